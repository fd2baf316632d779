"""The `predictive` eviction policy (runtime/policy.py) and the prefetcher's ratio-aware admission.

Invariants: a stale expert (its layer's turn passed without it) goes first, oldest first; otherwise the
expert needed farthest ahead; pinned experts never; a prefetch never displaces an expert needed sooner
than the one it brings. Admission: an idle or unknown link admits at `min_prob`; a busy slow link only
confident predictions, and fewer copies in flight."""

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.runtime.policy import NextUsePolicy

L = 4  # layers


def test_stale_oldest_first_then_farthest_next_use():
    p = NextUsePolicy(L, num_slots=3)
    p.used(10, now=0)  # next use at turn 4
    p.used(11, now=1)  # turn 5
    p.used(12, now=2)  # turn 6
    assert p.victim(99, now=3, pinned=()) == 12  # none stale: the one needed farthest ahead
    assert p.victim(99, now=5, pinned=()) == 10  # 10 missed turn 4 (5 is now, unused): the oldest stale one
    assert p.victim(99, now=5, pinned={10, 11}) == 12
    assert p.victim(99, now=3, pinned={10, 11, 12}) == -1
    assert p.victim(10, now=3, pinned=()) is None  # resident: nothing to evict
    p.forget(12)
    assert p.victim(99, now=3, pinned=()) is None  # a free slot: nothing to evict


def test_prediction_keeps_the_sooner_need():
    p = NextUsePolicy(L, num_slots=3)
    p.used(7, now=0)  # turn 4
    p.predicted(7, when=2, now=1)
    assert p.next_use[7] == 2
    p.predicted(7, when=3, now=1)  # a later wish does not push a sooner one back
    assert p.next_use[7] == 2
    p.predicted(7, when=9, now=6)  # but a stale estimate is replaced
    assert p.next_use[7] == 9


def test_a_prefetch_never_displaces_an_expert_needed_sooner():
    p = NextUsePolicy(L, num_slots=2)
    p.used(1, now=0)  # turn 4
    p.used(2, now=1)  # turn 5
    assert p.victim(99, now=2, pinned=(), needed_at=3) == 2  # needed at 5, later than the prefetched expert
    assert p.victim(99, now=2, pinned=(), needed_at=5) == -1  # every candidate is needed no later than it
    p.num_slots = 3
    p.used(3, now=1)  # stale by turn 6 ...
    assert p.victim(99, now=6, pinned=(), needed_at=7) == 1  # ... stale experts may always go, oldest first


def test_predictive_policy_keeps_the_next_layers_experts():
    """A pool that cycles through the layers: LRU evicts exactly what the next layer needs; the
    predictive policy evicts the layer just computed. Same routing every token, pool one expert short."""
    model = tiny_mixtral(layers=4)
    misses = {}
    for policy in ("lru", "predictive"):
        m2r2_moe.offload(model, device="cpu", cache_experts=7, policy=policy)
        off = m2r2_moe.get_offloader(model)
        for _ in range(6):
            for layer in range(4):
                off.run_experts(layer, torch.randn(1, 64), torch.tensor([[layer, layer + 1]]), torch.full((1, 2), 0.5))
        misses[policy] = m2r2_moe.stats(model).misses
        m2r2_moe.remove_offload(model)
    assert misses["lru"] == 6 * 8  # every use misses
    assert misses["predictive"] < misses["lru"] / 3


def _prefetcher(link_gbps):
    model = tiny_mixtral(layers=4)
    m2r2_moe.offload(model, device="cpu", cache_experts=8, predictor="history", lookahead=2, link_gbps=link_gbps)
    off = m2r2_moe.get_offloader(model)
    return model, off, off.prefetcher


def test_admission_is_free_on_an_idle_or_unknown_link():
    model, off, pf = _prefetcher(None)
    off.clock.layer_seconds, pf.link_busy = 1e-3, 1.0
    assert pf._transfer_ratio() == 0.0  # no link emulated: unknown
    assert pf._thresholds([1, 2], 0.0) == pytest.approx([pf.min_prob] * 2)
    assert pf._link_budget(0.0) == pf.max_queued
    m2r2_moe.remove_offload(model)


def test_admission_tightens_on_a_busy_slow_link():
    model, off, pf = _prefetcher(0.001)
    transfer = off.engine.link_seconds(off.expert_bytes[0])
    off.clock.layer_seconds = transfer / 8
    ratio = pf._transfer_ratio()
    assert ratio == pytest.approx(8)
    pf.link_busy = 0.0
    assert pf._thresholds([1, 2], ratio) == pytest.approx([pf.min_prob] * 2)  # idle link
    pf.link_busy = 1.0
    need = pf._thresholds([1, 2], ratio)
    assert need == pytest.approx([8 / 9, 8 / 10])  # p > uT / (uT + min(T, dC))
    assert pf._link_budget(ratio) == 1  # lookahead 2 layers carry a quarter of one copy: one at a time
    m2r2_moe.remove_offload(model)


@pytest.mark.parametrize("seed", range(6))
def test_decode_ranking_on_the_host_matches_the_batched_tensor_path(seed):
    """Batch-1 decode ranks predictions with Python on one host read; a batch of one token given twice
    (the tensor path, which takes the union over the batch) must choose the same experts in the same order."""
    model, off, pf = _prefetcher(0.001)
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(3, 1, 8, generator=g), -1)
    pf.width, pf.link_busy, ratio = 3, 0.1 + 0.15 * seed, 2.0  # thresholds from min_prob up to ~0.6
    host = pf._ranked(0, [1, 2, 3], probs, ratio)
    batched = pf._ranked(0, [1, 2, 3], probs.expand(3, 2, 8), ratio)
    assert host == batched and set(host) == {1, 2, 3}
    need = pf._thresholds([1, 2, 3], ratio)
    for d, floor in zip((1, 2, 3), need):
        row = probs[d - 1, 0]
        expected = [e for e in row.argsort(descending=True)[:3].tolist() if row[e] >= floor]
        assert host[d] == expected
    assert 0 < sum(map(len, host.values())) < 9  # the threshold cut some experts, not all
    m2r2_moe.remove_offload(model)


def test_prefetch_min_prob_reaches_the_prefetcher():
    model = tiny_mixtral(layers=3)
    m2r2_moe.offload(model, device="cpu", cache_experts=6, predictor="gate", prefetch_min_prob=0.4)
    try:
        pf = m2r2_moe.get_offloader(model).prefetcher
        assert pf.min_prob == 0.4 and pf._thresholds([1, 2], 0.0) == [0.4, 0.4]  # link unknown: the floor
        pf.link_busy = 0.0
        assert pf._thresholds([1, 2], 0.5) == [0.2, 0.2]  # a link faster than the compute: half the floor
        assert pf._thresholds([1, 2], 2.0) == [0.4, 0.4]
    finally:
        m2r2_moe.remove_offload(model)
    m2r2_moe.offload(model, device="cpu", cache_experts=6, predictor="gate")  # default: 0.6 / top-k
    try:
        assert m2r2_moe.get_offloader(model).prefetcher.min_prob == pytest.approx(0.6 / 2)
    finally:
        m2r2_moe.remove_offload(model)


def test_layer_time_estimate_restarts_when_the_forward_size_changes(monkeypatch):
    """A prefill's slow layers must not make the first decode steps' link ratio look small (that halves the
    admission floor): the estimate starts afresh when the number of tokens per forward changes. The clock is
    a fake one, so the figures are exact on any machine."""
    from types import SimpleNamespace

    from m2r2_moe.runtime import clock as clock_module

    clock = [100.0]
    monkeypatch.setattr(clock_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    model, off, pf = _prefetcher(0.001)
    try:
        off.clock.tick(0, 64, 0.0)
        clock[0] += 0.02
        off.clock.tick(1, 64, 0.0)
        assert off.clock.layer_seconds == pytest.approx(0.02)
        off.clock.tick(0, 1, 0.0)  # decode starts
        assert off.clock.layer_seconds == 0.0 and pf._transfer_ratio() == 0.0  # unknown: the full floor applies
        clock[0] += 0.002
        off.clock.tick(1, 1, 0.0)
        assert off.clock.layer_seconds == pytest.approx(0.002)
    finally:
        m2r2_moe.remove_offload(model)
