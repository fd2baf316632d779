"""What the prefetcher's planner costs per MoE layer call, cold (as in a decode step) and warm.

In a decode step the planner is called once per MoE layer, with the layer's kernels in between: its code and
state are read cold every time. This script replays synthetic batch-1 decode traffic (each layer's top-k experts
drawn at random, how each use was served drawn from hits, prefetch hits and misses, the predictor's rows drawn
from a Dirichlet) through the planner the runtime uses, and times each call: `layer` settling only (a layer that
does not predict), `layer` with predictions for the next two layers (what a predicting layer pays), and the
calls after it (`issued` for one copy, `add_spent`). Cold rows sweep 8 MB of memory between calls (the caches
a layer's kernels go through); warm rows call back to back. Both twins are timed: the C++ planner
(`csrc/planner.cpp`, what the runtime uses when it is built) and the Python one (`runtime/planner.py`).
Medians over the calls; µs.

    python benchmarks/planner_cost.py [--tokens 300] [--no-record]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe import _ext  # noqa: E402
from m2r2_moe.runtime.planner import make_planner  # noqa: E402

GEOMETRIES = ((8, 8, 2), (12, 32, 4), (32, 64, 8))  # (layers, experts, top-k): tiny-mixtral, tiny-qwen3-moe, larger
SWEEP_BYTES = 8 << 20


def measure(layers: int, experts: int, top_k: int, tokens: int, native: bool, cold: bool, seed: int = 0) -> dict:
    """Median µs per call of each kind over `tokens` decode steps (the first tenth not timed)."""
    planner = make_planner(layers, experts, experts, top_k, 4 * top_k, native=native)
    sweep = np.zeros(SWEEP_BYTES if cold else 1, dtype=np.uint8)
    rng, draws = random.Random(seed), np.random.default_rng(seed)
    times: dict[str, list[int]] = {"settle": [], "predict": [], "after": []}
    now = 0
    for step in range(tokens):
        planner.step(64, True, 0.0)
        for layer in range(layers):
            keys = [layer * experts + e for e in rng.sample(range(experts), top_k)]
            served = [rng.choice((0, 0, 1, 3)) for _ in keys]
            predicting = layer % 2 == 0
            probs = draws.dirichlet(np.ones(experts), size=2).astype(np.float32) if predicting else None
            np.add(sweep, 1, out=sweep)
            start = time.perf_counter_ns()
            queue, _, _ = planner.layer(layer, True, now, keys, served, [], probs, True, 2, 1e-3, 1e-3, 1e-3, 1, [],
                                        0.0)
            mid = time.perf_counter_ns()
            for target, expert, _ in queue[:1]:
                planner.issued(target * experts + expert, rng.choice((-1, rng.randrange(layers * experts))), now)
            planner.add_spent(1e-6)
            end = time.perf_counter_ns()
            if step >= tokens // 10:
                times["predict" if predicting else "settle"].append(mid - start)
                times["after"].append(end - mid)
            now += 1
    return {name: float(np.median(t)) / 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    twins = [("C++", True)] if _ext.HAS_PLANNER else []
    twins.append(("Python", False))
    rows = []
    for layers, experts, top_k in GEOMETRIES:
        for name, native in twins:
            for cold in (True, False):
                m = measure(layers, experts, top_k, args.tokens, native, cold)
                rows.append([f"{layers} x {experts}, top-{top_k}", name, "cold" if cold else "warm",
                             f"{m['settle']:.2f}", f"{m['predict']:.2f}", f"{m['after']:.2f}"])
    table = markdown_table(["layers x experts", "planner", "caches", "layer, settling µs", "layer, predicting µs",
                            "issued + add_spent µs"], rows)
    extra = (f"\nMedian per call over {args.tokens} synthetic decode steps; every other layer predicts two layers "
             f"ahead; cold: {SWEEP_BYTES >> 20} MB swept between calls.\n")
    publish("Planner cost per layer call (benchmarks/planner_cost.py)", table, extra, record=not args.no_record)


if __name__ == "__main__":
    main()
