"""The CUDA copy engine (torch): two long-lived copy streams, one event per expert copy.

The compute stream waits on a copy's event (`wait_event`), so the host never blocks in the per-token path.
Streams and events are all the runtime's device's (runtime/cuda_compute.py), whichever device is current.

Demand loads never queue behind prefetches (the CPU engine's rule, runtime/cpu_engine.py): prefetches go to
one stream (`stream`), demand loads to a second one of higher priority (`demand_stream`), which runs beside
it. Copies into one slot still land in the order they were submitted: a copy waits for the latest earlier
copy into its slot when that one went to the other stream (a prefetch withdrawn by eviction while still
queued — a stream cannot withdraw it — must not land over the demand load that reuses its slot), and, as
before, for the compute that last read the slot (`after`). What the two streams do not change: copies on
both share the link, and the hardware may interleave them.
"""

from __future__ import annotations

import time

import torch

from .cuda_compute import ComputeSide
from .transfer import DEMAND

DEMAND_PRIORITY = -1  # CUDA stream priority of demand loads (lower is higher; the default stream's is 0)


class CopyClock:
    """Device times of copies on the host's clock, for the profiler's trace (its copy lane).

    A reference event is recorded on the copy stream and waited for once, when timing starts (a profiler
    attaches): from then on an event's time is the reference's host time plus the device time elapsed between
    the two (`elapsed_time`, read only once both have completed: never a sync in the per-token path)."""

    def __init__(self, stream: torch.cuda.Stream):
        self.reference = torch.cuda.Event(enable_timing=True)
        self.reference.record(stream)
        self.reference.synchronize()  # once, off the per-token path: pins device time to the host clock
        self.host = time.perf_counter()

    def seconds(self, event: torch.cuda.Event | None) -> float:
        """`event`'s time on the host clock (perf_counter seconds), 0 while it has not completed."""
        if event is None or not event.query():
            return 0.0
        return self.host + self.reference.elapsed_time(event) / 1e3


class CudaTransfer:
    """Handle of one copy on the CUDA copy stream."""

    __slots__ = ("key", "slot", "nbytes", "priority", "event", "engine", "error", "start", "clock")

    def __init__(self, key, slot, nbytes, priority, event: torch.cuda.Event, engine: "CudaCopyEngine",
                 start: torch.cuda.Event | None = None, clock: CopyClock | None = None):
        self.key, self.slot, self.nbytes, self.priority, self.event = key, slot, nbytes, priority, event
        self.engine = engine
        self.error = None  # a failed submission raises in `submit` (then a FailedTransfer stands in)
        self.start, self.clock = start, clock  # timing events, when a profiler asked for them

    cancelled = False  # a copy on the stream cannot be withdrawn

    @property
    def started_at(self) -> float:
        return self.clock.seconds(self.start) if self.clock is not None else 0.0

    @property
    def finished_at(self) -> float:
        return self.clock.seconds(self.event) if self.clock is not None else 0.0

    @property
    def busy(self) -> float:
        """Seconds the copy held the stream (once both its events have completed)."""
        start, end = self.started_at, self.finished_at
        return end - start if start and end else 0.0

    def ready(self) -> bool:
        return self.event.query()  # non-blocking poll

    def wait(self, timeout: float | None = None) -> float:
        """Device-side wait: the compute stream of the engine's device stalls until the copy's event; the
        host does not block. The stall is timed with a pair of events read later (`drain_stall_seconds`)."""
        if not self.event.query():
            self.engine.compute.wait(lambda stream: stream.wait_event(self.event))
        return 0.0


class CudaCopyEngine:
    """Host→device copies on two dedicated streams (prefetches; demand loads, higher priority), one event
    per expert. Streams and events are the engine's device's (`compute`: runtime/cuda_compute.py), whichever
    device is current."""

    def __init__(self, device: torch.device):
        self.compute = ComputeSide(device)
        self.device = self.compute.device  # index resolved
        self.stream = torch.cuda.Stream(device=self.device)  # prefetches, in submission (deadline) order
        self.demand_stream = torch.cuda.Stream(device=self.device, priority=DEMAND_PRIORITY)
        for stream in (self.stream, self.demand_stream):
            self.compute.order_before(stream)  # the slot pool's zero fill, queued on the compute stream
        self._latest: dict[int, tuple[torch.cuda.Stream, torch.cuda.Event]] = {}  # slot -> its latest copy
        self.bytes_copied = 0
        self.busy_seconds = 0.0  # not measured on CUDA without a sync; the profiler times copies with events
        self.fault = None  # test-only hook, see the module docstring
        self.clock: CopyClock | None = None  # set while copies are timed (time_copies)

    def time_copies(self, on: bool) -> None:
        """Give every copy from now on timing events (the profiler's copy lane); off again with False."""
        self.clock = CopyClock(self.stream) if on else None

    def submit(self, key: int, slot: int, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
               after: torch.cuda.Event | None = None, expand=None) -> CudaTransfer:
        if self.fault is not None:
            self.fault(key, slot, priority)
        timed = self.clock is not None
        event = torch.cuda.Event(enable_timing=timed)
        start = torch.cuda.Event(enable_timing=True) if timed else None
        stream = self.demand_stream if priority == DEMAND else self.stream
        latest = self._latest.get(slot)
        with torch.cuda.stream(stream):  # also makes the stream's device current inside the block
            if after is not None:
                # The slot's previous tenant may still be read by queued compute kernels: overwrite after them.
                stream.wait_event(after)
            if latest is not None and latest[0] is not stream:
                stream.wait_event(latest[1])  # an earlier copy into the slot, on the other stream, lands first
            if start is not None:
                start.record(stream)
            if expand is None:
                dst.copy_(src, non_blocking=True)
            else:  # a compressed row: copied to a staging row, then expanded into the slot, on this stream
                expand.on_device(dst, src, stream)
            event.record(stream)
        self._latest[slot] = (stream, event)
        nbytes = src.numel() * src.element_size()
        self.bytes_copied += nbytes
        return CudaTransfer(key, slot, nbytes, priority, event, self, start, self.clock)

    def link_seconds(self, nbytes: int) -> float:
        return 0.0  # the real link: its speed is not known to the engine

    def cancel(self, transfer) -> bool:
        return False  # a copy queued on the stream cannot be withdrawn

    def promote(self, transfer) -> None:
        pass  # a queued prefetch cannot be moved to the demand stream (its copy is already on its stream)

    def drain_stall_seconds(self) -> float:
        """Seconds the compute stream waited on copies, for the waits whose end events have completed."""
        return self.compute.stalls.drain()

    def discard_stalls(self) -> None:
        """Forget the waits timed so far, completed or not (the stats they feed were reset)."""
        self.compute.stalls.discard()

    def compute_done(self) -> torch.cuda.Event:
        return self.compute.done()  # on the runtime's device's compute stream, whichever device is current

    def close(self) -> None:
        # Copies still queued read pinned host memory that the store may free next: let them finish.
        self.stream.synchronize()
        self.demand_stream.synchronize()
