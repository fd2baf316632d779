"""Predictions → prefetch copies, admitted by expected value, on a horizon that follows the link.

At MoE layer l, once the layer's own experts are pinned and their demand loads queued (a prefetch can neither
evict them nor delay them), the prefetcher asks the predictor for expert probabilities of layers l+1..l+D and
hands them, with what the layer's acquire reported, to the planner (runtime/planner.py; C++ twin in
csrc/planner.cpp): one call that settles earlier predictions (calibration, regret, benefit), ranks the
candidates — the predictor's, and past its lookahead, out to the link's horizon and across the token at batch 1,
each target layer's recent usage — and admits those whose expected value is positive (runtime/admission.py).
The prefetcher then queues the admitted copies nearest deadline first, marks predicted resident experts as
needed soon (the `predictive` policy keeps them), withdraws queued copies a newer prediction no longer wants,
and tells the planner what the cache did. When prefetching costs more than it saves the planner predicts on
fewer layers, down to none, and probes again; and the wall time of decode steps with prefetching on and off is
compared online (runtime/onoff.py), which catches the costs no layer can time: prefetching must never make a model
slower than on-demand loading. A decode step that predicts nowhere (the off arm, or the planner backed off to none)
costs as little as it can: the residual tap's hooks are off the model, the hot path does not call the prefetcher
after the first layer (`quiet`; unless the predictor learns from the routing), and the planner is not called at all
(it is resynchronised with the cache when prefetching resumes).
"""

from __future__ import annotations

import math

import torch

from ..models.tap import LayerTap
from ..predict.base import Predictor, as_probabilities
from .admission import StepTimer
from .clock import host_seconds
from .onoff import VOUCH, OnOff
from .planner import make_planner

WINDOW = 64  # forwards over which the benefit balance is kept
OFF = 2.0  # a floor on the probability of use no candidate reaches: the planner settles and admits nothing


class Prefetcher:
    """Drives one predictor for one offloaded model: reads the expert cache's state, never the hot path's."""

    def __init__(self, predictor: Predictor, cache, clock, engine, layers, top_k: int, expert_bytes: int,
                 min_prob: float = 0.0, width: int | None = None, max_queued: int | None = None):
        self.predictor, self.cache, self.clock, self.engine = predictor, cache, clock, engine
        self.num_layers, self.expert_bytes = len(layers), expert_bytes
        self.min_prob = min_prob  # a user's floor on the calibrated probability (0: the value test decides)
        num_experts = max(int(layer.experts.num_experts) for layer in layers)
        self.planner = make_planner(len(layers), num_experts, cache.key_stride, width or top_k, max_queued or 4 * top_k)
        self.top_k, self._near = top_k, 0  # the planner's `near` as last set (see `_plan`)
        self._plans_heads = True  # hand the planner the heads call where there is one (False: `_predict` always, as
        # a benchmark timing the prediction apart needs)
        self.miss_seconds = 0.0  # running estimate of the stall one demand load costs (0 until measured)
        self.late_seconds = None  # running estimate of the stall one late prefetch costs (None until measured)
        self._stall_mark = (0.0, 0, 0, 0, 0)  # stall, misses, late at the last call; its new misses and late ones
        # r_l and norm_l(r_l) as the model computed them, for predictors that read the residual
        self.tap = LayerTap(layers, residual=True, routing=False, flat=False) if predictor.needs_residual else None
        self.onoff = OnOff()  # seconds per decode step with prefetching on against off (runtime/onoff.py)
        self.step_timer = StepTimer()  # this step's cost for the planner's balance, outliers clipped
        self.on = self.predicting = True  # this forward: prefetching on (the guard's arm); predicting somewhere
        self._every = self.planner.every  # this forward: predict at the layers this divides (0: none)
        self._link = (0.0, 0.0, 0, 0)  # (layer compute, transfer, horizon, reach) as last read: see `_link_now`
        self._gap = False  # decode steps were skipped (prefetching off) since the planner was last told
        self._spent = 0.0  # what the last step was charged (refunded if its layer then waited: `_read_stalls`)
        self._observes = type(predictor).observe is not Predictor.observe  # not a no-op: called at every layer
        self._shows = self._observes or type(predictor).advance is not Predictor.advance  # has anything to be shown
        self.quiet = False  # this forward: its layers after the first have nothing to do here (see `on_layer`)
        cache.unseen_evictions = []  # evictions no `on_layer` call passes (a prompt's streamed copies): see `_plan`

    def remove(self) -> None:
        self.cache.unseen_evictions = None
        if self.tap is not None:
            self.tap.remove()

    def on_layer(self, layer: int, top_k_index: torch.Tensor, keys: list[int], served: list[int],
                 evicted: list[int] = ()) -> None:
        """Called by the hot path at layer `layer` once its experts (`keys`) are pinned; `served`: how each of
        their uses was served; `evicted`: the keys their demand loads displaced. At every layer 0, and at the others
        unless `quiet` (set at layer 0: nothing would be done there)."""
        decode = top_k_index.shape[0] == 1
        if layer and decode and not self.predicting:  # a decode step that predicts nowhere (reached only for a
            # predictor that learns from the routing: for the others the hot path does not call, `quiet`)
            self._show(layer, top_k_index)
            return
        start = host_seconds()
        if layer == 0:  # once per forward (decode steps' prefetches may cause a demand load's stall more than saved)
            self.planner.step(WINDOW, decode, self.miss_seconds or self._link[1])
            vouched = self.planner.saved > VOUCH * self.planner.spent > 0
            self.on = self.onoff.step(start, decode, vouched)
            self._every = self.planner.every
            self.predicting = self.on and self._every != 0  # this forward predicts at some layer
            if self.tap is not None:  # a forward that predicts nowhere reads no residual
                self.tap.residuals_wanted = self.predicting
            # a decode step that predicts nowhere, of a predictor that learns nothing from the routing: the hot path
            # does not call the layers after the first at all (runtime/offloader.py: `run_wave`)
            self.quiet = decode and not self.predicting and not self._shows
        # a decode step that predicts nowhere does not tell the planner either (its bookkeeping is most of what an
        # idle prefetcher costs a layer); the planner is resynchronised when prefetching resumes
        skip = decode and not self.predicting
        if skip:
            self._gap = True
        else:
            if self._gap:
                self._resume()
            self._plan(layer, top_k_index, decode, self.clock.now(layer), keys, served, evicted)
        if self._observes:  # `_show`, inline: this runs at every layer
            self.predictor.observe(layer, top_k_index)
        if layer == self.num_layers - 1:
            self.predictor.advance(top_k_index.shape[0])
        if self.on and not skip:  # the off arm's bookkeeping is not prediction's cost
            self._spent = self.step_timer.spent(host_seconds() - start)
            self.planner.add_spent(self._spent)
        else:
            self._spent = 0.0

    def _show(self, layer: int, top_k_index: torch.Tensor) -> None:
        """Show the predictor the experts the layer used (when it learns from them) and, at the last layer, the end
        of the forward."""
        if self._observes:
            self.predictor.observe(layer, top_k_index)
        if layer == self.num_layers - 1:
            self.predictor.advance(top_k_index.shape[0])

    def _plan(self, layer, top_k_index, decode, now, keys, served, evicted) -> None:
        """Settle this layer's outcomes in the planner and, where it predicts, act on its decision."""
        link = self._link
        compute, transfer, horizon, reach = link if layer and link[0] else self._link_now()
        unseen = self.cache.unseen_evictions
        if unseen:  # evicted where the hot path could not say (a prompt's streamed copies, a layer's later waves):
            # else its mirror would believe them resident and leave them to demand loads (docs/design.md)
            evicted = [*evicted, *unseen]
            unseen.clear()
        miss = self._read_stalls() or transfer
        every = self._every
        if self.on and every and layer % every == 0:  # the planner's `active(layer)`, as of this forward's start
            if every > 1 and horizon:  # the layers up to the next predicting one predict nothing: cover them here
                horizon = min(self.num_layers, horizon + every - 1)
            free, backlog = self.cache.free_slots(), self.cache.queued_prefetches()
            if horizon != self._near:  # copies past it are early ones: only likely ones (admission.py, EARLY_Q)
                self.planner.near = self._near = horizon
            if reach > horizon and not backlog:  # no prefetch on the link: room for early copies (`_link_now`)
                horizon = reach
            heads = self.predictor.host_heads if decode and self._plans_heads and self.tap is not None else None
            calls = heads[layer] if heads is not None else None
            x = self.tap.normed[layer] if calls is not None else None
            if x is not None and x.is_cpu and x.dtype is torch.float32 and x.is_contiguous():
                # one native call runs the heads and decides (`Predictor.host_heads`); x [1, (1,) H] in place
                probs = (x.data_ptr(), *calls[min(horizon, len(calls)) - 1 if horizon else -1])
            else:
                probs = self._predict(layer, top_k_index, decode, horizon)
        else:  # settling only: the cache's state matters to admission, which does not run
            horizon, probs, free, backlog = 0, None, 0, []
        queue, expect, withdraw = self.planner.layer(  # positional: the C++ twin's fastest call
            layer, decode, now, keys, served, evicted, probs, self.predictor.wraps, horizon,
            miss, transfer, compute, free, backlog,
            self.min_prob if self.on else OFF)
        if queue or expect or withdraw:
            self._act(queue, expect, withdraw, now, keys)

    def _resume(self) -> None:
        """The first layer told to the planner after decode steps it skipped: its mirror of the cache becomes the
        cache's keys, the predictions made before the gap are dropped, and the stall per demand load is sampled
        afresh (the counters moved while nobody looked)."""
        self._gap = False
        self.cache.unseen_evictions.clear()  # the mirror is rebuilt from the cache itself
        self.planner.resync([key for key, _ in self.cache.slots.resident()])
        stats = self.cache.stats
        self._stall_mark = (stats.stall_seconds, stats.misses, stats.late_prefetches, 0, 0)

    def _predict(self, layer, top_k_index, decode, horizon):
        """The predictor's probabilities `[D, E]` for distances 1..D, a float32 numpy array on the host (one
        device→host read per layer: which copies to issue depends on them); several tokens: each expert's
        highest. At decode, the native path computes only the distances within `horizon` (farther ones are
        predicted again, closer, by later layers)."""
        if torch.is_grad_enabled():  # predictions never need a graph; entering no_grad costs µs, so only when on
            with torch.no_grad():
                return self._predict(layer, top_k_index, decode, horizon)
        residual, normed = (self.tap.residual[layer], self.tap.normed[layer]) if self.tap else (None, None)
        if decode:  # one native call where the predictor has one (CPU, float32), on the tensors as the model made them
            probs = self.predictor.predict_host(layer, residual, top_k_index, normed=normed, count=horizon or None)
            if probs is not None:
                return probs
        if residual is not None:  # the tap keeps them `[..., H]`: `predict_stacked` takes `[T, H]`
            residual, normed = residual.reshape(-1, residual.shape[-1]), normed.reshape(-1, normed.shape[-1])
        depths, scores = self.predictor.predict_stacked(layer, residual, top_k_index, normed=normed)
        if not depths:
            return None
        probs = scores if self.predictor.scores_are_probabilities else as_probabilities(scores)  # [D, T, E]
        probs = probs[:, 0] if decode else probs.amax(1)
        return probs.float().contiguous().cpu().numpy()  # host sync on CUDA (see the docstring)

    def _act(self, queue, expect, withdraw, now, keys) -> None:
        """Carry out the planner's decision: withdraw, expect, then queue (`keys`: the layer's, pinned)."""
        cache, planner = self.cache, self.planner
        if withdraw:
            stride = cache.key_stride
            for target, expert in withdraw:
                if cache.withdraw(target, expert):
                    planner.withdrawn(target * stride + expert)
        if expect:
            cache.expect(expect, now)
        if queue:
            stride, pinned = cache.key_stride, frozenset(keys)
            for target, expert, distance in queue:
                planner.issued(target * stride + expert, cache.prefetch(target, expert, distance, now, pinned), now)

    def _link_now(self) -> tuple[float, float, int, int]:
        """(one layer's compute, one expert's transfer, the horizon in layers, the reach), read afresh. `_plan` reads
        them once per forward (at its first layer, and at each layer while compute is not measured yet) and uses
        `_link` in between: they move slowly, and each read costs a layer µs. The reach is the horizon of a whole
        layer's experts (top-k transfers): while no prefetch is on the link, the layers out to it are predicted too,
        so that a layer needing several copies gets them in time; the planner admits those early copies only when
        they are likely (`near`)."""
        transfer = self._transfer_seconds()
        horizon = self._horizon(transfer)
        compute = self.clock.layer_seconds
        reach = min(self.num_layers, math.ceil(self.top_k * transfer / compute)) if horizon else 0
        self._link = (compute, transfer, horizon, max(reach, horizon))
        return self._link

    def _horizon(self, transfer: float) -> int:
        """Layers ahead a copy needs to land in time: one transfer over one layer's compute, at least one. A copy
        asked for at layer l has the compute of layers l..l+d-1 to land by layer l+d. Copies queued ahead of it on
        the link are the planner's to price (each candidate's lead counts them), not the horizon's. A horizon one
        layer deeper for them (it was) predicted a distance more at every predicting layer and filled slots with
        its less certain copies: side by side on simulated time (three models, half the experts cached) it wasted
        1.8-2.2x the bytes at link ratio 0.5 and 1.2-1.3x at ratio 2 for no gain in time (0.5-1.5 % slower in
        one A/B, -0.6 to +0.6 % in a second); at ratio 8 the model's depth caps both."""
        compute = self.clock.layer_seconds
        if not transfer or not compute:
            return 0
        return min(self.num_layers, max(1, math.ceil(transfer / compute)))

    # -- the link --------------------------------------------------------------------------------
    def _transfer_seconds(self) -> float:
        """One expert's transfer time: the engine's (emulated link), else several layer times (a real link
        the engine cannot time: offloading's transfer-bound regime), else one unit (nothing is known yet)."""
        seconds = self.engine.link_seconds(self.expert_bytes)
        return seconds if seconds > 0 else (4 * self.clock.layer_seconds or 1.0)

    def _read_stalls(self) -> float:
        """What the stall since the last call says; returns the stall one demand load costs. A layer's demand
        loads are counted when it acquires (before this call) and waited for after it, so the stall since the last
        call belongs to the loads that call saw: a sample of the demand load's stall when they were all demand
        loads, of what a late prefetch waits when they were all late ones (the planner credits each late one the
        demand load's stall less that: `late_saving`); a mix is no sample. And when the layer of the last call
        waited at all, that call's step ran while the copies it waited for were on the link: it cost no time, and
        what it was charged is refunded."""
        stats, mark = self.cache.stats, self._stall_mark
        stall, misses, late = stats.stall_seconds, stats.misses, stats.late_prefetches
        if stall == mark[0] and misses == mark[1] and late == mark[2] and not (mark[3] or mark[4]):
            return self.miss_seconds  # nothing since the last call (most layers): the mark would not change
        last_stall, last_misses, last_late, new_misses, new_late = mark
        if stall > last_stall and self._spent:  # the last step ran while its layer's copies were on the link: free
            self.planner.add_spent(-self._spent)
        if stall >= last_stall:
            if new_misses > 0 and new_late == 0:
                sample = (stall - last_stall) / new_misses
                self.miss_seconds = sample if not self.miss_seconds else 0.9 * self.miss_seconds + 0.1 * sample
            elif new_late > 0 and new_misses == 0:
                sample = (stall - last_stall) / new_late
                self.late_seconds = sample if self.late_seconds is None else 0.9 * self.late_seconds + 0.1 * sample
            if new_late and self.miss_seconds and self.late_seconds is not None:
                self.planner.late_saving = max(self.miss_seconds - self.late_seconds, 0.0)
        self._stall_mark = (stall, misses, late, misses - last_misses, late - last_late)
        return self.miss_seconds
