"""The HTTP side of `m2r2-moe serve`: the standard library's threading HTTP server, one handler thread per connection.

Routes: `POST /v1/completions` (OpenAI's completions API; `stream: true` answers with server-sent events ending in
`data: [DONE]`), `GET /health`, `GET /v1/models`, `GET /stats` (the runtime's counters, the server's, the memory
plan and the warm start). Every refusal is a JSON error body with a 4xx status: bad JSON or fields 400, an unknown
model or path 404, another method 405, no Content-Length 411, a body over 1 MiB 413, a full queue 429 (with
Retry-After). A client that goes away — noticed when a write fails, or while waiting, when its socket reads EOF —
cancels its job: the model stops at the next token and serves the next request.
"""

from __future__ import annotations

import json
import logging
import queue
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .protocol import ApiError, Completion, parse_completion, sse
from .worker import Job, ModelWorker

logger = logging.getLogger(__name__)

MAX_BODY = 2**20
DISCARD_LIMIT = 64 * 2**20  # an oversized body up to this is read and dropped before its 413
POLL_S = 0.05  # how often a waiting handler looks at its client's socket


class CompletionServer(ThreadingHTTPServer):
    """Serves one offloaded model through `worker`; `info()` gives the `/stats` extras."""

    daemon_threads = False  # server_close() joins every handler thread: a clean shutdown leaves none
    block_on_close = True

    def __init__(self, address, name: str, max_tokens: int):
        super().__init__(address, Handler)  # listens now: a port in use fails before any model is loaded
        self.name, self.max_tokens = name, max_tokens
        self.worker: ModelWorker | None = None
        self.context: int | None = None  # the model's context, in tokens
        self.info = dict
        self.counters = {"requests": 0, "rejected_queue_full": 0, "rejected_invalid": 0}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()

    def serve(self, worker: ModelWorker, context: int | None, info) -> None:
        """Serve `worker`'s model (`info()`: the `/stats` extras) until `shutdown()`."""
        self.worker, self.context, self.info = worker, context, info
        self.serve_forever(poll_interval=0.2)

    def track(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(connection)

    def close_connections(self) -> None:
        """End every open connection (idle keep-alive ones would otherwise hold shutdown for `Handler.timeout`)."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def stats(self) -> dict:
        with self._lock:
            counters = dict(self.counters)
        return {"model": self.name, "server": {**counters, **self.worker.snapshot()}, **self.info()}


class Handler(BaseHTTPRequestHandler):
    """One connection; see the module docstring for the routes."""

    protocol_version = "HTTP/1.1"
    server_version = "m2r2-moe"
    timeout = 30  # seconds a client may take to send its request
    server: CompletionServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format, *args) -> None:  # noqa: A002 — BaseHTTPRequestHandler's signature
        logger.info("%s %s", self.address_string(), format % args)

    # -- routes ------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 — http.server's naming
        routes = {"/health": self._health, "/v1/models": self._models, "/stats": self._stats}
        if self.path in routes:
            self._json(200, routes[self.path]())
        elif self.path == "/v1/completions":
            self._error(ApiError(405, "use POST for /v1/completions"), allow="POST")
        else:
            self._error(ApiError(404, f"no such path {self.path!r}: POST /v1/completions, GET /health, "
                                      "/v1/models, /stats", code="not_found"))

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/v1/completions":
            get = self.path in ("/health", "/v1/models", "/stats")
            self._drain()
            self._error(ApiError(405, f"use GET for {self.path}") if get else
                        ApiError(404, f"no such path {self.path!r}: POST /v1/completions", code="not_found"),
                        allow="GET" if get else None)
            return
        self.server.count("requests")
        try:
            request = parse_completion(self._body(), self.server.name, self.server.max_tokens)
            job = Job(request, self._prompt_ids(request))
        except ApiError as e:
            self.server.count("rejected_invalid")
            self._error(e)
            return
        if not self.server.worker.submit(job):
            self.server.count("rejected_queue_full")
            self._error(ApiError(429, f"the request queue is full ({self.server.worker.max_queue} waiting); "
                                      "retry later", kind="rate_limit_error", code="queue_full"), retry_after=1)
            return
        (self._stream if request.stream else self._complete)(job, Completion(self.server.name))

    def do_PUT(self) -> None:  # noqa: N802
        self._drain()
        self._error(ApiError(405, f"{self.command} is not supported: POST /v1/completions, GET /health, /v1/models, "
                                  "/stats"), allow="GET, POST")

    do_DELETE = do_PATCH = do_PUT

    def _health(self) -> dict:
        return {"status": "ok", "model": self.server.name, "waiting": self.server.worker.waiting(),
                "busy": self.server.worker.running is not None}

    def _models(self) -> dict:
        return {"object": "list", "data": [{"id": self.server.name, "object": "model", "created": 0,
                                            "owned_by": "m2r2_moe"}]}

    def _stats(self) -> dict:
        return self.server.stats()

    # -- completions -------------------------------------------------------------------------------
    def _prompt_ids(self, request) -> list[int]:
        worker = self.server.worker
        ids = request.prompt if isinstance(request.prompt, list) else worker.tokenizer(request.prompt).input_ids
        vocab = worker.model.config.get_text_config().vocab_size
        if not ids or max(ids) >= vocab:
            raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}" if ids else "the prompt has no tokens",
                           param="prompt")
        context = self.server.context
        if context is not None and len(ids) + request.max_tokens > context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({request.max_tokens}) exceed the "
                                f"model's context of {context} tokens", param="max_tokens")
        return ids

    def _complete(self, job: Job, completion: Completion) -> None:
        for event in self._events(job):
            if event[0] == "done":
                _, finish, text, generated = event
                self._json(200, completion.body(text, finish, Completion.usage(len(job.ids), generated)))
            elif event[0] == "error":
                self._error(ApiError(500 if "shutting down" not in event[1] else 503, event[1], kind="server_error"))

    def _stream(self, job: Job, completion: Completion) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the body ends when the connection does
            self.end_headers()
            self.close_connection = True
            for event in self._events(job):
                if event[0] == "text":
                    self._write(sse(completion.body(event[1], None)))
                elif event[0] == "done":
                    self._write(sse(completion.body("", event[1])))
                    if job.request.include_usage:
                        self._write(sse(completion.body(None, None, Completion.usage(len(job.ids), event[3]))))
                    self._write(sse("[DONE]"))
                else:
                    self._write(sse(ApiError(500, event[1], kind="server_error").body()))
        except OSError as e:  # the client went away mid-stream: stop its generation
            logger.info("client %s left mid-stream (%s); its generation is cancelled", self.address_string(), e)
            job.cancel()

    def _events(self, job: Job):
        """The job's events until it is done or failed; cancels it when the client has gone away."""
        while True:
            try:
                event = job.events.get(timeout=POLL_S)
            except queue.Empty:
                if self._client_gone():
                    logger.info("client %s went away; its generation is cancelled", self.address_string())
                    job.cancel()
                    return
                continue
            yield event
            if event[0] != "text":
                return

    def _client_gone(self) -> bool:
        """Whether the client closed its side (EOF on a readable socket) while we wait for the model."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- plumbing ----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required (chunked request bodies are not supported)")
        if int(length) > MAX_BODY:
            self.close_connection = True
            self._discard(int(length))
            raise ApiError(413, f"the request body is {int(length)} bytes; the limit is {MAX_BODY}")
        return self.rfile.read(int(length))

    def _discard(self, length: int) -> None:
        """Read and drop an oversized body (up to DISCARD_LIMIT, for at most a few seconds) before the 413 is sent:
        a client still sending would otherwise see its connection reset instead of the answer."""
        if length > DISCARD_LIMIT:
            return
        try:
            self.connection.settimeout(5.0)
            while length > 0:
                chunk = self.rfile.read(min(length, 2**16))
                if not chunk:
                    return
                length -= len(chunk)
        except OSError:
            pass

    def _drain(self) -> None:
        """Read and drop a request body we will not use, so the connection stays in step."""
        try:
            self._body()
        except ApiError:
            pass

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self._write(data)
        except OSError as e:
            logger.info("client %s left before its response (%s)", self.address_string(), e)
            self.close_connection = True

    def _error(self, error: ApiError, allow: str | None = None, retry_after: int | None = None) -> None:
        headers = {"Allow": allow} if allow else {}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        self._json(error.status, error.body(), headers)
