"""Prefill and decode apart: each forward's time, stall and traffic go to its phase's counters.

A forward is *prefill* when its layer calls compute more than one token (a prompt, a chunk of one; also a
decode step of several sequences, one token each: the runtime sees tokens, not sequences) and *decode* when
they compute one. `PhaseMeter` is told when each MoE layer call starts and ends; at the end of a forward's
last MoE layer it adds what the totals (`OffloadStats`) grew by during the forward to the phase's
`PhaseStats`, and the forward's time, from the start of its first MoE layer. A forward cut short (an error,
an interrupt) is closed when the next one starts, up to the end of its last layer call.

On CUDA the compute stream's waits are timed on the device and read back later (`runtime/cuda_compute.py`):
each wait is labelled with the phase it was queued in, and `collect_device` adds the labelled seconds to each
phase when they are read.
"""

from __future__ import annotations

from ..stats import PhaseStats
from .clock import host_seconds

_COUNTERS = ("stall_seconds", "bytes_to_device", "misses", "prefetches")


class PhaseMeter:
    """Splits one offloaded model's counters between prefill and decode."""

    def __init__(self, cache, num_layers: int):
        self.cache = cache
        self.last = num_layers - 1
        self._open = None  # the forward in progress: [phase name, stats object, totals at start, start, end]

    def started(self, layer: int, tokens: int) -> None:
        """A MoE layer call of `tokens` tokens starts."""
        if layer != 0:
            return
        self._close()
        phase = "prefill" if tokens > 1 else "decode"
        stats = self.cache.stats
        getattr(stats, phase).tokens += tokens
        now = host_seconds()
        self._open = [phase, stats, [getattr(stats, c) for c in _COUNTERS], now, now]
        self._label(phase)

    def finished(self, layer: int) -> None:
        """The MoE layer call of `layer` ended."""
        if self._open is not None:
            self._open[4] = host_seconds()
            if layer == self.last:
                self._close()

    def collect_device(self, engine) -> None:
        """Right after the engine's device-side stalls were read into the total (CUDA): add them to the
        phases they were queued in, and keep them out of the open forward's growth of the total."""
        stalls = _stall_log(engine)
        if stalls is None:
            return
        for phase, seconds in stalls.take_labelled().items():
            if phase in ("prefill", "decode"):
                getattr(self.cache.stats, phase).stall_seconds += seconds
            if self._open is not None:
                self._open[2][0] += seconds  # _COUNTERS[0]: the total's stall at the forward's start

    def _close(self) -> None:
        if self._open is None:
            return
        name, stats, before, start, end = self._open
        self._open = None
        if stats is not self.cache.stats:
            return  # the counters were reset during the forward: it belongs to neither period
        phase: PhaseStats = getattr(stats, name)
        phase.forwards += 1
        phase.seconds += end - start
        for counter, was in zip(_COUNTERS, before):
            setattr(phase, counter, getattr(phase, counter) + getattr(stats, counter) - was)

    def _label(self, phase: str) -> None:
        stalls = _stall_log(self.cache.engine)
        if stalls is not None:
            stalls.label = phase


def _stall_log(engine):
    """The CUDA engines' device-side stall log (`ComputeSide.stalls`), None for the CPU engine."""
    compute = getattr(engine, "compute", None)
    return getattr(compute, "stalls", None)
