"""DeepSeek-V2 and DeepSeek-V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`).

`layers[i].mlp` is a `DeepseekV2Moe` / `DeepseekV3MoE` from layer `first_k_dense_replace` on (the first
layers are dense MLPs: not MoE layers, so MoE layer 0 is decoder layer `first_k_dense_replace`), with a
router `gate`, fused `experts` and `shared_experts` (one MLP of `n_shared_experts` experts' width, run
for every token: resident on the device).

Routing differs from the softmax families:
- V2 (`DeepseekV2TopkRouter`): softmax; `topk_method="group_limited_greedy"` first keeps the
  `topk_group` groups whose best expert scores highest (of `n_group`), then takes the top-k inside them.
  The weights are scaled by `routed_scaling_factor` (weights only, not the choice).
- V3 (`DeepseekV3TopkRouter`): sigmoid scores; the choice ranks sigmoid + `e_score_correction_bias`,
  limited to the `topk_group` groups with the highest sum of their top two; the weights are the sigmoid
  of the picked experts, renormalised (`norm_topk_prob`) and scaled by `routed_scaling_factor`.
route() reproduces each choice rule as scores (see `routing.py`).
"""

from __future__ import annotations

import torch

from .base import MoEAdapter, MoELayer
from .routing import sigmoid_bias_scores, softmax_group_scores, softmax_scores


class DeepseekV2Adapter(MoEAdapter):
    name = "deepseek_v2"
    model_types = ("deepseek_v2",)

    def scores(self, layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
        router = layer.router
        if router.topk_method == "group_limited_greedy":
            return softmax_group_scores(logits, router.num_group, router.topk_group)
        return softmax_scores(logits)


class DeepseekV3Adapter(MoEAdapter):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def scores(self, layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
        router = layer.router
        return sigmoid_bias_scores(logits, router.e_score_correction_bias, router.num_group, router.topk_group)
