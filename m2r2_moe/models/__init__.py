"""Model-family adapters: the only place that knows where a family keeps its MoE blocks."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import MoEAdapter, MoELayer, expert_param_bytes
from .mixtral import MixtralAdapter

ADAPTERS: list[MoEAdapter] = [MixtralAdapter()]
GENERIC = MoEAdapter()


def get_adapter(model: nn.Module) -> MoEAdapter:
    """The adapter for `model`'s family; the generic fused-layout adapter when none is dedicated."""
    if not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `config`: m2r2_moe.offload expects a transformers PreTrainedModel."
        )
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    return GENERIC


def find_moe_layers(model: nn.Module) -> tuple[MoEAdapter, list[MoELayer]]:
    adapter = get_adapter(model)
    layers = adapter.find_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) has no sparse MoE blocks with "
            "fused experts: there is nothing to offload."
        )
    return adapter, layers


__all__ = ["MoEAdapter", "MoELayer", "get_adapter", "find_moe_layers", "expert_param_bytes"]
