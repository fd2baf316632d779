"""Hit/miss counts of offloaded greedy generation on held-out prompts, for comparing two versions of the runtime.

No link is emulated and one torch thread runs, so what is counted depends on the runtime's decisions, not on
timing: for `none` and `history` the counts are deterministic; with `gate`/`m2r2`/`oracle` a prefetch's
arrival (prefetch hit or late) and, through the link budget, a few prefetches depend on when the copy thread
runs (two runs of the same code differ by a few misses). Every run is checked token for token against the
un-offloaded model. `--json` writes the counts, `--compare OLD.json` prints the differences against them.

    python benchmarks/hit_counts.py --json after.json --compare before.json --no-record
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import m2r2_moe  # noqa: E402
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.corpus import resolve_text, token_stream  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402
from m2r2_moe.predict import OraclePredictor  # noqa: E402
from m2r2_moe.profile.trace import record_trace  # noqa: E402

FIELDS = ("hits", "prefetch_hits", "late_prefetches", "misses", "prefetches", "evictions", "waves")


def counts(model, prompts, refs, predictor: str, cache: int, policy: str) -> dict:
    adapter, layers = find_moe_layers(model)
    total = dict.fromkeys(FIELDS, 0)
    for prompt, ref in zip(prompts, refs):
        chosen = predictor
        if predictor == "oracle":
            chosen = OraclePredictor(len(layers), max(int(x.experts.num_experts) for x in layers), adapter.top_k(model),
                                     4, record_trace(model, ref).experts)
        m2r2_moe.offload(model, device="cpu", cache_experts=cache, policy=policy, predictor=chosen)
        try:
            with torch.no_grad():
                out = model.generate(input_ids=prompt, max_new_tokens=ref.shape[1] - prompt.shape[1],
                                     do_sample=False, pad_token_id=0)
            stats = m2r2_moe.stats(model)
        finally:
            m2r2_moe.remove_offload(model)
        if not torch.equal(out, ref):
            raise AssertionError(f"{predictor}/{cache}/{policy}: offloaded tokens differ from the original's")
        for field in FIELDS:
            total[field] += getattr(stats, field)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None, help="write the counts here")
    parser.add_argument("--compare", default=None, help="counts of another version (its --json) to compare with")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = m2r2_moe.load_builtin()
    ids = token_stream(tokenizer, resolve_text(["builtin:heldout"]), max_tokens=args.prompts * 64 * 8)
    step = len(ids) // args.prompts
    prompts = [ids[i * step : i * step + 64].unsqueeze(0) for i in range(args.prompts)]
    with torch.no_grad():
        refs = [model.generate(input_ids=p, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=0) for p in prompts]
    total = sum(int(x.experts.num_experts) for x in find_moe_layers(model)[1])
    results = {f"{p}/{c}/{pol}": counts(model, prompts, refs, p, c, pol)
               for p in ("none", "history", "gate", "m2r2", "oracle") for c in (total // 4, total // 2)
               for pol in ("lru", "predictive")}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    old = json.loads(Path(args.compare).read_text()) if args.compare else {}
    rows = [[key] + [str(r[f]) if key not in old else f"{r[f]} / {old[key][f]}" for f in FIELDS]
            for key, r in results.items()]
    head = ["predictor/cache/policy"] + [f + (" (now / before)" if old else "") for f in FIELDS]
    extra = (f"\nBuilt-in model, {args.prompts} held-out prompts x {args.new_tokens} new tokens, no link emulation, "
             "tokens identical to the un-offloaded model in every run.\n")
    publish("Hit/miss counts (benchmarks/hit_counts.py)", markdown_table(head, rows), extra,
            record=not args.no_record)


if __name__ == "__main__":
    main()
