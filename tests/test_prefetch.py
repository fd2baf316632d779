"""Prefetch pipeline: classification on a hand-made trace, de-duplication, cancellation, accounting,
lossless outputs under every predictor/policy/link, Belady simulation, and the profile tool's JSON."""

import json
import sys

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.predict.base import Predictor
from m2r2_moe.runtime.expert_cache import NOT_QUEUED
from m2r2_moe.profile import Recorder, belady_loads, lru_loads

pytestmark = pytest.mark.lossless  # CI repeats these at other thread counts


class ManualTransfer:
    def __init__(self, key, nbytes, priority):
        self.key, self.nbytes, self.priority = key, nbytes, priority
        self.slot, self.error = -1, None
        self.done = self.cancelled = self.started = False
        self.started_at = self.finished_at = self.busy = 0.0

    def ready(self):
        return self.done

    def wait(self, timeout=None):
        self.done = True
        return 0.0


class ManualEngine:
    """Copies land when the test says so (or when compute waits for them)."""

    def __init__(self):
        self.transfers = []
        self.bytes_copied, self.busy_seconds, self.fault = 0, 0.0, None

    def submit(self, key, slot, dst, src, priority=0, after=None, expand=None):
        if expand is None:  # the bytes are real; only "arrival" is under the test's control
            dst.copy_(src)
        else:
            expand.expand(dst, src)
        t = ManualTransfer(key, src.numel() * src.element_size(), priority)
        self.transfers.append(t)
        return t

    def cancel(self, t):
        if t.started or t.done:
            return False
        t.cancelled = t.done = True
        return True

    def promote(self, t):
        pass

    def link_seconds(self, nbytes):
        return 1e-9  # a link far faster than compute: every copy lands in time, admission is about P(used)

    def drain_stall_seconds(self):
        return 0.0

    def discard_stalls(self):
        pass

    def compute_done(self):
        return None

    def time_copies(self, on):
        pass

    def close(self):
        pass


class Scripted(Predictor):
    """Predicts, at layer l of call c, `script[(c, l)]`: experts for layer l+1, or {depth: experts}."""

    name = "scripted"
    scores_are_probabilities = True  # a scripted expert is certain: admission is not what these tests are about

    def __init__(self, script):
        super().__init__(num_layers=4, num_experts=8, top_k=2, depth=2)
        self.script, self.call = script, 0

    def predict(self, layer, residual, chosen=None):
        wanted = self.script.get((self.call, layer), [])
        wanted = wanted if isinstance(wanted, dict) else {1: wanted}
        out = {}
        for d in self.depths(layer):
            scores = torch.zeros(1, 8)
            for e in wanted.get(d, []):
                scores[0, e] = 1.0
            out[d] = scores
        if layer == 3:
            self.call += 1
        return out


def _offloaded(script, cache=6, policy="lru"):
    """The hand-made traces below are written for LRU eviction (pass policy="predictive" for the other)."""
    model = tiny_mixtral(layers=4)
    m2r2_moe.offload(model, device="cpu", cache_experts=cache, predictor=Scripted(script), policy=policy)
    off = m2r2_moe.get_offloader(model)
    off.replace_engine(ManualEngine())
    off.prefetcher.min_prob = 0.0  # take every expert with a non-zero score
    return model, off


def _run(off, layer, experts):
    h = torch.randn(1, 64)
    idx = torch.tensor([experts])
    return off.run_experts(layer, h, idx, torch.full((1, len(experts)), 0.5))


def test_classification_on_a_hand_made_trace():
    model, off = _offloaded({(0, 0): [2, 3]})
    rec = Recorder(off)
    try:
        _run(off, 0, [0, 1])  # two misses; predicts layer 1 -> {2, 3}: two prefetches queued
        prefetches = {t.key: t for t in off.engine.transfers if t.priority > 0}
        assert sorted(prefetches) == [off.key_stride + 2, off.key_stride + 3]
        prefetches[off.key_stride + 2].done = True  # expert 2 arrives in time, expert 3 does not
        _run(off, 1, [2, 3])  # a prefetch hit and a late prefetch
        _run(off, 1, [2, 5])  # a plain hit and a miss
        counts = [(e.layer, e.hits, e.prefetch_hits, e.late_prefetches, e.misses) for e in rec.layers]
        assert counts == [(0, 0, 0, 0, 2), (1, 0, 1, 1, 0), (1, 1, 0, 0, 1)]
        s = m2r2_moe.stats(model)
        assert (s.hits, s.prefetch_hits, s.late_prefetches, s.misses, s.prefetches) == (1, 1, 1, 3, 2)
        assert s.bytes_to_device == 5 * off.expert_bytes[0]
    finally:
        rec.detach()
        m2r2_moe.remove_offload(model)


def test_eviction_of_a_queued_prefetch_withdraws_it():
    # 3 slots, 2 pinned by layer 0: prefetching 4 then 5 for layer 1 evicts 4 while its copy is still queued:
    # the copy is withdrawn, neither counted nor wasted
    model, off = _offloaded({(0, 0): [4, 5]}, cache=3)
    try:
        _run(off, 0, [0, 1])
        queued = [t for t in off.engine.transfers if t.priority > 0]
        assert [t.key - off.key_stride for t in queued] == [4, 5]
        assert queued[0].cancelled and not queued[1].cancelled
        s = m2r2_moe.stats(model)
        assert s.cancelled_prefetches == 1 and s.wasted_bytes == 0
        assert s.bytes_to_device == sum(t.nbytes for t in off.engine.transfers if not t.cancelled)
    finally:
        m2r2_moe.remove_offload(model)


def test_predictive_policy_never_displaces_a_prefetch_needed_as_soon():
    # the same trace with `predictive` eviction: 5 is needed no later than 4's queued copy, so it is not
    # brought at 4's expense; nothing is withdrawn
    model, off = _offloaded({(0, 0): [4, 5]}, cache=3, policy="predictive")
    try:
        _run(off, 0, [0, 1])
        queued = [t for t in off.engine.transfers if t.priority > 0]
        assert [t.key - off.key_stride for t in queued] == [4] and not queued[0].cancelled
        assert m2r2_moe.stats(model).cancelled_prefetches == 0
    finally:
        m2r2_moe.remove_offload(model)


def test_a_newer_prediction_cancels_what_it_contradicts():
    # layer 0 predicts expert 4 for layer 2; layer 1 predicts 5 for layer 2 instead: 4's queued copy is withdrawn
    model, off = _offloaded({(0, 0): {2: [4]}, (0, 1): {1: [5]}}, cache=8)
    try:
        _run(off, 0, [0, 1])
        _run(off, 1, [0, 1])
        prefetches = {t.key - 2 * off.key_stride: t for t in off.engine.transfers if t.priority > 0}
        assert prefetches[4].cancelled and not prefetches[5].cancelled
        assert off.cache.slots.lookup(2 * off.key_stride + 4) == -1  # its slot was freed
        s = m2r2_moe.stats(model)
        assert s.cancelled_prefetches == 1 and s.prefetches == 2
        _run(off, 2, [4, 5])  # 4 is now a miss (demand load), 5 a late prefetch
        s = m2r2_moe.stats(model)
        assert (s.misses, s.late_prefetches) == (2 + 2 + 1, 1)
    finally:
        m2r2_moe.remove_offload(model)


def test_the_backlog_is_the_prefetches_still_on_the_link():
    # queued_prefetches: the distance of each prefetch copy not landed, whatever became of the others (landed,
    # withdrawn, asked for again)
    model, off = _offloaded({}, cache=8)
    try:
        cache, now = off.cache, off.clock.now()
        for expert, distance in ((4, 1), (5, 2), (6, 3), (7, 2)):
            assert cache.prefetch(2, expert, distance, now, frozenset()) != NOT_QUEUED
        copies = {t.key - 2 * off.key_stride: t for t in off.engine.transfers if t.priority > 0}
        assert sorted(cache.queued_prefetches()) == [1, 2, 2, 3]
        copies[4].done = True  # landed
        assert sorted(cache.queued_prefetches()) == [2, 2, 3]
        assert cache.withdraw(2, 5)
        assert sorted(cache.queued_prefetches()) == [2, 3]
        assert cache.prefetch(2, 5, 1, now, frozenset()) != NOT_QUEUED  # the withdrawn one asked for again
        assert sorted(cache.queued_prefetches()) == [1, 2, 3]
        copies[4].done = False  # a landed copy is not looked at again
        assert sorted(cache.queued_prefetches()) == [1, 2, 3]
    finally:
        m2r2_moe.remove_offload(model)


def test_no_expert_copied_twice_while_in_flight():
    model, off = _offloaded({(0, 0): [4, 5], (0, 1): [4, 5]}, cache=8)
    try:
        _run(off, 0, [0, 1])
        _run(off, 1, [0, 1])  # layer 1 predicts layer 2 -> {4, 5}: other keys than layer 1's prediction
        keys = [t.key for t in off.engine.transfers if t.priority > 0]
        assert len(keys) == len(set(keys)) == 4
        assert off.cache.prefetch(1, 4, 1, off.clock.now(), frozenset()) == NOT_QUEUED  # in flight: no second copy
        assert len([t for t in off.engine.transfers if t.priority > 0]) == 4
    finally:
        m2r2_moe.remove_offload(model)


def test_a_wrapping_prediction_prefetches_the_next_forwards_first_layers():
    """A predictor that `wraps` names targets past the last layer: layer 3 (of 4) at distance 1 and 2 is the
    next forward's layers 0 and 1, queued with their distance as priority and used there as prefetch hits;
    in a forward of several positions (prefill) such targets are ignored."""
    script = {(0, 3): {1: [6], 2: [7]}, (1, 0): {1: [7]}, (1, 3): {1: [5]}}  # (1, 0) confirms 7 for layer 1
    model, off = _offloaded(script, cache=10)
    off.prefetcher.predictor.wraps = True
    try:
        for layer in range(4):
            _run(off, layer, [0, 1])
        wrapped = {(t.key, t.priority) for t in off.engine.transfers if t.priority > 0}
        assert wrapped == {(0 * off.key_stride + 6, 1), (1 * off.key_stride + 7, 2)}
        _run(off, 0, [6, 1])
        _run(off, 1, [7, 1])
        s = m2r2_moe.stats(model)
        assert s.late_prefetches == 2 and s.prefetch_hits == 0  # the manual engine had not landed them yet
        off.prefill.enabled = False  # the prompt's own streaming (runtime/prefill.py) would copy layer 0 too
        for layer in (2, 3):
            off.run_experts(layer, torch.randn(3, 64), torch.tensor([[0, 1]] * 3), torch.full((3, 2), 0.5))
        assert not [t for t in off.engine.transfers if t.key == 5]  # prefill-sized forward: no wrapped target
    finally:
        m2r2_moe.remove_offload(model)


@pytest.mark.parametrize("policy", ["lru", "predictive"])
@pytest.mark.parametrize("predictor", ["history", "gate"])
def test_prefetch_never_changes_outputs_with_random_link(policy, predictor):
    model = tiny_mixtral(torch.bfloat16)
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(11))
    gen = dict(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**gen, output_scores=True, return_dict_in_generate=True)
    rng = torch.Generator().manual_seed(hash((policy, predictor)) % 1000)
    gbps = float(torch.empty(1).uniform_(0.02, 2.0, generator=rng))
    latency = float(torch.empty(1).uniform_(0, 300, generator=rng))
    m2r2_moe.offload(model, device="cpu", cache_experts=5, predictor=predictor, policy=policy, link_gbps=gbps,
                     link_latency_us=latency)
    try:
        off = m2r2_moe.get_offloader(model)
        rec = Recorder(off)
        with torch.no_grad():
            out = model.generate(**gen, output_scores=True, return_dict_in_generate=True)
        rec.detach()
        s = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))
    # accounting adds up: per-layer stalls sum to the total, classes sum to the uses
    assert sum(e.stall for e in rec.layers) == pytest.approx(s.stall_seconds, rel=1e-6, abs=1e-9)
    assert sum(e.hits + e.prefetch_hits + e.late_prefetches + e.misses for e in rec.layers) == s.expert_uses
    copied = [c for c in rec.copies if not c.cancelled]
    assert s.bytes_to_device == sum(c.nbytes for c in copied) == len(copied) * off.expert_bytes[0]


def test_belady_and_lru_by_hand():
    A, B, C, D = 1, 2, 3, 4
    requests = [frozenset({A}), frozenset({B}), frozenset({C}), frozenset({A}), frozenset({B}), frozenset({D}),
                frozenset({A})]
    # capacity 2. LRU: A B C(evict A) A(evict B) B(evict C) D(evict A) A(evict B) -> 7 loads
    assert lru_loads(requests, 2) == 7
    # Belady: A B C (then keeps A, B: C is never used again, so it is dropped right after use) A hit, B hit,
    # D (keeps A: next use soonest) A hit -> 4 loads
    assert belady_loads(requests, 2) == 4
    assert belady_loads(requests, 2, count_from=3) == 1
    assert belady_loads(requests, 4) == 4  # cold misses only


def test_profile_tool_json_fields(tmp_path, monkeypatch):
    from m2r2_moe.cli import main

    out = tmp_path / "p.json"
    monkeypatch.setattr(sys, "argv", ["m2r2-moe"])
    code = main(["profile", "--model", "random", "--predictors", "none,gate,oracle", "--link-ratios", "2",
                 "--repeats", "2",
                 "--new-tokens", "4", "--prompt-tokens", "8", "--json", str(out), "--trace", str(tmp_path / "t.json"),
                 "--plots", str(tmp_path)])
    runs = json.loads(out.read_text())["runs"]
    fields = {"predictor", "link_ratio", "cache_experts", "policy", "tokens", "time_per_token_s", "limit_per_token_s",
              "stall_s_per_token", "hits", "prefetch_hits", "late_prefetches", "misses", "bytes_to_device",
              "wasted_bytes", "tokens_identical", "share_of_gain", "stall_removed", "floor_per_token_s",
              "share_ceiling"}
    assert len(runs) == 3 and all(fields <= set(r) for r in runs)
    none = next(r for r in runs if r["predictor"] == "none")
    assert none["speedup_vs_none"] == 1.0 and none["stall_removed"] in (None, 0.0)
    assert all(r["tokens_identical"] for r in runs) and code == 0
    trace = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert any(e.get("tid") == 1 and e["ph"] == "X" for e in trace)
    assert all((tmp_path / f).stat().st_size > 0 for f in ("timeline.png", "stalls.png", "hit_rate.png"))


def test_share_of_gain_and_ceiling_on_hand_made_runs():
    from m2r2_moe.profile.cli import _share_of_gain

    def run(name, t, stall, limit=0.010):
        return {"predictor": name, "link_ratio": 2.0, "cache_experts": 32, "policy": "predictive",
                "time_per_token_s": t, "stall_s_per_token": stall, "limit_per_token_s": limit}

    runs = [run("none", 0.020, 0.006), run("m2r2", 0.016, 0.003), run("oracle", 0.012, 0.0)]
    _share_of_gain(runs, floor=0.013)
    none, m2r2, oracle = runs
    assert none["share_of_gain"] == 0.0 and none["speedup_vs_none"] == 1.0
    assert m2r2["share_of_gain"] == pytest.approx(0.4) and m2r2["stall_removed"] == pytest.approx(0.5)
    assert m2r2["speedup_vs_none"] == pytest.approx(1.25)
    # the ceiling: no stall and no prediction cost, i.e. the floor: (20 - 13) / (20 - 10)
    assert all(r["share_ceiling"] == pytest.approx(0.7) and r["floor_per_token_s"] == 0.013 for r in runs)
    assert oracle["share_of_gain"] == pytest.approx(0.8)  # a run may beat the floor's ceiling only by noise
    # the gap a predictor can close: to max(floor, limit) = 13 ms
    assert m2r2["gap_closed"] == pytest.approx(4 / 7) and oracle["gap_closed"] == pytest.approx(8 / 7)
    _share_of_gain(runs)  # without a floor there is no ceiling
    assert all(r["share_ceiling"] is None for r in runs)


def test_profile_prompts_come_from_the_models_own_text_or_text_given(tmp_path, capsys):
    from m2r2_moe.cli import main
    from m2r2_moe.profile.cli import prompt_text

    assert prompt_text("builtin:tiny-qwen3-moe", None) == ["builtin:tiny-qwen3-moe:heldout"]
    assert prompt_text("builtin", None) == ["builtin:heldout"]
    assert prompt_text(str(tmp_path), None) == ["builtin:heldout"]  # a checkpoint: the default built-in text
    assert prompt_text("builtin", "a.txt,b") == ["a.txt", "b"]
    code = main(["profile", "--predictors", "none", "--text", str(tmp_path / "nowhere.txt")])
    err = capsys.readouterr().err
    assert code != 0 and "error: --text: text file" in err and "nowhere.txt" in err and "Traceback" not in err


def test_profile_tool_refuses_zero_repeats(capsys):
    from m2r2_moe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--model", "random", "--repeats", "0"])
    assert exit_info.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_the_prefetchers_tap_keeps_the_residuals_as_the_model_made_them():
    """`LayerTap(flat=False)` (the prefetcher's) stores the norm's input and output themselves, `[B, T, H]`, where the
    default flattens and detaches them: the same values, neither copied."""
    from m2r2_moe.models import find_moe_layers
    from m2r2_moe.models.tap import LayerTap

    model = tiny_mixtral()
    _, layers = find_moe_layers(model)
    ids = torch.tensor([[3, 7, 11]])
    with LayerTap(layers, routing=False) as flat, LayerTap(layers, routing=False, flat=False) as raw, torch.no_grad():
        model(ids)
        for i in range(len(layers)):
            assert raw.residual[i].shape == (1, 3, raw.residual[i].shape[-1]) and raw.normed[i].dim() == 3
            assert torch.equal(raw.residual[i].reshape(3, -1), flat.residual[i])
            assert torch.equal(raw.normed[i].reshape(3, -1), flat.normed[i])
            assert raw.normed[i].data_ptr() == flat.normed[i].data_ptr()  # the model's own tensor, not a copy


def test_the_limit_is_timed_on_the_clock_the_runs_are():
    """max(compute, Belady's bytes / link) per token: on the host the reference's measured time; on simulated time the
    fixed compute the runs are timed with (a slow host's measured time would put the limit above the runs)."""
    from m2r2_moe.profile.runs import Reference, limit_per_token

    empty = torch.zeros(1, 1, dtype=torch.long)
    requests = [frozenset({0, 1})] + [frozenset({e}) for e in (2, 3, 2, 4, 5)]  # a prompt, then 5 decode requests
    ref = Reference(empty, empty, empty, requests, prefill_requests=1, decode_seconds_per_token=0.009)
    assert limit_per_token(ref, 2, 1000, None, 6) == (0.009, belady_loads(requests, 2, count_from=1))
    assert limit_per_token(ref, 2, 1000, None, 6, compute=0.0068)[0] == 0.0068
    loads = belady_loads(requests, 2, count_from=1)
    assert loads > 0 and limit_per_token(ref, 2, 1000, 1000.0, 6, compute=0.0068)[0] == pytest.approx(loads / 5)


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_an_expert_a_prompts_streaming_evicted_is_prefetched_again(policy, admit_every_prediction):
    """The prompt's streamed copies (runtime/prefill.py) evict experts where no prefetcher call is told: the planner
    hears of those evictions at its next call. Believing such an expert still resident, it would leave it to a
    demand load (before stop 42 most of an oracle's remaining misses at link ratio 0.5)."""
    script = {(2, 1): [0]}  # call 0 decodes, call 1 is the prompt, call 2 decodes: layer 1 predicts expert 0 of 2
    model, off = _offloaded(script, cache=16, policy=policy)  # two layers' experts
    try:
        for layer in range(4):
            _run(off, layer, [0, 1])  # the planner's mirror: experts 0 and 1 of every layer resident
        every = torch.tensor([[t % 8, (t + 3) % 8] for t in range(8)])  # all 8 experts of a layer
        for layer in range(4):  # the prompt: each layer streams the next one's experts into the slots
            off.run_experts(layer, torch.randn(8, 64), every, torch.full((8, 2), 0.5))
        assert off.cache.slots.lookup(2 * off.key_stride) < 0  # streamed out by the last layer, unseen
        copies = len(off.engine.transfers)
        _run(off, 0, [0, 1])
        _run(off, 1, [0, 1])
        queued = [t.key for t in off.engine.transfers[copies:] if t.priority > 0]
        assert queued == [2 * off.key_stride]  # the planner knew it was gone: prefetched, not expected
        before = m2r2_moe.stats(model).misses
        _run(off, 2, [0, 1])
        assert m2r2_moe.stats(model).misses - before == 1  # expert 1 only (streamed out too, not predicted)
    finally:
        m2r2_moe.remove_offload(model)


@pytest.mark.parametrize("cache", [3, 5, 12])
def test_the_planner_never_believes_an_evicted_expert_resident(cache, admit_every_prediction):
    """Whatever evicts an expert (a demand load, a prefetch, a prompt's streaming, a layer's later waves when the
    slots are fewer than its experts), the planner's mirror of the cache (the Python twin's, which can be read) holds
    no key the cache does not: such a key would be left to a demand load instead of prefetched."""
    model = tiny_mixtral(layers=4)
    m2r2_moe.offload(model, device="cpu", cache_experts=cache, predictor="history", policy="predictive")
    off = m2r2_moe.get_offloader(model)
    try:
        for n in (9, 1, 30, 4):
            ids = torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(n))
            model.generate(ids, max_new_tokens=5, do_sample=False)
            held = {key for key, _ in off.cache.slots.resident()}  # copies in flight included
            believed = off.prefetcher.planner._resident | off.prefetcher.planner._inflight
            assert believed <= held, sorted(believed - held)
    finally:
        m2r2_moe.remove_offload(model)


def test_decode_steps_that_predict_nowhere_note_no_evictions(monkeypatch):
    """While prefetching is off the planner is not told anything (it resyncs from the cache when it resumes), so the
    evictions of those decode steps are not kept for it either: a long off stretch holds no growing list."""
    from m2r2_moe.runtime import prefetcher

    monkeypatch.setattr(prefetcher.OnOff, "step", lambda self, now, decode, vouched=False: False)  # the off arm
    model = tiny_mixtral(layers=4)
    m2r2_moe.offload(model, device="cpu", cache_experts=3, predictor="gate", policy="lru")
    off = m2r2_moe.get_offloader(model)
    try:
        ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(0))
        model.generate(ids, max_new_tokens=12, do_sample=False)
        assert off.prefetcher.quiet and m2r2_moe.stats(model).evictions > 40
        assert off.cache.unseen_evictions == []
    finally:
        m2r2_moe.remove_offload(model)
