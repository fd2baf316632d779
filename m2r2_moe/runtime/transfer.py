"""Copy engines: move packed expert buffers from the host store into device slots.

- `CudaCopyEngine`: one long-lived copy stream; each copy records an event; the compute stream waits on
  that event (`wait_event`), so the host never blocks in the per-token path.
- `ThreadCopyEngine`: the CPU twin. A worker thread does the real memcpy into the slot buffer and, when a
  link is emulated, holds the transfer until `latency + bytes / bandwidth` has passed on a serial link,
  so transfer/compute overlap and stalls can be studied without a GPU. Demand loads jump the queue ahead
  of prefetches.

A `Transfer` is the handle of one in-flight copy: `ready()` never blocks; `wait(timeout)` makes the compute
side wait for it and returns the host seconds spent waiting (0 on CUDA, where the wait is on the device);
it raises `CopyError` when the copy failed and `TimeoutError` when it did not land in time.

Both engines have a test-only fault hook: `engine.fault = fn(key, slot, priority)` runs before each copy
(on the worker thread on CPU, in `submit` on CUDA); raising fails that copy, sleeping slows it.
"""

from __future__ import annotations

import heapq
import os
import itertools
import logging
import threading
import time

import torch

from ..errors import CopyError

logger = logging.getLogger(__name__)

DEMAND, PREFETCH = 0, 1  # queue priorities: lower runs first


class Transfer:
    """Handle of one copy into a slot."""

    __slots__ = ("key", "slot", "nbytes", "priority", "_done", "error", "started_at", "finished_at", "claimed",
                 "cancelled")

    def __init__(self, key: int, slot: int, nbytes: int, priority: int):
        self.key, self.slot, self.nbytes, self.priority = key, slot, nbytes, priority
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.started_at = self.finished_at = 0.0  # perf_counter times on the (emulated) link
        self.claimed = self.cancelled = False  # taken by the worker / withdrawn before it was

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
        self._queue: list[tuple[int, int, Transfer, torch.Tensor, torch.Tensor]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._link_free_at = 0.0
        self._args: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fault = None  # test-only hook, see the module docstring
        self._worker = threading.Thread(target=self._run, name="m2r2-copy", daemon=True)
        self._worker.start()

    def link_seconds(self, nbytes: int) -> float:
        """Time the emulated link needs for `nbytes` (0 without emulation)."""
        if self.bytes_per_s is None:
            return 0.0
        return self.latency_s + nbytes / self.bytes_per_s

    def drain_stall_seconds(self) -> float:
        return 0.0  # CPU waits are timed on the host, in Transfer.wait

    def submit(self, key: int, slot: int, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
               after=None) -> Transfer:
        """Queue `dst.copy_(src)`. `after` (a device event guarding the slot's previous tenant) is unused
        on CPU, where compute is synchronous."""
        transfer = Transfer(key, slot, src.numel() * src.element_size(), priority)
        with self._cv:
            if self._closed:
                raise RuntimeError("copy engine is closed")
            heapq.heappush(self._queue, (priority, next(self._seq), transfer, dst, src))
            if priority != DEMAND:
                self._args[id(transfer)] = (dst, src)  # for a later promotion
            self._cv.notify()
        return transfer

    def cancel(self, transfer: Transfer) -> bool:
        """Withdraw a queued copy. False when the worker has already taken it (it then completes before
        any copy submitted later into the same slot, since there is one worker)."""
        with self._cv:
            if transfer.claimed:
                return False
            transfer.cancelled = True
        transfer._done.set()
        return True

    def promote(self, transfer: Transfer) -> None:
        """Move a queued prefetch ahead of all other prefetches: the compute side now waits for it."""
        with self._cv:
            if not transfer.claimed and not transfer.cancelled and transfer.priority != DEMAND:
                transfer.priority = DEMAND
                heapq.heappush(self._queue, (DEMAND, next(self._seq), transfer, None, None))
                self._cv.notify()

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
                _, _, transfer, dst, src = heapq.heappop(self._queue)
                if transfer.claimed or transfer.cancelled:
                    if transfer.cancelled:
                        self._args.pop(id(transfer), None)
                    continue  # a promoted copy's older queue entry, or a withdrawn one
                transfer.claimed = True
                if dst is None:  # a promotion entry: the copy's arguments live in its original entry
                    dst, src = self._args.pop(id(transfer))
                else:
                    self._args.pop(id(transfer), None)
            self._copy(transfer, dst, src)

    def _copy(self, transfer: Transfer, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy, then hold the emulated link; whatever raises is reported to the waiter, and the transfer is
        always marked done: the worker never dies and never leaves a waiter hanging."""
        start = transfer.started_at = time.perf_counter()
        try:
            if self.fault is not None:
                self.fault(transfer.key, transfer.slot, transfer.priority)
            dst.copy_(src)
            if self.bytes_per_s is not None:
                # Serial link: this transfer starts when the link is free and occupies it for its duration.
                transfer.started_at = max(start, self._link_free_at)
                self._link_free_at = transfer.started_at + self.link_seconds(transfer.nbytes)
                delay = self._link_free_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self.bytes_copied += transfer.nbytes
        except BaseException as e:  # noqa: BLE001 — reported to the waiter, never lost in the thread
            transfer.error = e
        finally:
            end = transfer.finished_at = time.perf_counter()
            self.busy_seconds += end - start
            transfer._done.set()


class CudaTransfer:
    """Handle of one copy on the CUDA copy stream."""

    __slots__ = ("key", "slot", "nbytes", "priority", "event", "engine")

    def __init__(self, key, slot, nbytes, priority, event: torch.cuda.Event, engine: "CudaCopyEngine"):
        self.key, self.slot, self.nbytes, self.priority, self.event = key, slot, nbytes, priority, event
        self.engine = engine

    def ready(self) -> bool:
        return self.event.query()  # non-blocking poll

    def wait(self, timeout: float | None = None) -> float:
        """Device-side wait: the compute stream stalls until the copy's event; the host does not block.
        The stall is timed with a pair of events read later (`drain_stall_seconds`), never synchronously."""
        if self.event.query():
            return 0.0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream()
        start.record(stream)
        stream.wait_event(self.event)
        end.record(stream)
        self.engine.pending_stalls.append((start, end))
        return 0.0


class CudaCopyEngine:
    """Host→device copies on one dedicated stream, one event per expert."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.bytes_copied = 0
        self.busy_seconds = 0.0  # not measured on CUDA without a sync; the profiler times copies with events
        self.pending_stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.fault = None  # test-only hook, see the module docstring

    def submit(self, key: int, slot: int, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
               after: torch.cuda.Event | None = None) -> CudaTransfer:
        if self.fault is not None:
            self.fault(key, slot, priority)
        event = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            if after is not None:
                # The slot's previous tenant may still be read by queued compute kernels: overwrite after them.
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            event.record(self.stream)
        nbytes = src.numel() * src.element_size()
        self.bytes_copied += nbytes
        return CudaTransfer(key, slot, nbytes, priority, event, self)

    def link_seconds(self, nbytes: int) -> float:
        return 0.0

    def drain_stall_seconds(self) -> float:
        """Seconds the compute stream waited on copies, for the waits whose end events have completed."""
        total_ms, pending = 0.0, []
        for start, end in self.pending_stalls:
            if end.query():
                total_ms += start.elapsed_time(end)
            else:
                pending.append((start, end))
        self.pending_stalls = pending
        return total_ms / 1e3

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
