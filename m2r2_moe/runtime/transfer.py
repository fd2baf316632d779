"""Copy engines move packed expert buffers from the host store into device slots; this module is their contract.

A `Transfer` is the handle of one in-flight copy: `ready()` never blocks; `wait(timeout)` makes the compute
side wait for it and returns the host seconds spent waiting (0 on CUDA, where the wait is on the device);
it raises `CopyError` when the copy failed and `TimeoutError` when it did not land in time. `CopyEngine` and
`Transfer` are the protocols every engine and handle implements in full (a capability an engine lacks is a
no-op: the CUDA stream cannot withdraw a queued copy, so its `cancel` returns False).

The engines (`runtime/engines.py` picks one):
- `cpu_engine.ThreadCopyEngine`: a worker thread does the real memcpy into the slot buffer and, when a link
  is emulated, holds the transfer until `latency + bytes / bandwidth` has passed on a serial link, so
  transfer/compute overlap and stalls can be studied without a GPU; demand loads pre-empt prefetches.
- `cuda_engine.CudaCopyEngine`: two long-lived copy streams, prefetches on one, demand loads on the other (of
  higher priority: they never queue behind prefetches); each copy records an event; the compute stream
  waits on that event, so the host never blocks in the per-token path.
- `cuda_native.NativeCudaCopyEngine`: the same through the C++/CUDA extension (opt-in).

Compressed experts (runtime/compressed): `submit(..., expand=...)` hands the engine the layer's `Expansion`
with the compressed row as `src`; the engine moves the row's bytes (its `nbytes` are the compressed ones) and
expands them into the slot `dst` as part of the same copy: the CPU worker calls `expand.expand(dst, src)`,
the CUDA engines queue `expand.on_device(dst, src, stream)` (row copy and expansion kernel) on their stream.
A copy is ready only once its slot holds the expanded weights.

Every engine has a test-only fault hook: `engine.fault = fn(key, slot, priority)` runs before each copy
(on the worker thread on CPU, in `submit` on CUDA); raising fails that copy, sleeping slows it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import CopyError

DEMAND, PREFETCH = 0, 1  # queue priorities: lower runs first

class Transfer(Protocol):
    """Handle of one copy into a slot."""

    key: int
    slot: int
    nbytes: int
    priority: int  # 0: a demand load; d: a prefetch for d layers ahead
    error: BaseException | None  # why the copy failed, once it has
    # for the profiler: host-clock (perf_counter) seconds the copy started and landed, 0 while unknown (on CUDA
    # only while `time_copies` is on), the seconds it held the link, and whether it was withdrawn unstarted
    started_at: float
    finished_at: float
    busy: float
    cancelled: bool

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
               after=None, expand=None) -> Transfer:
        """Queue `dst.copy_(src)`, after `after` (the event guarding the slot's previous tenant); with `expand`
        (a compressed copy) the expansion of the row `src` into `dst` instead."""

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

    def time_copies(self, on: bool) -> None:
        """Give copies host-clock start/finish times (CUDA: timing events); the CPU engine always does."""

    def compute_done(self):
        """An event recorded now on the compute stream, after the kernels queued so far (CUDA): a later copy
        into a slot they read waits for it. None where compute is synchronous (CPU)."""

    def close(self) -> None:
        """Let queued copies finish and stop."""


class FailedTransfer:
    """A copy whose submission raised: ready at once, its wait raises `CopyError` (so it is redone)."""

    __slots__ = ("key", "slot", "nbytes", "priority", "error")
    started_at = finished_at = busy = 0.0  # it never reached the link
    cancelled = False

    def __init__(self, key: int, slot: int, nbytes: int, priority: int, error: BaseException):
        self.key, self.slot, self.nbytes, self.priority, self.error = key, slot, nbytes, priority, error

    def ready(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> float:
        raise failed_error(self)


def failed_error(transfer) -> CopyError:
    """The error a waiter gets for a copy that failed (its cause attached)."""
    error = CopyError(f"copy of expert key {transfer.key} into slot {transfer.slot} failed: {transfer.error!r}")
    error.__cause__ = transfer.error
    return error
