"""Which predicted experts are worth a copy: probabilities calibrated online, an expected-value test, and a
watch on whether prefetching pays at all. No constant here is fitted to a model: every estimate starts from
what the predictor says and is corrected by what the running model does.

- `Calibration`: every prediction is later confirmed or refuted by the routing (did layer t use expert e at
  its next turn?). Per (source, distance, score bin) it keeps decayed counts of both, so that
  `probability(source, d, score)` is P(used | d, score) as measured on this model and this text, shrunk toward
  the predictor's own score while there are few outcomes.
- `value`: a copy for distance d, right with probability q, saves the stall it hides, min(T, lead) (T: one
  expert's transfer time; lead: the compute time until its layer, d layer times, less the copies queued ahead of
  it on the link); wrong, it costs the link time it takes from other copies (T times the link's busy share: on
  the CPU engine demand loads pre-empt prefetches, so it delays only other prefetches) — and either way, when a
  slot must be freed for it, the expected cost of the expert it evicts (T times the measured share of evicted
  experts that a demand load had to bring back soon after: `regret`). Admit when the expected value is
  positive.
- `Benefit`: the stall prefetching saved (demand loads it made unnecessary, and the part of late ones it
  hid), against what it cost (the time spent predicting and planning, evictions regretted). When the balance of
  the last tokens is negative prefetching backs off (it predicts on fewer layers), down to none, and probes
  again now and then: prefetching may never make a model slower than on-demand loading.
Times are host seconds; on a GPU whose link speed the engine does not know, T is taken as several layer times
(transfer-bound, the regime offloading is for).
"""

from __future__ import annotations

BINS = 10  # score bins of width 0.1
DECAY = 0.995  # per outcome: the calibration follows the text over the last few hundred outcomes
PRIOR = 4.0  # weight of the predictor's own score until outcomes accumulate


class Calibration:
    """P(used | source, distance, score bin), measured online."""

    def __init__(self):
        self._counts: dict[tuple, list[float]] = {}  # (source, d, bin) -> [used, seen]

    @staticmethod
    def _bin(score: float) -> int:
        return min(int(score * BINS), BINS - 1)

    def probability(self, source: str, distance: int, score: float) -> float:
        used, seen = self._counts.get((source, distance, self._bin(score)), (0.0, 0.0))
        return (used + PRIOR * score) / (seen + PRIOR)

    def record(self, source: str, distance: int, score: float, used: bool) -> None:
        counts = self._counts.setdefault((source, distance, self._bin(score)), [0.0, 0.0])
        counts[0] = counts[0] * DECAY + used
        counts[1] = counts[1] * DECAY + 1.0

    def table(self) -> dict[tuple, tuple[float, float]]:
        """(source, distance, bin) -> (measured P(used), outcomes), for reports and tests."""
        return {k: (u / s if s else 0.0, s) for k, (u, s) in sorted(self._counts.items())}


class Regret:
    """The share of evictions whose victim was demand-loaded again within `window` turns: what evicting an
    expert for a prefetch risks (the policy picks a prefetch's victim as it picks a demand load's)."""

    def __init__(self, window: int):
        self.window = window
        self._evicted: dict[int, int] = {}  # key -> turn it was evicted for a prefetch
        self.regretted, self.evictions = 0.0, 0.0

    def evicted(self, key: int, now: int) -> None:
        self._evicted[key] = now
        self.evictions = self.evictions * DECAY + 1.0  # both counts age by evictions: their ratio is a share
        self.regretted *= DECAY

    def missed(self, key: int, now: int) -> None:
        """`key` had to be demand-loaded at turn `now`."""
        when = self._evicted.pop(key, None)
        if when is not None and now - when <= self.window:
            self.regretted += 1.0

    def forget_older(self, now: int) -> None:
        """Drop evictions too old to be regretted (keeps the bookkeeping bounded)."""
        if len(self._evicted) > 4096:
            self._evicted = {k: t for k, t in self._evicted.items() if now - t <= self.window}

    @property
    def share(self) -> float:
        return (self.regretted + 0.5) / (self.evictions + 1.0)  # 0.5 until measured: neither free nor forbidden


def value(q: float, transfer: float, lead: float, busy: float, evicts: bool, regret: float) -> float:
    """Expected seconds a copy saves (see the module docstring); admit when positive."""
    saving = min(transfer, max(lead, 0.0))
    return q * saving - (1.0 - q) * busy * transfer - (regret * transfer if evicts else 0.0)


class Benefit:
    """Realized benefit of prefetching over the last tokens, and how much of the model to predict on."""

    def __init__(self, num_layers: int, window: int = 64):
        self.num_layers, self.window = num_layers, window
        self.saved = self.spent = 0.0  # decayed seconds
        self.every = 1  # predict on every `every`-th layer call (1: all; 0: none until the next probe)
        self._calls = 0
        self._quiet = 0  # layer calls since prefetching was switched off

    def record(self, saved: float = 0.0, spent: float = 0.0) -> None:
        self.saved += saved
        self.spent += spent

    def step(self) -> None:
        """Once per forward: decay, and decide how often to predict from the balance."""
        decay = 1.0 - 1.0 / self.window
        self.saved, self.spent = self.saved * decay, self.spent * decay
        if self.every == 0:
            self._quiet += 1
            if self._quiet >= self.window:  # probe again: the text (and the link) may have changed
                self.every, self._quiet = self.num_layers, 0
            return
        if self.spent > 2 * self.saved and self.spent > 0:
            self.every = 0 if self.every >= self.num_layers else self.every * 2
        elif self.saved > 2 * self.spent and self.every > 1:
            self.every //= 2

    def active(self, layer: int) -> bool:
        """Whether to predict at `layer` of the current forward."""
        return self.every != 0 and layer % self.every == 0
