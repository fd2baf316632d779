"""The runtime's sense of time: forwards, layer turns, and how long one layer computes.

- `now(layer)`: the current time in *layer turns*, `step * L + layer`, the unit of the `predictive` policy's
  next-use estimates (runtime/policy.py).
- `layer_seconds`: a running estimate of one MoE layer's compute time on the host clock, stalls excluded; the
  prefetcher weighs an expert's transfer time against it. A forward of another size (decode after a prefill)
  starts the estimate afresh: a prefill's layer times say nothing about a decode step's.
"""

from __future__ import annotations

import time

_source = time.perf_counter  # what `host_seconds` reads (runtime/virtual.py swaps in a simulated clock)


def host_seconds() -> float:
    """The seconds every timing in the runtime (and the profiler) reads: `time.perf_counter`, unless a
    simulation drives the clock."""
    return _source()


def host_source():
    return _source


def set_host_source(source) -> None:
    """Make `host_seconds` read `source()` (runtime/virtual.py; `time.perf_counter` restores the host's)."""
    global _source
    _source = source


class LayerClock:
    """Ticked once per MoE layer call by the hot path."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.step = 0  # forwards seen (a decode step is one forward)
        self.layer = 0  # the MoE layer being computed
        self.layer_seconds = 0.0
        self._last = (-1, 0.0, 0.0, 0)  # (layer, perf_counter, stall seconds, tokens) at the previous call

    def tick(self, layer: int, tokens: int, stall_seconds: float) -> None:
        """Layer `layer` starts on `tokens` tokens; `stall_seconds` is the runtime's stall so far."""
        if layer == 0:
            self.step += 1
        self.layer = layer
        now = _source()
        last_layer, last_time, last_stall, last_tokens = self._last
        if tokens != last_tokens:
            self.layer_seconds = 0.0  # unknown until this size's first sample: the prefetcher then uses its floor
        elif layer == last_layer + 1:
            sample = max(now - last_time - (stall_seconds - last_stall), 0.0)
            self.layer_seconds = sample if not self.layer_seconds else 0.9 * self.layer_seconds + 0.1 * sample
        self._last = (layer, now, stall_seconds, tokens)

    def now(self, layer: int | None = None) -> int:
        """The time in layer turns at `layer` (default: the layer being computed) of the current forward."""
        return self.step * self.num_layers + (self.layer if layer is None else layer)
