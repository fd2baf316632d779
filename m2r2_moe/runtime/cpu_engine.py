"""The CPU copy engine: a worker thread, a priority queue, an optional emulated serial link.

A worker thread does the real memcpy into the slot buffer and, when a link is emulated, holds the transfer
until `latency + bytes / bandwidth` has passed on a serial link, so transfer/compute overlap and stalls can
be studied without a GPU. Demand loads jump the queue ahead of prefetches, and on an emulated link a demand
load also pre-empts a prefetch already on the link: the prefetch gives the link up at once and resumes its
remaining link time after the demand load (prefetch traffic never holds a demand load up). The bytes of a
copy are moved when it first gets the link. A compressed copy (`expand`) is expanded into the slot by the
worker right there, and holds the link for the time of its compressed bytes plus the expansion (as on one CUDA
copy stream, where the expansion kernel runs after the bytes have crossed, before the next copy).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time

import torch

from .transfer import DEMAND, failed_error


class CpuTransfer:
    """Handle of one copy into a slot on the CPU engine."""

    __slots__ = ("key", "slot", "nbytes", "priority", "_done", "error", "started_at", "finished_at", "claimed",
                 "cancelled", "busy", "dst", "src", "entry", "remaining", "expand", "expand_seconds")

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
        self.expand = None  # the expansion of a compressed copy (runtime/compressed), None for a plain copy
        self.expand_seconds = 0.0  # seconds its expansion took

    def ready(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> float:
        start = time.perf_counter()
        if not self._done.wait(timeout):
            raise TimeoutError(f"copy of expert key {self.key} into slot {self.slot} did not land in {timeout} s")
        if self.error is not None:
            raise failed_error(self)
        return time.perf_counter() - start


class HostClockEngine:
    """What a CPU engine (this one, and its C++ twin in cpu_native.py) does where a CUDA engine works on the
    device: waits are timed on the host when they end, compute is synchronous, copies carry host times."""

    def drain_stall_seconds(self) -> float:
        return 0.0  # CPU waits are timed on the host, in the transfer's wait

    def discard_stalls(self) -> None:
        """Nothing to forget: CPU waits are counted when they end."""

    def compute_done(self) -> None:
        return None  # compute is synchronous: a slot is free as soon as its kernel returned

    def time_copies(self, on: bool) -> None:
        pass  # every copy carries its link times on the host clock already


class ThreadCopyEngine(HostClockEngine):
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

    def submit(self, key: int, slot: int, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
               after=None, expand=None) -> CpuTransfer:
        """Queue `dst.copy_(src)`, or with `expand` the expansion of the compressed row `src` into `dst`.
        `after` (a device event guarding the slot's previous tenant) is unused on CPU, where compute is
        synchronous."""
        transfer = CpuTransfer(key, slot, src.numel() * src.element_size(), priority)
        transfer.dst, transfer.src, transfer.expand = dst, src, expand
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
            transfer.dst = transfer.src = transfer.expand = None
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
                if transfer.expand is None:
                    transfer.dst.copy_(transfer.src)
                else:
                    transfer.expand_seconds = transfer.expand.expand(transfer.dst, transfer.src)
                transfer.remaining = self.link_seconds(transfer.nbytes) + transfer.expand_seconds
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
            transfer.dst = transfer.src = transfer.expand = None
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
