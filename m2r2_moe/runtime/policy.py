"""Eviction policies: which resident expert gives up its slot. One interface, two policies.

Both are told what happens to every key (`used`, `predicted`, `expect`, `forget`) and are asked one question,
`victim(key, now, pinned, needed_at)`, when `key` must be placed:
- `None`: no choice to make here — there is a free slot, or the policy leaves the choice to the slot table's
  own least-recently-used order (`lru`, which the C++ slot manager keeps at no cost);
- a key: evict that one first;
- `-1`: no key may be evicted for it (a prefetch that would displace something needed sooner).

Time is counted in layer turns: `now = step * L + layer` for the MoE layer `layer` (of L) being computed
in forward `step` (`runtime/clock.py`).
"""

from __future__ import annotations

import math

import numpy as np

HALF_LIFE = 32.0  # tokens over which an expert's use frequency halves (the text's, not a model's, time scale; 8 to
# 128 load within about 15 % of one another on every model tried, benchmarks/policies.py)


class LruPolicy:
    """`lru`: the least recently acquired (or prefetched) unpinned expert goes, as the slot table orders them."""

    name = "lru"
    expects = False  # `expect` is a no-op: callers skip it (no `expect_many`: ExpertCache.expect checks this)

    def used(self, key: int, now: int) -> None:
        pass

    def predicted(self, key: int, when: int, now: int) -> None:
        pass

    def expect(self, key: int, when: int, now: int) -> None:
        pass

    def forget(self, key: int) -> None:
        pass

    def victim(self, key: int, now: int, pinned, needed_at: int | None = None) -> int | None:
        return None


class NextUsePolicy:
    """`predictive`: evict the resident expert least likely to be needed soon.

    Every resident expert carries an estimate of the turn it is needed next:
    - used at its layer's turn `now`: `now + L`, its layer's next turn;
    - predicted for target layer t from source layer l: `now + (t - l)`, the target's coming turn.
    An estimate that is not in the future (`<= now`) is *stale*: its layer's turn came and went without the
    expert. And every expert, resident or not, has a use frequency: uses per turn of its layer, decayed with a
    half-life of `HALF_LIFE` tokens (forwards), so that it follows the text; an expert's history survives its
    eviction. Victim choice, only when a slot must be freed, among the unpinned experts (one pass over the keys, in
    C++ or numpy: `benchmarks/policy_cost.py`; tests/test_policy.py checks both against the rule written as a loop):
    1. an expert a prediction still wants (its predicted turn is to come) only when every candidate is one, the
       one needed farthest ahead first;
    2. else the expert used least often lately; of equally frequent ones (never used, say), the one whose
       layer's turn comes last, then the one resident longest.
    Recency alone (stale first, then the farthest next use) evicted an expert used at nearly every token the
    first time it was skipped. Replayed offline on the same decode requests (`benchmarks/policies.py`, no
    prefetching), this rule loads 0.45-0.88x the experts LRU loads on the shipped models' held-out text (0.45x: the
    fine-grained one at half its experts), and 0.55-0.89x on a model the half-life was not chosen on; Belady's
    optimum is 0.2-0.5x. Half-lives of 8 to 128 tokens land within about 15 % of one another.
    A prefetch (`needed_at`) may only displace a stale expert or one needed later than the prefetched one
    (Belady: never replace what is needed sooner with what is needed later); the rule above picks among those.
    """

    name = "predictive"
    expects = True  # predictions' `expect`s steer its victims

    def __init__(self, num_layers: int, num_slots: int, half_life: float | None = None, native: bool | None = None):
        """`native`: the victim search in C++ (`csrc/policy.hpp`, the default when it is built), or the numpy
        twin (False); True requires C++."""
        from .. import _ext  # the only door to native code

        if native and not _ext.HAS_PLANNER:
            raise RuntimeError(f"the C++ victim search is not available: {_ext.PLANNER_ERROR}")
        self._search = _ext.planner.policy_victim if native is not False and _ext.HAS_PLANNER else None
        self._expect_native = _ext.planner.policy_expect if self._search is not None else None  # its twin: `_expect_at`
        self.num_layers, self.num_slots = num_layers, num_slots
        self._rate = math.log(2.0) / (half_life or HALF_LIFE)  # decay per token, as a rate
        self._first = -1  # the forward of the first use: turns are counted from it
        self._rates = (-1, -1, 0.0, 0.0)  # (forward, _first, _per_turn(forward), _per_turn(forward - 1)) last asked
        self.resident = 0  # keys resident (as told: used or predicted, not forgotten)
        self._entered = 0  # how many times a key became resident: the order of the last tie-break
        self._size = 0
        self._grow(0)

    # Per key, indexed by the key and grown on demand: numpy arrays for the victim search (asked at every demand
    # load and prefetch that finds the pool full, over every resident expert, and a pool may hold thousands: in
    # C++ over the arrays in place, else one pass of numpy operations), and memoryviews of the same memory for the
    # per-use updates (a memoryview item costs what a dict item does).
    _FIELDS = (
        ("when", np.int64, 0),  # resident keys: the estimated turn of the next use
        ("res", np.bool_, False),  # resident
        ("want", np.bool_, False),  # resident, and the estimate is a prediction's (until it is used)
        ("since", np.int64, 0),  # the order in which it became resident
        ("score", np.float64, -math.inf),  # log of its decayed use count + rate x the forward of its last use
        ("visit", np.int64, -1),  # the forward of its last use
        ("layer", np.int64, 0),  # the layer of its uses
    )
    _SEARCHED = ("when", "res", "want", "since", "score", "layer")  # the C++ search's arrays, in its order

    def _grow(self, key: int) -> None:
        size = max(key + 1, 2 * self._size, 64)
        for name, dtype, fill in self._FIELDS:
            array = np.full(size, fill, dtype=dtype)
            if self._size:
                array[: self._size] = getattr(self, "_" + name + "_np")
            setattr(self, "_" + name + "_np", array)
            setattr(self, "_" + name, memoryview(array))
        self._size = size
        self._addresses = tuple(getattr(self, "_" + name + "_np").ctypes.data for name in self._SEARCHED)
        self._expecting = (self._when_np.ctypes.data, self._res_np.ctypes.data, self._want_np.ctypes.data)

    def _enter(self, key: int) -> None:
        if key >= self._size:
            self._grow(key)
        if not self._res[key]:
            self._res[key] = True
            self._since[key] = self._entered
            self._entered += 1
            self.resident += 1

    def next_turn(self, key: int) -> int | None:
        """The estimated turn of resident `key`'s next use (None: not resident)."""
        return self._when[key] if key < self._size and self._res[key] else None

    def frequency(self, key: int, now: int) -> float:
        """`key`'s decayed use count as of its layer's latest turn up to `now` (its uses, each weighed by the decay
        over the turns of its layer since)."""
        if key >= self._size:
            return 0.0
        visits = (now - self._layer[key]) // self.num_layers  # index of its layer's latest turn (forward) up to now
        return math.exp(self._score[key] - self._rate * visits)

    def used(self, key: int, now: int) -> None:
        """`key` is used at turn `now` (its own layer's turn)."""
        self._enter(key)
        self._when[key] = now + self.num_layers
        self._want[key] = False
        visit = now // self.num_layers  # the forward: its layer's turn in it
        if self._first < 0:
            self._first = visit
        if self._visit[key] != visit:  # once per turn of its layer
            offset = self._rate * visit  # log(count) = score - offset: decayed to this turn, plus this use
            self._score[key] = math.log1p(math.exp(self._score[key] - offset)) + offset
            self._visit[key] = visit
            self._layer[key] = now % self.num_layers

    def _per_turn(self, forward: int) -> float:
        """What turns a key's score into log(uses per turn of its layer) when the layer's latest turn was in
        `forward`: minus the decay up to that forward and the log of the decayed count of its turns since the
        policy's first (a layer still to come in the current forward has had one turn less than the others)."""
        turns = forward - self._first + 1
        if self._first < 0 or turns < 1:
            return 0.0  # the layer has had no turn yet: none of its experts has a use
        decay = math.exp(-self._rate)
        return -self._rate * forward - math.log((1.0 - decay ** turns) / (1.0 - decay))

    def predicted(self, key: int, when: int, now: int) -> None:
        """At turn `now` a prediction wants `key` at turn `when`; a sooner need already recorded stands."""
        if key < self._size and self._res[key]:
            self.expect(key, when, now)
            return
        self._enter(key)
        self._when[key] = when
        if when > now:
            self._want[key] = True

    def expect(self, key: int, when: int, now: int) -> None:
        """A prediction wants resident `key` at turn `when`: kept over experts needed later (a sooner need already
        recorded stands)."""
        self._expect_at(((key, when),), now)

    def expect_many(self, wanted, key_stride: int, now: int) -> None:
        """`expect` for each (layer, expert, distance) of `wanted`, at turn `now + distance`: the cache's one call per
        layer for all of a prediction's resident candidates."""
        if self._expect_native is not None:  # a loop in C++ over the arrays in place (it runs at every layer)
            self._expect_native(*self._expecting, self._size, wanted, key_stride, now)
            return
        self._expect_at(((layer * key_stride + expert, now + distance) for layer, expert, distance in wanted), now)

    def _expect_at(self, keyed, now: int) -> None:
        """The rule of `expect`, for each (key, turn) of `keyed`: a stale or later estimate gives way."""
        size, res, when_of, want = self._size, self._res, self._when, self._want
        for key, when in keyed:
            if key < size and res[key]:
                known = when_of[key]
                if known <= now or known > when:  # stale or later: the prediction wins
                    when_of[key] = when
                if when > now:
                    want[key] = True

    def forget(self, key: int) -> None:
        if key < self._size and self._res[key]:
            self._res[key] = self._want[key] = False
            self.resident -= 1

    def victim(self, key: int, now: int, pinned, needed_at: int | None = None) -> int | None:
        """The key to evict (not in `pinned`) so that `key` can be placed; None when `key` is resident or a
        slot is free; -1 if none may be evicted: with `needed_at` (a prefetch for that turn) only a stale key or
        one needed later than `needed_at` qualifies."""
        if self.resident < self.num_slots or (key < self._size and self._res[key]):
            return None
        layers, turn, forward = self.num_layers, now % self.num_layers, now // self.num_layers
        # uses per turn of its layer, as of that layer's latest turn: log(decayed uses) - log(decayed turns); a
        # layer still to come in this forward has had one turn less
        rates = self._rates
        if rates[0] != forward or rates[1] != self._first:  # once per forward (asked at every placement)
            rates = self._rates = (forward, self._first, self._per_turn(forward), self._per_turn(forward - 1))
        done, to_come = rates[2], rates[3]
        if self._search is not None:
            return self._search(*self._addresses, self._size, pinned, now, layers, done, to_come,
                                -1 if needed_at is None else needed_at)
        when = self._when_np
        candidates = self._res_np.copy()
        if pinned:
            candidates[[k for k in pinned if k < self._size]] = False
        if needed_at is not None:
            candidates &= (when <= now) | (when > needed_at)
        kept = candidates & self._want_np & (when > now)  # a prediction wants it: only if every candidate is wanted
        candidates &= ~kept
        index = np.flatnonzero(candidates)
        if not index.size:
            index = np.flatnonzero(kept)
            if not index.size:
                return -1
            ahead = when[index]
            return int(index[ahead == ahead.max()].max())  # the wanted expert needed farthest ahead
        rate = self._score_np[index] + np.where(self._layer_np[index] > turn, to_come, done)
        index = index[rate <= rate.min() + _TIE]
        if index.size > 1:  # equally frequent: the one whose layer's next turn comes last, then the first resident
            last = when[index]
            last = np.where(last > now, last, last + ((now - last) // layers + 1) * layers)
            index = index[last == last.max()]
            if index.size > 1:
                index = index[[np.argmin(self._since_np[index])]]
        return int(index[0])


_TIE = 1e-9  # log-rates closer than this are equal (the same uses at the same turns, computed in another order)


def make_policy(name: str, num_layers: int, num_slots: int):
    """The policy called `name` (`OffloadConfig.policy`)."""
    return NextUsePolicy(num_layers, num_slots) if name == "predictive" else LruPolicy()
