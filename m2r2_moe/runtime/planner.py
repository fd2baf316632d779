"""The prefetcher's per-layer decision, from plain numbers: the reference twin of the C++ planner.

One call per MoE layer (`layer`) takes what the layer's acquire said (the keys it used, how each use was
served, what its demand loads evicted), the predictor's probabilities for the layers ahead and the link's state,
and returns what to do: the copies to queue, the resident experts to mark as needed soon, the queued copies to
withdraw. It keeps everything that is learned online (runtime/admission.py says why each piece is there):
- the calibration of P(used | source, distance, score bin), settled by the routing each prediction was for;
- each layer's recent usage, the prior for distances past the predictor's lookahead and across the token;
- the regret of evicting for a prefetch (the share of its victims brought back within a turn of layers, by a demand
  load or by a prefetch, whose use then saves nothing; unless the prefetched copy landed in time and was used first:
  a demand load of it would then have evicted too, and the victim is absolved; a late copy's victim is not);
- the benefit balance (stall saved against time spent), and the stall the decode steps since the last prompt
  saved and caused, that decide how often to predict;
- a mirror of which experts are resident or in flight, from the reports it gets (acquires, evictions, the copies
  it asked for), so that candidates are filtered without asking the cache. The mirror only steers prefetching:
  the cache checks every copy again.
The C++ twin (`m2r2_moe._native_plan.Planner`, csrc/planner.cpp) makes the same decisions on the same inputs
(tests/test_planner_diff.py); `make_planner` picks it when it is built.
"""

from __future__ import annotations

import math

from ..predict.base import run_host_heads
from .admission import BINS, DECAY, EARLY_Q, PRIOR, REGRET_PRIOR, value

MODEL, PRIOR_SOURCE = 0, 1
PRIOR_DECAY = 0.8  # per use of a layer: the prior follows the last few tokens
HIT, PREFETCH_HIT, LATE, MISS = 0, 1, 2, 3  # as runtime/expert_cache.py
NOT_QUEUED = -2


class PlannerCore:
    """Python twin of the C++ planner: the same interface and decisions."""

    def __init__(self, num_layers: int, num_experts: int, key_stride: int, width: int, max_queued: int):
        self.num_layers, self.num_experts, self.key_stride = num_layers, num_experts, key_stride
        self.width, self.max_queued, self.near = width, max_queued, 0  # near: see admission.py, EARLY_Q
        self._counts: dict[tuple[int, int, int], list[float]] = {}  # (source, distance, bin) -> [used, seen]
        self.prior = [[0.0] * num_experts for _ in range(num_layers)]
        self._pending: list[list[tuple[int, int, float, int]]] = [[] for _ in range(num_layers)]
        self._evicted_at: dict[int, int] = {}
        self._victims: dict[int, tuple[int, int]] = {}  # prefetched key -> (its victim, the turn it was evicted)
        self._restoring: set[int] = set()  # prefetches of a prefetch's recent victim: their use saves nothing
        self.regretted = self.evictions = self.saved = self.spent = 0.0
        self.decode_saved = self.decode_caused = 0.0  # stall the decode steps since the prompt saved and caused
        self._decoding, self._late_saving = False, None  # (late_saving: float | None)
        self.every, self._quiet = 1, 0
        self._resident: set[int] = set()
        self._inflight: set[int] = set()  # (with _resident: the mirror)
        self._wanted: dict[int, set[int]] = {}

    # -- learned quantities ------------------------------------------------------------------------
    def probability(self, source: int, distance: int, score: float) -> float:
        used, seen = self._counts.get((source, distance, min(int(score * BINS), BINS - 1)), (0.0, 0.0))
        return (used + PRIOR * score) / (seen + PRIOR)

    def _record(self, source: int, distance: int, score: float, used: bool) -> None:
        if not 0 <= distance <= self.num_layers:
            return  # beyond one cycle of layers: never asked for
        counts = self._counts.setdefault((source, distance, min(int(score * BINS), BINS - 1)), [0.0, 0.0])
        counts[0] = counts[0] * DECAY + used
        counts[1] = counts[1] * DECAY + 1.0

    def regret(self) -> float:
        return (self.regretted + REGRET_PRIOR) / (self.evictions + 1.0)

    def active(self, layer: int) -> bool:
        return self.every != 0 and layer % self.every == 0

    def step(self, window: int, decode: bool = False, margin: float = 0.0) -> None:
        """Once per forward: age the benefit balance and decide how often to predict (admission.py, Benefit).
        `decode`: this forward is a decode step; from the first one after a prompt, the stall the decode steps'
        prefetches saved and caused is kept apart too (`decode_saved`, `decode_caused`), and when they caused more
        than they saved by more than `margin`, prediction backs off even if the prompt's credit still covers it."""
        decay = 1.0 - 1.0 / window
        self.saved, self.spent = self.saved * decay, self.spent * decay
        self.decode_saved, self.decode_caused = self.decode_saved * decay, self.decode_caused * decay
        if not decode:
            self._decoding = False
        elif not self._decoding:  # the first decode step after a prompt: the decode steps' stall balance starts
            self._decoding, self.decode_saved, self.decode_caused = True, 0.0, 0.0
        if self.every == 0:
            self._quiet += 1
            if self._quiet >= window:  # probe again: the text (and the link) may have changed
                self.every, self._quiet = self.num_layers, 0
            return
        harmful = self._decoding and self.decode_caused > self.decode_saved + margin
        if (self.spent > self.saved and self.spent > 0) or harmful:  # fewer layers (more only at twice the cost)
            self.every = 0 if self.every >= self.num_layers else self.every * 2
        elif self.saved > 2 * self.spent and self.every > 1:
            self.every //= 2

    def add_spent(self, seconds: float) -> None:
        self.spent += seconds

    def _credit(self, seconds: float) -> None:
        self.saved += seconds
        if self._decoding:
            self.decode_saved += seconds

    @property
    def late_saving(self) -> float | None:
        """The stall a late prefetch hid, as the prefetcher measured it (each late use is credited that, at most a
        demand load's stall); None until measured: half a demand load's."""
        return self._late_saving

    @late_saving.setter
    def late_saving(self, seconds: float | None) -> None:
        if seconds is not None and not seconds >= 0:
            raise ValueError("late_saving: seconds >= 0, or None")
        self._late_saving = None if seconds is None else float(seconds)

    # -- what is kept across runs (a warm start's profile, m2r2_moe/warm.py) ---------------------------
    def export_state(self) -> dict:
        """What was learned online that outlives a run: the calibration counts `[2, L + 1, BINS, 2]` (source,
        distance, score bin, (used, seen)) flattened, each layer's usage prior `[L, E]` and the regret counts."""
        width = self.num_layers + 1
        counts = [0.0] * (2 * width * BINS * 2)
        for (source, distance, b), (used, seen) in self._counts.items():
            i = ((source * width + distance) * BINS + b) * 2
            counts[i], counts[i + 1] = used, seen
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "counts": counts,
                "prior": [list(row) for row in self.prior], "regret": [self.regretted, self.evictions]}

    def import_state(self, state: dict) -> None:
        """Start from `export_state`'s output (of either twin); the rest (mirror, benefit balance) starts afresh.
        ValueError, changing nothing, when it was made for another geometry."""
        width = self.num_layers + 1
        counts, prior, regret = checked_state(state, self.num_layers, self.num_experts)
        self._counts = {}
        for i in range(0, len(counts), 2):
            if counts[i] or counts[i + 1]:
                b, rest = (i // 2) % BINS, (i // 2) // BINS
                self._counts[(rest // width, rest % width, b)] = [counts[i], counts[i + 1]]
        self.prior = prior
        self.regretted, self.evictions = regret

    # -- the per-layer decision ----------------------------------------------------------------------
    def layer(self, layer: int, decode: bool, now: int, keys: list[int], served: list[int], evicted: list[int],
              probs, wraps: bool, horizon: int, miss: float, transfer: float, compute: float, free: int,
              backlog: list[int], min_prob: float):
        """Returns (copies to queue [(target, expert, distance)], resident experts needed soon [(target,
        expert, distance)], copies to withdraw [(target, expert)]). `probs`: the predictor's probabilities
        `[D, E]` for distances 1..D (a float32 numpy array; None: this layer does not predict); `miss`: the stall
        of a demand load (measured); `transfer`: the link time of one copy."""
        self._settle(layer, decode, now, keys, served, evicted, miss)
        if probs is None:
            return [], [], []
        if isinstance(probs, tuple):  # a heads call (`Predictor.host_heads`), run as the C++ planner runs it
            probs = run_host_heads(probs)
        rows = probs.tolist()
        candidates = self._candidates(layer, decode, rows, wraps, max(len(rows), horizon))
        withdraw = self._withdrawals(layer, candidates)
        queue, expect = [], []
        regret = self.regret()
        backlog = list(backlog)
        for distance, target, expert, q in candidates:
            key = target * self.key_stride + expert
            if key in self._resident:
                expect.append((target, expert, distance))
                continue
            if key in self._inflight or len(backlog) >= self.max_queued or q < min_prob:
                continue
            if 0 < self.near < distance and q < EARLY_Q:  # an early copy: only a likely one
                continue
            ahead = sum(1 for d in backlog if d <= distance)
            lead = distance * compute - transfer * ahead if compute > 0 else math.inf
            if value(q, miss, transfer, lead, free <= 0, regret) <= 0:
                continue
            queue.append((target, expert, distance))
            backlog.append(distance)
            free -= 1
        return queue, expect, withdraw

    def issued(self, key: int, evicted: int, now: int) -> None:
        """The cache's answer to a copy asked for: NOT_QUEUED, or the key it evicted (-1: none)."""
        if evicted == NOT_QUEUED:
            return
        self._inflight.add(key)
        when = self._evicted_at.get(key)
        if when is not None and now - when <= self.num_layers:  # a prefetch's victim fetched back: regretted too
            del self._evicted_at[key]
            self.regretted += 1.0
            self._restoring.add(key)
        if evicted >= 0:  # evicted for a prefetch: regretted if a demand load or a prefetch brings it back soon
            self._evict(evicted)
            self._evicted_at[evicted] = now
            self._victims[key] = (evicted, now)
            self.evictions = self.evictions * DECAY + 1.0  # both counts age by evictions: their ratio is a share
            self.regretted *= DECAY

    def withdrawn(self, key: int) -> None:
        self._inflight.discard(key)
        self._restoring.discard(key)

    def resync(self, resident: list[int]) -> None:
        """After layers this planner was not told about (the prefetcher skips the settling while prefetching is
        off): the mirror becomes `resident`, the cache's keys (copies in flight count as resident: they are not
        asked for again), and the predictions made before the gap are dropped unsettled (their turns passed
        unseen). What was learned stays: calibration, prior, regret, benefit balance."""
        self._resident = set(resident)
        self._inflight = set()
        self._pending = [[] for _ in range(self.num_layers)]
        self._wanted = {}

    # -- internals ---------------------------------------------------------------------------------
    def _settle(self, layer, decode, now, keys, served, evicted, miss) -> None:
        # The balance is settled in a prompt's forward too, where the prefill streamer's copies (runtime/prefill.py)
        # land as prefetch hits: that credit is what the first decode steps start from. Settled on decode steps
        # only (measured, Python twin), the balance ran negative in the first forwards, before their predictions
        # were used, and halved prediction down to none within six tokens: at link ratio 0.5 with 16 of 64 slots a
        # run that prefetching makes 0.80x as long ran as long as on-demand loading. A start that is not borrowed
        # from the prompt has to keep that from happening. The credit has its own cost: decode steps that lose can
        # run on it for tens of tokens (a model the runtime was not tuned on, link ratio 8, a quarter of its experts
        # cached, LRU: 1.07-1.11x on-demand loading's time). The decode steps' own stall balance (`step`) stops that.
        base = layer * self.key_stride
        used = [key - base for key in keys]
        for key, how in zip(keys, served):
            self._resident.add(key)
            self._inflight.discard(key)
            restored = key in self._restoring
            self._restoring.discard(key)
            if how == MISS:
                when = self._evicted_at.pop(key, None)
                if when is not None and now - when <= self.num_layers:  # a prefetch's victim, needed again
                    self.regretted += 1.0
                    self.spent += miss
                    if self._decoding:
                        self.decode_caused += miss
            elif how == PREFETCH_HIT or how == LATE:
                late = self._late_saving  # a late one hid part of its copy: as much as measured
                if not restored:  # a copy that only undid a prefetch's eviction saved nothing against on demand
                    self._credit(miss if how == PREFETCH_HIT else miss / 2 if late is None else min(late, miss))
                victim = self._victims.pop(key, None)  # landed in time, the prefetch was right: victim absolved
                if how == PREFETCH_HIT and victim is not None and self._evicted_at.get(victim[0]) == victim[1]:
                    del self._evicted_at[victim[0]]
        for key in evicted:
            self._evict(key)
        pending, self._pending[layer] = self._pending[layer], []
        if decode:
            for source, distance, score, expert in pending:
                self._record(source, distance, score, expert in used)
        row = self.prior[layer]
        for e in range(self.num_experts):
            row[e] *= PRIOR_DECAY
        for e in used:
            row[e] += 1.0
        if layer == 0 and len(self._evicted_at) > 4096:
            self._evicted_at = {k: t for k, t in self._evicted_at.items() if now - t <= self.num_layers}
        if layer == 0 and len(self._victims) > 4096:  # an absolution older than a turn decides nothing
            self._victims = {k: v for k, v in self._victims.items() if now - v[1] <= self.num_layers}

    def _evict(self, key: int) -> None:
        self._restoring.discard(key)
        self._resident.discard(key)
        self._inflight.discard(key)

    def _candidates(self, layer, decode, rows, wraps, horizon) -> list[tuple[int, int, int, float]]:
        """(distance, target layer, expert, calibrated P(used)), nearest first, likeliest first; at batch 1
        the top 2 x width of every target are kept to be settled when the target runs."""
        count, width, out = self.num_layers, self.width, []
        for d in range(1, horizon + 1):
            target = layer + d
            model = d <= len(rows)
            if target >= count and not (decode and (wraps or not model)) or target >= 2 * count:
                break
            target %= count
            if model:
                source, row = MODEL, rows[d - 1]
            else:
                total = sum(self.prior[target])
                if total <= 0:
                    continue
                source, row = PRIOR_SOURCE, [c / total for c in self.prior[target]]
            ranked = sorted(range(len(row)), key=lambda e: (-row[e], e))[: 2 * width]
            if decode:
                self._pending[target].extend((source, d, row[e], e) for e in ranked)
            out.extend((d, target, e, self.probability(source, d, row[e])) for e in ranked[:width] if row[e] > 0)
        out.sort(key=lambda c: (c[0], -c[3], c[2]))
        return out

    def _withdrawals(self, layer, candidates) -> list[tuple[int, int]]:
        """Queued copies for targets the new plan covers but no longer wants."""
        wanted: dict[int, set[int]] = {}
        for _, target, expert, _ in candidates:
            wanted.setdefault(target, set()).add(expert)
        self._wanted.pop(layer, None)
        out = []
        for target, experts in wanted.items():
            for expert in sorted(self._wanted.get(target, set()).difference(experts)):
                if target * self.key_stride + expert in self._inflight:
                    out.append((target, expert))
            self._wanted[target] = experts
        return out


def checked_state(state: dict, num_layers: int, num_experts: int):
    """(counts, prior, regret) of an exported planner state, as floats, checked against this geometry; ValueError
    naming what does not match."""
    size = 2 * (num_layers + 1) * BINS * 2
    try:
        if (int(state["num_layers"]), int(state["num_experts"])) != (num_layers, num_experts):
            raise ValueError(f"it was learned for {state['num_layers']} MoE layers of {state['num_experts']} experts, "
                             f"this planner has {num_layers} of {num_experts}")
        counts = [float(x) for x in state["counts"]]
        prior = [[float(x) for x in row] for row in state["prior"]]
        regret = [float(x) for x in state["regret"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a planner state (needs num_layers, num_experts, counts, prior, regret): {e!r}") from None
    if len(counts) != size or len(prior) != num_layers or any(len(r) != num_experts for r in prior) or len(regret) != 2:
        raise ValueError(f"planner state of the wrong shape: {len(counts)} counts (expected {size}), prior "
                         f"{len(prior)} x {len(prior[0]) if prior else 0} (expected {num_layers} x {num_experts})")
    if not all(math.isfinite(x) and x >= 0 for x in counts + [v for r in prior for v in r] + regret):
        raise ValueError("planner state has negative or non-finite counts")
    return counts, prior, regret


def make_planner(num_layers: int, num_experts: int, key_stride: int, width: int, max_queued: int,
                 native: bool | None = None):
    """The C++ planner (`m2r2_moe._native_plan.Planner`, same interface and decisions) when it is built, else the
    Python twin. `native=True` requires it; `False` forces the twin."""
    from .. import _ext  # the only door to native code

    if native is False or (native is None and not _ext.HAS_PLANNER):
        return PlannerCore(num_layers, num_experts, key_stride, width, max_queued)
    if not _ext.HAS_PLANNER:
        raise RuntimeError(f"the C++ planner is not available: {_ext.PLANNER_ERROR}")
    return _ext.planner.Planner(num_layers, num_experts, key_stride, width, max_queued)
