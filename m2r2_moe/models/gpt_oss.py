"""GPT-OSS (`GptOssForCausalLM`): `layers[i].mlp` is a `GptOssMLP` with a `router` (`GptOssTopKRouter`:
linear with bias, top-k of the logits, softmax over the k picked) and `experts` (`GptOssExperts`).

The experts layout differs from the other families, but the class says so to transformers
(`@use_experts_implementation(is_concatenated=False, is_transposed=True, has_bias=True)`) and the
runtime runs the class's own kernels: `gate_up_proj [E, H, 2I]` (transposed, gate/up interleaved
column by column), `down_proj [E, I, H]`, per-expert biases `gate_up_proj_bias [E, 2I]` and
`down_proj_bias [E, H]` (moved with their expert), and the clamped SwiGLU `_apply_gate`
(limit `swiglu_limit`, alpha `swiglu_alpha`). route() scores: the softmax over all logits (bias
included), which ranks experts as the router's top-k of the logits does."""

from __future__ import annotations

from .base import MoEAdapter


class GptOssAdapter(MoEAdapter):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
