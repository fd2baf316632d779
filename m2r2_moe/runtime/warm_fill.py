"""Filling free slots with a profile's likeliest experts before they are asked for (a warm start).

Each copy goes through `ExpertCache.prefetch`, the one way to bring an expert in ahead of use, marked for its
layer's next turn, so the first forward finds it resident (a prefetch hit) instead of loading it on demand.
The fill never evicts: it stops at the last free slot. How it is fed depends on the copy engine:

- CPU engine (priority queue): everything is queued at once, at prefetch priority (the layer's distance, farther
  than any prediction's): demand loads jump ahead of it, and on an emulated link take the link from it at once.
- CUDA copy stream (runs copies in submission order, no pre-emption): a background thread queues one layer's
  worth (top-k copies) at a time, the next once those have landed, and only while the model runs no forward — a
  forward pre-hook waits for the few microseconds of a submission in progress, and none is made until the forward
  is over. A demand load then waits behind at most one chunk. (A forward interrupted by KeyboardInterrupt leaves
  the fill paused; prefetching only changes speed.)
"""

from __future__ import annotations

import logging
import threading
import time

from .expert_cache import NOT_QUEUED

logger = logging.getLogger(__name__)

POLL_S = 0.001  # the background feeder's wait for a chunk to land


class WarmFill:
    """Brings `order` ((layer, expert), likeliest first in the order they are needed) into the free slots."""

    def __init__(self, offloader, model, order: list[tuple[int, int]], background: bool):
        self.offloader = offloader
        self.pending = list(order)
        self.planned = len(order)
        self.queued = 0  # copies queued (the others were resident already, or no slot was free)
        self.chunk = max(1, offloader.top_k)
        self._thread = None
        self._handles = []
        if not background:
            self._submit(len(self.pending))
            return
        self._cv = threading.Condition()
        self._inside: dict[int, int] = {}  # thread ident -> depth of the model's forwards it is in
        self._busy = self._closed = False
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._exit, always_call=True)]
        self._thread = threading.Thread(target=self._run, name="m2r2-warm-fill", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        """Every copy of the fill is queued (or was given up: no free slot)."""
        return not self.pending

    def close(self) -> None:
        """Stop feeding (copies already queued finish); the model's hooks come off."""
        if self._thread is not None:
            with self._cv:
                self._closed = True
                self._cv.notify_all()
            self._thread.join(timeout=10)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _submit(self, count: int) -> None:
        """Queue up to `count` more copies, each for its layer's turn in the next forward."""
        cache, clock = self.offloader.cache, self.offloader.clock
        prefetcher = self.offloader.prefetcher
        num_layers, now = len(self.offloader.layers), clock.now()
        while count > 0 and self.pending and cache.free_slots() > 0:
            layer, expert = self.pending.pop(0)
            distance = (clock.step + 1) * num_layers + layer - now
            evicted = cache.prefetch(layer, expert, distance, now, frozenset())
            if evicted != NOT_QUEUED:
                self.queued += 1
                count -= 1
            if prefetcher is not None:  # its mirror of what is in flight
                prefetcher.planner.issued(layer * cache.key_stride + expert, evicted, now)
        if cache.free_slots() <= 0:
            self.pending.clear()

    # -- background feeding (CUDA) -----------------------------------------------------------------
    def _enter(self, module, args) -> None:
        me = threading.get_ident()
        with self._cv:
            self._inside[me] = self._inside.get(me, 0) + 1
            while self._busy:
                self._cv.wait()

    def _exit(self, module, args, output) -> None:
        me = threading.get_ident()
        with self._cv:
            depth = self._inside.pop(me, 0) - 1
            if depth > 0:
                self._inside[me] = depth
            self._cv.notify_all()

    def _run(self) -> None:
        cache = self.offloader.cache
        while True:
            with self._cv:
                while self._inside and not self._closed:
                    self._cv.wait()
                if self._closed or not self.pending:
                    return
                self._busy = True
            try:
                if len(cache.queued_prefetches()) < self.chunk:  # the last chunk has landed
                    self._submit(self.chunk)
            except Exception as e:  # noqa: BLE001 — a warm start only changes speed: stop filling, say why
                logger.warning("warm start: filling the slots stopped (%r); the model is unaffected", e)
                self.pending.clear()
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
            time.sleep(POLL_S)
