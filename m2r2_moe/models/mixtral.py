"""Mixtral (transformers `MixtralForCausalLM`): `layers[i].mlp` is a `MixtralSparseMoeBlock`
with `gate` (a `MixtralTopKRouter`: softmax, top-k, renormalised) and fused `experts`."""

from __future__ import annotations

from torch import nn

from .base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    name = "mixtral"

    def matches(self, model: nn.Module) -> bool:
        return getattr(model.config, "model_type", None) == "mixtral"
