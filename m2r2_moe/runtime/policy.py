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
    """`predictive`: evict the resident expert whose estimated next use is farthest.

    Every resident expert carries an estimate of the turn it is needed next:
    - used at its layer's turn `now`: `now + L`, its layer's next turn (decode routing repeats often);
    - predicted for target layer t from source layer l: `now + (t - l)`, the target's coming turn.
    An estimate that is not in the future (`<= now`) is *stale*: its layer's turn came and went without the
    expert (or is happening now without it). Victim choice, O(resident) but only when a slot must be freed:
    1. the stale expert with the oldest estimate (it missed the most turns), else
    2. the expert needed farthest ahead — in a pool that cycles through the layers this is the layer just
       computed, where plain LRU would evict the next layer's experts, the worst possible choice.
    A prefetch may only displace a stale expert or one needed later than the prefetched one (Belady: never
    replace what is needed sooner with what is needed later).
    """

    name = "predictive"

    def __init__(self, num_layers: int, num_slots: int):
        self.num_layers, self.num_slots = num_layers, num_slots
        self.next_use: dict[int, int] = {}  # resident key -> estimated turn of its next use

    def used(self, key: int, now: int) -> None:
        """`key` is used at turn `now` (its own layer's turn)."""
        self.next_use[key] = now + self.num_layers

    def predicted(self, key: int, when: int, now: int) -> None:
        """At turn `now` a prediction wants `key` at turn `when`; a sooner need already recorded stands."""
        known = self.next_use.get(key)
        if known is None or known <= now or known > when:  # unknown, stale or later: the prediction wins
            self.next_use[key] = when

    def expect(self, key: int, when: int, now: int) -> None:
        """A prediction wants resident `key` at turn `when`: kept over experts needed later."""
        if key in self.next_use:
            self.predicted(key, when, now)

    def forget(self, key: int) -> None:
        self.next_use.pop(key, None)

    def victim(self, key: int, now: int, pinned, needed_at: int | None = None) -> int | None:
        """The key to evict (not in `pinned`) so that `key` can be placed; None when `key` is resident or a
        slot is free; -1 if none may be evicted: with `needed_at` (a prefetch for that turn) only a stale key or
        one needed later than `needed_at` qualifies."""
        if key in self.next_use or len(self.next_use) < self.num_slots:
            return None
        best, best_rank = -1, None
        for candidate, when in self.next_use.items():
            if candidate in pinned:
                continue
            rank = (0, when) if when <= now else (1, -when)  # stale first (oldest first), then farthest
            if best_rank is None or rank < best_rank:
                best, best_rank = candidate, rank
        if best >= 0 and needed_at is not None and best_rank[0] == 1 and -best_rank[1] <= needed_at:
            return -1  # every candidate is needed no later than the prefetched expert
        return best


def make_policy(name: str, num_layers: int, num_slots: int):
    """The policy called `name` (`OffloadConfig.policy`)."""
    return NextUsePolicy(num_layers, num_slots) if name == "predictive" else LruPolicy()
