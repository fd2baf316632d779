"""What `m2r2-moe serve` adds per token over calling `generate` in-process, on the same offloaded model.

The server runs in a subprocess (built-in model, CPU, float32, its default slots and prefetching) and counts the
seconds its worker spends inside `generate` (`/stats`: `generate_seconds`); this process times a completion
through the server with the openai client, not streamed and streamed (to its last event): the time the client
waits less the server's `generate` time is what serving adds (HTTP, JSON, the queue hand-off, the streamer, the
client's parsing), measured on one model instance. For scale, this process also loads the same model the same way
and times `generate` in-process (another instance in another process: differences of a few % between the two
are the machine's, not the server's). Every greedy completion has the same text (checked). Best of `--repeats`.

    python benchmarks/serve_overhead.py [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import m2r2_moe  # noqa: E402
from _report import markdown_table, publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):\n    "


def start_server(max_tokens: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "m2r2_moe.cli", "serve", "--port", "0", "--max-tokens",
                             str(max_tokens)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "listening on http://" in line:
            return proc, line.split("listening on ")[1].split()[0]
    raise RuntimeError("the server did not start")


def main() -> None:
    from openai import OpenAI
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    path = m2r2_moe.builtin_model_path()
    model = m2r2_moe.from_pretrained(path, device="cpu", dtype=torch.float32, cache_experts=None, predictor="m2r2",
                                     progress=False)  # what `m2r2-moe serve` does with its defaults
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    proc, url = start_server(args.tokens)
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    request = dict(model="tiny-mixtral", prompt=PROMPT, max_tokens=args.tokens, temperature=0)

    def in_process():
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), out.shape[1] - ids.shape[1]

    def served():
        reply = client.completions.create(**request)
        return reply.choices[0].text, reply.usage.completion_tokens

    def streamed():
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **request)), None

    def inside() -> float:
        with urllib.request.urlopen(url + "/stats") as response:
            return json.load(response)["server"]["generate_seconds"]

    ways = {"generate in-process": in_process, "server (openai client)": served,
            "server, streamed (SSE)": streamed}
    best = {name: (float("inf"), 0.0) for name in ways}  # (client seconds, of which generate in the server)
    texts, counts = {}, set()
    try:
        for name, way in ways.items():
            way()  # warm-up: the cache and the predictor's state settle
        for _ in range(args.repeats):  # interleaved: every way sees the machine's drift alike
            for name, way in ways.items():
                before = inside() if name != "generate in-process" else 0.0
                start = time.perf_counter()
                texts[name], count = way()
                wall = time.perf_counter() - start
                generate = inside() - before if name != "generate in-process" else wall
                best[name] = min(best[name], (wall, generate))
                counts |= {count} - {None}
    finally:
        proc.terminate()
        proc.wait(60)
    if len(set(texts.values())) != 1 or len(counts) != 1:
        raise RuntimeError(f"the three ways gave different completions: {texts}, {counts} tokens")
    tokens = counts.pop()
    rows = [[name, f"{wall * 1e3:.0f}", f"{generate * 1e3:.0f}", f"{wall / tokens * 1e3:.2f}",
             f"{(wall - generate) * 1e3:.1f}", f"{(wall - generate) / tokens * 1e3:.3f}"]
            for name, (wall, generate) in best.items()]
    table = markdown_table(["way", f"ms for {tokens} tokens", "of which generate", "ms/token",
                            "added by serving (ms)", "added ms/token"], rows)
    extra = (f"\nBest of {args.repeats} (by the client's wait), interleaved; built-in model (tiny-mixtral), CPU, "
             f"float32, half of the experts in slots, m2r2 prefetching, greedy, prompt {PROMPT!r}; the same text all "
             "three ways. 'added by serving' = the client's wait less the server worker's time inside generate.\n")
    publish("Server overhead per token (benchmarks/serve_overhead.py)", table, extra, record=not args.no_record)


if __name__ == "__main__":
    main()
