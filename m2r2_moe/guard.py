"""One thread at a time per offloaded model: a clear `ConcurrentUseError` instead of corrupted slots.

An offloaded model's slot pool, slot table, prefetch state and counters belong to the forward being
computed; two threads running the same offloaded model at once would evict each other's experts
mid-layer. `UseGuard` is installed by `m2r2_moe.offload` as a forward pre-hook on the model (it runs
once per forward, not per layer) that takes the model for the calling thread, and an `always_call`
forward hook that gives it back, also when the forward raises. Two *different* offloaded models may run on
two threads at once: each has its own guard and runtime.

- Re-entrant: a forward nested in a forward of the same model on the same thread passes.
- A forward abandoned without its exit hook — torch runs `always_call` hooks on `Exception` only, so a
  `KeyboardInterrupt` (or `SystemExit`) leaves the model marked as taken — is detected, not trusted: the
  owner's live stack is searched for a forward of this model (`Module._call_impl` frames whose `self` is
  the model). None there means the ownership is stale and the caller takes the model over. That search
  runs only when the model is found taken, never on the uncontended path.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

from torch import nn

from .errors import ConcurrentUseError

logger = logging.getLogger(__name__)

_CALL_IMPL = nn.Module._call_impl.__code__  # the frame torch runs every module call (and its hooks) in


class UseGuard:
    """Per-model ownership by one thread; see the module docstring."""

    def __init__(self, model: nn.Module):
        self._model_name = type(model).__name__
        self._model_id = id(model)
        self._mutex = threading.Lock()  # guards the two fields below; held for a few instructions only
        self._owner: int | None = None  # thread ident of the thread inside a forward of the model
        self._depth = 0  # nesting depth of that thread's forwards
        self._held = False  # taken by `hold` (outside any forward: never stale, released by its `finally`)
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def owner(self) -> int | None:
        """Ident of the thread that holds the model (None when free)."""
        return self._owner

    def _enter(self, module, args) -> None:
        self._take(own_calls=1)  # the forward being entered is one call of the model on this stack

    @contextlib.contextmanager
    def hold(self):
        """Hold the model for this thread outside a forward (`remove_offload`): forwards on other threads
        are refused meanwhile, and a forward running on another thread makes this raise."""
        self._take(own_calls=0)
        self._held = True
        try:
            yield
        finally:
            self._held = False
            self._exit(None, None, None)

    def _take(self, own_calls: int) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner is None:
                self._owner, self._depth = me, 1
                return
            if self._owner == me:
                # nested (a call of the model encloses this one on this stack), or left by an interrupted forward
                nested = _forwards_on_stack(sys._getframe(), self._model_id) > own_calls
                self._depth = self._depth + 1 if nested else 1
                return
            owner = self._owner
            frame = sys._current_frames().get(owner)
            if self._held or frame is not None and _forwards_on_stack(frame, self._model_id) > 0:
                raise ConcurrentUseError(
                    f"this offloaded {self._model_name} is running on thread {_thread_name(owner)}; it cannot be "
                    f"used on thread {threading.current_thread().name} at the same time (its device slots and "
                    "prefetch state belong to one forward). Serialize the calls with a lock, or offload one copy "
                    "of the model per thread."
                )
            logger.warning("offloaded %s: thread %s left a forward without finishing it (interrupted?); thread %s "
                           "takes the model over", self._model_name, _thread_name(owner),
                           threading.current_thread().name)
            self._owner, self._depth = me, 1

    def _exit(self, module, args, output) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                return  # a forward refused by _enter (its always_call hook still runs), or taken over
            self._depth -= 1
            if self._depth <= 0:
                self._owner, self._depth = None, 0


def _forwards_on_stack(frame, model_id: int) -> int:
    """How many calls of the module `model_id` are running on the stack that ends at `frame`."""
    count = 0
    while frame is not None:
        if frame.f_code is _CALL_IMPL and id(frame.f_locals.get("self")) == model_id:
            count += 1
        frame = frame.f_back
    return count


def _thread_name(ident: int) -> str:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return repr(thread.name)
    return f"{ident} (finished)"
