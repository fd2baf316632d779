"""The CPU copy engine with its worker in C++ (csrc/cpu_copy.hpp): the default on CPU when the native
planner module is built; `cpu_engine.ThreadCopyEngine` is its Python twin and reference.

Why: the Python engine's worker needs the GIL each time it wakes (a copy queued, a link hold ending, a copy
landing), and takes it whenever the compute thread lets go of it around a torch op; the compute thread then
waits to get it back. With prefetches on the link while a layer computes, that costs up to tens of µs per torch
op — a tax on prefetching that only the CPU emulation has. This worker
runs a plain copy (a memcpy, then the emulated link held on the monotonic clock) without Python.

Same semantics as the twin (tests/test_transfer.py runs its tests on both): demand loads first, a demand
load pre-empts a prefetch holding the emulated link, `promote`, `cancel`, link times on the host clock.
Queueing a copy for a worker asleep on a condition variable costs the caller a futex wake (in a virtual
machine an inter-processor interrupt, tens of µs: `benchmarks/copy_engine.py`). When torch leaves a core free, the worker polls instead of sleeping
(for up to `SPIN_S` when idle, and through each emulated link hold) and waiters poll before they sleep: the
emulated link then stands in for a DMA engine, as on a GPU, where queueing a copy costs the compute side ~1 µs.

A copy that needs Python runs a hook on the worker, with the GIL, before its bytes move: while the test-only
`fault` hook is set (it is read when a copy is submitted), for a compressed copy's expansion (`expand`), and
for a copy the memcpy cannot do (tensors not contiguous, of other dtypes or sizes: `dst.copy_(src)` then).
"""

from __future__ import annotations

import atexit
import collections
import itertools
import os
import time
import weakref

import torch

from .. import _ext
from .cpu_engine import HostClockEngine
from .transfer import DEMAND, Transfer, failed_error


MAX_IN_ORDER = 64  # copies kept referenced past one still in flight before a full sweep
SPIN_S = 0.05  # how long an idle worker, or a waiter, polls before it sleeps (when a core is free for it): longer
# than the gaps between a decode step's copies, which a few ms are not (the worker would sleep between layers)


def spare_core() -> bool:
    """Whether torch's threads leave a core of this process's CPU set free for the copy worker."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.get_num_threads() < cores


def available() -> bool:
    """Whether the native engine is built (an older installed module may lack it)."""
    return _ext.HAS_PLANNER and hasattr(_ext.planner, "CpuCopyEngine")


class NativeTransfer:
    """Handle of one copy on the native CPU engine; the copy's tensors stay referenced until it is done."""

    __slots__ = ("key", "slot", "nbytes", "error", "dst", "src", "expand", "fault", "memcpy", "ident", "_c")

    def __init__(self, key: int, slot: int, nbytes: int, dst, src, expand, fault, ident: int,
                 memcpy: bool | None = None):
        """`memcpy`: whether the worker's memcpy moves the bytes (None: decided from `dst` and `src`)."""
        self.key, self.slot, self.nbytes, self.ident = key, slot, nbytes, ident
        self.error: BaseException | None = None
        self.dst, self.src, self.expand, self.fault = dst, src, expand, fault
        self.memcpy = (expand is None and _memcpy_able(dst, src)) if memcpy is None else memcpy
        self._c = None

    priority = property(lambda self: self._c.priority)
    started_at = property(lambda self: self._c.started_at)
    finished_at = property(lambda self: self._c.finished_at)
    busy = property(lambda self: self._c.busy)
    cancelled = property(lambda self: self._c.cancelled)

    def ready(self) -> bool:
        return self._c.done

    def wait(self, timeout: float | None = None) -> float:
        start = time.perf_counter()
        if not self._c.done and not self._c.wait_done(-1.0 if timeout is None else timeout):
            raise TimeoutError(f"copy of expert key {self.key} into slot {self.slot} did not land in {timeout} s")
        if self._c.failed:
            if self.error is None:
                self.error = RuntimeError("the copy engine's hook failed (see the unraisable-exception report)")
            raise failed_error(self)
        return time.perf_counter() - start

    def _release(self) -> None:
        self.dst = self.src = self.expand = self.fault = None


class NativeCopyEngine(HostClockEngine):
    """CPU copy engine whose worker is a C++ thread; see the module docstring."""

    def __init__(self, link_gbps: float | None = None, link_latency_us: float = 0.0, spin: bool | None = None):
        """`spin`: poll instead of sleeping (module docstring); None: when a core is free for the worker."""
        if link_gbps is not None and not (1e-9 <= link_gbps < float("inf")):
            raise ValueError(f"link_gbps must be a finite number of at least 1e-9 GB/s (1 byte/s), not {link_gbps!r}")
        if not (0.0 <= link_latency_us < float("inf")):
            raise ValueError(f"link_latency_us must be a finite number >= 0, not {link_latency_us!r}")
        self.bytes_per_s = None if link_gbps is None else link_gbps * 1e9
        self.latency_s = link_latency_us * 1e-6
        self.fault = None  # test-only hook, see runtime/transfer.py
        self._ids = itertools.count()
        self._hooked: dict[int, NativeTransfer] = {}  # copies whose worker step calls `_hook`, by id
        self._held: dict[int, torch.Tensor] = {}  # what `submit_at`'s copies read and write, by id, until `close`
        self._live: collections.deque[NativeTransfer] = collections.deque()  # copies maybe in flight, in submit
        # order: their tensors stay referenced until they are done
        ref = weakref.ref(self)  # the C++ engine holds the hook: a weak reference, so no cycle keeps this alive

        def hook(ident: int) -> float:
            engine = ref()
            return -1.0 if engine is None else engine._hook(ident)

        self.spin = spare_core() if spin is None else bool(spin)
        self._engine = _ext.planner.CpuCopyEngine(self.bytes_per_s or 0.0, self.latency_s, hook,
                                                  SPIN_S if self.spin else 0.0)
        _OPEN.add(self)

    @property
    def bytes_copied(self) -> int:
        return self._engine.bytes_copied

    @property
    def busy_seconds(self) -> float:
        return self._engine.busy_seconds

    def link_seconds(self, nbytes: int) -> float:
        """Time the emulated link needs for `nbytes` (0 without emulation)."""
        return self._engine.link_seconds(nbytes)

    def submit(self, key: int, slot: int, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
               after=None, expand=None) -> NativeTransfer:
        """Queue `dst.copy_(src)`, or with `expand` the expansion of the compressed row `src` into `dst`
        (`after` is unused on CPU, where compute is synchronous)."""
        nbytes = src.numel() * src.element_size()
        transfer = NativeTransfer(key, slot, nbytes, dst, src, expand, self.fault, next(self._ids))
        return self._enqueue(transfer, priority, dst.data_ptr(), src.data_ptr())

    def submit_at(self, key: int, slot: int, dst_address: int, src_address: int, nbytes: int, priority: int,
                  owners: tuple) -> Transfer:
        """`submit` for a plain copy given by addresses: `nbytes` from `src_address` to `dst_address`, inside the
        tensors `owners` = (destination, source). The hot path's copies: no per-copy tensor views nor checks (the
        caller checked the layout once), and no Python object per copy: the handle is the C++ copy's own (it has
        the `Transfer` protocol), and the engine keeps `owners` referenced until it closes (a copy's owners are the
        expert pool and the store's rows, which live as long as the offloaded model anyway)."""
        dst, src = owners
        if self.fault is not None:  # the test-only hook runs on the worker: a Python handle carries it
            transfer = NativeTransfer(key, slot, nbytes, dst, src, None, self.fault, next(self._ids), memcpy=True)
            return self._enqueue(transfer, priority, dst_address, src_address)
        held = self._held
        if id(dst) not in held or id(src) not in held:
            held[id(dst)], held[id(src)] = dst, src
        return self._engine.submit(-1, key, slot, nbytes, priority, dst_address, src_address, nbytes, False)

    def _enqueue(self, transfer: NativeTransfer, priority: int, dst_address: int, src_address: int) -> NativeTransfer:
        """Hand `transfer` to the worker (its memcpy moves the bytes unless the copy is hooked), and keep its
        tensors referenced while it may be in flight; release those of the copies done."""
        hooked = not transfer.memcpy or transfer.fault is not None
        if hooked:
            self._hooked[transfer.ident] = transfer
        try:
            transfer._c = self._engine.submit(transfer.ident, transfer.key, transfer.slot, transfer.nbytes, priority,
                                              dst_address, src_address, transfer.nbytes if transfer.memcpy else 0,
                                              hooked)
        except BaseException:
            self._hooked.pop(transfer.ident, None)
            raise
        live = self._live
        live.append(transfer)
        while live and live[0]._c.done:  # copies land about in submit order: the done ones are at the front
            live.popleft()._release()
        if len(live) > MAX_IN_ORDER:  # a copy stuck at the front (a slow link, a fault): sweep them all
            for t in live:
                if t._c.done:
                    t._release()
            self._live = collections.deque(t for t in live if t.dst is not None)
        return transfer

    def _hook(self, ident: int) -> float:
        """On the worker, with the GIL: the Python part of a hooked copy. Seconds it adds to the link time
        (an expansion's), or -1 with the error on the handle."""
        transfer = self._hooked.pop(ident, None)
        if transfer is None:
            return 0.0
        try:
            if transfer.fault is not None:
                transfer.fault(transfer.key, transfer.slot, transfer.priority)
            if transfer.expand is not None:
                return float(transfer.expand.expand(transfer.dst, transfer.src))
            if not transfer.memcpy:
                transfer.dst.copy_(transfer.src)
            return 0.0
        except BaseException as e:  # noqa: BLE001 — reported to the waiter, never lost in the worker
            transfer.error = e
            return -1.0

    def cancel(self, transfer: Transfer) -> bool:
        """Withdraw a queued copy. False when the worker has already started it."""
        if type(transfer) is not NativeTransfer:  # a plain copy's handle is the C++ copy itself (`submit_at`)
            return self._engine.cancel(transfer)
        if not self._engine.cancel(transfer._c):
            return False
        self._hooked.pop(transfer.ident, None)  # its hook will never run
        transfer._release()
        return True

    def promote(self, transfer: Transfer) -> None:
        """Run a prefetch (queued, or pre-empted partway) before all other prefetches: compute waits for it."""
        self._engine.promote(transfer._c if type(transfer) is NativeTransfer else transfer)

    def close(self) -> None:
        """Let queued copies finish (without holding the emulated link any more) and stop the worker."""
        self._engine.close()
        for transfer in self._live:
            transfer._release()
        self._live.clear()
        self._hooked.clear()
        self._held.clear()
        _OPEN.discard(self)


def _memcpy_able(dst: torch.Tensor, src: torch.Tensor) -> bool:
    return (dst.is_cpu and src.is_cpu and dst.dtype == src.dtype and dst.numel() == src.numel()
            and dst.is_contiguous() and src.is_contiguous())


_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    """Join every worker before the interpreter tears down (a hooked copy needs the GIL)."""
    for engine in list(_OPEN):
        engine.close()
