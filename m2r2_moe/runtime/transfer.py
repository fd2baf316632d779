"""Copy engines: move packed expert buffers from the host store into device slots.

- `CudaCopyEngine`: one long-lived copy stream; each copy records an event; the compute stream waits on
  that event (`wait_event`), so the host never blocks in the per-token path. Streams and events are all
  the runtime's device's (runtime/cuda_compute.py), whichever device is current.
- `ThreadCopyEngine`: the CPU twin. A worker thread does the real memcpy into the slot buffer and, when a
  link is emulated, holds the transfer until `latency + bytes / bandwidth` has passed on a serial link,
  so transfer/compute overlap and stalls can be studied without a GPU. Demand loads jump the queue ahead
  of prefetches, and on an emulated link a demand load also pre-empts a prefetch already on the link: the
  prefetch gives the link up at once and resumes its remaining link time after the demand load (prefetch
  traffic never holds a demand load up). The bytes of a copy are moved when it first gets the link.
  The CUDA copy stream does not pre-empt yet: there a demand load queues behind the prefetches submitted
  before it (feeding prefetches to the stream in pieces from the host would give it the same property).

A `Transfer` is the handle of one in-flight copy: `ready()` never blocks; `wait(timeout)` makes the compute
side wait for it and returns the host seconds spent waiting (0 on CUDA, where the wait is on the device);
it raises `CopyError` when the copy failed and `TimeoutError` when it did not land in time. `CopyEngine` and
`Transfer` are the protocols every engine and handle implements in full (a capability an engine lacks is a
no-op: the CUDA stream cannot withdraw a queued copy, so its `cancel` returns False).

Both engines have a test-only fault hook: `engine.fault = fn(key, slot, priority)` runs before each copy
(on the worker thread on CPU, in `submit` on CUDA); raising fails that copy, sleeping slows it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from typing import Protocol

import torch

from ..errors import CopyError
from .cuda_compute import ComputeSide

logger = logging.getLogger(__name__)

DEMAND, PREFETCH = 0, 1  # queue priorities: lower runs first


class Transfer(Protocol):
    """Handle of one copy into a slot."""

    key: int
    slot: int
    nbytes: int
    priority: int  # 0: a demand load; d: a prefetch for d layers ahead
    error: BaseException | None  # why the copy failed, once it has

    def ready(self) -> bool:
        """Whether the copy has landed (or failed); never blocks."""

    def wait(self, timeout: float | None = None) -> float:
        """Make the compute side wait for the copy; host seconds waited. `CopyError`, `TimeoutError`."""


class CopyEngine(Protocol):
    """Moves packed expert buffers from the host store into device slots."""

    bytes_copied: int
    busy_seconds: float  # seconds the link spent copying (0 where it is not measured without a sync)
    fault: object  # test-only hook: fn(key, slot, priority) run before each copy

    def submit(self, key: int, slot: int, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
               after=None) -> Transfer:
        """Queue `dst.copy_(src)`, after `after` (the event guarding the slot's previous tenant)."""

    def cancel(self, transfer: Transfer) -> bool:
        """Withdraw a copy that has not started; False when it has (or the engine cannot)."""

    def promote(self, transfer: Transfer) -> None:
        """The compute side waits for this prefetch now: run it before other prefetches (where possible)."""

    def link_seconds(self, nbytes: int) -> float:
        """Time the link needs for `nbytes`, when the engine knows it (emulated link), else 0."""

    def drain_stall_seconds(self) -> float:
        """Device-side stall seconds measured since the last call (CUDA), else 0."""

    def discard_stalls(self) -> None:
        """Forget stall timings not drained yet (the counters were reset)."""

    def compute_done(self):
        """An event recorded now on the compute stream, after the kernels queued so far (CUDA): a later copy
        into a slot they read waits for it. None where compute is synchronous (CPU)."""

    def close(self) -> None:
        """Let queued copies finish and stop."""


class CpuTransfer:
    """Handle of one copy into a slot on the CPU engine."""

    __slots__ = ("key", "slot", "nbytes", "priority", "_done", "error", "started_at", "finished_at", "claimed",
                 "cancelled", "busy", "dst", "src", "entry", "remaining")

    def __init__(self, key: int, slot: int, nbytes: int, priority: int):
        self.key, self.slot, self.nbytes, self.priority = key, slot, nbytes, priority
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.started_at = self.finished_at = 0.0  # perf_counter times on the (emulated) link
        self.busy = 0.0  # seconds it held the link (less than finished - started when a demand load cut in)
        self.claimed = self.cancelled = False  # taken by the worker / withdrawn before it was
        self.dst = self.src = None  # the copy's arguments, held until it is done (CPU engine)
        self.entry = -1  # sequence number of its live queue entry (older entries of a promoted copy are stale)
        self.remaining = None  # emulated link seconds still to hold (None until its bytes have moved)

    def ready(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> float:
        start = time.perf_counter()
        if not self._done.wait(timeout):
            raise TimeoutError(f"copy of expert key {self.key} into slot {self.slot} did not land in {timeout} s")
        if self.error is not None:
            raise _failed(self)
        return time.perf_counter() - start


class FailedTransfer:
    """A copy whose submission raised: ready at once, its wait raises `CopyError` (so it is redone)."""

    __slots__ = ("key", "slot", "nbytes", "priority", "error")

    def __init__(self, key: int, slot: int, nbytes: int, priority: int, error: BaseException):
        self.key, self.slot, self.nbytes, self.priority, self.error = key, slot, nbytes, priority, error

    def ready(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> float:
        raise _failed(self)


def _failed(transfer) -> CopyError:
    """The error a waiter gets for a copy that failed (its cause attached)."""
    error = CopyError(f"copy of expert key {transfer.key} into slot {transfer.slot} failed: {transfer.error!r}")
    error.__cause__ = transfer.error
    return error


class ThreadCopyEngine:
    """CPU copy engine: a worker thread, a priority queue, an optional emulated serial link."""

    def __init__(self, link_gbps: float | None = None, link_latency_us: float = 0.0):
        self.bytes_per_s = None if link_gbps is None else link_gbps * 1e9
        self.latency_s = link_latency_us * 1e-6
        self.bytes_copied = 0
        self.busy_seconds = 0.0
        self._queue: list[tuple[int, int, CpuTransfer]] = []  # (priority, sequence, transfer)
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._link_free_at = 0.0
        self._holding: int | None = None  # priority of the copy holding the emulated link, None when idle
        self.fault = None  # test-only hook, see the module docstring
        self._worker = threading.Thread(target=self._run, name="m2r2-copy", daemon=True)
        self._worker.start()

    def link_seconds(self, nbytes: int) -> float:
        """Time the emulated link needs for `nbytes` (0 without emulation)."""
        if self.bytes_per_s is None:
            return 0.0
        return self.latency_s + nbytes / self.bytes_per_s

    def drain_stall_seconds(self) -> float:
        return 0.0  # CPU waits are timed on the host, in CpuTransfer.wait

    def discard_stalls(self) -> None:
        """Nothing to forget: CPU waits are counted when they end."""

    def compute_done(self) -> None:
        return None  # compute is synchronous: a slot is free as soon as its kernel returned

    def submit(self, key: int, slot: int, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
               after=None) -> CpuTransfer:
        """Queue `dst.copy_(src)`. `after` (a device event guarding the slot's previous tenant) is unused
        on CPU, where compute is synchronous."""
        transfer = CpuTransfer(key, slot, src.numel() * src.element_size(), priority)
        transfer.dst, transfer.src = dst, src
        with self._cv:
            if self._closed:
                raise RuntimeError("copy engine is closed")
            self._push(transfer, priority)
        return transfer

    def _push(self, transfer: CpuTransfer, priority: int) -> None:
        """Queue (or re-queue) `transfer`; wake the worker when it is idle or this pre-empts its copy."""
        transfer.entry = next(self._seq)
        heapq.heappush(self._queue, (priority, transfer.entry, transfer))
        if self._holding is None or (priority == DEMAND and self._holding != DEMAND):
            self._cv.notify()

    def cancel(self, transfer: CpuTransfer) -> bool:
        """Withdraw a queued copy. False when the worker has already started it (its bytes have moved; a
        later copy into the same slot moves its own bytes after them)."""
        with self._cv:
            if transfer.claimed:
                return False
            transfer.cancelled = True
            transfer.dst = transfer.src = None
        transfer._done.set()
        return True

    def promote(self, transfer: CpuTransfer) -> None:
        """Run a prefetch (queued, or pre-empted partway) before all other prefetches: compute waits for it."""
        with self._cv:
            if not transfer.cancelled and not transfer.ready() and transfer.priority != DEMAND:
                transfer.priority = DEMAND
                self._push(transfer, DEMAND)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._worker.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                _, seq, transfer = heapq.heappop(self._queue)
                if transfer.cancelled or transfer.entry != seq or transfer.ready():
                    continue  # withdrawn, or an older entry of a promoted copy
                transfer.claimed = True
            if not self._serve(transfer):
                with self._cv:  # pre-empted: back in its place, unless a promotion queued it anew meanwhile
                    if transfer.entry == seq:
                        heapq.heappush(self._queue, (transfer.priority, seq, transfer))

    def _serve(self, transfer: CpuTransfer) -> bool:
        """Move the copy's bytes (the first time it gets the link), then hold the emulated link for its
        remaining time unless a demand load pre-empts it. True when the transfer is done: whatever raises is
        reported to the waiter, and the worker never dies nor leaves a waiter hanging."""
        start, held, done = time.perf_counter(), None, True
        try:
            if transfer.remaining is None:
                transfer.started_at = start
                if self.fault is not None:
                    self.fault(transfer.key, transfer.slot, transfer.priority)
                transfer.dst.copy_(transfer.src)
                transfer.remaining = self.link_seconds(transfer.nbytes)
                if self.bytes_per_s is not None:
                    transfer.started_at = max(start, self._link_free_at)
            if self.bytes_per_s is not None:
                held, done = self._hold_link(transfer, start)
            if done:
                self.bytes_copied += transfer.nbytes
        except BaseException as e:  # noqa: BLE001 — reported to the waiter, never lost in the thread
            transfer.error, done = e, True
        end = time.perf_counter()
        busy = end - start if held is None else held  # the link's time on an emulated link, else the copy's
        transfer.busy += busy
        self.busy_seconds += busy
        if done:
            transfer.finished_at = end
            transfer.dst = transfer.src = None
            transfer._done.set()
        return done

    def _hold_link(self, transfer: CpuTransfer, start: float) -> tuple[float, bool]:
        """Serial link: the copy holds it from when it is free (at the earliest `start`, before its bytes
        moved: the memcpy is part of the transfer) for its remaining time, or, a prefetch, until a demand load
        (or a promoted prefetch) is queued. Returns (seconds held, finished)."""
        link_start = max(start, self._link_free_at)
        deadline = link_start + transfer.remaining
        with self._cv:
            self._holding = transfer.priority
            try:
                while (left := deadline - time.perf_counter()) > 0:
                    if self._queue and self._queue[0][0] == DEMAND and transfer.priority != DEMAND:
                        now = time.perf_counter()  # pre-empted: the link is free from now on
                        transfer.remaining, self._link_free_at = deadline - now, now
                        return max(now - link_start, 0.0), False
                    self._cv.wait(left)
            finally:
                self._holding = None
        self._link_free_at = deadline
        transfer.remaining = 0.0
        return deadline - link_start, True


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


def make_copy_engine(device: torch.device, link_gbps: float | None, link_latency_us: float):
    if device.type == "cuda":
        # -- native engine (csrc/copy_engine.cu, via runtime/cuda_native.py): opt-in with
        #    M2R2_MOE_NATIVE_CUDA=1 until it has been validated on a GPU (benchmarks/gpu_check.sh);
        #    CudaCopyEngine above is its torch twin and the default. --
        if os.environ.get("M2R2_MOE_NATIVE_CUDA") == "1":
            from . import cuda_native

            reason = cuda_native.available()
            if not reason:
                return cuda_native.NativeCudaCopyEngine(device)
            logger.warning("M2R2_MOE_NATIVE_CUDA=1 but the native CUDA copy engine cannot run: %s", reason)
        # -- end native engine --
        return CudaCopyEngine(device)
    return ThreadCopyEngine(link_gbps, link_latency_us)
