"""Time from process start to the first token, as an app embedding m2r2_moe meets it (built-in model, CPU).

Each run is a new Python process that imports torch and m2r2_moe, loads the built-in model with
`from_pretrained` in a device budget (`gpu_memory`, m2r2 prefetching), reads a prompt and streams the first
token; the process reports when each step ended, on the wall clock the parent started it at. `cold` runs without a
profile, `warm` with the profile an earlier process saved (`warm_start=`). Best of `--repeats` per mode.

    python benchmarks/first_token.py [--repeats 3] [--gpu-memory 16MB]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, publish  # noqa: E402

PROMPT = "import os\n\ndef list_files(path):\n"
STEPS = ("import", "load", "first token")


def child(args: argparse.Namespace) -> None:
    """One app process: report (seconds since the parent's start mark) after each step, as JSON on stdout."""
    t0 = float(os.environ["M2R2_BENCH_T0"])
    marks = {}
    import torch  # noqa: F401 — part of what an app pays at start

    import m2r2_moe
    from transformers import AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    marks["import"] = time.time() - t0
    path = m2r2_moe.builtin_model_path()
    model = m2r2_moe.from_pretrained(path, device="cpu", dtype=torch.float32, gpu_memory=args.gpu_memory,
                                     context_length=512, predictor="m2r2", warm_start=args.warm, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    marks["load"] = time.time() - t0

    class First(BaseStreamer):
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first is the prompt
                marks["first token"] = time.time() - t0

        def end(self):
            pass

    model.generate(**tokenizer(PROMPT, return_tensors="pt"), max_new_tokens=2, do_sample=False, streamer=First(),
                   pad_token_id=0)
    if args.save:
        model.generate(**tokenizer(PROMPT, return_tensors="pt"), max_new_tokens=32, do_sample=False, pad_token_id=0)
        m2r2_moe.save_profile(model, args.save)
    print(json.dumps(marks), flush=True)


def run(*extra: str) -> dict:
    env = {**os.environ, "M2R2_BENCH_T0": repr(time.time())}
    done = subprocess.run([sys.executable, __file__, "--child", *extra], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory", default="16MB")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as folder:
        profile = str(Path(folder) / "profile.json")
        run("--gpu-memory", args.gpu_memory, "--save", profile)  # an earlier session of the app
        results = {"cold": [], "warm": []}
        for _ in range(args.repeats):  # interleaved: both modes see the machine's drift alike
            results["cold"].append(run("--gpu-memory", args.gpu_memory))
            results["warm"].append(run("--gpu-memory", args.gpu_memory, "--warm", profile))
    rows = []
    for mode, runs in results.items():
        best = min(runs, key=lambda r: r["first token"])
        rows.append([mode, *(f"{best[s]:.2f}" for s in STEPS), f"{(best['first token'] - best['load']) * 1e3:.0f}"])
    table = markdown_table(["start", *(f"{s} done (s)" for s in STEPS), "load to first token (ms)"], rows)
    extra = (f"\nSeconds from process start to the end of each step, best of {args.repeats} processes per mode (by "
             f"first token); built-in model (tiny-mixtral), CPU, float32, gpu_memory={args.gpu_memory}, m2r2 "
             f"prefetching; prompt {PROMPT!r}. Importing torch and transformers' model code dominates.\n")
    publish("Process start to first token (benchmarks/first_token.py)", table, extra, record=not args.no_record)


if __name__ == "__main__":
    main()
