"""The native CUDA copy engine (csrc/copy_engine.cu) behind the interface of `cuda_engine.CudaCopyEngine`.

The torch twin's streams-and-events discipline with one long-lived copy stream owned by torch (the torch
twin gives demand loads a second stream; here they queue behind the prefetches submitted before them), one
event per expert copy, the compute stream waits on that event (`cudaStreamWaitEvent`), so the host never
blocks in the per-token path. What the native engine saves is the Python/torch dispatch of
`copy_` and of event creation per copy; the copy itself is the same `cudaMemcpyAsync` on the GPU's copy
engines. Pointers, the stream and events cross into C++ as integers, so no torch ABI is involved.

`submit_many` enqueues the copies of a whole wave in one native call.
"""

from __future__ import annotations

import torch

from .. import _ext
from .cuda_compute import ComputeSide
from .cuda_engine import CudaCopyEngine
from .transfer import DEMAND


def available() -> str:
    """'' when the native engine can run here, else why not."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return _ext.cuda_probe()


def _event_handle(after) -> int:
    """Raw cudaEvent_t of a torch.cuda.Event (0 if it was never recorded) or of a native event; 0 for None."""
    if after is None:
        return 0
    handle = getattr(after, "cuda_event", None)  # torch.cuda.Event: created lazily on first record
    if handle is None:
        handle = after.handle  # NativeCudaTransfer.event (m2r2_moe._native_cuda.Event)
    return int(handle)


class NativeCudaTransfer:
    """Handle of one copy on the native engine's stream (the interface of `cuda_engine.CudaTransfer`)."""

    __slots__ = ("key", "slot", "nbytes", "priority", "event", "engine", "error", "_src", "_dst")

    def __init__(self, key, slot, nbytes, priority, event, engine: "NativeCudaCopyEngine", src, dst):
        self.key, self.slot, self.nbytes, self.priority, self.event = key, slot, nbytes, priority, event
        self.engine = engine
        self.error = None
        self._src, self._dst = src, dst  # keep both buffers alive while the copy may be in flight

    def ready(self) -> bool:
        return self.event.query()  # cudaEventQuery: never blocks

    def wait(self, timeout: float | None = None) -> float:
        """Device-side wait: the compute stream of the engine's device stalls until the copy's event
        (`cudaStreamWaitEvent`); the host does not block. The stall is timed with a pair of torch events
        read later (`drain_stall_seconds`)."""
        if not self.event.query():
            self.engine.compute.wait(lambda stream: self.event.wait_on(stream.cuda_stream))
        return 0.0


class NativeCudaCopyEngine(CudaCopyEngine):
    """Host→device copies on one dedicated stream through the native engine, one event per expert.
    Stall accounting (`drain_stall_seconds`, `discard_stalls`) and `link_seconds` are the torch twin's;
    the stream, events and waits are all on the engine's device, whichever device is current."""

    def __init__(self, device: torch.device):
        reason = available()
        if reason:
            raise RuntimeError(f"the native CUDA copy engine cannot run here: {reason}")
        self.compute = ComputeSide(device)
        self.device = self.compute.device  # index resolved: the stream, events and waits are all on it
        self.stream = torch.cuda.Stream(device=self.device)  # owned by torch; the engine only enqueues on it
        self.compute.order_before(self.stream)  # the slot pool's zero fill, queued on the compute stream
        self._engine = _ext.cuda.CopyEngine(self.device.index, self.stream.cuda_stream)
        self.bytes_copied = 0
        self.busy_seconds = 0.0  # not measured without a sync; the profiler times copies with events
        self.fault = None  # test-only hook (runtime/transfer.py: the engine contract)
        self._in_flight: list[NativeCudaTransfer] = []  # holds each copy's buffers until its event completes
        self.clock = None  # the torch twin's copy timing, used by its compressed copies (`submit(expand=...)`)

    def _hold(self, transfers: list[NativeCudaTransfer]) -> None:
        """Keep source buffers (possibly short-lived staging memory) alive until their copy has run; the
        caller may drop a transfer after a device-side `wait` that returns before the copy ends."""
        self._in_flight = [t for t in self._in_flight if not t.event.query()] + transfers

    def submit(self, key: int, slot: int, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
               after=None, expand=None):
        """Enqueue `dst.copy_(src)` after `after` (the event guarding the slot's previous tenant). A compressed
        copy (`expand`) goes through the torch twin's path on the same stream (a row copy and the expansion
        kernel: the native engine moves raw bytes only)."""
        if expand is not None:
            return CudaCopyEngine.submit(self, key, slot, dst, src, priority, after, expand)
        if self.fault is not None:
            self.fault(key, slot, priority)
        nbytes = _check_pair(dst, src)
        event = self._engine.submit(dst.data_ptr(), src.data_ptr(), nbytes, _event_handle(after))
        self.bytes_copied += nbytes
        transfer = NativeCudaTransfer(key, slot, nbytes, priority, event, self, src, dst)
        self._hold([transfer])
        return transfer

    def submit_many(self, keys, slots, dsts, srcs, priority: int = DEMAND, afters=None) -> list[NativeCudaTransfer]:
        """`submit` for a whole wave in one native call (copies are enqueued in order)."""
        afters = afters if afters is not None else [None] * len(keys)
        sizes = [_check_pair(d, s) for d, s in zip(dsts, srcs)]
        events = self._engine.submit_batch([d.data_ptr() for d in dsts], [s.data_ptr() for s in srcs], sizes,
                                           [_event_handle(a) for a in afters])
        self.bytes_copied += sum(sizes)
        transfers = [NativeCudaTransfer(k, sl, n, priority, ev, self, s, d)
                     for k, sl, n, ev, s, d in zip(keys, slots, sizes, events, srcs, dsts)]
        self._hold(transfers)
        return transfers

    def close(self) -> None:
        # Copies still queued read pinned host memory that the store may free next: let them finish.
        self._engine.synchronize()
        self._in_flight.clear()


def _check_pair(dst: torch.Tensor, src: torch.Tensor) -> int:
    """Bytes of a host→device copy; refuses what `cudaMemcpyAsync` of raw pointers would get wrong."""
    if src.device.type != "cpu" or dst.device.type != "cuda":
        raise ValueError(f"native copy engine copies host→cuda, got {src.device} → {dst.device}")
    if src.dtype != dst.dtype or src.shape != dst.shape:
        raise ValueError(f"copy {tuple(src.shape)} {src.dtype} → {tuple(dst.shape)} {dst.dtype}: shapes and dtypes must match")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("native copy engine needs contiguous buffers (one expert = one contiguous copy)")
    return src.numel() * src.element_size()
