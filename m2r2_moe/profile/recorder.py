"""Per-token, per-layer record of an offloaded model's expert traffic — a listener of the runtime's events.

The recorder subscribes to the offloader's events (`runtime/events.py`; nothing is patched, and the hot path
does nothing for it when no one listens). For every MoE layer call it keeps the wall interval, the stall, and
how many expert uses were hits / prefetch hits / late prefetches / misses (read as counter deltas, so the
classification is the runtime's own); for every copy, its priority and link interval (CPU engine) and
whether it was used. A forward of layer 0 starts a new step: step 0 is the prefill, then one step per
decoded token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime.clock import host_seconds

_CLASSES = ("hits", "prefetch_hits", "late_prefetches", "misses")


@dataclass
class LayerEvent:
    step: int
    layer: int
    start: float
    end: float
    stall: float
    hits: int
    prefetch_hits: int
    late_prefetches: int
    misses: int
    tokens: int


@dataclass
class CopyEvent:
    step: int
    layer: int  # MoE layer that issued it (the one computing when it was queued)
    key: int
    priority: int  # 0 = demand load, d = prefetch for d layers ahead
    nbytes: int
    submitted: float
    transfer: object = field(repr=False)

    @property
    def started(self) -> float:
        return self.transfer.started_at

    @property
    def finished(self) -> float:
        return self.transfer.finished_at

    @property
    def cancelled(self) -> bool:
        return self.transfer.cancelled


class Recorder:
    """Attach to an `Offloader`; `detach()` stops listening."""

    def __init__(self, offloader):
        self.offloader = offloader
        self.layers: list[LayerEvent] = []
        self.copies: list[CopyEvent] = []
        self.step = -1
        self.t0 = host_seconds()
        self._current_layer = -1
        self._open = None  # (layer, tokens, start, counters before) of the layer call in progress
        offloader.events.subscribe(self)
        offloader.engine.time_copies(True)  # CUDA: copies get timing events, so the trace has a copy lane

    def detach(self) -> None:
        self.offloader.events.unsubscribe(self)
        self.offloader.engine.time_copies(False)

    def _counters(self) -> list:
        self.offloader.collect_device_stalls()  # CUDA: the waits timed so far that have completed (never blocks)
        stats = self.offloader.stats
        return [getattr(stats, c) for c in _CLASSES] + [stats.stall_seconds]

    def layer_started(self, step: int, layer: int, tokens: int) -> None:
        if layer == 0:
            self.step += 1
        self._current_layer = layer
        self._open = (layer, tokens, host_seconds(), self._counters())

    def layer_finished(self, step: int, layer: int) -> None:
        end = host_seconds()
        opened, tokens, start, before = self._open
        delta = [a - b for a, b in zip(self._counters(), before)]
        self.layers.append(LayerEvent(self.step, layer, start - self.t0, end - self.t0, delta[4], *delta[:4],
                                      tokens=tokens))

    def copy_submitted(self, step: int, layer: int, key: int, priority: int, transfer) -> None:
        self.copies.append(CopyEvent(self.step, self._current_layer, key, priority, transfer.nbytes,
                                     host_seconds() - self.t0, transfer))

    # -- summaries ---------------------------------------------------------------------------------
    def decode_layers(self) -> list[LayerEvent]:
        return [e for e in self.layers if e.step >= 1]

    def per_step(self) -> list[dict]:
        """One row per step: wall time of its MoE layers' span, stall, and the four classes."""
        rows: dict[int, dict] = {}
        for e in self.layers:
            row = rows.setdefault(e.step, {"step": e.step, "start": e.start, "end": e.end, "stall": 0.0,
                                           **{c: 0 for c in _CLASSES}})
            row["end"] = max(row["end"], e.end)
            row["stall"] += e.stall
            for c in _CLASSES:
                row[c] += getattr(e, c)
        return [rows[s] for s in sorted(rows)]

    def per_layer(self, decode_only: bool = True) -> list[dict]:
        rows: dict[int, dict] = {}
        for e in self.decode_layers() if decode_only else self.layers:
            row = rows.setdefault(e.layer, {"layer": e.layer, "stall": 0.0, **{c: 0 for c in _CLASSES}})
            row["stall"] += e.stall
            for c in _CLASSES:
                row[c] += getattr(e, c)
        return [rows[layer] for layer in sorted(rows)]

    def link_busy_seconds(self) -> float:
        """Seconds the link spent on copies (the emulated link on CPU; the copy stream, from timing events, on CUDA)."""
        return sum(c.transfer.busy for c in self.copies if c.finished and not c.cancelled)
