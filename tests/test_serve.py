"""`m2r2-moe serve`, started in a subprocess on a free port and driven by real HTTP clients: the `openai` package for
completions (streaming and not: the text `generate` gives in-process, greedy), http.client for what a well-behaved
client never sends. Eight clients at once all complete or get 429; a client dropped mid-stream leaves the server
serving; malformed requests get 4xx JSON errors; SIGTERM / SIGINT stop it cleanly (exit 0, no thread left, the
expert store released) — and a profile saved on shutdown warm-starts the next server."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import m2r2_moe

openai = pytest.importorskip("openai", reason="the serve tests drive the server with the openai client: "
                                               "pip install 'm2r2_moe[test]'")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):\n    "
MODEL = "tiny-mixtral"


class Server:
    """`m2r2-moe serve --port 0 ...` in a subprocess; its output is read on a thread."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "m2r2_moe.cli", "serve", "--port", "0", *args], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.wait_for("listening on http://").split("listening on ")[1].split()[0]
        self.host, self.port = self.url.removeprefix("http://").split(":")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            if text in line:
                return line
        raise AssertionError(f"the server did not print {text!r}; its output:\n{''.join(self.lines)}")

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    def stats(self) -> dict:
        return self.request("GET", "/stats")[1]

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def server():
    s = Server("--max-queue", "2", "--max-tokens", "64")
    yield s
    if s.proc.poll() is None:
        assert s.stop() == 0, "".join(s.lines)


@pytest.fixture(scope="module")
def reference():
    """The text in-process greedy `generate` gives for PROMPT, by max_new_tokens."""
    model, tokenizer = m2r2_moe.load_builtin()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    return lambda n: tokenizer.decode(out[0, ids.shape[1]: ids.shape[1] + n], skip_special_tokens=True)


def test_completions_equal_generate(server, reference):
    client = server.client()
    done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert done.choices[0].text == reference(24) and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 24 and done.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference(24) and len(chunks) > 3  # streamed in pieces, not at once
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 24
    stop = reference(24)[5:8]  # a stop string the greedy text contains: the completion ends before it
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == reference(24)[: reference(24).find(stop)] and cut.choices[0].finish_reason == "stop"


def test_health_models_and_stats(server):
    assert server.request("GET", "/health") == (200, {"status": "ok", "model": MODEL, "waiting": 0, "busy": False})
    assert [m.id for m in server.client().models.list()] == [MODEL]
    before = server.stats()
    server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    after = server.stats()
    assert after["server"]["completed"] == before["server"]["completed"] + 1
    assert after["runtime"]["tokens"] > before["runtime"]["tokens"] and after["slots"] == 32
    assert after["warm_start"] == {"profile": None} and "expert slots" in after["memory_plan"]


def test_eight_clients_at_once_complete_or_get_429(server, reference):
    results, before = [], server.stats()["server"]

    def one():
        try:
            r = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
            results.append(r.choices[0].text)
        except openai.RateLimitError as e:
            results.append(e.status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 8 and set(results) <= {reference(8), 429}
    assert results.count(reference(8)) >= 3  # the one running and the two waiting, at least
    after = server.stats()["server"]
    assert after["rejected_queue_full"] - before["rejected_queue_full"] == results.count(429)
    assert after["completed"] - before["completed"] == results.count(reference(8))


def test_a_client_dropped_mid_stream_leaves_the_server_serving(server, reference):
    before = server.stats()["server"]
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 64,
                                                        "temperature": 0, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: {")
    response.close(), conn.close()  # gone after the first token
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = server.stats()["server"]
        if now["cancelled"] > before["cancelled"] and not now["busy"]:
            break
        time.sleep(0.05)
    assert now["cancelled"] == before["cancelled"] + 1 and now["tokens_generated"] - before["tokens_generated"] < 64
    again = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert again.choices[0].text == reference(12)


@pytest.mark.parametrize("method, path, body, headers, status", [
    ("POST", "/v1/completions", b"{not json", None, 400),
    ("POST", "/v1/completions", b"[1, 2]", None, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_token": 5}, None, 400),  # unknown field
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 65}, None, 400),  # over the limit
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, None, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, None, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, None, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, None, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": ""}, None, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, None, 400),
    ("POST", "/v1/completions", {"model": MODEL}, None, 400),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, None, 404),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [5] * 2000, "max_tokens": 64}, None, 400),  # > context
    ("POST", "/v1/completions", b"x" * (2**20 + 1), None, 413),
    ("GET", "/v1/completions", None, None, 405),
    ("PUT", "/health", None, None, 405),
    ("GET", "/nowhere", None, None, 404),
])
def test_malformed_requests_get_4xx_json(server, method, path, body, headers, status):
    if isinstance(body, dict):
        body = json.dumps(body)
    code, reply = server.request(method, path, body, headers)
    assert code == status and set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
    assert server.request("GET", "/health")[0] == 200


def test_a_request_without_content_length_gets_411(server):
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]["message"]
    conn.close()


@pytest.mark.slow
def test_sigterm_and_sigint_stop_cleanly_and_a_saved_profile_warm_starts(tmp_path, reference):
    profile = tmp_path / "profile.json"
    first = Server("--save-profile", str(profile))
    stream = first.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=64, temperature=0, stream=True)
    next(iter(stream))  # a generation is running when the signal comes
    assert first.stop(signal.SIGTERM) == 0, "".join(first.lines)
    out = "".join(first.lines)
    assert "threads left: none; expert store released" in out and "profile written" in out
    second = Server("--warm-start", str(profile))
    warm = second.stats()["warm_start"]
    assert warm["profile"] == str(profile) and warm["queued"] > 0
    text = second.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert text.choices[0].text == reference(12)
    assert second.stop(signal.SIGINT) == 0 and "threads left: none" in "".join(second.lines)
