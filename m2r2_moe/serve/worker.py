"""The model side of `m2r2-moe serve`: one generation at a time per model, a bounded queue in front of it.

An offloaded model runs one forward at a time (its slots belong to the forward being computed), so one worker
thread owns the model and runs the queued jobs in turn with transformers' own `generate`, which is what makes a
served completion equal to an in-process one. A full queue refuses the job (the server answers 429). Each job
gets its text as it is generated (`TextDeltas`, a transformers streamer) and can be cancelled at any time: a
stopping criterion ends its `generate` at the next token, and the model is free for the next job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..attach import runtime_of
from .protocol import CompletionRequest

logger = logging.getLogger(__name__)


class Job:
    """One completion: its request, prompt ids, and what the worker reports (`events`): ("text", delta),
    then ("done", finish_reason, text, completion_tokens) or ("error", message)."""

    def __init__(self, request: CompletionRequest, ids: list[int]):
        self.request, self.ids = request, ids
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class TextDeltas(BaseStreamer):
    """Turns the tokens `generate` streams into text deltas: each sent once a later decode cannot change it
    (no half-decoded character, nothing that could still start a stop string); stops at a stop string. With
    `emit=None` (a completion not streamed) it only decodes when there are stop strings to look for."""

    def __init__(self, tokenizer, stops: tuple[str, ...], emit=None):
        self.tokenizer, self.stops, self.emit = tokenizer, stops, emit
        self.hold = max((len(s) for s in stops), default=1) - 1  # characters that could begin a stop string
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was generated
        self._prompt = True  # generate streams the prompt first

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        if self.emit is None and not self.stops:
            return
        text = self.text()
        ready = len(text) - self.hold if not self.stopped else len(text)
        if text.endswith("\ufffd") and not self.stopped:  # a character whose bytes have not all come yet
            ready = min(ready, len(text) - 1)
        self._send(text[:ready])

    def end(self) -> None:
        self._send(self.text())

    def text(self) -> str:
        """The completion's text so far: decoded, cut before the first stop string."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            text = text[: min(cuts)]
        return text

    def _send(self, text: str) -> None:
        if self.emit is not None and len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit(text[len(self.sent):])
            self.sent = text


class _Stop(StoppingCriteria):
    """Ends `generate` when the job is cancelled or its text reached a stop string."""

    def __init__(self, job: Job, deltas: TextDeltas):
        self.job, self.deltas = job, deltas

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = self.job.cancelled.is_set() or self.deltas.stopped
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class ModelWorker:
    """Runs the jobs of one offloaded model in turn on its own thread; at most `max_queue` wait."""

    def __init__(self, model, tokenizer, max_queue: int):
        self.model, self.tokenizer = model, tokenizer
        self.device = runtime_of(model).device
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "tokens_generated": 0, "generate_seconds": 0.0}
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._run, name="m2r2-serve-model")
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue `job`; False when the queue is full (or the worker is closing)."""
        if self._closed.is_set():
            return False
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def waiting(self) -> int:
        return self._queue.qsize()

    def snapshot(self) -> dict:
        """The counters, how many jobs wait, whether one runs."""
        with self._lock:
            return {**self.counters, "waiting": self.waiting(), "busy": self.running is not None}

    def close(self) -> None:
        """Cancel the running job and every queued one (told "the server is shutting down"); join the thread."""
        self._closed.set()
        running = self.running
        if running is not None:
            running.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.cancel()
            job.events.put(("error", "the server is shutting down"))
        self._thread.join()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                job = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if job.cancelled.is_set():
                self._count("cancelled")
                continue
            self.running = job
            try:
                last = self._generate(job)
            except Exception as e:  # noqa: BLE001 — one request failed: say so to its client, keep serving
                logger.exception("generation failed")
                self._count("failed")
                last = ("error", f"generation failed: {e}")
            finally:
                self.running = None
                runtime_of(self.model).collect_device_stalls()  # on this thread, between forwards
            job.events.put(last)  # once the worker is free: a client that has its answer finds it idle

    def _generate(self, job: Job) -> tuple:
        """Run one job; returns its last event (`done` or `error`), which the caller reports."""
        request = job.request
        emit = (lambda text: job.events.put(("text", text))) if request.stream else None
        deltas = TextDeltas(self.tokenizer, request.stop, emit)
        ids = torch.tensor([job.ids], device=self.device)  # [1, T]
        options = dict(max_new_tokens=request.max_tokens, streamer=deltas, attention_mask=torch.ones_like(ids),
                       stopping_criteria=StoppingCriteriaList([_Stop(job, deltas)]),
                       pad_token_id=_pad_token(self.model))
        if request.temperature > 0:
            options.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=0)
            if request.seed is not None:
                torch.manual_seed(request.seed)
        else:
            options.update(do_sample=False)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, **options)
        self._count("generate_seconds", time.perf_counter() - start)  # what the server adds is the rest
        generated = out[0, ids.shape[1]:].tolist()
        self._count("tokens_generated", len(generated))
        if job.cancelled.is_set():  # its client left (it reads no more), or the server is shutting down
            self._count("cancelled")
            return ("error", "the server is shutting down" if self._closed.is_set() else "cancelled")
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        finish = "stop" if deltas.stopped or (generated and generated[-1] in eos) else "length"
        self._count("completed")
        return ("done", finish, deltas.text(), len(generated))


def _pad_token(model) -> int | None:
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    return pad
