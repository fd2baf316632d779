"""Which predicted experts are worth a copy: probabilities calibrated online, an expected-value test, and a
watch on whether prefetching pays at all. No constant here is fitted to a model: every estimate starts from
what the predictor says and is corrected by what the running model does.

- Calibration: every prediction is later confirmed or refuted by the routing (did layer t use expert e at
  its next turn?). Per (source, distance, score bin) decayed counts of both give P(used | d, score) as measured
  on this model and this text, shrunk toward the predictor's own score while there are few outcomes.
- `value`: a copy for distance d, right with probability q, saves the stall a demand load of it would cost
  (S, measured: the runtime's stall per demand load), all of it when it lands in time, the share lead/T of it
  otherwise (T: one expert's transfer time; lead: the compute time until its layer, d layer times, less the
  copies queued ahead of it on the link); when a slot must be freed for it, it costs the expected stall of the
  expert it evicts (S times the measured share of experts evicted for a prefetch that a demand load had to bring
  back soon after, before the prefetched copy was used: `regret`, optimistic until measured, so that prefetching
  starts. When the copy lands in time and is used the prefetch was right, a demand load of it would have evicted
  an expert too, and its victim is absolved; charged for every victim, 16 of the 18 regretted loads of a
  tiny-mixtral run at link ratio 8 were used prefetches' victims. A late copy's victim is not absolved: absolving it
  too, at ratio 8 with a quarter of the experts cached, prefetching ran 1.07x on-demand loading's time against 1.00x,
  the late copies hiding little of their transfers while their victims were needed again). Admit when the expected
  value is positive. The link time a wrong copy takes is not charged to it: demand loads pre-empt prefetches
  (CPU engine; on CUDA they have their own stream), so a wrong copy delays only the prefetches queued after it,
  and those are charged for it already: each one's lead counts the copies ahead of it, and one that would land
  too late to hide enough is not queued. (This test once also charged a wrong copy T x the link's busy share,
  counting that delay twice. On simulated time, `runtime/virtual.py`, the two rules side by side on three
  models: without the charge 1-3.5 % faster at link ratios 0.5 and 2 in five cases of six, equal in the sixth;
  at ratio 8 one model 1.3 % faster, one equal, one 1.8 % slower. What remains at high ratios: a wrong
  prefetch on the link still holds up a later one, as prefetches do not pre-empt each other.)
- Benefit: the stall prefetching saved (demand loads it made unnecessary, and the part of late ones it
  hid: a demand load's stall less what late prefetches were measured to wait; nothing for a copy that fetched back
  an expert a prefetch had evicted within a turn: it only undid that eviction, which counts as regretted. Credited
  for such copies too, on an unseen Mixtral at link ratio 8 with LRU and half its experts cached the balance stayed
  positive while prefetching ran 1.036x on-demand loading's time; without the credit 0.972x), against what it cost: the time
  spent predicting and planning (each layer's step as timed, clipped at a few times its running typical value by
  `StepTimer`: a step the OS preempted, or a page fault in it, is not prediction's cost; refunded when its layer
  then waited for a copy anyway: it ran while that copy was on the link), and the demand loads of experts it had
  evicted. When the balance of the last tokens is negative prefetching backs off (it predicts on fewer layers),
  down to none, and probes again now and then: prefetching may never make a model slower than on-demand loading.
  A prompt's forward is settled too (its streamed copies land as prefetch hits), which gives the first decode
  steps credit: time for the predictor's cost to pay off while its calibration settles. That credit does not
  cover harm to the cache: the stall the decode steps' prefetches saved and the stall they caused (their victims
  loaded again) are also kept apart since the prompt, and prediction backs off when the second exceeds the first
  by more than one demand load's stall, whatever the credit.
The state behind these lives in the planner (runtime/planner.py and its C++ twin).
Times are host seconds; on a GPU whose link speed the engine does not know, T is taken as several layer times
(transfer-bound, the regime offloading is for).
"""

from __future__ import annotations

BINS = 10  # score bins of width 0.1
DECAY = 0.995  # per outcome: the calibration follows the text over the last few hundred outcomes
PRIOR = 4.0  # weight of the predictor's own score until outcomes accumulate


REGRET_PRIOR = 0.1  # the share of regretted evictions assumed before any is measured (one eviction's weight)
# An early copy — for a layer past the link's horizon, asked for only while no prefetch is on the link, so that a
# burst of copies for one layer can land in time — takes the link ahead of copies that will be needed sooner and
# are not predicted yet; only one more likely used than not is worth that (the planner's `near`).
EARLY_Q = 0.5


def value(q: float, miss: float, transfer: float, lead: float, evicts: bool, regret: float) -> float:
    """Expected seconds a copy saves (see the module docstring); admit when positive. `miss`: the stall of a
    demand load; `transfer`: the link time of a copy."""
    saving = miss * (min(1.0, max(lead, 0.0) / transfer) if transfer > 0 else 1.0)
    return q * saving - (regret * miss if evicts else 0.0)


CLIP = 4.0  # a step timed longer than CLIP x the running typical step counts as CLIP x typical
FOLLOW = 0.05  # weight of each (clipped) step in the running typical value: a lasting change is followed in tens
# of steps, by up to CLIP x per step


class StepTimer:
    """The time the prefetcher's per-layer steps cost, for the benefit balance, robust to outliers: on a shared
    machine a step is sometimes preempted for milliseconds, and one such step would outweigh a hundred layers'
    savings and switch prefetching off for a whole window. `spent(seconds)` returns the step's time clipped at
    `CLIP` times the running typical step (a lasting rise is followed, up to CLIP x per step)."""

    def __init__(self):
        self.typical = 0.0

    def spent(self, seconds: float) -> float:
        typical = self.typical
        if typical > 0:
            seconds = min(seconds, CLIP * typical)
            self.typical = typical + FOLLOW * (seconds - typical)
        else:
            self.typical = seconds
        return seconds
