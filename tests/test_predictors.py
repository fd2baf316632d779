"""Predictors: well-formed outputs, gate by hand, adapters files, identity sanity, lossless prefetching."""

import numpy as np
import pytest
import torch

import m2r2_moe
from m2r2_moe.profile import Recorder
from conftest import tiny_mixtral
from m2r2_moe.models import find_moe_layers
from m2r2_moe.predict import (AcceleratorAdapters, AdapterFileError, AdapterMismatchError, OraclePredictor,
                              make_predictor, model_fingerprint, select)
from m2r2_moe.predict.collect import chunk_tokens, collect
from m2r2_moe.predict.evaluate import evaluate
from m2r2_moe.predict.train import train_adapters

DEPTH = 2


@pytest.fixture(scope="module")
def trained():
    """A tiny model with adapters trained on a little random-token text (module-scoped: trained once)."""
    model = tiny_mixtral(layers=4)
    adapter, layers = find_moe_layers(model)
    ids = torch.randint(3, 96, (1024,), generator=torch.Generator().manual_seed(0))
    adapters, report = train_adapters(model, adapter, layers, chunk_tokens(ids, 64, 4), depth=DEPTH, rank=8,
                                      kl_steps=20, kl_samples=512, route_features=True, progress=False)
    return model, adapter, layers, adapters, report


def test_select_width_and_mass():
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.97, 0.01, 0.01, 0.01]])
    assert select(scores, width=2).sum(-1).tolist() == [2, 2]
    widened = select(scores, mass=0.85, cap=3)
    assert widened[0].tolist() == [True, True, True, False]  # 0.5 + 0.3 < 0.85 → a third expert
    assert widened[1].tolist() == [True, False, False, False]  # one expert already carries the mass
    with pytest.raises(ValueError):
        select(scores)


def test_predictors_are_well_formed(trained):
    model, adapter, layers, adapters, _ = trained
    residual = torch.randn(5, 64)
    chosen = torch.randint(0, 8, (5, 2))
    for name, kind in (("history", None), ("gate", None), ("m2r2", "linear"), ("m2r2", "mlp")):
        p = make_predictor(name, model, adapter, layers, DEPTH, adapters=adapters, kind=kind)
        out = p.predict(0, residual, chosen)
        assert sorted(out) == [1, 2]
        for scores in out.values():
            assert scores.shape == (5, 8) and torch.isfinite(scores).all()
        last = p.predict(len(layers) - 1, residual, chosen)
        if p.wraps:  # the heads wrap: from the last layer, the next token's first layers
            assert kind == "mlp" and sorted(last) == [1, 2]
        else:
            assert sorted(p.predict(len(layers) - 2, residual, chosen)) == [1]  # no target beyond the last layer
            assert last == {}
    m2r2 = make_predictor("m2r2", model, adapter, layers, DEPTH, adapters=adapters, kind="linear")
    with pytest.raises(ValueError, match="expert choice"):
        m2r2.predict(0, residual)  # routing-feature adapters need the source layer's choice


def test_gate_depth1_equals_hand_computation(trained):
    model, adapter, layers, _, _ = trained
    gate = make_predictor("gate", model, adapter, layers, DEPTH)
    r = torch.randn(3, 64)
    nxt = model.model.layers[2]
    hand = torch.softmax(torch.nn.functional.linear(nxt.post_attention_layernorm(r), nxt.mlp.gate.weight), dim=-1)
    assert torch.allclose(gate.predict(1, r)[1], hand)


def test_adapters_round_trip_and_errors(trained, tmp_path):
    model, adapter, layers, adapters, report = trained
    path = tmp_path / "a.safetensors"
    fingerprint = model_fingerprint(model, layers)
    adapters.save(path, fingerprint, {"report": report["mean_final"]})
    loaded = AcceleratorAdapters.load(path, fingerprint=fingerprint)
    assert all(torch.equal(getattr(loaded, n), getattr(adapters, n)) for n in ("U", "V", "b"))
    assert loaded.meta["info"]["report"] == pytest.approx(report["mean_final"])
    half = tmp_path / "half.safetensors"
    adapters.save(half, fingerprint, dtype=torch.bfloat16)  # the tensors rounded once, read back as float32
    back = AcceleratorAdapters.load(half, fingerprint=fingerprint)
    pairs = [(getattr(back, n), getattr(adapters, n)) for n in ("U", "V", "b")]
    if adapters.mlp is not None:
        pairs += [(getattr(back.mlp, n), getattr(adapters.mlp, n)) for n in ("w1", "w2")]
    assert all(b.dtype == torch.float32 and torch.equal(b, a.detach().bfloat16().float()) for b, a in pairs)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    other = tiny_mixtral(layers=4, seed=1)
    with pytest.raises(AdapterMismatchError, match="trained for another model"):
        m2r2_moe.offload(other, device="cpu", predictor="m2r2", adapters=str(path))
    assert not m2r2_moe.is_offloaded(other)  # nothing changed
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        AcceleratorAdapters.load(corrupt)
    with pytest.raises(AdapterFileError, match="does not exist"):
        AcceleratorAdapters.load(tmp_path / "missing.safetensors")
    with pytest.raises(AdapterFileError, match="adapters=PATH"):
        make_predictor("m2r2", model, adapter, layers, DEPTH)  # not the built-in model: no default adapters


def test_the_default_lookahead_is_4_or_the_adapters_depth(trained, tmp_path, caplog):
    """`lookahead=None` (the default): 4, or m2r2's adapters' depth when less (no warning: nobody asked for 4); a
    number is kept, capped (with a warning) at the adapters' depth; deeper adapters look farther only when asked."""
    from m2r2_moe.config import DEFAULT_LOOKAHEAD, OffloadConfig

    def looks(model, **kwargs) -> int:
        m2r2_moe.offload(model, device="cpu", **kwargs)
        try:
            off = m2r2_moe.get_offloader(model)
            assert off.prefetcher.predictor.depth == off.plan.lookahead, kwargs
            return off.plan.lookahead
        finally:
            m2r2_moe.remove_offload(model)

    model, adapter, layers, adapters, report = trained
    path = tmp_path / "a.safetensors"
    adapters.save(path, model_fingerprint(model, layers), {})
    assert OffloadConfig().lookahead is None and DEFAULT_LOOKAHEAD == 4
    with caplog.at_level("WARNING", logger="m2r2_moe.config"):
        assert looks(model, predictor="m2r2", adapters=str(path)) == DEPTH
        assert "trained to predict" not in caplog.text
        assert looks(model, predictor="m2r2", adapters=str(path), lookahead=1) == 1
        assert looks(model, predictor="history") == DEFAULT_LOOKAHEAD
        assert looks(model, predictor="gate", lookahead=3) == 3
        assert looks(model, predictor=OraclePredictor(4, 8, 2, 3, torch.zeros(1, 4, 2, dtype=torch.long))) == 3
        assert looks(model, predictor="m2r2", adapters=str(path), lookahead=DEPTH + 1) == DEPTH
        assert "trained to predict 2 layers" in caplog.text
    deep, _ = m2r2_moe.load_builtin()  # its shipped adapters predict 7 layers ahead
    assert looks(deep, predictor="m2r2") == DEFAULT_LOOKAHEAD and looks(deep, predictor="m2r2", lookahead=7) == 7


def test_closed_form_improves_on_gate_in_training(trained):
    report = trained[4]
    assert report["mean_final"]["nmse"] < 1.0  # better than not accelerating at all (r̂ = r_l)
    assert report["mean_final"]["recall_topk"] >= report["mean_final"]["gate_recall_topk"] - 0.02


def test_identity_like_layers_m2r2_at_least_gate():
    """When layers barely change the residual, gate is almost exact; m2r2 must not be worse."""
    model = tiny_mixtral(layers=4, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.experts.down_proj.mul_(0.01)
    adapter, layers = find_moe_layers(model)
    ids = torch.randint(3, 96, (1536,), generator=torch.Generator().manual_seed(1))
    adapters, _ = train_adapters(model, adapter, layers, chunk_tokens(ids[:1024], 64, 4), depth=DEPTH, rank=8,
                                 kl_steps=0, progress=False)
    preds = {n: make_predictor(n, model, adapter, layers, DEPTH, adapters=adapters) for n in ("gate", "m2r2")}
    res = evaluate(preds, collect(model, layers, chunk_tokens(ids[1024:], 64, 1)), top_k=2, depth=DEPTH, widths=[2])
    for d in (1, 2):
        assert res["gate"][d]["recall"] > 0.8
        assert res["m2r2"][d]["recall"] >= res["gate"][d]["recall"] - 0.01


@pytest.mark.parametrize("name", ["history", "gate", "m2r2", "oracle"])
def test_prefetching_never_changes_outputs(trained, name, admit_every_prediction):
    model, adapter, layers, adapters, _ = trained
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(7))
    gen = dict(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**gen, output_scores=True, return_dict_in_generate=True)
    if name == "oracle":
        trace = torch.stack([c for c in _chosen_per_position(model, layers, ref.sequences)])
        predictor = OraclePredictor(len(layers), 8, 2, DEPTH, trace)
    else:
        predictor = make_predictor(name, model, adapter, layers, DEPTH, adapters=adapters)
    # every prediction prefetched (the fixture): this test is about the copies prefetching makes
    m2r2_moe.offload(model, device="cpu", cache_experts=6, link_gbps=0.2, predictor=predictor)
    try:
        with torch.no_grad():
            out = model.generate(**gen, output_scores=True, return_dict_in_generate=True)
        s = m2r2_moe.stats(model)
        expert_bytes = m2r2_moe.get_offloader(model).expert_bytes[0]
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))
    assert s.prefetches > 0
    assert s.bytes_to_device == (s.misses + s.prefetches - s.cancelled_prefetches) * expert_bytes
    if name == "oracle":  # replaying the true routing removes demand loads against on-demand loading
        m2r2_moe.offload(model, device="cpu", cache_experts=6, link_gbps=0.2)
        try:
            with torch.no_grad():
                model.generate(**gen)
            on_demand = m2r2_moe.stats(model)
        finally:
            m2r2_moe.remove_offload(model)
        assert s.misses < 0.7 * on_demand.misses and s.prefetch_hits + s.late_prefetches > 0


def test_oracle_across_the_token_boundary_covers_the_first_layers(trained, admit_every_prediction):
    """`oracle-wrap` also prefetches the next token's first layers, which no within-token prediction reaches:
    in decode, layer 0's uses become prefetch hits or late prefetches instead of misses, more than with the
    prefetcher's own prior for the next token; outputs identical."""
    model, adapter, layers, adapters, _ = trained
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    gen = dict(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**gen)
    trace = _chosen_per_position(model, layers, ref)
    first_layer = {}
    for wrap in (False, True):
        predictor = OraclePredictor(len(layers), 8, 2, DEPTH, trace, wrap=wrap)
        assert predictor.name == ("oracle-wrap" if wrap else "oracle") and list(predictor.depths(len(layers) - 1)) == (
            list(range(1, DEPTH + 1)) if wrap else [])
        m2r2_moe.offload(model, device="cpu", cache_experts=6, link_gbps=0.2, predictor=predictor)
        try:
            rec = Recorder(m2r2_moe.get_offloader(model))
            with torch.no_grad():
                out = model.generate(**gen)
            rec.detach()
        finally:
            m2r2_moe.remove_offload(model)
        assert torch.equal(out, ref)
        decode0 = [e for e in rec.decode_layers() if e.layer == 0]
        first_layer[wrap] = (sum(e.prefetch_hits + e.late_prefetches for e in decode0), sum(e.misses for e in decode0))
    # without wrapping only the prior (each layer's recent use) reaches past the last layer; the exact
    # cross-token prediction covers more of layer 0
    assert first_layer[True][0] > 0
    assert first_layer[True][1] < first_layer[False][1]


def _chosen_per_position(model, layers, sequences):
    """[N, L, K] experts per token position of a full sequence (what the oracle replays)."""
    _, chosen = next(collect(model, layers, [sequences[:, :-1]]))  # [L, N, K]
    return chosen.permute(1, 0, 2)


def test_stacked_routing_matches_the_reference_path(trained):
    """The batched fast path of gate/m2r2 gives the reference's scores (and is used on Mixtral)."""
    model, adapter, layers, adapters, _ = trained
    for name in ("gate", "m2r2"):
        kind = "linear" if name == "m2r2" else None  # the accelerated residual, routed by the target's router
        p = make_predictor(name, model, adapter, layers, DEPTH, adapters=adapters, kind=kind)
        assert all(s is not None for s in p.stacked[: len(layers) - 1])
        r, chosen = torch.randn(4, 64), torch.randint(0, 8, (4, 2))
        fast = p.predict(0, r, chosen)
        if name == "m2r2":  # reference: one adapter and one routing call per depth
            ref = {d: p.target_scores(d, p.accelerate(0, d, r, chosen)) for d in p.depths(0)}
        else:
            ref = {d: p.target_scores(d, r) for d in p.depths(0)}
        assert sorted(fast) == sorted(ref)
        assert all(torch.allclose(fast[d], ref[d], atol=1e-5) for d in ref)
        # the prefetcher's per-layer path (stacked tensor, fused adapters, the model's own normed input)
        depths, stacked = p.predict_stacked(0, r, chosen, normed=layers[0].norm(r))
        assert depths == sorted(ref) and stacked.shape == (len(depths), 4, 8)
        assert all(torch.allclose(stacked[i], ref[d], atol=1e-5) for i, d in enumerate(depths))


def test_the_oracle_predicts_its_experts_with_certainty():
    """The oracle's scores are probabilities of use (1 for the recorded experts), not shares of the top-k:
    the prefetcher's admission threshold, below 1 on any link, never throttles a perfect prediction."""
    trace = torch.tensor([[[1, 3], [0, 2]]])  # [N=1, L=2, K=2]
    oracle = OraclePredictor(2, 4, 2, 1, trace)
    depths, scores = oracle.predict_stacked(0, torch.zeros(1, 8))
    assert oracle.scores_are_probabilities and depths == [1]
    assert scores[0, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_gate_shared_residual_path_matches_the_reference(trained):
    """gate routes one residual through every target's router: the fused path (the norm once, one matmul for
    all targets) gives the reference's probabilities."""
    model, adapter, layers, _, _ = trained
    gate = make_predictor("gate", model, adapter, layers, DEPTH)
    residual = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    for layer in range(len(layers) - 1):
        depths, fast = gate.predict_stacked(layer, residual)
        assert gate.stacked[layer].scores_shared(residual) is not None  # the fused path was taken
        reference = torch.stack([gate.target_scores(layer + d, residual) for d in depths])
        assert torch.allclose(fast, reference, atol=1e-5, rtol=1e-4)


def test_gate_native_batch1_path_matches_the_tensor_path(trained):
    """Decode at batch 1 on the CPU: gate's one native call gives predict_stacked's probabilities."""
    from m2r2_moe import _ext

    if not _ext.HAS_PLANNER:
        pytest.skip(f"C++ heads: {_ext.PLANNER_ERROR}")
    model, adapter, layers, _, _ = trained
    gate = make_predictor("gate", model, adapter, layers, DEPTH)
    residual = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    for layer in range(len(layers) - 1):
        host = gate.predict_host(layer, residual)
        _, reference = gate.predict_stacked(layer, residual)
        assert host is not None and host.shape == tuple(reference[:, 0].shape)
        assert torch.allclose(torch.from_numpy(host), reference[:, 0], atol=2e-6, rtol=1e-4)
        assert np.array_equal(gate.predict_host(layer, residual.view(1, 1, 64)), host)  # as the model made it
    assert gate.predict_host(0, residual.expand(2, 64)) is None  # several tokens: the tensor path


@pytest.mark.parametrize("wrap", [False, True])
def test_the_oracles_host_rows_are_its_predictions(wrap):
    """The oracle's batch-1 host path (one numpy gather) gives `predict_stacked`'s rows, nearest `count` first,
    across the token boundary and past the trace's end alike."""
    layers, experts, top_k, depth = 4, 8, 2, 3
    trace = torch.randint(0, experts, (5, layers, top_k), generator=torch.Generator().manual_seed(0))
    oracle = OraclePredictor(layers, experts, top_k, depth, trace, wrap=wrap)
    for position in range(6):
        oracle.position = position
        for layer in range(layers):
            depths, scores = oracle.predict_stacked(layer, None)
            for count in (None, 1, 2, 9):
                rows = oracle.predict_host(layer, None, count=count)
                if not depths:
                    assert rows is None  # nothing ahead: the prefetcher predicts nothing here
                    continue
                want = scores[: count or len(depths), 0].numpy()
                assert rows.dtype == np.float32 and np.array_equal(rows, want), (position, layer, count)
                assert not rows.flags.writeable  # a view of the oracle's table: a caller cannot change it
    assert oracle.predict_host(0, torch.zeros(2, 4)) is None  # several tokens: the torch path
