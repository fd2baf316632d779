"""Tiny random models of every supported MoE family, for the tests (built from transformers' config classes).

`tiny(family, dtype, kernel)`: 3 decoder layers, 8 experts, hidden 64, routers random (some transformers
versions initialise them to zero: every expert would tie) and score-correction biases random (zero at init:
a rule that ignored them would pass unnoticed). `random_adapters(model)`: untrained M2R2 adapters saved with
the model's fingerprint, as `train-adapters` would write them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from m2r2_moe.models import find_moe_layers
from m2r2_moe.predict import AcceleratorAdapters, model_fingerprint

COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# multi-head latent attention has no grouped KV heads (with 2 of 4, a padded batch's mask does not broadcast)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4)
# family -> (config overrides, adapter expected, decoder indices of the MoE layers, has shared experts)
FAMILIES = {
    "mixtral": (dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32), "mixtral", [0, 1, 2], False),
    "qwen2_moe": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                       shared_expert_intermediate_size=48, mlp_only_layers=[1]), "qwen2_moe", [0, 2], True),
    "qwen3_moe": (dict(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32, intermediate_size=64,
                       head_dim=16, norm_topk_prob=True), "qwen3_moe", [0, 1, 2], False),
    "olmoe": (dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32), "olmoe", [0, 1, 2], False),
    "deepseek_v2": (dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                         first_k_dense_replace=1, n_shared_experts=1, topk_method="group_limited_greedy", n_group=4,
                         topk_group=1, routed_scaling_factor=1.5, q_lora_rank=None, **MLA),
                    "deepseek_v2", [1, 2], True),
    "deepseek_v3": (dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, intermediate_size=64,
                         first_k_dense_replace=1, n_shared_experts=1, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, q_lora_rank=24, **MLA), "deepseek_v3", [1, 2], True),
    "gpt_oss": (dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16, sliding_window=6),
                "gpt_oss", [0, 1, 2], False),
    "phimoe": (dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32), "phimoe", [0, 1, 2], False),
    "glm4_moe": (dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                      first_k_dense_replace=1, n_shared_experts=1, n_group=2, topk_group=1, head_dim=16),
                 "generic", [1, 2], True),
    "minimax_m2": (dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16),
                   "generic", [0, 1, 2], False),
    "flex_olmo": (dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32), "generic", [0, 1, 2], False),
}
_ADAPTERS_DIR = Path(tempfile.mkdtemp(prefix="m2r2_test_adapters_"))


def randomize_routers(model, layers) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            layer.router.weight.normal_(0, 0.1, generator=generator)
        for name, buf in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape, generator=generator) * 0.2 - 0.1)


def tiny(family: str, dtype=torch.bfloat16, experts_implementation: str | None = None, **overrides):
    """A 3-layer, 8-expert, hidden-64 random model of `family`."""
    config = CONFIG_MAPPING[family](**{**COMMON, **FAMILIES[family][0], **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    randomize_routers(model, find_moe_layers(model)[1])
    model = model.to(dtype)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model


def random_adapters(model, depth: int = 2, rank: int = 4) -> str:
    """Path of untrained M2R2 adapters for `model` (random maps: predictions are arbitrary, copies are real)."""
    layers = find_moe_layers(model)[1]
    adapters = AcceleratorAdapters(len(layers), model.config.hidden_size, depth=depth, rank=rank)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in (adapters.U, adapters.V):
            p.normal_(0, 0.3, generator=generator)
    fingerprint = model_fingerprint(model, layers)
    path = _ADAPTERS_DIR / f"{fingerprint}.safetensors"
    if not path.exists():
        adapters.save(path, fingerprint)
    return str(path)
