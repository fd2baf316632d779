"""Routing-trace recorder on tiny random models.

Invariants:
- the recorded experts of every token and MoE layer are exactly the top-k of that layer's router
  applied by hand to the hidden state entering the MoE block (captured independently);
- the recorded probabilities are the softmax of those router logits;
- save/load (safetensors and npz) round-trips every field bit for bit;
- routers are found generically (Mixtral `.gate`, GPT-OSS `.router`), in layer order.
"""

from __future__ import annotations

import pytest
import torch

from m2r2_moe.profile.trace import RouterRecorder, RoutingTrace, find_routers, record_trace

transformers = pytest.importorskip("transformers")


def tiny_mixtral(seed: int = 0, layers: int = 3):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                           num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    # Random init routes almost uniformly; sharper routers make ties impossible and the test meaningful.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    return model


def routing_by_hand(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, L, K] top-k and [T, L, E] softmax recomputed from each MoE block's input."""
    inputs = []
    handles = [layer.mlp.register_forward_hook(lambda _m, args, _o: inputs.append(args[0]))
               for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids.unsqueeze(0), use_cache=False)
    for h in handles:
        h.remove()
    experts, probs = [], []
    for layer, hidden in zip(model.model.layers, inputs):
        logits = hidden.reshape(-1, hidden.shape[-1]) @ layer.mlp.gate.weight.T  # [T, E]
        p = logits.float().softmax(-1)
        experts.append(p.topk(model.config.num_experts_per_tok, dim=-1).indices)
        probs.append(p)
    return torch.stack(experts, 1), torch.stack(probs, 1)


def test_choices_equal_router_topk_by_hand():
    model = tiny_mixtral()
    seqs = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 19)]
    trace = record_trace(model, seqs)
    assert trace.experts.shape == (26, 3, 2) and trace.probs.shape == (26, 3, 6)
    assert trace.layers == [0, 1, 2]
    assert trace.sequence.tolist() == [0] * 7 + [1] * 19
    assert torch.equal(trace.token_ids, torch.cat(seqs))
    for i, seq in enumerate(seqs):
        experts, probs = routing_by_hand(model, seq)
        part = trace.sequences()[i]
        assert torch.equal(part.experts, experts)
        torch.testing.assert_close(part.probs, probs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(trace.probs.sum(-1), torch.ones(26, 3))


def test_batch_tensor_equals_list_of_rows():
    model = tiny_mixtral(seed=1)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(3))
    a, b = record_trace(model, ids), record_trace(model, list(ids))
    assert torch.equal(a.experts, b.experts) and torch.equal(a.sequence, b.sequence)


def test_recorder_during_generate_covers_every_token():
    model = tiny_mixtral(seed=2)
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(5))
    with RouterRecorder(model) as rec:
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        experts, _ = rec.take()
    # The prompt in one prefill forward, then one token per decode step; the last generated token is
    # never fed back, so it has no routing.
    assert experts.shape == (out.shape[1] - 1, 3, 2)
    by_hand, _ = routing_by_hand(model, out[0, :-1])
    assert torch.equal(experts, by_hand)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_load_round_trip(tmp_path, suffix):
    model = tiny_mixtral()
    trace = record_trace(model, [torch.arange(9), torch.arange(20, 33)], model_name="tiny")
    trace.meta["note"] = "round trip"
    path = tmp_path / f"trace{suffix}"
    trace.save(path)
    back = RoutingTrace.load(path)
    for name in ("experts", "probs", "token_ids", "sequence"):
        assert torch.equal(getattr(back, name), getattr(trace, name)), name
    assert (back.layers, back.model_name, back.meta) == (trace.layers, "tiny", {"note": "round trip"})
    assert back.experts.dtype == torch.int64 and back.probs.dtype == torch.float32


def test_bad_suffix_and_foreign_file(tmp_path):
    from safetensors.torch import save_file

    trace = record_trace(tiny_mixtral(), torch.arange(4))
    with pytest.raises(ValueError, match="unknown trace format"):
        trace.save(tmp_path / "t.pt")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a routing trace"):
        RoutingTrace.load(tmp_path / "other.safetensors")


def test_find_routers_generic_names():
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).eval()
    routers = find_routers(model)
    assert [layer for layer, _, _ in routers] == [0, 1]
    assert all(router is model.model.layers[i].mlp.router for i, router, _ in routers)
    trace = record_trace(model, torch.arange(6))
    assert trace.experts.shape == (6, 2, 2) and trace.num_experts == 4


def test_no_moe_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="no MoE blocks"):
        find_routers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
