"""Nonlinear accelerators (MLP heads): the fused decode path against the per-pair reference, wrapping into the
next token, learning what a linear map cannot (within the token and across it), the adapters file (versions,
kinds), the choice of the default kind, the next-token evaluation and the cost's arithmetic, and lossless
prefetching with heads that wrap."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.models import find_moe_layers
from m2r2_moe.predict import AcceleratorAdapters, AdapterFileError, MLPHeads, make_predictor, model_fingerprint
from m2r2_moe.predict.base import Predictor
from m2r2_moe.predict.collect import RoutingSet, RoutingSetBuilder, chunk_tokens, collect_normed
from m2r2_moe.predict.cost import mixtral_8x7b_active_params, predictor_cost, projected_flops
from m2r2_moe.predict.evaluate import evaluate_next_token
from m2r2_moe.predict.train import train_adapters
from m2r2_moe.predict.train_mlp import batch_targets, fit_heads, head_recalls, pair_table

DEPTH = 2


def random_heads(layers: int, hidden: int = 64, experts: int = 8, depth: int = DEPTH, wraps: bool = True, seed=0):
    heads = MLPHeads(layers, hidden, depth, 16, experts, wraps=wraps)
    heads.initialize(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        heads.w2.mul_(20)  # peaked predictions
        heads.b1.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return heads


@pytest.fixture(scope="module")
def model_and_layers():
    model = tiny_mixtral(layers=4)
    adapter, layers = find_moe_layers(model)
    return model, adapter, layers


def mlp_predictor(model, adapter, layers, wraps=True, depth=DEPTH):
    adapters = AcceleratorAdapters(len(layers), 64, depth, 4, mlp=random_heads(len(layers), depth=depth, wraps=wraps))
    return make_predictor("m2r2", model, adapter, layers, depth, adapters=adapters)


@pytest.mark.parametrize("wraps", [True, False])
def test_fused_heads_match_the_per_pair_reference(model_and_layers, wraps):
    model, adapter, layers = model_and_layers
    p = mlp_predictor(model, adapter, layers, wraps)
    assert p.kind == "mlp" and p.wraps == wraps and p.scores_are_probabilities
    residual = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    for layer in range(len(layers)):
        depths, scores = p.predict_stacked(layer, residual, normed=layers[layer].norm(residual))
        expected = list(range(1, DEPTH + 1)) if wraps else list(range(1, min(DEPTH, len(layers) - 1 - layer) + 1))
        assert depths == expected
        if not depths:
            assert scores is None
            continue
        assert scores.shape == (len(depths), 5, 8) and torch.allclose(scores.sum(-1), torch.ones(len(depths), 5))
        reference = torch.stack([p.head_scores(layer, d, residual) for d in depths])
        assert torch.allclose(scores, reference, atol=1e-6)
        assert sorted(p.predict(layer, residual)) == depths


@pytest.mark.parametrize("wraps", [True, False])
def test_heads_native_batch1_path_matches_the_tensor_path(model_and_layers, wraps):
    """Decode at batch 1 on the CPU: the heads' one native call gives predict_stacked's probabilities, from the
    normed residual when the caller has it and from the residual otherwise. The native call reads w1 and w2 in
    bfloat16 (`HOST_HEADS_BF16`): on weights that bfloat16 holds exactly the two agree within float32 rounding,
    and on any weights within the rounding of the weights."""
    from m2r2_moe import _ext
    from m2r2_moe.predict.m2r2 import HOST_HEADS_BF16

    if not _ext.HAS_PLANNER:
        pytest.skip(f"C++ heads: {_ext.PLANNER_ERROR}")
    assert HOST_HEADS_BF16
    model, adapter, layers = model_and_layers
    adapters = AcceleratorAdapters(len(layers), 64, DEPTH, 4, mlp=random_heads(len(layers), wraps=wraps))
    unrounded = make_predictor("m2r2", model, adapter, layers, DEPTH, adapters=adapters)
    exact = random_heads(len(layers), wraps=wraps)
    with torch.no_grad():
        for w in (exact.w1, exact.w2):
            w.copy_(w.to(torch.bfloat16).float())
    adapters = AcceleratorAdapters(len(layers), 64, DEPTH, 4, mlp=exact)
    p = make_predictor("m2r2", model, adapter, layers, DEPTH, adapters=adapters)
    residual = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))
    for layer in range(len(layers)):
        depths, reference = p.predict_stacked(layer, residual)
        normed = layers[layer].norm(residual)
        as_made = (residual.view(1, 1, 64), normed.view(1, 1, 64))  # the prefetcher's tap does not flatten them
        for host in (p.predict_host(layer, residual), p.predict_host(layer, residual, normed=normed),
                     p.predict_host(layer, as_made[0], normed=as_made[1])):
            if not depths:
                assert host is None
                continue
            assert host is not None and host.shape == tuple(reference[:, 0].shape)
            assert torch.allclose(torch.tensor(host), reference[:, 0], atol=2e-6, rtol=1e-4)
        if depths:  # unrounded float32 weights: the native probabilities within the weights' rounding
            assert torch.allclose(torch.tensor(unrounded.predict_host(layer, residual)),
                                  unrounded.predict_stacked(layer, residual)[1][:, 0], atol=0.02)
    assert p.predict_host(0, residual.expand(2, 64)) is None  # several tokens: the tensor path
    full = p.predict_host(0, residual).copy()  # the predictor's buffer: the calls below may write it again
    with pytest.raises(ValueError):  # read-only to callers
        p.predict_host(0, residual)[0, 0] = 1.0
    for count in range(1, len(full) + 2):  # only the nearest depths: the same rows, computed alone
        near = p.predict_host(0, residual, count=count)
        assert near.shape[0] == min(count, len(full)) and torch.equal(torch.tensor(near),
                                                                      torch.from_numpy(full[: len(near)]))
    adapters = AcceleratorAdapters(len(layers), 64, DEPTH, 4, mlp=random_heads(len(layers)))
    linear = make_predictor("m2r2", model, adapter, layers, DEPTH, adapters=adapters, kind="linear")
    assert linear.predict_host(0, residual) is None  # routed from the accelerated residual: no native path


@pytest.mark.parametrize("wraps", [True, False])
def test_the_planner_runs_the_heads_call_as_predict_host_would(model_and_layers, wraps):
    """`host_heads`: the prefetcher hands the planner (x, *call) and the planner runs the heads itself. The heads'
    output equals `predict_host`'s for every layer and count, and both planners (C++ and the Python twin) decide
    on a heads call exactly as on the array; a call of the wrong length is refused by both."""
    from m2r2_moe import _ext
    from m2r2_moe.predict.base import run_host_heads
    from m2r2_moe.runtime.planner import PlannerCore, make_planner

    if not _ext.HAS_PLANNER:
        pytest.skip(f"C++ heads: {_ext.PLANNER_ERROR}")
    model, adapter, layers = model_and_layers
    adapters = AcceleratorAdapters(len(layers), 64, DEPTH, 4, mlp=random_heads(len(layers), wraps=wraps))
    p = make_predictor("m2r2", model, adapter, layers, DEPTH, adapters=adapters)
    assert p.host_heads is not None and len(p.host_heads) == len(layers)
    normed = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(5))
    L, E = len(layers), 8
    planners = [(PlannerCore(L, E, E, 2, 8), PlannerCore(L, E, E, 2, 8)),
                (make_planner(L, E, E, 2, 8, native=True), make_planner(L, E, E, 2, 8, native=True))]
    checked = queued = 0
    for step in range(3):
        for layer in range(L):
            calls = p.host_heads[layer]
            assert (calls is None) == (not p.depths(layer))
            for count in range(1, len(calls or ()) + 1):
                call = (normed.data_ptr(), *calls[count - 1])
                array = p.predict_host(layer, normed.view(1, 64), normed=normed, count=count).copy()
                assert np.array_equal(run_host_heads(call), array)
                args = dict(layer=layer, decode=True, now=step * L + layer, keys=[layer * E + step % E], served=[3],
                            evicted=[], wraps=wraps, horizon=count, miss=1e-3, transfer=5e-4, compute=1e-3,
                            free=count - 1, backlog=[], min_prob=0.0)
                for by_call, by_array in planners:
                    decided = by_call.layer(probs=call, **args)
                    assert decided == by_array.layer(probs=array, **args)
                    queued += bool(decided[0])
                    checked += 1
    assert checked >= 2 * L and queued  # decisions that queue copies among them
    for planner, _ in planners:
        with pytest.raises(TypeError):
            planner.layer(probs=(normed.data_ptr(), 1, 2), **args)


def test_a_wrapping_predictor_names_the_next_tokens_first_layers(model_and_layers):
    """From the last layer every depth is a target past it: layer l + d - L of the next forward."""
    model, adapter, layers = model_and_layers
    p = mlp_predictor(model, adapter, layers, wraps=True)
    last = len(layers) - 1
    assert list(p.depths(last)) == [1, 2] and [(last + d) % len(layers) for d in p.depths(last)] == [0, 1]
    within = mlp_predictor(model, adapter, layers, wraps=False)
    assert list(within.depths(last)) == []


def synthetic(tokens: int, seq: int, layers: int = 3, hidden: int = 12, experts: int = 8, seed: int = 0):
    """Router inputs x (the same at every layer), each token's next x = x rolled by one; layer t routes
    softmax(3 (x ** 2) A_t): a function of x no linear map can follow (it is even in x)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randn(tokens // seq, hidden, generator=g)
    x = torch.stack([starts.roll(i, dims=-1) for i in range(seq)], dim=1).reshape(-1, hidden)  # [N, H]
    a = torch.randn(layers, hidden, experts, generator=g)
    probs = torch.softmax(3 * (x ** 2) @ a, dim=-1)  # [L, N, E]
    rows = torch.arange(len(x))
    following = torch.where(rows % seq < seq - 1, rows + 1, -1)
    return RoutingSet(x.expand(layers, -1, -1).contiguous(), probs, probs.topk(2, dim=-1).indices, following)


def test_batch_targets_take_the_next_token_for_pairs_past_the_last_layer():
    data = synthetic(64, 8)
    heads = MLPHeads(3, 12, 2, 4, 8, wraps=True)
    table = pair_table(heads)
    rows = torch.tensor([0, 7, 9])  # 7 ends its sequence: no next token
    targets, mask = batch_targets(data, rows, table)
    pair = 2 * 2 + 0  # (l=2, d=1): layer 0 of the next token
    assert torch.equal(targets[pair, 0], data.probs[0, 1]) and torch.equal(targets[pair, 2], data.probs[0, 10])
    assert mask[pair].tolist() == [True, False, True]
    within = 0 * 2 + 1  # (l=0, d=2): layer 2 of the same token
    assert torch.equal(targets[within], data.probs[2, rows]) and mask[within].all()
    assert not pair_table(MLPHeads(3, 12, 2, 4, 8, wraps=False))[2][pair]


def test_heads_learn_a_nonlinear_routing_within_and_across_the_token():
    data = synthetic(3072, 8)
    split = 2560
    part = lambda s: RoutingSet(data.normed[:, s], data.probs[:, s], data.chosen[:, s],  # noqa: E731
                                torch.where(data.next[s] >= 0, data.next[s] - s.start, -1))
    train, val = part(slice(0, split)), part(slice(split, None))
    heads, report = fit_heads(train, val, depth=2, width=64, epochs=15, lr=1e-2, batch=256, progress=False)
    assert report["validation_kl"][report["best_epoch"] - 1] == min(report["validation_kl"])
    within, previous = head_recalls(heads, val, 2)
    assert min(within.values()) > 0.65  # chance: 2 / 8; within the token and for the next token
    assert within["2->next:0"] > previous["next:0"] + 0.3
    untrained = MLPHeads(3, 12, 2, 64, 8, wraps=True)
    untrained.initialize(torch.Generator().manual_seed(0))
    assert min(head_recalls(untrained, val, 2)[0].values()) < 0.6


def test_adapters_file_keeps_both_kinds_and_refuses_other_versions(model_and_layers, tmp_path):
    model, adapter, layers = model_and_layers
    fingerprint = model_fingerprint(model, layers)
    adapters = AcceleratorAdapters(len(layers), 64, DEPTH, 4, mlp=random_heads(len(layers)))
    with torch.no_grad():
        adapters.U.normal_(generator=torch.Generator().manual_seed(1))
    path = tmp_path / "a.safetensors"
    adapters.save(path, fingerprint, {"note": 1})
    loaded = AcceleratorAdapters.load(path, fingerprint=fingerprint)
    assert loaded.kind == "mlp" and loaded.mlp.wraps and loaded.meta["version"] == "2"
    assert all(torch.equal(a, b) for a, b in zip(adapters.state_dict().values(), loaded.state_dict().values()))
    linear = make_predictor("m2r2", model, adapter, layers, DEPTH, adapters=loaded, kind="linear")
    assert linear.kind == "linear" and not linear.wraps
    # a file of the first format (linear adapters, no kind) still loads, as linear
    tensors = {n: getattr(adapters, n).detach().contiguous() for n in ("U", "V", "b")}
    meta = {"format": "m2r2-adapters", "version": "1", "fingerprint": fingerprint, "num_layers": str(len(layers)),
            "hidden": "64", "depth": str(DEPTH), "rank": "4", "route_features": "0", "info": json.dumps({})}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    old = AcceleratorAdapters.load(tmp_path / "v1.safetensors", fingerprint=fingerprint)
    assert old.kind == "linear" and old.mlp is None and torch.equal(old.U, adapters.U)
    with pytest.raises(AdapterFileError, match="no nonlinear heads"):
        make_predictor("m2r2", model, adapter, layers, DEPTH, adapters=old, kind="mlp")
    save_file(tensors, str(tmp_path / "v3.safetensors"), metadata={**meta, "version": "3"})
    with pytest.raises(AdapterFileError, match="version 3.*retrain"):
        AcceleratorAdapters.load(tmp_path / "v3.safetensors")


def test_training_reports_both_kinds_and_picks_the_better(model_and_layers):
    model, adapter, layers = model_and_layers
    ids = torch.randint(3, 96, (2048,), generator=torch.Generator().manual_seed(0))
    adapters, report = train_adapters(model, adapter, layers, chunk_tokens(ids, 64, 4), depth=DEPTH, rank=4,
                                      width=32, epochs=2, progress=False)
    val = report["validation"]
    assert set(val) == {"gate", "linear", "mlp", "previous_token"} and report["validation_tokens"] == 256
    mean = {k: sum(v for key, v in val[k].items() if "next" not in key) / 5 for k in ("linear", "mlp")}
    assert adapters.kind == report["kind"] == max(mean, key=mean.get)
    assert sorted(k for k in val["mlp"] if "next" in k) == ["2->next:0", "3->next:0", "3->next:1"]
    assert 1 <= report["mlp"]["best_epoch"] <= report["mlp"]["epochs_run"] <= 2


class _NextPairPredictor(Predictor):
    """Wraps; for the next token's layers it names the experts *not* used by the current token's same layer."""

    wraps = True

    def predict(self, layer, residual, chosen=None):
        return {d: 1.0 - torch.zeros(len(chosen), self.num_experts).scatter_(-1, chosen, 1.0)
                for d in self.depths(layer) if layer + d >= self.num_layers}


def test_next_token_recall_is_aligned_with_the_next_position():
    """Tokens alternate between experts {0, 1} and {2, 3} at every layer: the previous token's experts are
    always wrong, the other pair always right."""
    chosen = torch.tensor([[0, 1], [2, 3]]).repeat(8, 1).expand(3, -1, -1)  # [L=3, N=16, K=2]
    predictor = _NextPairPredictor(3, 4, 2, 2)
    out = evaluate_next_token({"pairs": predictor}, [(torch.zeros(3, 16, 8), chosen)], top_k=2)
    assert out["previous token"] == {"next:0": 0.0, "next:1": 0.0}
    assert out["pairs"] == {"1->next:0": 1.0, "2->next:0": 1.0, "2->next:1": 1.0}


def test_cost_counts_and_projects_the_heads(model_and_layers):
    model, adapter, layers = model_and_layers
    assert 12.5e9 < mixtral_8x7b_active_params() < 13.2e9  # Mixtral-8x7B: 12.9 B active parameters
    p = mlp_predictor(model, adapter, layers)
    cost = predictor_cost(model, layers, {"m2r2": p})["m2r2"]
    # every layer predicts DEPTH targets (it wraps): hidden layers [64, 2*16], block-diagonal heads [2*16, 2*8]
    per_layer = 2 * (64 * DEPTH * 16 + DEPTH * 16 * DEPTH * 8)
    assert cost["adapter_flops_per_token"] == len(layers) * per_layer and cost["seconds_per_layer"] > 0
    assert cost["seconds_per_layer_median"] >= cost["seconds_per_layer"]
    assert projected_flops(p) == 32 * 2 * (4096 * DEPTH * 16 + DEPTH * 16 * DEPTH * 8)


def test_prefetching_with_wrapping_heads_is_lossless(admit_every_prediction):
    model = tiny_mixtral(layers=4, seed=4)
    adapter, layers = find_moe_layers(model)
    predictor = mlp_predictor(model, adapter, layers)
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(2))
    gen = dict(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(**gen)
    m2r2_moe.offload(model, device="cpu", cache_experts=4, link_gbps=0.2, predictor=predictor)
    try:
        with torch.no_grad():
            out = model.generate(**gen)
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out.sequences, ref.sequences) and all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))
    assert stats.prefetches > 0 and stats.predictor_failures == 0


def test_routing_sets_mark_sequence_ends_and_hold_the_routers_choice(model_and_layers):
    model, adapter, layers = model_and_layers
    builder = RoutingSetBuilder(adapter, layers, torch.float32, capacity=64, keep_residuals=True)
    batches = [torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    for residuals, normed, chosen in collect_normed(model, layers, batches):
        builder.add(residuals, normed, chosen, 16)
    data = builder.build()
    assert data.tokens == 64 and data.residuals.shape == (len(layers), 64, 64)
    ends = torch.arange(64) % 16 == 15
    assert (data.next[ends] == -1).all() and torch.equal(data.next[~ends], torch.arange(64)[~ends] + 1)
    assert torch.allclose(data.probs.sum(-1), torch.ones(len(layers), 64))
    top = data.probs.topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(top, data.chosen.sort(-1).values)  # the distribution ranks the experts the block used


def test_heads_compute_where_the_model_computes_without_host_syncs(model_and_layers):
    """Every tensor the heads' predictor holds follows `to` (the model's device, played by `meta`), and its
    per-layer calls read nothing back to the host."""
    from test_device_placement import owned_tensors
    from test_host_syncs import SyncWatch

    model, adapter, layers = model_and_layers
    p = mlp_predictor(model, adapter, layers)
    residual, chosen = torch.randn(1, 64), torch.zeros(1, 2, dtype=torch.long)
    with SyncWatch() as watch:
        for layer in range(len(layers)):
            p.predict_stacked(layer, residual, chosen, normed=layers[layer].norm(residual))
            p.observe(layer, chosen)
    assert watch.calls == []
    p.to("meta")
    stray = [path for path, t in owned_tensors(p) if t.device.type != "meta"]
    assert stray == []
    meta = torch.empty(1, 64, device="meta")
    depths, scores = p.predict_stacked(len(layers) - 1, meta, chosen.to("meta"), normed=meta)
    assert depths == [1, 2] and scores.device.type == "meta" and scores.shape == (2, 1, 8)
