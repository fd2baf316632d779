"""The `predictive` eviction policy (runtime/policy.py) and the prefetcher's admission (runtime/admission.py).

Invariants: the expert used least per turn of its layer lately goes first (equal rates: the one whose layer's turn
comes last); one a prediction still wants only when all are; pinned experts never; a prefetch never displaces an
expert needed sooner than the one it brings. Admission: a copy's expected value weighs the stall it hides against the link time
it takes and the expert it evicts; probabilities are calibrated from outcomes; eviction regret is measured;
prefetching backs off to none when it does not pay, and probes again; the horizon follows the link."""

import math
import random

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe import _ext
from m2r2_moe.runtime.admission import value
from m2r2_moe.runtime.planner import LATE, MISS, PREFETCH_HIT, PlannerCore, make_planner
from m2r2_moe.runtime.policy import HALF_LIFE, NextUsePolicy

L = 4  # layers


@pytest.fixture(params=["numpy", "native"])
def search(request):
    """Each victim search: the numpy twin and the C++ one (csrc/policy.hpp)."""
    if request.param == "native" and not _ext.HAS_PLANNER:
        pytest.skip(f"C++ victim search: {_ext.PLANNER_ERROR}")
    return lambda layers, num_slots: NextUsePolicy(layers, num_slots, native=request.param == "native")


def test_least_used_per_turn_first_then_the_farthest_next_turn(search):
    p = search(L, num_slots=3)
    p.used(10, now=0)  # layers 0, 1, 2 of forward 0; next turns 4, 5, 6
    p.used(11, now=1)
    p.used(12, now=2)
    assert p.victim(99, now=3, pinned=()) == 12  # equal rates: the one whose layer's turn comes last
    assert p.victim(99, now=3, pinned={12}) == 11
    assert p.victim(99, now=3, pinned={10, 11, 12}) == -1
    assert p.victim(10, now=3, pinned=()) is None  # resident: nothing to evict
    p.forget(12)
    assert p.victim(99, now=3, pinned=()) is None  # a free slot: nothing to evict


def test_an_expert_used_at_most_turns_outlives_one_used_once_lately(search):
    """Recency alone would evict 10 the first time its layer skipped it; its rate says it comes back."""
    p = search(L, num_slots=3)
    for forward in range(11):
        if forward < 10:
            p.used(10, now=forward * L)  # layer 0: every turn but forward 10's
        p.used(12, now=forward * L + 2)  # layer 2: every turn
    p.used(11, now=10 * L + 1)  # layer 1: once, in forward 10
    assert p.frequency(10, now=10 * L + 3) < p.frequency(10, now=9 * L + 3)  # decayed by the skipped turn
    assert p.victim(99, now=10 * L + 3, pinned=()) == 11
    assert p.victim(99, now=10 * L + 3, pinned={11}) == 10  # 10 missed its latest turn, 12 did not


def test_an_expert_a_prediction_still_wants_goes_last(search):
    p = search(L, num_slots=3)
    p.used(10, now=0)
    p.used(11, now=1)
    p.predicted(13, when=6, now=3)  # prefetched for layer 2's turn at 6: never used yet
    assert p.victim(99, now=4, pinned=()) != 13
    assert p.victim(99, now=4, pinned={10, 11}) == 13  # only when every candidate is wanted
    assert p.victim(99, now=7, pinned=()) == 13  # turn 6 passed without it: no use, no want


def test_prediction_keeps_the_sooner_need(search):
    p = search(L, num_slots=3)
    p.used(7, now=0)  # turn 4
    p.predicted(7, when=2, now=1)
    assert p.next_turn(7) == 2
    p.predicted(7, when=3, now=1)  # a later wish does not push a sooner one back
    assert p.next_turn(7) == 2
    p.predicted(7, when=9, now=6)  # but a stale estimate is replaced
    assert p.next_turn(7) == 9
    p.forget(7)
    assert p.next_turn(7) is None


def test_a_prefetch_never_displaces_an_expert_needed_sooner(search):
    p = search(L, num_slots=2)
    p.used(1, now=0)  # turn 4
    p.used(2, now=1)  # turn 5
    assert p.victim(99, now=2, pinned=(), needed_at=3) == 2  # both needed later than the prefetched expert
    assert p.victim(99, now=2, pinned=(), needed_at=4) == 2  # 1 is needed at 4, no later than it
    assert p.victim(99, now=2, pinned=(), needed_at=5) == -1  # every candidate is needed no later than it
    p.num_slots = 3
    p.used(3, now=1)
    p.used(3, now=5)  # needed at 9; 1 and 2 missed their turns 4 and 5 ...
    assert p.victim(99, now=6, pinned=(), needed_at=9) == 2  # ... stale experts may always go (then the rule)


class LoopPolicy:
    """The `predictive` rule written as a plain loop over dicts (what `NextUsePolicy` computes with vector
    operations): the reference its victims are checked against."""

    def __init__(self, num_layers, num_slots, half_life=None):
        self.L, self.num_slots, self.next_use, self.wanted, self.uses = num_layers, num_slots, {}, set(), {}
        self.rate = math.log(2.0) / (half_life or HALF_LIFE)
        self.first = -1

    def used(self, key, now):
        self.next_use[key] = now + self.L
        self.wanted.discard(key)
        visit = now // self.L
        self.first = visit if self.first < 0 else self.first
        score, last, _ = self.uses.get(key, (-math.inf, -1, 0))
        if last != visit:
            offset = self.rate * visit
            self.uses[key] = (math.log1p(math.exp(score - offset)) + offset, visit, now % self.L)

    def predicted(self, key, when, now):
        known = self.next_use.get(key)
        if known is None or known <= now or known > when:
            self.next_use[key] = when
        if when > now:
            self.wanted.add(key)

    def expect(self, key, when, now):
        if key in self.next_use:
            self.predicted(key, when, now)

    def forget(self, key):
        self.next_use.pop(key, None)
        self.wanted.discard(key)

    def per_turn(self, forward):
        turns = forward - self.first + 1
        if self.first < 0 or turns < 1:
            return 0.0
        decay = math.exp(-self.rate)
        return -self.rate * forward - math.log((1.0 - decay ** turns) / (1.0 - decay))

    def victim(self, key, now, pinned, needed_at=None):
        if key in self.next_use or len(self.next_use) < self.num_slots:
            return None
        turn, forward = now % self.L, now // self.L
        best, best_rate, best_turn, kept = -1, math.inf, 0, []
        for candidate, when in self.next_use.items():  # in the order keys became resident
            if candidate in pinned or (needed_at is not None and now < when <= needed_at):
                continue
            if when > now and candidate in self.wanted:
                kept.append((when, candidate))
                continue
            score, _, layer = self.uses.get(candidate, (-math.inf, 0, 0))
            rate = score + self.per_turn(forward - 1 if layer > turn else forward)
            if rate > best_rate + 1e-9:
                continue
            nxt = when if when > now else when + ((now - when) // self.L + 1) * self.L
            if rate < best_rate - 1e-9 or nxt > best_turn:
                best, best_rate, best_turn = candidate, rate, nxt
        if best < 0 and kept:
            best = max(kept)[1]
        return best


@pytest.mark.parametrize("seed", range(6))
def test_victims_equal_the_plain_loops(seed, search):
    """Random traffic through the vectorised policy and the loop above, a cache's way (a miss evicts the
    victim, a prefetch is refused on -1): the same victim at every question, the same next turns."""
    rng = random.Random(seed)
    layers, experts = rng.choice([(4, 8), (6, 16), (3, 40)])
    slots = rng.randint(layers, layers * experts // 2)
    fast, slow = search(layers, slots), LoopPolicy(layers, slots)
    resident, asked = set(), 0
    for forward in range(40):
        for layer in range(layers):
            now = forward * layers + layer
            keys = {layer * experts + rng.choice(range(experts)) ** 2 % experts for _ in range(3)}  # skewed
            pinned = frozenset(keys)
            for key in sorted(keys):  # demand loads
                v = fast.victim(key, now, pinned)
                assert v == slow.victim(key, now, pinned)
                asked += 1
                if v is not None and v >= 0:
                    for p in (fast, slow):
                        p.forget(v)
                    resident.discard(v)
                for p in (fast, slow):
                    p.used(key, now)
                resident.add(key)
            for _ in range(rng.randint(0, 3)):  # predictions: prefetches and resident experts wanted
                distance = rng.randint(1, layers)
                target = (layer + distance) % layers * experts + rng.randrange(experts)
                if target in resident:  # the cache's one call per layer, against the rule key by key
                    fast.expect_many([(target // experts, target % experts, distance)], experts, now)
                    slow.expect(target, now + distance, now)
                    continue
                v = fast.victim(target, now, pinned, needed_at=now + distance)
                assert v == slow.victim(target, now, pinned, needed_at=now + distance)
                asked += 1
                if v == -1:
                    continue
                if v is not None:
                    for p in (fast, slow):
                        p.forget(v)
                    resident.discard(v)
                for p in (fast, slow):
                    p.predicted(target, now + distance, now)
                resident.add(target)
            if rng.random() < 0.05 and resident:  # a withdrawn prefetch
                gone = rng.choice(sorted(resident - pinned)) if resident - pinned else None
                if gone is not None:
                    for p in (fast, slow):
                        p.forget(gone)
                    resident.discard(gone)
        assert fast.resident == len(slow.next_use) == len(resident)
        for key in range(layers * experts):
            assert fast.next_turn(key) == slow.next_use.get(key)
    assert asked > 100


@pytest.mark.skipif(not _ext.HAS_PLANNER, reason="the C++ expect needs the native planner module")
@pytest.mark.parametrize("seed", range(4))
def test_the_native_expect_equals_its_python_twin(seed):
    """`expect_many` in C++ (csrc/policy.hpp) against `_expect_at`, key by key: resident keys (stale, sooner,
    later estimates), keys not resident and keys past the arrays; the same next turns and the same wanted flags,
    and a malformed item changes nothing."""
    rng = random.Random(seed)
    experts, layers = 8, 4
    fast, slow = NextUsePolicy(layers, 20, native=True), NextUsePolicy(layers, 20, native=False)
    for now in range(0, 60):
        for key in rng.sample(range(layers * experts), 3):
            if rng.random() < 0.5:
                for p in (fast, slow):
                    p.used(key, now)
            elif rng.random() < 0.3:
                for p in (fast, slow):
                    p.forget(key)
        wanted = [(rng.randrange(layers + 3), rng.randrange(experts), rng.randint(0, 6)) for _ in range(5)]
        fast.expect_many(wanted, experts, now)
        slow.expect_many(wanted, experts, now)
        assert bytes(fast._when) == bytes(slow._when) and bytes(fast._want) == bytes(slow._want)
    when, want = bytes(fast._when), bytes(fast._want)
    resident = next(k for k in range(layers * experts) if fast.next_turn(k) is not None)
    with pytest.raises(TypeError):
        fast.expect_many([(resident // experts, resident % experts, 1), (0, 1)], experts, 1000)
    assert bytes(fast._when) == when and bytes(fast._want) == want


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


def test_value_weighs_the_hidden_stall_against_the_eviction():
    """value(q, S, T, lead, evicts, regret) = q S min(1, lead / T) - regret S [evicts]."""
    assert value(1.0, 1.0, 1.0, 5.0, True, 0.0) == 1.0  # certain, in time, nothing regretted
    assert value(0.5, 1.0, 1.0, 0.25, False, 0.0) == pytest.approx(0.125)  # lands late: hides a quarter
    assert value(0.5, 1.0, 1.0, 5.0, True, 0.5) == 0.0  # the victim is worth what the copy is expected to save
    assert value(0.9, 1.0, 1.0, 5.0, True, 0.95) < 0 < value(0.9, 1.0, 1.0, 5.0, False, 0.95)  # costly victim
    assert value(1.0, 1.0, 1.0, -1.0, False, 0.0) == 0.0  # too late to hide anything
    assert value(1.0, 3.0, 1.0, 5.0, False, 0.0) == 3.0  # a demand load stalls more than its link time


@pytest.fixture(params=["python", "native"])
def planner(request):
    if request.param == "native" and not _ext.HAS_PLANNER:
        pytest.skip(f"C++ planner: {_ext.PLANNER_ERROR}")
    return make_planner(4, 8, 8, 2, 8, native=request.param == "native")


def _settle(planner, layer, now, used, probs=None, served=None, evicted=()):
    """One decode layer call that used experts `used` of `layer` (served as `served`, default hits)."""
    keys = [layer * 8 + e for e in used]
    return planner.layer(layer=layer, decode=True, now=now, keys=keys, served=served or [0] * len(keys),
                         evicted=list(evicted), probs=probs, wraps=False, horizon=0, miss=1.0, transfer=1.0, compute=0.0,
                         free=0, backlog=[], min_prob=0.0)


def test_calibration_learns_what_the_scores_mean(planner):
    """Starts from the predictor's score; converges to the measured rate of use per (source, distance, bin)."""
    assert planner.probability(0, 1, 0.35) == pytest.approx(0.35)  # no outcomes yet: the score itself
    probs = torch.zeros(1, 8)
    probs[0, 3], probs[0, 5] = 0.35, 0.33  # layer 0 predicts experts 3 and 5 for layer 1, at distance 1
    for i in range(400):
        _settle(planner, 0, 2 * i, [0, 1], probs=probs.numpy())
        _settle(planner, 1, 2 * i + 1, [3, 6] if i % 10 else [6, 7])  # 3 used 90% of the time, 5 never
    assert planner.probability(0, 1, 0.35) == pytest.approx(0.9 / 2 + 0.0 / 2, abs=0.05)  # one bin: 3 and 5
    assert planner.probability(0, 2, 0.35) == pytest.approx(0.35)  # another distance: its own outcomes
    assert planner.probability(1, 1, 0.35) == pytest.approx(0.35)  # another source too


def test_regret_is_the_share_of_prefetch_victims_loaded_again_soon(planner):
    assert planner.regret() == pytest.approx(0.1)  # unknown: optimistic, so that prefetching starts
    for now in range(400):  # every call evicts an expert of layer 1 for a prefetch; a quarter come back 3 turns later
        planner.issued(2 * 8 + now % 8, 8 + now % 8, now)
        back = [(now - 3) % 8] if now >= 3 and (now - 3) % 4 == 0 else []
        _settle(planner, 1, now, back or [7], served=[MISS] * len(back) or [0])
    assert 0.15 < planner.regret() < 0.35
    spent = planner.spent
    _settle(planner, 1, 401, [(401 - 3) % 8], served=[MISS])  # 398 % 8 = 6 was evicted at 398: regretted
    assert planner.spent == pytest.approx(spent + 1.0)  # a regretted demand load counts against prefetching
    _settle(planner, 1, 402, [5], served=[MISS])  # a demand eviction is not the prefetcher's doing: no regret


@pytest.mark.parametrize("how", [PREFETCH_HIT, LATE])
def test_a_right_prefetchs_victim_is_not_regretted(planner, how):
    """A prefetch whose copy landed in time and was used was right: a demand load of it would have evicted an expert
    as well, so its victim coming back is not charged to prefetching. A wrong prefetch's victim, a victim back before
    the copy was used, and a late copy's victim (it hid only part of its transfer) are."""
    planner.issued(2 * 8 + 3, 1 * 8 + 4, 10)  # prefetch of (2, 3) evicts (1, 4) at turn 10
    planner.issued(2 * 8 + 5, 1 * 8 + 6, 10)  # prefetch of (2, 5) evicts (1, 6): never used
    planner.issued(3 * 8 + 1, 1 * 8 + 7, 10)  # prefetch of (3, 1) evicts (1, 7), which comes back first
    _settle(planner, 1, 11, [7], served=[MISS])
    regret, spent = planner.regret(), planner.spent
    assert spent == pytest.approx(1.0)  # regretted: (1, 7) came back before (3, 1) was used
    _settle(planner, 2, 12, [3], served=[how])  # (2, 3) used: right
    _settle(planner, 3, 13, [1], served=[how])  # (3, 1) used after its victim came back: nothing to absolve
    _settle(planner, 1, 14, [4, 6], served=[MISS, MISS])  # both back: (1, 6)'s prefetch was wrong; (1, 4) absolved
    absolved = how == PREFETCH_HIT  # if (2, 3) landed in time
    assert planner.regret() > regret and planner.spent == pytest.approx(spent + (1.0 if absolved else 2.0))


def test_a_prefetch_that_fetches_back_a_prefetchs_victim_saves_nothing(planner):
    """Fetching back, by another prefetch, an expert a prefetch evicted within a turn undoes that prefetch's harm: the
    eviction is regretted as if a demand load had brought it back, and the copy's use saves nothing against on-demand
    loading (it is not credited). A copy withdrawn loses the mark; other prefetches are credited as ever."""
    planner.issued(2 * 8 + 3, 1 * 8 + 4, 10)  # prefetch of (2, 3) evicts (1, 4) at turn 10
    planner.issued(3 * 8 + 5, 1 * 8 + 6, 10)  # prefetch of (3, 5) evicts (1, 6)
    regret = planner.regret()
    planner.issued(1 * 8 + 4, -1, 11)  # (1, 4) prefetched back at turn 11
    planner.issued(1 * 8 + 6, -1, 11)  # (1, 6) too, then withdrawn, and prefetched again
    planner.withdrawn(1 * 8 + 6)
    planner.issued(1 * 8 + 6, -1, 12)
    assert planner.regret() > regret
    saved = planner.saved
    _settle(planner, 1, 17, [4, 6], served=[PREFETCH_HIT, PREFETCH_HIT])  # (1, 4): nothing; (1, 6): a plain prefetch
    assert planner.saved == pytest.approx(saved + 1.0)
    _settle(planner, 2, 18, [3], served=[PREFETCH_HIT])
    assert planner.saved == pytest.approx(saved + 2.0)


def test_a_late_prefetch_is_credited_what_it_was_measured_to_hide(planner):
    """Until the prefetcher has measured a late prefetch's wait, each late use counts half a demand load's stall
    as saved; then what was measured, at most a whole demand load's."""
    assert planner.late_saving is None
    for late_saving, credit in ((None, 0.5), (0.2, 0.2), (3.0, 1.0), (0.0, 0.0), (None, 0.5)):
        planner.late_saving = late_saving
        saved = planner.saved
        _settle(planner, 1, 1, [2], served=[LATE])  # miss = 1.0
        assert planner.saved == pytest.approx(saved + credit), late_saving
    for bad in (-1e-3, math.nan):
        with pytest.raises(ValueError, match="late_saving"):
            planner.late_saving = bad
    assert planner.late_saving is None  # unchanged by the refused values


def test_the_prefetcher_measures_what_a_late_prefetch_waits():
    """The stall after a wave with late prefetches and no demand load is what they waited: the planner then
    credits a late one the demand load's stall less that. A wave with both samples neither."""
    model, off, pf = _prefetcher(0.001)
    try:
        stats = off.cache.stats
        pf._resume()  # the marks from the counters as they are
        assert pf.planner.late_saving is None
        stats.misses += 2
        pf._read_stalls()  # the call after the acquire that counted two demand loads
        stats.stall_seconds += 0.004  # their wait
        assert pf._read_stalls() == pytest.approx(0.002)
        stats.late_prefetches += 1
        pf._read_stalls()
        stats.stall_seconds += 0.0005  # a late prefetch waited a quarter of a demand load
        pf._read_stalls()
        assert pf.late_seconds == pytest.approx(0.0005) and pf.planner.late_saving == pytest.approx(0.0015)
        stats.late_prefetches, stats.misses = stats.late_prefetches + 1, stats.misses + 1
        pf._read_stalls()
        stats.stall_seconds += 0.05  # a mixed wave: whose wait is whose is not known
        assert pf._read_stalls() == pytest.approx(0.002)
        assert pf.late_seconds == pytest.approx(0.0005) and pf.planner.late_saving == pytest.approx(0.0015)
        stats.late_prefetches += 2
        pf._read_stalls()
        stats.stall_seconds += 0.1  # two late ones that waited far longer than a demand load: they hid nothing
        pf._read_stalls()
        assert pf.late_seconds == pytest.approx(0.9 * 0.0005 + 0.1 * 0.05) and pf.planner.late_saving == 0.0
    finally:
        m2r2_moe.remove_offload(model)


def test_benefit_backs_off_to_none_and_probes_again(planner):
    assert all(planner.active(layer) for layer in range(4))
    for _ in range(3):  # every forward, prediction costs far more than it saves
        planner.add_spent(1e-3)
        planner.step(8)
    assert planner.every == 0 and not any(planner.active(layer) for layer in range(4))  # down to on-demand
    for _ in range(8):
        planner.step(8)
    assert planner.active(0) and not planner.active(1)  # a probe: one layer per forward
    for _ in range(6):  # it pays now (prefetch hits save whole demand loads): back to every layer
        _settle(planner, 0, 0, [1, 2], served=[PREFETCH_HIT, PREFETCH_HIT])
        planner.step(8)
    assert planner.every == 1


def test_decode_steps_whose_prefetches_cause_stall_back_off_whatever_the_prompt_credited(planner):
    """A prompt's forward credits the balance (its streamed copies land as prefetch hits); decode steps then also
    keep the stall their prefetches saved and caused (victims loaded again), and prediction backs off once they
    caused more than they saved by more than the margin, though the prompt's credit still covers it. Prediction's own
    time is the main balance's to judge (with the credit): it does not count there."""
    def run(outcomes, margin=1.5, spent_per_step=0.0):
        p = make_planner(4, 8, 8, 2, 8, native=not isinstance(planner, PlannerCore))
        p.step(64, decode=False)
        for layer in range(1, 4):  # the prompt: 24 demand loads' stall saved
            p.layer(layer=layer, decode=False, now=layer, keys=[layer * 8 + e for e in range(8)],
                    served=[PREFETCH_HIT] * 8, evicted=[], probs=None, wraps=False, horizon=0, miss=1.0,
                    transfer=1.0, compute=0.0, free=0, backlog=[], min_prob=0.0)
        assert (p.saved, p.decode_saved, p.decode_caused) == (24.0, 0.0, 0.0)
        backed_off = None
        for step, outcome in enumerate(outcomes, 1):
            p.step(64, decode=True, margin=margin)
            if p.every > 1 and backed_off is None:
                backed_off = step
            if outcome == MISS:  # a victim evicted for a prefetch comes back: a demand load regretted
                p.issued(2 * 8 + 3, 8 + step % 8, 10 * step)
            _settle(p, 1, 10 * step + 1, [step % 8], served=[outcome])
            p.add_spent(spent_per_step)
        return p, backed_off
    p, backed_off = run([MISS] * 6)  # every decode step's prefetching costs a demand load's stall
    assert backed_off == 3 and p.saved > p.spent  # caused 2 > 1.5 at the third step; the total balance still paid
    assert p.decode_caused > p.decode_saved == 0.0
    assert run([MISS] + [PREFETCH_HIT] * 5)[1] is None  # within the margin, then paying
    p, backed_off = run([PREFETCH_HIT] * 6, spent_per_step=1.5)  # costly to predict, but no harm done to the cache
    assert backed_off is None and p.decode_caused == 0.0 and p.saved > p.spent
    p.step(64, decode=False)  # another prompt: the decode steps' stall balance starts again at the next decode step
    p.step(64, decode=True)
    assert (p.decode_saved, p.decode_caused) == (0.0, 0.0)


def test_a_step_that_ran_while_its_layer_waited_is_refunded():
    """The prefetcher's step for a layer runs while that layer's demand loads are on the link: when the layer then
    waited, the step cost no time, and its charge is taken back."""
    model, off, pf = _prefetcher(0.001)
    try:
        stats = off.cache.stats
        pf._resume()
        pf.planner.add_spent(5e-5)
        pf._spent = 5e-5  # what the last step was charged
        pf._read_stalls()  # no stall since: it stands
        assert pf.planner.spent == pytest.approx(5e-5)
        pf._spent = 5e-5
        stats.stall_seconds += 1e-4  # its layer waited
        pf._read_stalls()
        assert pf.planner.spent == pytest.approx(0.0, abs=1e-12)
    finally:
        m2r2_moe.remove_offload(model)


def test_the_planner_queues_by_expected_value(planner):
    """Likely predictions are queued nearest first; an unlikely one goes into a free slot, but is not worth an
    eviction; a copy that would land too late is not queued; resident experts are expected, not copied."""
    probs = torch.zeros(2, 8)
    probs[0, 4], probs[1, 5], probs[1, 6] = 1.0, 0.9, 0.05
    args = dict(layer=0, decode=True, now=1, keys=[0, 1], served=[0, 0], evicted=[], probs=probs.numpy(), wraps=False,
                horizon=0, miss=1.0, transfer=1.0, compute=2.0, backlog=[], min_prob=0.0)
    native = not isinstance(planner, PlannerCore)
    queue, _, _ = make_planner(4, 8, 8, 2, 8, native=native).layer(free=4, **args)
    assert queue == [(1, 4, 1), (2, 5, 2), (2, 6, 2)]  # free slots: even q 0.05 saves something, evicts nothing
    queue, _, _ = make_planner(4, 8, 8, 2, 8, native=native).layer(**{**args, "compute": 1.0}, free=4)
    assert queue == [(1, 4, 1), (2, 5, 2)]  # 6 would start after two copies, 2 layers ahead: it hides nothing
    queue, expect, withdraw = planner.layer(free=0, **args)
    assert queue == [(1, 4, 1), (2, 5, 2)] and not expect and not withdraw  # 6 (q 0.05 < regret 0.1): not worth a victim
    planner.issued(1 * 8 + 4, -1, 1)
    _settle(planner, 1, 2, [4])  # expert 4 of layer 1 is now resident
    queue, expect, _ = planner.layer(**{**args, "now": 3, "probs": probs[:1].numpy()}, free=0)
    assert expect == [(1, 4, 1)] and not queue


def test_the_horizon_follows_the_link():
    """Layers ahead a copy needs: one transfer over one layer's compute, at least one, at most all layers."""
    model, off, pf = _prefetcher(0.001)
    try:
        transfer = off.engine.link_seconds(off.expert_bytes[0])
        for ratio, horizon in ((0.5, 1), (1.5, 2), (2, 2), (3, 3), (8, 4)):
            off.clock.layer_seconds = transfer / ratio
            assert pf._horizon(transfer) == horizon
        off.clock.layer_seconds = 0.0
        assert pf._horizon(transfer) == 0  # unknown compute: the predictor's own lookahead only
    finally:
        m2r2_moe.remove_offload(model)


def test_predicting_every_other_layer_looks_past_the_layer_that_skips(monkeypatch):
    """When the planner predicts at every `every`-th layer only (backing off), each predicting layer looks `every - 1`
    layers farther than the link's horizon: the layers between two predicting ones are still covered (without it,
    half of them were never prefetched for: on simulated time, tiny-mixtral at link ratio 0.5 with the prefetch path
    free, 0.962x on-demand loading's time against 0.937x)."""
    from m2r2_moe.runtime import prefetcher

    monkeypatch.setattr(prefetcher, "make_planner", lambda *args: PlannerCore(*args))  # the twin: `every` settable
    monkeypatch.setattr(PlannerCore, "step", lambda self, window, decode=False, margin=0.0: None)  # pinned below
    model, off, pf = _prefetcher(0.001)
    pf.planner.every = 2
    asked = []
    predict = pf._predict

    def spied(layer, top_k_index, decode, horizon):
        asked.append((layer, decode, horizon))
        return predict(layer, top_k_index, decode, horizon)

    def link_now():  # one layer's compute is two transfers: the link's horizon is one layer
        pf._link = (1e-3, 5e-4, 1, 1)  # (compute, transfer, horizon, reach: top-k of 2 transfers, one layer)
        return pf._link

    monkeypatch.setattr(pf, "_predict", spied)
    monkeypatch.setattr(pf, "_link_now", link_now)
    monkeypatch.setattr(pf.onoff, "step", lambda now, decode, vouched=False: True)
    try:
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        m2r2_moe.remove_offload(model)
    decode = [(layer, horizon) for layer, dec, horizon in asked if dec]
    assert decode and {layer for layer, _ in decode} == {0, 2}  # layers 1 and 3 of 4 do not predict
    assert {horizon for _, horizon in decode} == {2}  # the link's horizon (1) + every - 1


def test_an_idle_link_widens_the_prediction_to_the_reach(monkeypatch):
    """While no prefetch is on the link the prefetcher predicts out to the reach (a layer's top-k transfers), else
    to the link's horizon; the planner's `near` is the horizon either way (copies past it are early ones)."""
    from m2r2_moe.runtime import prefetcher

    monkeypatch.setattr(prefetcher, "make_planner", lambda *args: PlannerCore(*args))
    monkeypatch.setattr(PlannerCore, "step", lambda self, window, decode=False, margin=0.0: None)  # every = 1
    model, off, pf = _prefetcher(0.001)
    asked, backlogs = [], iter([[], [1], [], [2, 1]] * 100)
    predict = pf._predict

    def spied(layer, top_k_index, decode, horizon):
        asked.append((decode, horizon, pf.planner.near))
        return predict(layer, top_k_index, decode, horizon)

    def link_now():  # one transfer is 1.5 layers: horizon 2, a layer's two experts take 3 layers (the reach)
        pf._link = (1e-3, 1.5e-3, 2, 3)
        return pf._link

    monkeypatch.setattr(pf, "_predict", spied)
    monkeypatch.setattr(pf, "_link_now", link_now)
    monkeypatch.setattr(pf.cache, "queued_prefetches", lambda: next(backlogs))
    monkeypatch.setattr(pf.onoff, "step", lambda now, decode, vouched=False: True)
    try:
        with torch.no_grad():
            model.generate(torch.tensor([[1, 2, 3, 4, 5]]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=0)
    finally:
        m2r2_moe.remove_offload(model)
    decode = [(horizon, near) for dec, horizon, near in asked if dec]
    assert decode and {near for _, near in decode} == {2}
    assert {horizon for horizon, _ in decode} == {2, 3}  # the reach on an idle link, the horizon behind a backlog


def test_prefetch_min_prob_reaches_the_prefetcher():
    model = tiny_mixtral(layers=3)
    m2r2_moe.offload(model, device="cpu", cache_experts=6, predictor="gate", prefetch_min_prob=0.4)
    try:
        assert m2r2_moe.get_offloader(model).prefetcher.min_prob == 0.4
    finally:
        m2r2_moe.remove_offload(model)
    m2r2_moe.offload(model, device="cpu", cache_experts=6, predictor="gate")  # default: no floor
    try:
        assert m2r2_moe.get_offloader(model).prefetcher.min_prob == 0.0
    finally:
        m2r2_moe.remove_offload(model)


def test_layer_time_estimate_restarts_when_the_forward_size_changes(monkeypatch):
    """A prefill's slow layers must not make the first decode steps' link ratio look small (that halves the
    admission floor): the estimate starts afresh when the number of tokens per forward changes. The clock is
    a fake one, so the figures are exact on any machine."""
    from m2r2_moe.runtime import clock as clock_module

    clock = [100.0]
    monkeypatch.setattr(clock_module, "_source", lambda: clock[0])
    model, off, pf = _prefetcher(0.001)
    try:
        off.clock.tick(0, 64, 0.0)
        clock[0] += 0.02
        off.clock.tick(1, 64, 0.0)
        assert off.clock.layer_seconds == pytest.approx(0.02)
        off.clock.tick(0, 1, 0.0)  # decode starts
        assert off.clock.layer_seconds == 0.0 and pf._horizon(1.0) == 0  # unknown: the predictor's lookahead only
        clock[0] += 0.002
        off.clock.tick(1, 1, 0.0)
        assert off.clock.layer_seconds == pytest.approx(0.002)
    finally:
        m2r2_moe.remove_offload(model)


def test_an_early_copy_is_admitted_only_when_more_likely_used_than_not(planner):
    """`near`: a candidate past the link's horizon (asked for only while the link is idle) is queued only with a
    calibrated probability of at least EARLY_Q; within the horizon the value test alone decides."""
    from m2r2_moe.runtime.admission import EARLY_Q

    probs = torch.zeros(3, 8)
    probs[:, 1], probs[:, 2] = 0.7, 0.3  # fresh calibration: q is about the score
    args = dict(layer=0, decode=True, now=0, keys=[0], served=[0], evicted=[], probs=probs.numpy(), wraps=False,
                horizon=3, miss=1e-3, transfer=1e-4, compute=1e-3, free=8, backlog=[], min_prob=0.0)
    queued = {(t, e) for t, e, _ in planner.layer(**args)[0]}
    assert {(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)} <= queued  # no rule: every positive value
    planner.near = 1
    assert planner.near == 1
    queued = {(t, e) for t, e, _ in planner.layer(**{**args, "now": 1, "layer": 1, "keys": [9]})[0]}
    assert (2, 1) in queued and (2, 2) in queued  # within the horizon (distance 1 from layer 1)
    assert (3, 1) in queued and (3, 2) not in queued  # early: q 0.7 >= EARLY_Q > 0.3
    assert 0.3 < EARLY_Q <= 0.7
