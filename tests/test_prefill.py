"""Prefill streaming (runtime/prefill.py, ExpertCache.stream) and prefill/decode counters (runtime/phases.py).

Invariants:
- in a forward of many tokens, the next layers' experts are copied while a layer computes: only the first
  layer waits for demand loads when the slots hold two layers' experts;
- no expert is copied twice in one forward, whatever the policy and cache size (layers computed in waves
  too), and the logits stay the original's;
- a streamed copy is not withdrawn by a prediction; decode (one token per layer call) never streams;
- on a link of known speed only what the link moves while a layer computes (with a margin) is queued;
- selection rates are learned per layer: experts a layer never uses stop being streamed;
- `stats().prefill` / `.decode` split time, stall, bytes, misses and prefetches, and add up to the totals.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.profile import Recorder
from m2r2_moe.runtime.prefill import PrefillStream
from test_prefetch import ManualEngine

pytestmark = pytest.mark.lossless  # CI repeats these at other thread counts


def _offloaded(cache: int, policy: str = "predictive"):
    model = tiny_mixtral(layers=4)  # 4 MoE layers x 8 experts, top-2
    m2r2_moe.offload(model, device="cpu", cache_experts=cache, policy=policy)
    offloader = m2r2_moe.get_offloader(model)
    offloader.replace_engine(ManualEngine())  # copies land when compute waits for them
    return model, offloader


def _every_expert(tokens: int = 8) -> torch.Tensor:
    """`[T, 2]` routing that uses all 8 experts."""
    return torch.tensor([[t % 8, (t + 3) % 8] for t in range(tokens)])


def _forward(offloader, routing: list[torch.Tensor]) -> None:
    for layer, index in enumerate(routing):
        hidden = torch.randn(index.shape[0], 64)
        offloader.run_experts(layer, hidden, index, torch.full(index.shape, 0.5))


def test_the_next_layer_streams_in_while_a_layer_computes():
    model, offloader = _offloaded(cache=16)  # two layers' experts
    try:
        _forward(offloader, [_every_expert()] * 4)
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert stats.misses == 8  # layer 0 only: the rest was streamed in while the layer before computed
    # 24 streamed for layers 1-3, used; and 8 by the last layer for the next forward's layer 0
    assert stats.prefetches == 32 and stats.late_prefetches + stats.prefetch_hits == 24
    assert stats.bytes_to_device == 40 * offloader.expert_bytes[0]  # one copy of each expert used, and those 8


def test_the_last_layers_stream_the_next_forwards_first_layers():
    model, offloader = _offloaded(cache=24)  # three layers' experts
    try:
        _forward(offloader, [_every_expert()] * 4)
        m2r2_moe.reset_stats(model)
        _forward(offloader, [_every_expert()] * 4)  # a prompt's next chunk
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    # the last layer's compute brought layer 0's experts back in (displacing layer 1's, needed after them):
    # no layer of the second forward waits for a demand load, and each expert used is copied once
    assert stats.misses == 0 and stats.prefetch_hits + stats.late_prefetches == 32 - stats.hits
    assert stats.bytes_to_device <= 32 * offloader.expert_bytes[0]


def test_decode_never_streams():
    model, offloader = _offloaded(cache=16)
    try:
        _forward(offloader, [torch.tensor([[1, 5]])] * 4)
        assert m2r2_moe.stats(model).prefetches == 0
    finally:
        m2r2_moe.remove_offload(model)


def test_a_prediction_does_not_withdraw_a_streamed_copy():
    model, offloader = _offloaded(cache=16)
    try:
        _forward(offloader, [_every_expert()])  # layer 0 streams layer 1's experts
        cache = offloader.cache
        assert len(cache.queued_prefetches()) == 8
        assert not cache.withdraw(1, 3)
        cache.prefetch(3, 0, 3, offloader.clock.now(0), frozenset())  # a prediction's own prefetch
        assert cache.withdraw(3, 0)
    finally:
        m2r2_moe.remove_offload(model)


@pytest.mark.parametrize("link", [None, 0.05, 100.0])  # unknown speed; slow: a copy or two ahead; fast: deep
@pytest.mark.parametrize("policy", ["lru", "predictive"])
@pytest.mark.parametrize("cache", [3, 5, 8, 12, 20])
def test_no_expert_is_copied_twice_in_a_forward_and_logits_stay(policy, cache, link):
    model = tiny_mixtral(layers=4)
    prompts = [torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (6, 30, 17)]
    with torch.no_grad():
        references = [model(input_ids=p).logits for p in prompts]
    m2r2_moe.offload(model, device="cpu", cache_experts=cache, policy=policy, link_gbps=link)
    recorder = Recorder(m2r2_moe.get_offloader(model))
    try:
        with torch.no_grad():
            for prompt, reference in zip(prompts, references):
                assert torch.equal(model(input_ids=prompt).logits, reference)
        stats = m2r2_moe.stats(model)
        stride = m2r2_moe.get_offloader(model).cache.key_stride
    finally:
        recorder.detach()
        m2r2_moe.remove_offload(model)
    # a copy streamed for a layer at or before the one that issued it is the next forward's
    copies = Counter((c.step + (c.priority > 0 and c.key // stride <= c.layer), c.key)
                     for c in recorder.copies if not c.cancelled)
    assert max(copies.values()) == 1
    if cache >= 8:
        assert stats.prefetches > 0


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_a_streamed_expert_displaces_only_experts_needed_after_it_and_not_used_again(policy):
    model, offloader = _offloaded(cache=8, policy=policy)
    cache = offloader.cache
    try:
        sooner = cache.keys(1, [0])
        slots = cache.acquire(1, [0], sooner, 1)[0]  # used at layer 1 of forward 0: needed at turn 5 again
        cache.release(sooner, slots, None)
        later = cache.keys(3, [0, 1])
        slots = cache.acquire(3, [0, 1], later, 3)[0]  # used at layer 3: needed at turn 7 again
        cache.release(later, slots, None)
        cache.prefetch(2, 6, 2, 0, frozenset())  # predicted for turn 2, never used: stale from turn 3 on
        pinned = cache.keys(0, [0, 1, 2, 3])
        slots = cache.acquire(0, [0, 1, 2, 3], pinned, 4)[0]  # forward 1, layer 0: every slot taken
        stale = 2 * cache.key_stride + 6
        # layer 2's experts are needed at turn 6, the layer-3 ones at turn 7, the layer-1 one at turn 5: a
        # farther layer takes only the stale one's slot (displacing one this forward still uses would cost its
        # copy again); `lru` displaces only what the forward is done with (none here)
        farther = cache.stream([(2, 4, 2), (2, 5, 2)], 4, frozenset(pinned), 0, 8, offloader.prefill.victim)
        assert farther == (1 if policy == "predictive" else 0)
        assert (cache.slots.lookup(stale) < 0) == (policy == "predictive")
        assert all(cache.slots.lookup(k) >= 0 for k in later + sooner)
        # the next layer's expert (turn 5) may displace one needed after it (Belady: a layer-3 expert), never
        # the layer-1 expert needed at the same turn
        nearest = cache.stream([(1, 5, 1)], 4, frozenset(pinned), 0, 8, offloader.prefill.victim)
        assert nearest == (1 if policy == "predictive" else 0)
        assert cache.slots.lookup(sooner[0]) >= 0
        assert sum(cache.slots.lookup(k) < 0 for k in later) == (1 if policy == "predictive" else 0)
        cache.release(pinned, slots, None)
        # at layer 1 the forward is done with layer 0: a slot gives way for the next layer (both policies)
        assert cache.stream([(2, 3, 1)], 5, frozenset(), 1, 8, offloader.prefill.victim) == 1
    finally:
        m2r2_moe.remove_offload(model)


class _Link:
    def __init__(self, seconds: float, queued: int = 0):
        self.seconds, self.queued = seconds, queued
        self.engine = self

    def link_seconds(self, nbytes: int) -> float:
        return self.seconds

    def queued_prefetches(self) -> list[int]:
        return [1] * self.queued


def _stream(cache, layer_seconds: float) -> PrefillStream:
    clock = SimpleNamespace(layer_seconds=layer_seconds, step=0)
    return PrefillStream(cache, clock, [8, 8, 8], [100] * 3, top_k=2)


def test_on_a_known_link_only_what_it_moves_while_a_layer_computes_is_queued():
    assert _stream(_Link(1e-3), 2e-3).copy_budget(0, 256) == 3  # 1.5 layer times of 1 ms copies
    assert _stream(_Link(1e-3, queued=2), 2e-3).copy_budget(0, 256) == 1
    assert _stream(_Link(1e-3), 20e-3).copy_budget(0, 256) == 30  # compute-bound: deeper
    assert _stream(_Link(0.0), 2e-3).copy_budget(0, 256) == 8  # link speed unknown: the next layer's likely ones
    assert _stream(_Link(1e-3), 0.0).copy_budget(2, 256) == 8  # layer time unknown yet (the next forward's layer 0)
    assert _stream(_Link(0.0), 2e-3).copy_budget(0, 1) == 0  # one token: no expert more likely than not


def test_selection_rates_are_learned_per_layer():
    stream = _stream(_Link(0.0), 0.0)
    assert stream.likely(1, 256) == list(range(8))  # the uniform prior: every expert, for a long prompt
    assert stream.likely(1, 1) == []  # one token: no expert more likely than not
    stream.route(1, torch.tensor([[0, 1]] * 2000))
    assert sorted(stream.likely(1, 256)) == [0, 1]
    assert stream.likely(2, 256) == list(range(8))  # another layer learned nothing


def test_prefill_and_decode_are_counted_apart():
    model = tiny_mixtral()
    prompt = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(3))
    m2r2_moe.offload(model, device="cpu", cache_experts=12, link_gbps=0.5)
    try:
        with torch.no_grad():
            model.generate(input_ids=prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        s = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert (s.prefill.forwards, s.prefill.tokens, s.decode.forwards, s.decode.tokens) == (1, 24, 5, 5)
    assert s.prefill.bytes_to_device + s.decode.bytes_to_device == s.bytes_to_device
    assert s.prefill.misses + s.decode.misses == s.misses
    assert s.prefill.prefetches + s.decode.prefetches == s.prefetches > 0
    assert s.prefill.stall_seconds + s.decode.stall_seconds == pytest.approx(s.stall_seconds)
    assert s.prefill.seconds > 0 and s.decode.seconds > 0 and s.prefill.stall_seconds > 0
    assert "prefill (1 forwards, 24 tokens)" in str(s)
    copied = s.copy()
    copied.prefill.forwards = 99
    assert s.prefill.forwards == 1  # a snapshot does not share its phases with the counters


def test_profile_prefill_mode_table_and_json(tmp_path, capsys):
    import json

    from m2r2_moe.cli import main

    out = tmp_path / "prefill.json"
    code = main(["profile", "--model", "random", "--prefill", "8,24", "--link-ratios", "2,8", "--repeats", "1",
                 "--new-tokens", "3", "--prompt-tokens", "8", "--json", str(out)])
    rows = json.loads(out.read_text())["prefill"]
    assert code == 0 and len(rows) == 4 and all(r["identical"] for r in rows)
    assert [(r["prompt_tokens"], r["link_ratio"]) for r in rows] == [(8, 2), (8, 8), (24, 2), (24, 8)]
    for r in rows:
        transfer = r["bytes"] / (r["link_gbps"] * 1e9)
        assert r["bytes"] > 0 and r["limit_s"] == pytest.approx(max(r["original_s"], transfer))
        assert r["ratio_to_limit"] == pytest.approx(r["offloaded_s"] / r["limit_s"])
        # the floor counts one copy of each expert used that held no slot: never more than was moved
        assert 0 < r["needed_bytes"] <= r["bytes"] and r["floor_s"] <= r["limit_s"]
        assert r["ratio_to_floor"] == pytest.approx(r["offloaded_s"] / r["floor_s"])
    printed = capsys.readouterr().out
    assert "prompt tokens" in printed and "x limit" in printed


@pytest.mark.parametrize("cache", [3, 5])
def test_eager_top3_decode_stays_exact_whatever_order_the_slots_are_in(cache):
    """eager adds a token's K contributions in the order of the indices it is given: with slots out of expert
    order (streaming fills them in its own order) a decode step at top-3 goes through the pair path."""
    model = tiny_mixtral(top_k=3, experts=4, layers=3, experts_implementation="eager")
    prompt = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    with torch.no_grad():
        reference = model.generate(input_ids=prompt, **gen)
    m2r2_moe.offload(model, device="cpu", cache_experts=cache, policy="lru")
    try:
        with torch.no_grad():
            out = model.generate(input_ids=prompt, **gen)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, reference.scores))


def test_measure_prefill_interleaves_modes_and_restores_the_model():
    from m2r2_moe.profile.prefill import chunked_prefill, measure_prefill

    model = tiny_mixtral()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    original, runs = measure_prefill(model, prompt, 2, (True, False), device="cpu", cache_experts=12, link_gbps=1.0)
    assert original > 0 and set(runs) == {True, False}
    assert all(r["identical"] and r["bytes"] > 0 and r["seconds"] > 0 for r in runs.values())
    assert not m2r2_moe.is_offloaded(model)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    times = chunked_prefill(model, prompt, [None, 8], 1)
    assert set(times) == {None, 8} and all(t > 0 for t in times.values())
