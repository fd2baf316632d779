"""Model-family adapters: the only place that knows where a family keeps its MoE blocks."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import BLOCK_NAMES, MoEAdapter, MoELayer, expert_param_bytes, shared_param_bytes
from .deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from .gpt_oss import GptOssAdapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .phimoe import PhimoeAdapter
from .qwen2_moe import Qwen2MoeAdapter
from .qwen3_moe import Qwen3MoeAdapter

ADAPTERS: list[MoEAdapter] = [
    MixtralAdapter(), Qwen2MoeAdapter(), Qwen3MoeAdapter(), OlmoeAdapter(), DeepseekV2Adapter(), DeepseekV3Adapter(),
    GptOssAdapter(), PhimoeAdapter(),
]
GENERIC = MoEAdapter()  # any other family whose experts follow the fused layout


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
        decoder = adapter.decoder_layers(model)
        children = ", ".join(f"{n} ({type(m).__name__})" for n, m in decoder[-1].named_children()) if decoder else ""
        raise UnsupportedModelError(
            f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) has no sparse MoE blocks with "
            f"fused experts: no decoder layer has a child named one of {', '.join(BLOCK_NAMES)} with an `experts` "
            f"module (last decoder layer: {children}). There is nothing to offload."
        )
    return adapter, layers


__all__ = ["MoEAdapter", "MoELayer", "ADAPTERS", "GENERIC", "get_adapter", "find_moe_layers", "expert_param_bytes",
           "shared_param_bytes"]
