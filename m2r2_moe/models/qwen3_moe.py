"""Qwen3-MoE (`Qwen3MoeForCausalLM`): `layers[i].mlp` is a `Qwen3MoeSparseMoeBlock` with a softmax top-k
router `gate` (`Qwen3MoeTopKRouter`) and fused `experts` (`Qwen3MoeExperts`); no shared expert.
`norm_topk_prob` renormalises the top-k weights only, not the choice, so route() scores are the softmax.
`mlp_only_layers` / `decoder_sparse_step` layers are dense and are not MoE layers."""

from __future__ import annotations

from .base import MoEAdapter


class Qwen3MoeAdapter(MoEAdapter):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
