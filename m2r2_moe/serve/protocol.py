"""The OpenAI completions protocol, as far as `m2r2-moe serve` speaks it: requests checked field by field, and the
bodies of responses, stream chunks and errors.

A request is refused with a 4xx `ApiError` (OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`)
when it is not JSON, has a field the completions API does not have, a value of the wrong type or range, asks for a
feature this server does not implement (n > 1, logprobs, echo, penalties, ...), names another model, or asks for
more tokens than the server allows. Sampling follows the API: `temperature` defaults to 1 (sampling); 0 is greedy.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

MAX_STOPS = 4  # as the API
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "stream", "stream_options", "stop", "seed", "n",
          "user", "echo", "logprobs", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "suffix")
# fields of the API this server does not implement, and the only values it accepts for them
UNSUPPORTED = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (), "presence_penalty": (0,),
               "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",)}


_TYPE_NAMES = {bool: "true or false", dict: "an object", str: "a string", int: "an integer", float: "a number"}


class ApiError(Exception):
    """A request this server refuses: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked `POST /v1/completions` body."""

    prompt: str | list[int]  # text, or token ids
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    stop: tuple[str, ...]
    seed: int | None


def parse_completion(body: bytes, model: str, max_tokens_limit: int) -> CompletionRequest:
    """The request in `body`, checked; `ApiError` (4xx) naming the field and the fix otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; POST /v1/completions takes {', '.join(FIELDS)}",
                       param=unknown[0])
    for name, allowed in UNSUPPORTED.items():
        if data.get(name) is not None and data[name] not in allowed:
            raise ApiError(400, f"{name}={data[name]!r} is not supported by this server (leave it out"
                                + (f" or use {allowed[0]!r})" if allowed else ")"), param=name)
    if "model" not in data:
        raise ApiError(400, f"model is required (this server serves {model!r})", param="model")
    if data["model"] != model:
        raise ApiError(404, f"model {data['model']!r} is not served here; GET /v1/models lists {model!r}",
                       param="model", code="model_not_found")
    stream = _get(data, "stream", bool, False)
    options = _get(data, "stream_options", dict, None)
    if options is not None and (not stream or set(options) - {"include_usage"}):
        raise ApiError(400, "stream_options takes only include_usage, and only with stream: true", param="stream_options")
    max_tokens = _get(data, "max_tokens", int, 16)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(400, f"max_tokens must be from 1 to {max_tokens_limit} (this server's limit: m2r2-moe serve "
                            f"--max-tokens), got {max_tokens}", param="max_tokens")
    temperature, top_p = _get(data, "temperature", float, 1.0), _get(data, "top_p", float, 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be from 0 (greedy) to 2, got {temperature}", param="temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    _get(data, "user", str, None)
    return CompletionRequest(prompt=_prompt(data.get("prompt")), max_tokens=max_tokens, temperature=temperature,
                             top_p=top_p, stream=stream, include_usage=bool(options and options.get("include_usage")),
                             stop=_stops(data.get("stop")), seed=_get(data, "seed", int, None))


def _get(data: dict, name: str, kind: type, default):
    """`data[name]` of JSON type `kind` (an int is a float too; a bool is neither), `default` when absent or null."""
    value = data.get(name)
    if value is None:
        return default
    ok = (isinstance(value, kind) if kind in (bool, dict, str) else
          not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int))
    if not ok or kind is float and not math.isfinite(value):
        raise ApiError(400, f"{name} must be {_TYPE_NAMES[kind]}, got {json.dumps(value)}", param=name)
    return float(value) if kind is float else value


def _prompt(value) -> str | list[int]:
    """A string, token ids, or a list holding one of them (the API's batch form, with one prompt)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ApiError(400, "prompt is empty", param="prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in value):
        return value
    raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                   param="prompt")


def _stops(value) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", param="stop")
    return tuple(stops)


class Completion:
    """One completion's identity and the bodies of its responses (`text_completion` objects)."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model

    def body(self, text: str, finish: str | None, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": [] if text is None else [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        if usage is not None:
            out["usage"] = usage
        return out

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def sse(data) -> bytes:
    """One server-sent event carrying `data` (JSON, or the `[DONE]` marker)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
