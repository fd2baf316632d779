"""What the `predictive` eviction policy costs the host per decision, at the pool sizes of real models.

The policy is asked for a victim at every demand load and every prefetch that finds the pool full, and told of
every use. Its victim search looks at every resident expert, so its cost grows with the pool: this script times
it on synthetic batch-1 decode traffic (each layer's experts drawn Zipf-like over a layer-own ranking, the top-k
of a token distinct) with a pool of half the experts, for geometries of shipped and real MoE models. Rows: µs
per victim search that evicts, µs per use recorded, and what both add to a decoded token at the measured
evictions per token. Both victim searches are timed: the C++ one the runtime uses (`csrc/policy.hpp`) and
its numpy twin (`NextUsePolicy(native=False)`, the fallback when the extension is not built). In the runtime,
between a layer's kernels, caches are cold and each search costs more than here: numpy's fixed cost per
operation most (on tiny-qwen3-moe's 192 slots, 50-90 µs per evicting search in the runtime against 15-25 here).

    python benchmarks/policy_cost.py [--tokens 300] [--no-record]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe import _ext  # noqa: E402
from m2r2_moe.runtime.policy import HALF_LIFE, NextUsePolicy  # noqa: E402
from policies import replay  # noqa: E402

GEOMETRIES = (  # name, MoE layers, experts per layer, top-k
    ("tiny-mixtral (built-in)", 8, 8, 2),
    ("tiny-qwen3-moe (built-in)", 12, 32, 4),
    ("Mixtral-8x7B", 32, 8, 2),
    ("DeepSeek-V2-Lite", 26, 64, 6),
    ("Qwen3-30B-A3B", 48, 128, 8),
)


def traffic(layers: int, experts: int, top_k: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """Per (token, layer), the keys of the experts it routes to (key = layer x experts + expert)."""
    rng = random.Random(seed)
    rankings = [rng.sample(range(experts), experts) for _ in range(layers)]
    weights = [1.0 / (r + 1) for r in range(experts)]
    out = []
    for _ in range(tokens):
        for layer in range(layers):
            chosen: set[int] = set()
            while len(chosen) < top_k:
                chosen.add(rankings[layer][rng.choices(range(experts), weights)[0]])
            out.append(sorted(layer * experts + e for e in chosen))
    return out


class Timed:
    """A policy whose evicting victim searches and use updates are timed from turn `start` on."""

    def __init__(self, policy, start: int):
        self.policy, self.start = policy, start
        self.search = self.use = 0.0
        self.evictions = self.uses = 0

    def victim(self, key, now, pinned, needed_at=None):
        begin = time.perf_counter()
        victim = self.policy.victim(key, now, pinned, needed_at)
        took = time.perf_counter() - begin
        if victim is not None and now >= self.start:
            self.search, self.evictions = self.search + took, self.evictions + 1
        return victim

    def used(self, key, now) -> None:
        begin = time.perf_counter()
        self.policy.used(key, now)
        if now >= self.start:
            self.use, self.uses = self.use + time.perf_counter() - begin, self.uses + 1

    def forget(self, key) -> None:
        self.policy.forget(key)


def measure(layers: int, experts: int, top_k: int, tokens: int, native: bool | None = None) -> dict:
    """Replays the traffic as the expert cache would (`policies.replay`: a call's experts pinned, placed in key
    order); times the victim searches that evict and the uses, over the tokens after the first quarter (the pool
    full)."""
    slots = layers * experts // 2
    timed = Timed(NextUsePolicy(layers, slots, native=native), tokens // 4 * layers)
    replay([frozenset(keys) for keys in traffic(layers, experts, top_k, tokens)], slots, 0, layers, HALF_LIFE, timed)
    timed_tokens = tokens - tokens // 4
    return {"search_us": timed.search / max(timed.evictions, 1) * 1e6, "use_us": timed.use / max(timed.uses, 1) * 1e6,
            "evictions": timed.evictions / timed_tokens, "token_ms": (timed.search + timed.use) / timed_tokens * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=300, help="decoded tokens replayed per geometry")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    searches = {"C++": None, "numpy twin": False} if _ext.HAS_PLANNER else {"numpy twin": False}
    rows = []
    for name, layers, experts, top_k in GEOMETRIES:
        for search, native in searches.items():
            m = measure(layers, experts, top_k, args.tokens, native)
            rows.append([name, f"{layers} x {experts}, top-{top_k}", layers * experts // 2, search,
                         f"{m['search_us']:.1f}", f"{m['use_us']:.2f}", f"{m['evictions']:.1f}", f"{m['token_ms']:.2f}"])
    table = markdown_table(["geometry", "MoE layers x experts", "slots", "victim search", "µs per victim search",
                            "µs per use", "evictions per token", "policy ms per token"], rows)
    extra = (f"\nSynthetic batch-1 decode traffic ({args.tokens} tokens, Zipf-like routing per layer), pool of half "
             "the experts, no prefetching; timed after the first quarter of the tokens. `policy ms per token` = "
             "the victim searches and use updates of one decoded token on the host.\n")
    publish("Eviction policy cost per decision (benchmarks/policy_cost.py)", table, extra, not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
