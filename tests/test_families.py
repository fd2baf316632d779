"""Every supported MoE family offloads, keeps its shared experts resident, and routes as itself.

Invariants, per family (tiny random model built from the family's transformers config class, tests/families.py;
that its outputs are bit-identical is tests/test_lossless.py's matrix):
- only routed experts go to the host store; shared experts (and their gates) stay in the model;
- MoE-layer indices skip dense layers (DeepSeek's first layers, Qwen2-MoE's mlp_only_layers);
- `adapter.route(layer, block input)` returns the block's own top-k and scores that rank it first and
  form a distribution; the `gate` predictor (router of layer l+1 on layer l's residual) has a recall in
  [0, 1] and calls `route` for every target layer while it prefetches;
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
from families import COMMON, FAMILIES, randomize_routers, tiny
from m2r2_moe.errors import UnsupportedModelError
from m2r2_moe.models import find_moe_layers
from m2r2_moe.predict import make_predictor

pytestmark = pytest.mark.lossless  # the gate test checks outputs too


def _routed_expert_bytes(snap):
    return sum(v.numel() * v.element_size() for k, v in snap.items() if ".experts." in k)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routed_experts_offloaded_shared_resident_and_restored(family):
    _, adapter_name, decoder_indices, has_shared = FAMILIES[family]
    model = tiny(family)
    snap = snapshot(model)
    adapter, layers = find_moe_layers(model)
    assert adapter.name == adapter_name
    assert [layer.decoder_index for layer in layers] == decoder_indices
    assert [layer.index for layer in layers] == list(range(len(layers)))
    assert all(bool(layer.shared) == has_shared for layer in layers)
    m2r2_moe.offload(model, device="cpu", cache_experts=adapter.top_k(model))
    try:
        offloader = m2r2_moe.get_offloader(model)
        assert offloader.store.nbytes == _routed_expert_bytes(snap)  # routed experts only
        for layer in offloader.layers:
            assert all(p.numel() == 0 for n, p in layer.experts.named_parameters())
            assert all(p.numel() > 0 for shared in layer.shared for p in shared.parameters())
        with torch.no_grad():
            model(input_ids=torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2)))
    finally:
        m2r2_moe.remove_offload(model)
    assert same_weights(model, snap)


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
