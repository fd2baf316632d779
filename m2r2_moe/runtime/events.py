"""What the runtime tells listeners (the profiler's recorder) as it works: no method is patched from outside.

A listener implements any of `layer_started(step, layer, tokens)`, `layer_finished(step, layer)` and
`copy_submitted(step, layer, key, priority, transfer)`; the runtime calls them only when someone listens (one
list check per layer call otherwise).
"""

from __future__ import annotations


class RuntimeEvents:
    """The listeners of one offloaded model."""

    def __init__(self):
        self.listeners: list = []

    def subscribe(self, listener) -> None:
        self.listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def layer_started(self, step: int, layer: int, tokens: int) -> None:
        for listener in self.listeners:
            listener.layer_started(step, layer, tokens)

    def layer_finished(self, step: int, layer: int) -> None:
        for listener in self.listeners:
            listener.layer_finished(step, layer)

    def copy_submitted(self, step: int, layer: int, key: int, priority: int, transfer) -> None:
        for listener in self.listeners:
            listener.copy_submitted(step, layer, key, priority, transfer)
