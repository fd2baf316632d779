"""Predictions → prefetch copies.

At MoE layer l, after the layer's own experts are pinned (so a prefetch can never evict them) and their
demand loads are queued (so a prefetch never delays them), the predictor turns the residual r_l into
expert scores for layers l+1..l+D (a predictor that `wraps` may name layers past the last one: the next
forward's, used in decode at batch 1). For each target the prefetcher takes the top-k experts whose predicted
probability (the target router's softmax on the accelerated residual, for `gate`/`m2r2`) clears the
admission threshold (`min_prob`, raised on a slow busy link: `_thresholds`), and, nearest target first
(deadline order):
- skips experts already resident or in flight (de-duplication); marks the resident ones as needed at their
  target's turn (the `predictive` policy then keeps them; `lru` leaves recency to actual use);
- withdraws queued copies for a target that the newer prediction no longer wants (cancellation);
- keeps at most `max_queued` prefetch copies unfinished, fewer when the link cannot deliver them within
  the lookahead (`_link_budget`): the link then carries only the most urgent, most likely experts. A
  prefetch only ever evicts an unpinned expert, and the copy engine runs demand loads first.
Copies are queued with priority d (demand loads: 0): on CPU the copy engine runs them in deadline order;
on CUDA the single copy stream runs them in submission order, which is the same.
"""

from __future__ import annotations

import time

import torch

from ..models.tap import LayerTap
from ..predict.base import Predictor, as_probabilities
from .experts import to_device


class Prefetcher:
    """Drives one predictor for one offloaded model: reads the expert cache's state, never the hot path's."""

    def __init__(self, predictor: Predictor, cache, clock, engine, layers, top_k: int, expert_bytes: int,
                 min_prob: float, width: int | None = None, max_queued: int | None = None):
        self.predictor, self.cache, self.clock, self.engine = predictor, cache, clock, engine
        self.num_layers, self.expert_bytes = len(layers), expert_bytes
        self.min_prob = min_prob  # the admission floor: RuntimePlan.prefetch_min_prob
        self.width = width or top_k
        self.max_queued = max_queued or 2 * top_k
        self._wanted: dict[int, set[int]] = {}  # target layer -> experts the latest prediction wants
        self.link_busy = 0.0  # running estimate of the link's busy fraction (ratio-aware admission)
        self._busy_mark = (0.0, 0.0)  # (perf_counter, engine busy seconds) at the last layer-0 call
        # r_l and norm_l(r_l) as the model computed them, for predictors that read the residual
        self.tap = LayerTap(layers, residual=True, routing=False) if predictor.needs_residual else None

    def remove(self) -> None:
        if self.tap is not None:
            self.tap.remove()

    @torch.no_grad()
    def on_layer(self, layer: int, top_k_index: torch.Tensor, pinned: frozenset) -> None:
        """Called by the hot path at layer `layer` once the keys `pinned` hold their slots."""
        if layer == 0:
            self._measure_link()
        residual, normed = (self.tap.residual[layer], self.tap.normed[layer]) if self.tap else (None, None)
        depths, scores = self.predictor.predict_stacked(layer, residual, top_k_index, normed=normed)
        self.predictor.observe(layer, top_k_index)
        ratio = self._transfer_ratio()
        targets = self._ranked(layer, depths, scores, ratio) if depths else {}  # {layer + d: experts}
        count, now = self.num_layers, self.clock.now(layer)
        # (target layer, distance, experts), deadline order; a target past the last layer is the next forward's
        # layer (target % count), taken only in decode at batch 1
        plan = [(t % count, t - layer, experts) for t, experts in sorted(targets.items())
                if t < count or top_k_index.shape[0] == 1]
        self._wanted.pop(layer, None)
        for target, _, experts in plan:  # keyed by layer index: a wrapped target's own turn is still ahead
            for expert in self._wanted.get(target, set()).difference(experts):
                self.cache.withdraw(target, expert)
            self._wanted[target] = set(experts)
        for target, distance, experts in plan:  # resident predicted experts are needed soon
            for expert in experts:
                self.cache.expect(target, expert, distance, now)
        queued, budget = self.cache.queued_prefetches(), self._link_budget(ratio)
        for target, distance, experts in plan:
            for expert in experts:
                if queued >= budget:
                    break
                queued += self.cache.prefetch(target, expert, distance, now, pinned)
        if layer == count - 1:
            self.predictor.advance(top_k_index.shape[0])

    def _transfer_ratio(self) -> float:
        """One expert's transfer time / one layer's compute time, as measured (0 while unknown, or when
        the engine cannot tell its link's speed)."""
        transfer = self.engine.link_seconds(self.expert_bytes)
        compute = self.clock.layer_seconds
        return transfer / compute if transfer > 0 and compute > 0 else 0.0

    def _measure_link(self) -> None:
        """Once per forward: the share of the last forward the link spent copying."""
        now, busy = time.perf_counter(), self.engine.busy_seconds
        last_now, last_busy = self._busy_mark
        if last_now and now > last_now:
            sample = min((busy - last_busy) / (now - last_now), 1.0)
            self.link_busy = 0.7 * self.link_busy + 0.3 * sample
        self._busy_mark = (now, busy)

    def _link_budget(self, ratio: float) -> int:
        """Prefetch copies allowed unfinished: what the link can deliver within the lookahead (a copy that
        cannot arrive before its deadline delays the demand loads behind it), at least one. `ratio`: see
        `_transfer_ratio`."""
        if not ratio:
            return self.max_queued
        return max(1, min(self.max_queued, int(self.predictor.depth / ratio)))

    def _thresholds(self, depths: list[int], ratio: float) -> list[float]:
        """Minimum predicted probability per target. Ratio-aware admission: a copy at distance d saves at
        most min(T, d·C) of stall when right (T = transfer, C = layer compute); when wrong it holds the link
        for T, which delays other copies about as often as the link is busy (u) — other prefetches on the CPU
        engine, where demand loads pre-empt it, demand loads too on CUDA. It is worth it when
        p·min(T, dC) > (1 − p)·u·T, i.e. p > uT / (uT + min(T, dC)); never below the floor `min_prob`, which
        stands for what this leaves out: a prefetch also evicts a resident expert that may be needed. On a
        link measured faster than the compute (ratio < 1) the floor is halved: there an evicted expert that
        is needed again is brought back in time by the next prediction. An idle link admits down to the
        floor, a saturated slow link only confident predictions."""
        busy = self.link_busy
        floor = max(self.min_prob * (0.5 if 0 < ratio < 1 else 1.0), 1e-12)  # > 0: no score, no fetch
        if not ratio or not busy:
            return [floor] * len(depths)
        return [max(floor, busy * ratio / (busy * ratio + min(ratio, d))) for d in depths]

    def _ranked(self, layer: int, depths: list[int], scores: torch.Tensor, ratio: float) -> dict[int, list[int]]:
        """`scores [D, T, E]` → {target layer: experts to bring, most likely first}: each token's top `width`
        experts whose share of the token's scores clears the admission threshold (union over the batch). All targets
        at once, one device→host read (which copies to issue depends on it)."""
        probs = scores if self.predictor.scores_are_probabilities else as_probabilities(scores)  # [D, T, E]
        need = self._thresholds(depths, ratio)
        width = min(self.width, probs.shape[-1])
        if probs.shape[1] == 1:  # decode, batch 1: D x E numbers, ranked on the host (cheaper than tensor ops)
            # host sync: which copies to issue depends on the predicted probabilities (one read per layer)
            return {layer + d: _top(row, width, floor) for d, row, floor in zip(depths, probs[:, 0].tolist(), need)}
        top, order = probs.topk(width, dim=-1)  # [D, T, W]
        floors = to_device(need, top.device, top.dtype).view(-1, 1, 1)  # [D, 1, 1]
        keep = top >= floors
        best = torch.zeros_like(probs).scatter_(-1, order, top * keep).amax(1)  # [D, E]
        value, ranked = best.sort(-1, descending=True)
        rows = torch.where(value > 0, ranked, -1).tolist()  # host sync: as above, one read per layer
        return {layer + d: [e for e in row if e >= 0] for d, row in zip(depths, rows)}


def _top(row: list[float], width: int, floor: float) -> list[int]:
    """The `width` largest entries of `row` (most likely first) that are at least `floor`: their indices."""
    best = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:width]
    return [e for e in best if row[e] >= floor]
