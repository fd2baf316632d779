"""The compute side of a CUDA device, as the copy engines see it, and stall timing that never blocks.

Streams and events belong to one device. A runtime on `cuda:1` must make its copy stream there, record
its events on that device's streams and make that device's compute stream wait, whichever device is
current when it runs: `ComputeSide` names the device once (index resolved) and every stream it hands
out is that device's current stream, the one the model's kernels run on.

Stall timing: each time the compute stream is made to wait for a copy, a pair of timing events is
recorded around the wait. The seconds between them are what the compute stream stalled; they can only be
read once the end event has completed (reading them earlier would synchronize). `StallLog` keeps the
pairs not completed yet and folds the completed ones into a running total at every wait, so it holds
only waits still queued on the device, however long nobody reads the stats. Events recorded on one
stream complete in order: folding stops at the first pair still pending (amortized O(1) per wait); when
pairs from several streams pile up (a caller switched the current stream), a full scan runs once
`MAX_PENDING` is passed. Each pair carries the `label` current when it was recorded (the runtime's phase,
prefill or decode: runtime/phases.py); `take_labelled` splits the last `drain` by label.
"""

from __future__ import annotations

from collections import deque

import torch

MAX_PENDING = 1024  # pairs kept before a full scan folds the completed ones out of order


def cuda_device(device: torch.device | str) -> torch.device:
    """`device` with its index resolved ('cuda' means the device current now)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"a CUDA copy engine needs a cuda device, got {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


class StallLog:
    """Timing-event pairs of device-side waits; `drain` returns the stalled seconds completed so far.

    The events need `query()` (non-blocking: has the event completed?) and `start.elapsed_time(end)`
    (milliseconds; never blocks once both have completed), as `torch.cuda.Event(enable_timing=True)`.
    """

    def __init__(self):
        self.pending: deque = deque()  # (start, end, label) of waits whose end has not completed, oldest first
        self.label: str | None = None  # given to the waits recorded from now on
        self._ms = 0.0  # completed stalls not drained yet
        self._by_label: dict = {}  # the same, per label (ms)
        self._drained: dict = {}  # the last drain, per label (seconds)

    def add(self, start, end) -> None:
        """Record the pair of one wait, and fold what has completed since the last one."""
        self.pending.append((start, end, self.label))
        while self.pending and self.pending[0][1].query():
            self._fold(*self.pending.popleft())
        if len(self.pending) > MAX_PENDING:
            self._fold_all_completed()

    def drain(self) -> float:
        """Seconds the compute stream stalled in the waits completed so far; the total restarts at 0."""
        self._fold_all_completed()
        ms, self._ms = self._ms, 0.0
        self._drained = {label: v / 1e3 for label, v in self._by_label.items()}
        self._by_label = {}
        return ms / 1e3

    def take_labelled(self) -> dict:
        """{label: seconds} of the last `drain` (once: a second call returns {})."""
        drained, self._drained = self._drained, {}
        return drained

    def discard(self) -> None:
        """Forget every recorded wait, completed or not (the counters they feed were reset)."""
        self.pending.clear()
        self._ms = 0.0
        self._by_label, self._drained = {}, {}

    def _fold(self, start, end, label) -> None:
        ms = start.elapsed_time(end)
        self._ms += ms
        self._by_label[label] = self._by_label.get(label, 0.0) + ms

    def _fold_all_completed(self) -> None:
        still = deque()
        for start, end, label in self.pending:
            if end.query():
                self._fold(start, end, label)
            else:
                still.append((start, end, label))
        self.pending = still


class ComputeSide:
    """The compute stream of one device (its current stream, where the model's kernels run), the waits
    queued on it for copies, and their stall timing."""

    def __init__(self, device: torch.device | str):
        self.device = cuda_device(device)
        self.stalls = StallLog()

    def stream(self) -> torch.cuda.Stream:
        """The current stream of the device: what the model computes on (not the current device's)."""
        return torch.cuda.current_stream(self.device)

    def order_before(self, copy_stream: torch.cuda.Stream) -> None:
        """Make `copy_stream` run after everything queued on the compute stream so far (once, at the copy
        engine's creation: the slot pool was zero-filled on the compute stream just before it, in
        `Offloader.__init__`, and a first copy into the pool must not land before that fill)."""
        copy_stream.wait_stream(self.stream())

    def done(self) -> torch.cuda.Event:
        """An event recorded on the compute stream now: a copy made to wait on it (`submit(after=...)`)
        runs after every kernel queued so far, e.g. the last ones reading a slot's previous tenant."""
        event = torch.cuda.Event()
        event.record(self.stream())
        return event

    def wait(self, enqueue_wait) -> None:
        """`enqueue_wait(stream)` queues a wait for a copy on the compute stream; it runs between two
        timing events, whose pair goes to the stall log (read later, never synchronously)."""
        stream = self.stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        enqueue_wait(stream)
        end.record(stream)
        self.stalls.add(start, end)
