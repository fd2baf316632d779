"""Eviction policies on recorded decode traffic, offline: demand loads per token against Belady's optimum.

Each model decodes held-out prompts un-offloaded; the expert sets its MoE layer calls asked for are replayed
through each policy as the runtime places them (a call's experts pinned together, placed in key order), with no
prefetching, at several cache sizes. Deterministic: no timing, the same requests for every policy.

- `lru`: the slot table's least recently used order;
- `predictive`: the runtime's `NextUsePolicy` (use frequency per turn of a layer, decayed with a half-life of
  `HALF_LIFE` tokens, then the farthest next turn), and the same with other half-lives, to show how much the
  choice of that constant matters;
- `recency`: the frequency ignored (`half-life -> 0`: only whether the expert was used at its layer's latest
  turn counts);
- `belady`: the optimal policy that knows the future (`profile/belady.py`), a bound no policy reaches.

    python benchmarks/policies.py [--models builtin,builtin:tiny-qwen3-moe] [--caches 0.25,0.5,0.75]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.cli_common import text_files  # noqa: E402
from m2r2_moe.loading import load_model  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402
from m2r2_moe.profile.belady import belady_loads, lru_loads  # noqa: E402
from m2r2_moe.profile.cli import prompt_text, references  # noqa: E402
from m2r2_moe.runtime.policy import HALF_LIFE, NextUsePolicy  # noqa: E402

HALF_LIVES = (1e-3, 8.0, HALF_LIFE, 128.0)  # 1e-3: recency alone


def replay(requests: list[frozenset[int]], capacity: int, count_from: int, num_layers: int,
           half_life: float, policy=None) -> int:
    """Demand loads `NextUsePolicy` makes on `requests` (one per MoE layer call, in turn order) with `capacity`
    slots, counted from request `count_from` (the decode steps). `policy`: one to replay through instead (its
    `victim`, `forget` and `used` are called as the expert cache calls them)."""
    policy = policy or NextUsePolicy(num_layers, capacity, half_life)
    resident, loads = set(), 0
    for turn, request in enumerate(requests):
        for key in sorted(request):
            if key not in resident:
                victim = policy.victim(key, turn, request)
                if victim is not None and victim >= 0:
                    resident.discard(victim)
                    policy.forget(victim)
                resident.add(key)
                loads += turn >= count_from
            policy.used(key, turn)
    return loads


def policy_rows(spec: str, refs, num_layers: int, caches: list[int]) -> list[list]:
    rows = []
    for capacity in caches:
        per_token = {}
        for ref in refs:
            tokens = (len(ref.requests) - ref.prefill_requests) / num_layers
            counts = {"lru": lru_loads(ref.requests, capacity, ref.prefill_requests),
                      "belady": belady_loads(ref.requests, capacity, ref.prefill_requests)}
            for half_life in HALF_LIVES:
                counts[half_life] = replay(ref.requests, capacity, ref.prefill_requests, num_layers, half_life)
            for name, count in counts.items():
                per_token.setdefault(name, []).append(count / tokens)
        mean = {name: statistics.mean(v) for name, v in per_token.items()}
        rows.append([spec, capacity, *(f"{mean[n]:.2f}" for n in ("lru", HALF_LIVES[0], *HALF_LIVES[1:], "belady")),
                     f"{mean[HALF_LIFE] / mean['lru']:.2f}", f"{mean[HALF_LIVES[0]] / mean['lru']:.2f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="builtin,builtin:tiny-qwen3-moe",
                   help="comma-separated: built-in models or checkpoint folders")
    p.add_argument("--text", default=None, help="prompt text for the checkpoint folders (as the profiler's --text; "
                   "a built-in model uses its own held-out text)")
    p.add_argument("--caches", default="0.25,0.5,0.75", help="cache sizes as shares of all experts")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for spec in args.models.split(","):
        files = text_files(prompt_text(spec, None if spec.startswith("builtin") else args.text), "builtin:heldout")
        model, tokenizer = load_model(spec, torch.float32)
        _, layers = find_moe_layers(model)
        total = sum(int(x.experts.num_experts) for x in layers)
        refs = references(model, tokenizer, layers, args.prompts, 64, args.new_tokens, 1, files)
        caches = sorted({max(1, round(float(share) * total)) for share in args.caches.split(",")})
        rows += policy_rows(spec, refs, len(layers), caches)
    head = ["model", "cache", "lru", "recency", *(f"predictive, half-life {h:g}" + (" (default)" if h == HALF_LIFE else "")
                                                  for h in HALF_LIVES[1:]), "belady", "default x lru", "recency x lru"]
    table = markdown_table(head, rows)
    extra = (f"\nDemand loads per decoded token without prefetching ({args.prompts} held-out prompts x {args.new_tokens} "
             "tokens, mean over the prompts), each policy replayed on the same recorded requests; half-lives in "
             "tokens; recency = half-life 0.001 (only the latest turn counts).\n")
    publish("Eviction policies on recorded decode traffic (benchmarks/policies.py)", table, extra,
            record=not args.no_record)


if __name__ == "__main__":
    main()
