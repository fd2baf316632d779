"""Simulated time: the runtime's own decisions and host work, on a clock the machine's load cannot move.

On a shared CPU the same run differs by several percent from one minute to the next, as much as a change to
prefetching is worth. `virtual_time(offloader, ...)` runs an offloaded model on a virtual clock instead:
- every MoE layer call advances it by one layer's compute, given (`layer_seconds` for a decode step,
  `prefill_layer_seconds` for a forward of many tokens), whatever the model's kernels really took: attention,
  norms, routers and the experts kernels cost the same in every run;
- the runtime's own host work inside each MoE layer call (acquire, prediction, planning, issuing copies,
  release) advances it by the real time it takes: this is what prefetching costs, and it is measured, not
  modelled;
- copies go over `VirtualLinkEngine`, a serial link of the offloader's emulated speed simulated on the virtual
  clock, with the CPU engine's rules: demand loads (and promoted prefetches) pre-empt a prefetch on the link,
  which resumes where it stopped; a wait advances the clock to the copy's landing.
Everything the runtime and the profiler time (`runtime/clock.host_seconds`) reads this clock: stalls, the layer
time, the prefetcher's cost and benefit, the link's busy share, time per token. What stays real: the memcpy into the
slot (done when the copy gets the link, not charged), the outputs (lossless as ever), the host work's own jitter.
A plain expert row is queued by address (`submit_at`), the native CPU engine's path, whose handle is the C++ copy
itself; here the handle is made in the uncharged enqueue. In place (timers included) the engine's call is charged
5.8-6.4 µs here against 4.7-5.7 µs there, the cache's per-copy call 11.3-12.4 against 11.4-13.4. Not modelled: a
hook outside the MoE layer call (the m2r2 predictor's residual tap, about 3 µs per layer), contention between copy and
compute for the host's cores (a GPU's copy engine is separate hardware).
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import math
import time
from contextlib import contextmanager

import torch

from . import clock as clock_module
from .cpu_engine import HostClockEngine
from .engines import make_copy_engine
from .transfer import DEMAND, failed_error


class VirtualClock:
    """Seconds that advance only when told (`advance`), or at the host's pace between `host()` and `pause()`."""

    def __init__(self):
        self.base = 0.0
        self._mark: float | None = None  # perf_counter when host time started counting, None while paused

    def now(self) -> float:
        mark = self._mark
        return self.base if mark is None else self.base + (time.perf_counter() - mark)

    def advance(self, seconds: float) -> None:
        self.base += seconds

    def host(self) -> bool:
        """Count host time from now; returns whether it was already counted (for `pause`'s caller to restore)."""
        if self._mark is not None:
            return True
        self._mark = time.perf_counter()
        return False

    def pause(self) -> bool:
        """Stop counting host time; returns whether it was being counted."""
        mark = self._mark
        if mark is None:
            return False
        self.base += time.perf_counter() - mark
        self._mark = None
        return True


class VirtualTransfer:
    """Handle of one copy on `VirtualLinkEngine` (the `Transfer` protocol, runtime/transfer.py)."""

    __slots__ = ("key", "slot", "nbytes", "priority", "error", "started_at", "finished_at", "busy", "cancelled",
                 "claimed", "done", "submitted", "remaining", "entry", "dst", "src", "expand", "at", "_engine")

    def __init__(self, engine: "VirtualLinkEngine", key: int, slot: int, nbytes: int, priority: int):
        self.key, self.slot, self.nbytes, self.priority = key, slot, nbytes, priority
        self.error: BaseException | None = None
        self.started_at = self.finished_at = self.busy = 0.0
        self.cancelled = self.claimed = self.done = False
        self.submitted = 0.0  # when it was queued (`_enqueue`)
        self.remaining: float | None = None  # link seconds still to hold (None until its bytes have moved)
        self.entry = -1
        self.dst = self.src = self.expand = None
        self.at: tuple[int, int] | None = None  # (destination, source) addresses of a copy by address (`submit_at`)
        self._engine = engine

    def ready(self) -> bool:
        if not self.done:
            with self._engine._uncharged() as now:
                self._engine._advance(now)
        return self.done

    def wait(self, timeout: float | None = None) -> float:
        """Advance the virtual clock to the copy's landing; the virtual seconds waited. A simulated copy always
        lands, so `timeout` (a guard against a stuck device) is not applied."""
        engine = self._engine
        with engine._uncharged() as now:
            engine._advance(now)
            waited = engine._landing(self) - now if not self.done else 0.0
            engine.clock.advance(waited)
        if self.error is not None:
            raise failed_error(self)
        return waited


class VirtualLinkEngine(HostClockEngine):
    """A serial link of `link_gbps` (+ `link_latency_us` per copy) simulated on `clock` (`CopyEngine`
    protocol). The queue is ordered by priority (demand loads first), then by submission; a demand load or a
    promoted prefetch takes the link from a prefetch, which goes back to the queue with its remaining time.
    The link's state is brought up to the clock's time at every call, so copies start and land at the virtual
    times they would have on a link that ran alongside."""

    def __init__(self, clock: VirtualClock, link_gbps: float | None, link_latency_us: float = 0.0):
        self.clock = clock
        self.bytes_per_s = None if link_gbps is None else link_gbps * 1e9
        self.latency_s = link_latency_us * 1e-6
        self.bytes_copied = 0
        self.busy_seconds = 0.0
        self.fault = None  # test-only hook, as on every engine
        self._queue: list[tuple[int, int, VirtualTransfer]] = []
        self._seq = itertools.count()
        self._holding: VirtualTransfer | None = None
        self._resumed = 0.0  # when the copy holding the link got it (this time: a pre-empted copy resumes)
        self._until = 0.0  # when the copy holding the link finishes
        self._free_at = 0.0  # when the link became free (it is idle when nothing holds it)
        self._closed = False

    def link_seconds(self, nbytes: int) -> float:
        return 0.0 if self.bytes_per_s is None else self.latency_s + nbytes / self.bytes_per_s

    def submit(self, key: int, slot: int, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
               after=None, expand=None) -> VirtualTransfer:
        transfer = VirtualTransfer(self, key, slot, src.numel() * src.element_size(), priority)
        transfer.dst, transfer.src, transfer.expand = dst, src, expand
        with self._uncharged() as now:  # the handle above is charged: the native engine's for such a copy is Python
            return self._enqueue(transfer, now)

    def submit_at(self, key: int, slot: int, dst_address: int, src_address: int, nbytes: int, priority: int,
                  owners: tuple) -> VirtualTransfer:
        """The native CPU engine's call: `nbytes` by address in `owners` (dst, src), moved when it gets the link."""
        with self._uncharged() as now:  # the native engine's handle is its C++ copy: made in the enqueue
            transfer = VirtualTransfer(self, key, slot, nbytes, priority)
            transfer.at, (transfer.dst, transfer.src) = (dst_address, src_address), owners
            return self._enqueue(transfer, now)

    def _enqueue(self, transfer: VirtualTransfer, now: float) -> VirtualTransfer:
        if self._closed:
            raise RuntimeError("copy engine is closed")
        transfer.submitted = now
        self._advance(now)
        self._push(transfer, now)
        self._advance(now)
        return transfer

    def cancel(self, transfer: VirtualTransfer) -> bool:
        with self._uncharged() as now:
            self._advance(now)
            if transfer.claimed or transfer.done:
                return False
            transfer.cancelled = transfer.done = True
            transfer.dst = transfer.src = transfer.expand = None
            return True

    def promote(self, transfer: VirtualTransfer) -> None:
        with self._uncharged() as now:
            self._advance(now)
            if not transfer.done and transfer.priority != DEMAND:
                transfer.priority = DEMAND
                if self._holding is not transfer:
                    self._push(transfer, now)
                self._advance(now)

    def close(self) -> None:
        """Land what is queued (on the virtual clock, without advancing it) and refuse new copies."""
        if not self._closed:
            with self._uncharged():
                self._advance(math.inf)
            self._closed = True

    # -- the simulated link ------------------------------------------------------------------------
    @contextmanager
    def _uncharged(self):
        """The simulation's bookkeeping, not charged (the native engine's enqueue), with the memcpy into the slot (its
        worker thread's); yields the time it happens at. Every entry into the link's state goes through it."""
        now = self.clock.now()
        counted = self.clock.pause()
        try:
            yield now
        finally:
            if counted:
                self.clock.host()

    def _push(self, transfer: VirtualTransfer, now: float) -> None:
        transfer.entry = next(self._seq)
        heapq.heappush(self._queue, (transfer.priority, transfer.entry, transfer))
        holding = self._holding
        if transfer.priority == DEMAND and holding is not None and holding.priority != DEMAND:
            self._stop(holding, now, now - self._resumed)

    def _stop(self, transfer: VirtualTransfer, now: float, held: float) -> None:
        """Pre-empt the prefetch on the link at `now`: back in the queue with what it has left."""
        transfer.remaining = self._until - now
        transfer.busy += held
        self.busy_seconds += held
        self._holding, self._free_at = None, now
        heapq.heappush(self._queue, (transfer.priority, transfer.entry, transfer))

    def _next(self) -> VirtualTransfer | None:
        while self._queue:
            _, seq, transfer = heapq.heappop(self._queue)
            if not (transfer.cancelled or transfer.done or transfer.entry != seq):
                return transfer
        return None

    def _start(self, transfer: VirtualTransfer) -> None:
        """`transfer` gets the link at max(when it was free, when the copy was queued)."""
        start = max(self._free_at, transfer.submitted)
        if transfer.remaining is None:  # first time on the link: its bytes move now (under `_uncharged`)
            transfer.claimed, transfer.started_at = True, start
            try:
                if self.fault is not None:
                    self.fault(transfer.key, transfer.slot, transfer.priority)
                seconds = 0.0
                if transfer.at is not None:
                    ctypes.memmove(transfer.at[0], transfer.at[1], transfer.nbytes)
                elif transfer.expand is None:
                    transfer.dst.copy_(transfer.src)
                else:
                    seconds = transfer.expand.expand(transfer.dst, transfer.src)
                transfer.remaining = self.link_seconds(transfer.nbytes) + seconds
            except BaseException as e:  # noqa: BLE001 — reported to the waiter
                transfer.error, transfer.remaining = e, 0.0
        self._holding, self._resumed, self._until = transfer, start, start + transfer.remaining

    def _finish(self) -> None:
        transfer, end = self._holding, self._until
        held = end - self._resumed
        transfer.busy += held
        self.busy_seconds += held
        transfer.finished_at, transfer.done = end, True
        if transfer.error is None:
            self.bytes_copied += transfer.nbytes
        transfer.dst = transfer.src = transfer.expand = None
        self._holding, self._free_at = None, end

    def _advance(self, t: float) -> None:
        """Run the link up to virtual time `t`: copies that land by then land, the next ones start."""
        while True:
            if self._holding is not None:
                if self._until > t:
                    return
                self._finish()
            transfer = self._next()
            if transfer is None:
                return
            self._start(transfer)

    def _landing(self, transfer: VirtualTransfer) -> float:
        """When `transfer` lands if nothing else is queued meanwhile (the compute side is waiting for it)."""
        while not transfer.done:
            if self._holding is None:
                nxt = self._next()
                if nxt is None:
                    raise RuntimeError(f"copy of expert key {transfer.key} is neither queued nor on the link")
                self._start(nxt)
            self._finish()
        return transfer.finished_at


@contextmanager
def virtual_time(offloader, layer_seconds: float, prefill_layer_seconds: float | None = None,
                 free_prefetcher: bool = False):
    """Run `offloader` (an `Offloader`, runtime/offloader.py) on a virtual clock until the block ends (see the module
    docstring). `layer_seconds`: one MoE layer's compute in a decode step (attention and the rest of the layer
    included); `prefill_layer_seconds`: in a forward of many tokens (default: `layer_seconds`). Its copy engine is
    replaced by a `VirtualLinkEngine` of the same link speed; at the end a fresh engine of the kind it had takes over.
    `free_prefetcher`: the prefetcher's per-layer work (prediction, planning, issuing) is not charged, and its own
    timings see none of it (no back-off for cost): the bound a cheaper per-layer path can approach. Yields the clock."""
    if layer_seconds <= 0 or not math.isfinite(layer_seconds):
        raise ValueError(f"layer_seconds must be a positive time, got {layer_seconds!r}")
    if offloader.device.type != "cpu":
        raise ValueError(f"virtual time simulates the CPU engine's link; the offloader runs on {offloader.device}")
    if clock_module.host_source() is not time.perf_counter:
        raise RuntimeError("virtual time is already running")
    prefill_layer_seconds = layer_seconds if prefill_layer_seconds is None else prefill_layer_seconds
    clock = VirtualClock()
    link_gbps, link_latency_us = offloader.link
    engine = VirtualLinkEngine(clock, link_gbps, link_latency_us)
    real_run, real_kernels = offloader.run_experts, list(offloader.kernels)

    def run_experts(layer, hidden_states, top_k_index, top_k_weights):
        clock.advance(layer_seconds if top_k_index.shape[0] == 1 else prefill_layer_seconds)
        clock.host()
        try:
            return real_run(layer, hidden_states, top_k_index, top_k_weights)
        finally:
            clock.pause()

    def uncounted(kernel):
        def run(*args, **kwargs):
            counted = clock.pause()
            try:
                return kernel(*args, **kwargs)
            finally:
                if counted:
                    clock.host()
        return run

    prefetcher = offloader.prefetcher if free_prefetcher else None
    own_on_layer = vars(prefetcher).get("on_layer") if prefetcher is not None else None  # one set on the instance
    offloader.replace_engine(engine)
    offloader.run_experts = run_experts
    offloader.kernels = [uncounted(k) for k in real_kernels]
    if prefetcher is not None:
        prefetcher.on_layer = uncounted(prefetcher.on_layer)
    clock_module.set_host_source(clock.now)
    try:
        yield clock
    finally:
        clock_module.set_host_source(time.perf_counter)
        offloader.kernels = real_kernels
        del offloader.run_experts
        if prefetcher is not None and own_on_layer is not None:
            prefetcher.on_layer = own_on_layer
        elif prefetcher is not None:
            del prefetcher.on_layer
        offloader.replace_engine(make_copy_engine(offloader.device, link_gbps, link_latency_us))
