"""OLMoE (`OlmoeForCausalLM`): `layers[i].mlp` is an `OlmoeSparseMoeBlock` with a softmax top-k router
`gate` (`OlmoeTopKRouter`; `norm_topk_prob` is False in the released checkpoints, so the top-k weights
are the raw probabilities) and fused `experts` (`OlmoeExperts`). Every layer is an MoE layer."""

from __future__ import annotations

from .base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    name = "olmoe"
    model_types = ("olmoe",)
