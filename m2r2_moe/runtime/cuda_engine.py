"""The CUDA copy engine (torch): one long-lived copy stream, one event per expert copy.

The compute stream waits on a copy's event (`wait_event`), so the host never blocks in the per-token path.
Streams and events are all the runtime's device's (runtime/cuda_compute.py), whichever device is current.
The copy stream does not pre-empt: a demand load queues behind the prefetches submitted before it (feeding
prefetches to the stream in pieces from the host would give it the CPU engine's pre-emption).
"""

from __future__ import annotations

import torch

from .cuda_compute import ComputeSide
from .transfer import DEMAND


class CudaTransfer:
    """Handle of one copy on the CUDA copy stream."""

    __slots__ = ("key", "slot", "nbytes", "priority", "event", "engine", "error")

    def __init__(self, key, slot, nbytes, priority, event: torch.cuda.Event, engine: "CudaCopyEngine"):
        self.key, self.slot, self.nbytes, self.priority, self.event = key, slot, nbytes, priority, event
        self.engine = engine
        self.error = None  # a failed submission raises in `submit` (then a FailedTransfer stands in)

    def ready(self) -> bool:
        return self.event.query()  # non-blocking poll

    def wait(self, timeout: float | None = None) -> float:
        """Device-side wait: the compute stream of the engine's device stalls until the copy's event; the
        host does not block. The stall is timed with a pair of events read later (`drain_stall_seconds`)."""
        if not self.event.query():
            self.engine.compute.wait(lambda stream: stream.wait_event(self.event))
        return 0.0


class CudaCopyEngine:
    """Host→device copies on one dedicated stream, one event per expert. Streams and events are the
    engine's device's (`compute`: runtime/cuda_compute.py), whichever device is current."""

    def __init__(self, device: torch.device):
        self.compute = ComputeSide(device)
        self.device = self.compute.device  # index resolved
        self.stream = torch.cuda.Stream(device=self.device)
        self.compute.order_before(self.stream)  # the slot pool's zero fill, queued on the compute stream
        self.bytes_copied = 0
        self.busy_seconds = 0.0  # not measured on CUDA without a sync; the profiler times copies with events
        self.fault = None  # test-only hook, see the module docstring

    def submit(self, key: int, slot: int, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
               after: torch.cuda.Event | None = None) -> CudaTransfer:
        if self.fault is not None:
            self.fault(key, slot, priority)
        event = torch.cuda.Event()
        with torch.cuda.stream(self.stream):  # also makes the stream's device current inside the block
            if after is not None:
                # The slot's previous tenant may still be read by queued compute kernels: overwrite after them.
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            event.record(self.stream)
        nbytes = src.numel() * src.element_size()
        self.bytes_copied += nbytes
        return CudaTransfer(key, slot, nbytes, priority, event, self)

    def link_seconds(self, nbytes: int) -> float:
        return 0.0  # the real link: its speed is not known to the engine

    def cancel(self, transfer) -> bool:
        return False  # a copy queued on the stream cannot be withdrawn

    def promote(self, transfer) -> None:
        pass  # the stream runs copies in submission order

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
