"""Is the link or the cache the cap? Link busy share and experts moved per token, per predictor, in one regime.

For each held-out prompt the built-in model (or `--model`) decodes offloaded at one link ratio with each predictor;
from the profiler's recorder: the share of decode time the emulated link was busy, demand loads and prefetches per
token, and the stall. A run whose link is busy nearly all the time is transfer-bound: only moving fewer experts
(which ones stay resident) makes it faster, not deeper queues or longer horizons. Prints a table and appends it
to BENCHMARKS.md.

    python benchmarks/link_busy.py [--model builtin] [--link-ratio 8] [--predictors none,m2r2,oracle-wrap]
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
from m2r2_moe.models.base import expert_param_bytes  # noqa: E402
from m2r2_moe.profile.cli import prompt_text, references  # noqa: E402
from m2r2_moe.profile.runs import offloaded_run  # noqa: E402


def figures(run: dict, tokens: int) -> dict:
    recorder = run["recorder"]
    decode = [c for c in recorder.copies if c.step >= 1 and not c.cancelled and c.finished]
    start = min(e.start for e in recorder.layers if e.step == 1)
    end = max(e.end for e in recorder.layers)
    demand = sum(1 for c in decode if c.priority == 0)
    return {"ms": run["time_per_token_s"] * 1e3, "busy": sum(c.transfer.busy for c in decode) / (end - start),
            "demand": demand / tokens, "prefetch": (len(decode) - demand) / tokens,
            "stall": run["stall_s_per_token"] * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--adapters", default=None)
    parser.add_argument("--link-ratio", type=float, default=8.0)
    parser.add_argument("--predictors", default="none,m2r2,oracle-wrap")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model, torch.float32)
    _, layers = find_moe_layers(model)
    total = sum(int(x.experts.num_experts) for x in layers)
    files = text_files(prompt_text(args.model, None), "builtin:heldout")
    refs = references(model, tokenizer, layers, args.prompts, 64, args.new_tokens, 1, files)
    compute = statistics.mean(r.decode_seconds_per_token for r in refs) / len(layers)
    gbps = expert_param_bytes(layers[0]) / (args.link_ratio * compute) / 1e9
    rows = []
    for i, ref in enumerate(refs):
        for name in args.predictors.split(","):
            run = offloaded_run(model, ref, args.new_tokens, name, total // 2, gbps, "predictive", args.adapters)
            f = figures(run, args.new_tokens - 1)
            rows.append([i, name, f"{f['ms']:.1f}", f"{f['busy']:.2f}", f"{f['demand']:.2f}", f"{f['prefetch']:.2f}",
                         f"{f['demand'] + f['prefetch']:.2f}", f"{f['stall']:.1f}"])
    table = markdown_table(["prompt", "predictor", "ms/token", "link busy", "demand loads/token", "prefetches/token",
                            "experts moved/token", "stall ms/token"], rows)
    extra = (f"\nModel {args.model}, link ratio {args.link_ratio:g} (one expert's copy = {args.link_ratio * compute * 1e3:.1f} "
             f"ms), cache {total // 2} of {total} experts, `predictive` policy, {args.new_tokens} new tokens per prompt, "
             "1 torch thread; link busy = the decode copies' link time over the decode time.\n")
    publish("Link busy share and experts moved per token (benchmarks/link_busy.py)", table, extra,
            record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
