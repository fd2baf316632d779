"""Predictions → prefetch copies, admitted by expected value, on a horizon that follows the link.

At MoE layer l, once the layer's own experts are pinned and their demand loads queued (a prefetch can neither
evict them nor delay them), the prefetcher:
1. settles earlier predictions for layer l: which predicted experts it used (the calibration's outcomes), which
   demand loads were experts a prefetch had evicted (regret), what prefetch hits saved (runtime/admission.py);
2. asks the predictor for expert probabilities of layers l+1..l+D, and, farther out to the link's horizon
   (the distance a copy needs to land in time: one expert's transfer over one layer's compute), uses each target
   layer's recent usage as a prior; a predictor that `wraps`, and the prior, name layers past the last one in
   decode at batch 1: the next token's first layers;
3. takes each target's most likely experts, nearest deadline first, and queues a copy where its expected value
   is positive: P(used) as calibrated online, against the stall it can hide given the copies queued ahead of it,
   the link time it takes and the expert it evicts (`admission.value`); marks predicted resident experts as
   needed soon (the `predictive` policy keeps them) and withdraws queued copies a newer prediction no longer
   wants.
When the measured balance of saved stall against time spent turns negative, it predicts on fewer layers, down to
none (`admission.Benefit`): prefetching must never make a model slower than on-demand loading.
"""

from __future__ import annotations

import math
import time

import torch

from ..models.tap import LayerTap
from ..predict.base import Predictor, as_probabilities
from .admission import Benefit, Calibration, Regret, value
from .expert_cache import LATE, MISS, NOT_QUEUED, PREFETCH_HIT

MODEL, PRIOR = "model", "prior"  # calibration sources: the predictor's scores, a layer's recent usage
PRIOR_DECAY = 0.8  # per use of the layer: the prior follows the last few tokens


class Prefetcher:
    """Drives one predictor for one offloaded model: reads the expert cache's state, never the hot path's."""

    def __init__(self, predictor: Predictor, cache, clock, engine, layers, top_k: int, expert_bytes: int,
                 min_prob: float = 0.0, width: int | None = None, max_queued: int | None = None):
        self.predictor, self.cache, self.clock, self.engine = predictor, cache, clock, engine
        self.num_layers, self.expert_bytes = len(layers), expert_bytes
        self.num_experts = max(int(layer.experts.num_experts) for layer in layers)
        self.min_prob = min_prob  # a user's floor on the calibrated probability (0: the value test decides)
        self.width = width or top_k
        self.max_queued = max_queued or 4 * top_k
        self.calibration, self.regret, self.benefit = Calibration(), Regret(self.num_layers), Benefit(self.num_layers)
        self.prior = [[0.0] * self.num_experts for _ in layers]  # decayed use counts per layer
        self._pending: dict[int, list] = {}  # target layer -> [(source, distance, score, expert)] to settle
        self._wanted: dict[int, set[int]] = {}  # target layer -> experts the latest plan wants
        self.link_busy = 0.0  # running estimate of the link's busy share
        self._busy_mark = (0.0, 0.0)  # (perf_counter, engine busy seconds) at the last layer-0 call
        # r_l and norm_l(r_l) as the model computed them, for predictors that read the residual
        self.tap = LayerTap(layers, residual=True, routing=False) if predictor.needs_residual else None

    def remove(self) -> None:
        if self.tap is not None:
            self.tap.remove()

    @torch.no_grad()
    def on_layer(self, layer: int, top_k_index: torch.Tensor, keys: list[int], served: list[int],
                 evicted: list[int] = ()) -> None:
        """Called by the hot path at layer `layer` once its experts (`keys`) are pinned; `served`: how each of
        their uses was served (the outcome of earlier predictions); `evicted`: the keys their loads displaced."""
        start, now = time.perf_counter(), self.clock.now(layer)
        decode = top_k_index.shape[0] == 1
        if layer == 0:
            self._measure_link()
            self.benefit.step()
        transfer = self._transfer_seconds()
        self._settle(layer, keys, served, now, transfer, decode)
        for key in evicted:  # any eviction's victim coming back soon is what evicting for a prefetch risks too
            self.regret.evicted(key, now)
        if self.benefit.active(layer):
            self._plan(layer, top_k_index, frozenset(keys), now, transfer, decode)
        self.predictor.observe(layer, top_k_index)
        if layer == self.num_layers - 1:
            self.predictor.advance(top_k_index.shape[0])
        self.benefit.record(spent=time.perf_counter() - start)

    # -- outcomes ----------------------------------------------------------------------------------
    def _settle(self, layer, keys, served, now, transfer, decode) -> None:
        """Book what this layer's uses say about earlier predictions (made in decode at batch 1: the outcome
        of one token's prediction is that token's routing)."""
        stride = self.cache.key_stride
        used = {key - layer * stride for key in keys}
        saved = 0.0
        for key, how in zip(keys, served):
            if how == MISS:
                self.regret.missed(key, now)
            elif how == PREFETCH_HIT:
                saved += transfer
            elif how == LATE:
                saved += transfer / 2  # part of its copy was hidden
        self.benefit.record(saved=saved)
        pending = self._pending.pop(layer, ())
        if decode:
            for source, distance, score, expert in pending:
                self.calibration.record(source, distance, score, expert in used)
        row = self.prior[layer]
        for e in range(len(row)):
            row[e] *= PRIOR_DECAY
        for e in used:
            row[e] += 1.0
        if decode and layer == 0:
            self.regret.forget_older(now)

    # -- planning ----------------------------------------------------------------------------------
    def _plan(self, layer, top_k_index, pinned, now, transfer, decode) -> None:
        residual, normed = (self.tap.residual[layer], self.tap.normed[layer]) if self.tap else (None, None)
        depths, scores = self.predictor.predict_stacked(layer, residual, top_k_index, normed=normed)
        candidates = self._candidates(layer, depths, scores, transfer, decode)
        self._withdraw_unwanted(layer, candidates)
        compute = self.clock.layer_seconds  # 0 while unknown: every copy is taken to land in time
        backlog = self.cache.queued_prefetches()
        free, regret, busy = self.cache.free_slots(), self.regret.share, self.link_busy
        for distance, target, expert, q in candidates:
            self.cache.expect(target, expert, distance, now)  # resident and predicted: needed soon
            if len(backlog) >= self.max_queued or q < self.min_prob:
                continue
            lead = distance * compute - transfer * sum(1 for d in backlog if d <= distance) if compute else math.inf
            if value(q, transfer, lead, busy, free <= 0, regret) <= 0:
                continue
            evicted = self.cache.prefetch(target, expert, distance, now, pinned)
            if evicted == NOT_QUEUED:
                continue
            backlog.append(distance)
            if evicted >= 0:
                self.regret.evicted(evicted, now)
            else:
                free -= 1

    def _candidates(self, layer, depths, scores, transfer, decode) -> list[tuple[int, int, int, float]]:
        """(distance, target layer, expert, calibrated P(used)), nearest first, likeliest first; predictions
        made at batch 1 are kept to be settled when their target runs."""
        count, width = self.num_layers, self.width
        rows = self._rows(depths, scores, decode) if depths else []
        horizon = max(max(depths, default=0), self._horizon(transfer))
        out = []
        for d in range(1, horizon + 1):
            target = layer + d
            if target >= count and not (decode and (self.predictor.wraps or d > len(rows))):
                break  # past the last layer: only in decode at batch 1, and only where the source can see it
            if target >= 2 * count:
                break
            if d <= len(rows):
                source, row = MODEL, rows[d - 1]
            else:
                source, row = PRIOR, self._prior(target % count)
            if row is None:
                continue
            ranked = sorted(range(len(row)), key=row.__getitem__, reverse=True)[: 2 * width]
            if decode:  # settled at the target's next turn: calibration of the top 2 x width
                self._pending.setdefault(target % count, []).extend((source, d, row[e], e) for e in ranked)
            for e in ranked[:width]:
                if row[e] > 0:
                    out.append((d, target % count, e, self.calibration.probability(source, d, row[e])))
        out.sort(key=lambda c: (c[0], -c[3]))
        return out

    def _rows(self, depths, scores, decode) -> list[list[float]]:
        """The predictor's probabilities as host lists per distance (one device→host read: which copies to
        issue depends on them); several tokens: each expert's highest probability over the tokens."""
        probs = scores if self.predictor.scores_are_probabilities else as_probabilities(scores)  # [D, T, E]
        if not decode:
            probs = probs.amax(1, keepdim=True)
        return probs[:, 0].tolist()  # host sync (once per layer), see above

    def _prior(self, layer: int) -> list[float] | None:
        row = self.prior[layer]
        total = sum(row)
        return [c / total for c in row] if total > 0 else None

    def _horizon(self, transfer: float) -> int:
        """Layers ahead a copy needs to land in time: one transfer over one layer's compute, plus one."""
        compute = self.clock.layer_seconds
        if not transfer or not compute:
            return 0
        return min(self.num_layers, math.ceil(transfer / compute) + 1)

    def _withdraw_unwanted(self, layer, candidates) -> None:
        """Cancel queued copies for targets the new plan covers but no longer wants."""
        wanted: dict[int, set[int]] = {}
        for _, target, expert, _ in candidates:
            wanted.setdefault(target, set()).add(expert)
        self._wanted.pop(layer, None)
        for target, experts in wanted.items():
            for expert in self._wanted.get(target, set()).difference(experts):
                self.cache.withdraw(target, expert)
            self._wanted[target] = experts

    # -- the link --------------------------------------------------------------------------------
    def _transfer_seconds(self) -> float:
        """One expert's transfer time: the engine's (emulated link), else several layer times (a real link
        the engine cannot time: offloading's transfer-bound regime), else one unit (nothing is known yet: the
        value test then weighs distances in transfers)."""
        seconds = self.engine.link_seconds(self.expert_bytes)
        return seconds if seconds > 0 else (4 * self.clock.layer_seconds or 1.0)

    def _measure_link(self) -> None:
        """Once per forward: the share of the last forward the link spent copying."""
        now, busy = time.perf_counter(), self.engine.busy_seconds
        last_now, last_busy = self._busy_mark
        if last_now and now > last_now:
            sample = min((busy - last_busy) / (now - last_now), 1.0)
            self.link_busy = 0.7 * self.link_busy + 0.3 * sample
        self._busy_mark = (now, busy)
