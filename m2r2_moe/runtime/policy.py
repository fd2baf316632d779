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

HALF_LIFE = 32.0  # tokens over which an expert's use frequency halves (the text's, not a model's, time scale; 8 to
# 128 load within about 15 % of one another on every model tried, benchmarks/policies.py)


class LruPolicy:
    """`lru`: the least recently acquired (or prefetched) unpinned expert goes, as the slot table orders them."""

    name = "lru"

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
    eviction. Victim choice, O(resident) but only when a slot must be freed, among the unpinned experts:
    1. an expert a prediction still wants (its predicted turn is to come) only when every candidate is one, the
       one needed farthest ahead first;
    2. else the expert used least often lately; of equally frequent ones (never used, say), the one whose
       layer's turn comes last.
    Recency alone (stale first, then the farthest next use) evicted an expert used at nearly every token the
    first time it was skipped. Replayed offline on the same decode requests (`benchmarks/policies.py`, no
    prefetching), this rule loads 0.45-0.88x the experts LRU loads on the shipped models' held-out text (0.45x: the
    fine-grained one at half its experts), and 0.55-0.89x on a model the half-life was not chosen on; Belady's
    optimum is 0.2-0.5x. Half-lives of 8 to 128 tokens land within about 15 % of one another.
    A prefetch (`needed_at`) may only displace a stale expert or one needed later than the prefetched one
    (Belady: never replace what is needed sooner with what is needed later); the rule above picks among those.
    """

    name = "predictive"

    def __init__(self, num_layers: int, num_slots: int, half_life: float | None = None):
        self.num_layers, self.num_slots = num_layers, num_slots
        self.next_use: dict[int, int] = {}  # resident key -> estimated turn of its next use
        self.wanted: set[int] = set()  # resident keys whose estimate is a prediction's (until they are used)
        self._rate = math.log(2.0) / (half_life or HALF_LIFE)  # decay per token, as a rate
        self._uses: dict[int, tuple[float, int, int]] = {}  # key -> (log of its decayed use count + rate x forward
        # of its last use, that forward, its layer)
        self._first = -1  # the forward of the first use: turns are counted from it

    def frequency(self, key: int, now: int) -> float:
        """`key`'s decayed use count as of its layer's latest turn up to `now` (its uses, each weighed by the decay
        over the turns of its layer since)."""
        score, _, layer = self._uses.get(key, (-math.inf, 0, 0))
        visits = (now - layer) // self.num_layers  # index of its layer's latest turn (forward) up to now
        return math.exp(score - self._rate * visits)

    def used(self, key: int, now: int) -> None:
        """`key` is used at turn `now` (its own layer's turn)."""
        self.next_use[key] = now + self.num_layers
        self.wanted.discard(key)
        visit = now // self.num_layers  # the forward: its layer's turn in it
        if self._first < 0:
            self._first = visit
        score, last, _ = self._uses.get(key, (-math.inf, -1, 0))
        if last != visit:  # once per turn of its layer
            offset = self._rate * visit  # log(count) = score - offset: decayed to this turn, plus this use
            self._uses[key] = (math.log1p(math.exp(score - offset)) + offset, visit, now % self.num_layers)

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
        known = self.next_use.get(key)
        if known is None or known <= now or known > when:  # unknown, stale or later: the prediction wins
            self.next_use[key] = when
        if when > now:
            self.wanted.add(key)

    def expect(self, key: int, when: int, now: int) -> None:
        """A prediction wants resident `key` at turn `when`: kept over experts needed later."""
        if key in self.next_use:
            self.predicted(key, when, now)

    def forget(self, key: int) -> None:
        self.next_use.pop(key, None)
        self.wanted.discard(key)

    def victim(self, key: int, now: int, pinned, needed_at: int | None = None) -> int | None:
        """The key to evict (not in `pinned`) so that `key` can be placed; None when `key` is resident or a
        slot is free; -1 if none may be evicted: with `needed_at` (a prefetch for that turn) only a stale key or
        one needed later than `needed_at` qualifies."""
        next_use = self.next_use
        if key in next_use or len(next_use) < self.num_slots:
            return None
        layers, wanted, uses = self.num_layers, self.wanted, self._uses
        # uses per turn of its layer, as of that layer's latest turn: log(decayed uses) - log(decayed turns); a
        # layer still to come in this forward has had one turn less
        turn, forward = now % layers, now // layers
        done, to_come = self._per_turn(forward), self._per_turn(forward - 1)
        best, best_rate, best_turn, kept = -1, math.inf, 0, []
        for candidate, when in next_use.items():
            if candidate in pinned or (needed_at is not None and now < when <= needed_at):
                continue
            if when > now and candidate in wanted:  # a prediction wants it: only if every candidate is wanted
                kept.append((when, candidate))
                continue
            score, _, layer = uses.get(candidate, _NEVER)
            rate = score + (to_come if layer > turn else done)
            if rate > best_rate + _TIE:
                continue
            nxt = when if when > now else when + ((now - when) // layers + 1) * layers  # its layer's next turn
            if rate < best_rate - _TIE or nxt > best_turn:
                best, best_rate, best_turn = candidate, rate, nxt
        if best < 0 and kept:
            best = max(kept)[1]  # the wanted expert needed farthest ahead
        return best


_NEVER = (-math.inf, 0, 0)  # the use record of an expert never used
_TIE = 1e-9  # log-rates closer than this are equal (the same uses at the same turns, computed in another order)


def make_policy(name: str, num_layers: int, num_slots: int):
    """The policy called `name` (`OffloadConfig.policy`)."""
    return NextUsePolicy(num_layers, num_slots) if name == "predictive" else LruPolicy()
