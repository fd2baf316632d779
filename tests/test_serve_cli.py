"""`m2r2-moe serve`'s options as a user meets them: refused in one line naming the flag, before any model loads
(a port in use too), and every protocol check of the completions API without a server (serve/protocol.py)."""

from __future__ import annotations

import json
import socket

import pytest
from test_cli import assert_one_line_error, run

import m2r2_moe
from m2r2_moe.serve.protocol import ApiError, parse_completion


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(m2r2_moe, "from_pretrained", refuse)


@pytest.mark.parametrize("argv, words", [
    (["--model", "random"], ["--model random has no tokenizer"]),
    (["--gpu-memory", "lots"], ["argument --gpu-memory", "not an amount of memory"]),
    (["--cache-experts", "4", "--gpu-memory", "1GB"], ["--cache-experts", "give one"]),
    (["--port", "-1"], ["argument --port"]),
    (["--warm-start", "no-such-profile.json"], ["argument --warm-start", "is not a file"]),
])
def test_bad_options_are_one_line_errors_before_loading(capsys, no_loading, argv, words):
    code, _, err = run(capsys, "serve", *argv)
    assert code == 2
    assert_one_line_error(err, "serve", *words)


def test_a_port_in_use_is_refused_before_loading(capsys, no_loading):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = run(capsys, "serve", "--port", str(busy.getsockname()[1]))
    assert code == 2
    assert_one_line_error(err, "serve", "cannot listen on 127.0.0.1")


def _parse(**body):
    return parse_completion(json.dumps({"model": "m", **body}).encode(), "m", 100)


def test_the_protocol_reads_the_apis_forms():
    request = _parse(prompt=["one prompt"], max_tokens=7, temperature=0, stop="\n", stream=True,
                     stream_options={"include_usage": True}, seed=3, n=1, user="u", logprobs=None)
    assert (request.prompt, request.max_tokens, request.temperature, request.stop, request.seed) == \
        ("one prompt", 7, 0.0, ("\n",), 3)
    assert request.stream and request.include_usage
    assert _parse(prompt=[[1, 2, 3]]).prompt == [1, 2, 3]
    defaults = _parse(prompt="x")
    assert (defaults.max_tokens, defaults.temperature, defaults.top_p, defaults.stream) == (16, 1.0, 1.0, False)


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),  # a bool is not a number
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),  # without stream
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),  # one prompt per request
    ({"prompt": [1, -2]}, 400, "prompt"),
])
def test_the_protocol_refuses_with_the_field_named(body, status, param):
    with pytest.raises(ApiError) as caught:
        _parse(**body)
    assert caught.value.status == status and caught.value.param == param
