"""Do no harm, measured: seconds per decode step with prefetching on against off, online.

The planner's benefit balance weighs the stall its copies save against the time it spends predicting, which is
all it can time from inside a layer. Some costs it cannot see: copies that slow the kernels down (memory
traffic; on the CPU copy engine a worker thread beside the compute), wasted link time, caches the predictor's
weights push out. So the prefetcher also measures the one number prefetching is for: the wall time of a decode
step, in blocks of `BLOCK` steps run with prefetching on or off. After one block of each, every block runs the
arm whose recent blocks were faster (the median step of each block, the mean of the last `MEMORY` blocks per
arm) — prefetching is switched off only when off measured faster by more than `MARGIN` — except one block in `PROBE`, which measures the other arm again: the text, the cache and the link change
as a generation goes on, and a decision made early must be undone when they do.

The margin is there because blocks differ by more than the arms do: the text changes from block to block, and
with it how many experts miss (a 16-step block of a 128-token generation varies by 10 % and more on its own).
Without it, noise switched a predictor that pays off for a third of a generation; the planner's own balance
already turns prediction down when the costs it can time exceed the stall it saves.

And while the planner's own balance vouches for prefetching by a wide margin (the stall it counts as saved is more
than `VOUCH` times the time it spent predicting and issuing), no block is run with prefetching off: measuring
the off arm costs a block of the gain, and the comparison of two blocks of different text can only mislead
when what can be timed already says so clearly that prefetching pays. The costs no layer can time would have
to exceed that margin to be missed; the blocks resume as soon as the balance is less clear.

Only decode steps count (a prompt's forward takes much longer and is not a sample); the first `SETTLE` steps of a
block are not timed: they still run on what the other arm left (its prefetched experts, its queued copies). Nor
are the first `BLOCK` decode steps after a prompt's forward: decode starts from the experts the prompt left in the
cache and misses more until its own working set is in, whatever the arm (in two of three tiny-qwen3-moe prompts at
link ratio 2 the first block's median step took 1.1-2.4x the later on-blocks') — and the first block, always run
with prefetching on, would charge that to prefetching. With nothing to gain the off arm wins
and prefetching costs one probe block in `PROBE`; when prefetching pays it costs the same share of its gain.
"""

from __future__ import annotations

import statistics
from collections import deque

BLOCK = 16  # decode steps per block
SETTLE = 4  # steps at the start of a block not timed
PROBE = 8  # one block in PROBE measures the arm not in use
MEMORY = 4  # blocks of each arm averaged
MARGIN = 0.03  # off must be faster than on by this share to switch prefetching off
VOUCH = 4.0  # saved > VOUCH x spent in the planner's balance: no off blocks. The costs the planner cannot time were
# measured as large as those it times (kernels +60-90 µs per layer against a prefetch path of 80-90 µs, link ratio
# 0.5), and its saving counts every prefetch hit as a whole demand load: 2x for each, so 4x to skip the check


class OnOff:
    """Chooses, per decode step, whether prefetching runs; `step(now, decode)` at the start of every forward."""

    def __init__(self, block: int = BLOCK, probe: int = PROBE, memory: int = MEMORY, settle: int = SETTLE,
                 margin: float = MARGIN):
        self.block, self.probe, self.settle, self.margin = block, probe, min(settle, block - 1), margin
        self.blocks: dict[bool, deque] = {True: deque(maxlen=memory), False: deque(maxlen=memory)}
        self.arm = True  # the arm of the current block (True: prefetching on)
        self._count = 0  # blocks finished
        self._steps = 0  # decode steps begun in the current block
        self._times: list[float] = []  # timed steps of the current block
        self._last: float | None = None  # start of the previous decode step
        self._warming = 0  # decode steps after a prompt's forward whose time is not a sample yet

    def step(self, now: float, decode: bool, vouched: bool = False) -> bool:
        """Whether prefetching runs in the forward starting at `now` (seconds, perf_counter). Forwards of
        several tokens always prefetch and break the chain of decode steps (their time is not a sample).
        `vouched`: the planner's balance says prefetching pays by a wide margin; the next block runs it."""
        if not decode:
            self._last, self._warming = None, self.block
            return True
        if self._last is not None:  # the previous step's time: a sample past the prompt's wake and the settling
            if self._warming:
                self._warming -= 1
            elif self._steps > self.settle:
                self._times.append(now - self._last)
        self._last = now
        if self._steps >= self.block:
            self._finish(vouched)
        self._steps += 1
        return self.arm

    def _finish(self, vouched: bool) -> None:
        if self._times:
            self.blocks[self.arm].append(statistics.median(self._times))
        self._count += 1
        self._steps, self._times = 0, []
        self.arm = True if vouched else self.choose()

    def choose(self) -> bool:
        """The arm of the next block: each arm measured once first; then the faster (off only when faster by more
        than the margin), the other every PROBE-th."""
        for arm in (True, False):
            if not self.blocks[arm]:
                return arm
        best = self.mean(True) <= self.mean(False) * (1 + self.margin)
        return (not best) if self._count % self.probe == 0 else best

    def mean(self, arm: bool) -> float:
        return statistics.fmean(self.blocks[arm]) if self.blocks[arm] else float("nan")
