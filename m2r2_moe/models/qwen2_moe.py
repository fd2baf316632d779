"""Qwen2-MoE (`Qwen2MoeForCausalLM`): `layers[i].mlp` is a `Qwen2MoeSparseMoeBlock` with a softmax top-k
router `gate` (`Qwen2MoeTopKRouter`, renormalised when `norm_topk_prob`), fused `experts`
(`Qwen2MoeExperts`), and a shared expert: `shared_expert` (`Qwen2MoeMLP`) scaled by
sigmoid(`shared_expert_gate`). The shared expert and its gate run for every token, so they stay resident
on the device (`MoELayer.shared`). Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step`,
are dense `Qwen2MoeMLP`s and are not MoE layers."""

from __future__ import annotations

from .base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
