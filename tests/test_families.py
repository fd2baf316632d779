"""Every supported MoE family offloads losslessly, keeps its shared experts resident, and routes as itself.

Invariants, per family (tiny random model built from the family's transformers config class):
- logits and greedy tokens are bit-identical (torch.equal) to the un-offloaded model at cache_experts =
  top-k (prefill needs more experts than slots: waves), a middle size and all experts, over the emulated
  link;
- only routed experts go to the host store; shared experts (and their gates) stay in the model;
- MoE-layer indices skip dense layers (DeepSeek's first layers, Qwen2-MoE's mlp_only_layers);
- `adapter.route(layer, block input)` returns the block's own top-k and scores that rank it first and
  form a distribution; the `gate` predictor (router of layer l+1 on layer l's residual) has a recall in
  [0, 1];
- `remove_offload` gives back a bit-identical state_dict.
Three families without a dedicated adapter go through the generic path: GLM-4-MoE (DeepSeek-V3-style
router), MiniMax-M2 (correction bias kept on the block), FlexOlmo (post-norms: no pre-MoE norm).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import m2r2_moe
from conftest import same_weights, snapshot
from m2r2_moe.errors import UnsupportedModelError
from m2r2_moe.models import find_moe_layers
from m2r2_moe.predict import make_predictor

pytestmark = pytest.mark.lossless  # CI repeats these at other thread counts

COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
# family -> (config overrides, adapter expected, decoder indices of the MoE layers, has shared experts)
FAMILIES = {
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


def randomize_routers(model, layers) -> None:
    """Router weights random (some transformers versions leave them zero: every expert would tie) and
    score-correction biases random (zero at init: a rule that ignores them would pass unnoticed)."""
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


def _run(model, ids, prompt):
    """Prefill logits of `ids` [2, T] and greedy generation (tokens and scores) from `prompt` [1, T']."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        gen = model.generate(input_ids=prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    return logits, gen.sequences, gen.scores


def _routed_expert_bytes(snap):
    return sum(v.numel() * v.element_size() for k, v in snap.items() if ".experts." in k)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_offload_bit_identical_shared_resident_and_restored(family):
    _, adapter_name, decoder_indices, has_shared = FAMILIES[family]
    model = tiny(family)
    snap = snapshot(model)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    prompt = ids[:1, :6]
    ref_logits, ref_tokens, ref_scores = _run(model, ids, prompt)
    adapter, layers = find_moe_layers(model)
    assert adapter.name == adapter_name
    assert [layer.decoder_index for layer in layers] == decoder_indices
    assert [layer.index for layer in layers] == list(range(len(layers)))
    assert all(bool(layer.shared) == has_shared for layer in layers)
    top_k = adapter.top_k(model)
    for cache in (top_k, top_k + 2, 8 * len(layers)):
        m2r2_moe.offload(model, device="cpu", cache_experts=cache, link_gbps=2.0)
        try:
            offloader = m2r2_moe.get_offloader(model)
            assert offloader.store.nbytes == _routed_expert_bytes(snap)  # routed experts only
            for layer in offloader.layers:
                assert all(p.numel() == 0 for n, p in layer.experts.named_parameters())
                assert all(p.numel() > 0 for shared in layer.shared for p in shared.parameters())
            logits, tokens, scores = _run(model, ids, prompt)
            stats = m2r2_moe.stats(model)
        finally:
            m2r2_moe.remove_offload(model)
        assert torch.equal(logits, ref_logits), (family, cache)
        assert torch.equal(tokens, ref_tokens) and all(torch.equal(a, b) for a, b in zip(scores, ref_scores))
        if cache == top_k:
            assert stats.waves > stats.layer_calls  # prefill needed more experts than slots
        assert same_weights(model, snap)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "deepseek_v3"])
def test_eager_kernel_bit_identical_in_waves(family):
    """eager with waves: GPT-OSS's kernel has no sentinel; top-k > 2 adds in expert order (fp32 here)."""
    model = tiny(family, torch.float32, "eager")
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    m2r2_moe.offload(model, device="cpu", cache_experts=find_moe_layers(model)[0].top_k(model))
    try:
        with torch.no_grad():
            out = model(input_ids=ids).logits
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_route_is_the_blocks_choice_and_gate_recall(family):
    model = tiny(family)
    adapter, layers = find_moe_layers(model)
    seen = [{} for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        residual_source = layer.norm if layer.norm is not None else layer.block  # FlexOlmo: the block reads r_l
        hooks.append(residual_source.register_forward_pre_hook(lambda m, a, i=i: seen[i].__setitem__("residual", a[0])))
        hooks.append(layer.block.register_forward_pre_hook(lambda m, a, i=i: seen[i].__setitem__("input", a[0])))
        hooks.append(layer.experts.register_forward_pre_hook(lambda m, a, i=i: seen[i].__setitem__("chosen", a[1])))
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(4)))
    finally:
        for h in hooks:
            h.remove()
    top_k = adapter.top_k(model)
    for i, layer in enumerate(layers):
        x = seen[i]["input"]
        chosen = seen[i]["chosen"]  # [T, K] what the block ran
        with torch.no_grad():
            scores, picked = adapter.route(layer, x.reshape(-1, x.shape[-1]))
        assert picked.shape == chosen.shape == (24, top_k)
        assert torch.equal(picked.sort(-1).values, chosen.sort(-1).values)
        assert scores.dtype == torch.float32 and scores.shape == (24, 8)
        assert bool((scores >= 0).all()) and torch.allclose(scores.sum(-1), torch.ones(24))
        ranked = scores.topk(top_k, dim=-1).indices.sort(-1).values
        assert torch.equal(ranked, chosen.sort(-1).values)
    gate = make_predictor("gate", model, adapter, layers, depth=1)
    for i in range(len(layers) - 1):
        r = seen[i]["residual"]
        with torch.no_grad():
            predicted = gate.predict(i, r.reshape(-1, r.shape[-1]))[1].topk(top_k, dim=-1).indices  # [T, K]
        used = seen[i + 1]["chosen"]
        recall = (predicted.unsqueeze(-1) == used.unsqueeze(-2)).any(-2).float().mean().item()
        assert 0.0 <= recall <= 1.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gate_predictor_prefetches_through_route_losslessly(family, monkeypatch):
    """predictor='gate' calls route() on every layer's residual during decode: tokens unchanged."""
    model = tiny(family)
    prompt = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(input_ids=prompt, **kwargs)
    adapter = find_moe_layers(model)[0]
    calls = []
    route = adapter.route
    monkeypatch.setattr(adapter, "route", lambda layer, hidden: calls.append(layer.index) or route(layer, hidden))
    m2r2_moe.offload(model, device="cpu", cache_experts=adapter.top_k(model) + 2, predictor="gate", lookahead=1,
                     link_gbps=2.0)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=prompt, **kwargs)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out, ref)
    assert set(calls) == set(range(1, len(find_moe_layers(model)[1])))  # every target layer was predicted


def test_unsupported_experts_class_is_refused_at_offload_naming_it():
    """Llama-4's experts keep fused tensors but run their own dense forward: refused, model untouched."""
    config = CONFIG_MAPPING["llama4_text"](**COMMON, num_local_experts=4, num_experts_per_tok=1, intermediate_size=32,
                                           intermediate_size_mlp=64, head_dim=16)
    model = AutoModelForCausalLM.from_config(config).eval()
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="Llama4TextExperts"):
        m2r2_moe.offload(model, device="cpu")
    assert same_weights(model, snap) and not m2r2_moe.is_offloaded(model)


def test_unknown_routing_rule_is_refused_by_route():
    """ERNIE-4.5-MoE adds its correction bias inside the router (moe_statics): the generic scores cannot
    rank its choice, so route() refuses instead of feeding predictors wrong experts. Offload still works."""
    config = CONFIG_MAPPING["ernie4_5_moe"](**COMMON, moe_num_experts=8, moe_k=2, moe_intermediate_size=32,
                                            intermediate_size=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    adapter, layers = find_moe_layers(model)
    randomize_routers(model, layers)
    with torch.no_grad():
        for layer in layers:
            bias = layer.router.moe_statics.e_score_correction_bias
            bias.copy_(torch.linspace(0.5, -0.5, bias.numel()).view_as(bias))
        hidden = torch.randn(16, 64)
        with pytest.raises(UnsupportedModelError, match="Ernie4_5_MoeTopKRouter"):
            adapter.route(layers[0], hidden)
