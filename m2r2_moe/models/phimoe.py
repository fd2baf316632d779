"""Phi-MoE (`PhimoeForCausalLM`): `layers[i].mlp` is a `PhimoeSparseMoeBlock` with a `router`
(`PhimoeTopKRouter`, an `nn.Linear`) and fused `experts` (`PhimoeExperts`).

The router's sparsemixer picks the arg-max expert, then the arg-max of the rest (jitter sampling only in
training), so it always uses two experts whatever `num_experts_per_tok` says, and the pick is the top-2 of
the logits: route() scores are the softmax of the logits. The weights (masked softmaxes) are the router's
own business."""

from __future__ import annotations

from torch import nn

from .base import MoEAdapter


class PhimoeAdapter(MoEAdapter):
    name = "phimoe"
    model_types = ("phimoe",)

    def top_k(self, model: nn.Module) -> int:
        return 2  # sparsemixer is top-2 by construction
