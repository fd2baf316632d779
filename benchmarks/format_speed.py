"""What the compressed expert formats save on a slow link: bytes per miss, stall and time per token, side by side.

The built-in model in its own dtype (bf16) on CPU, the link emulated at link ratios of the UNCOMPRESSED expert
(one bf16 expert's transfer time / one layer's compute time; default 8 and 32), half of all experts cached.
For each ratio, each predictor (none: on-demand loading; m2r2: prefetching on top) and each format (model =
lossless bf16, int8, int4) the same prompt is generated; each configuration runs `--repeats` times, formats
interleaved within a round, and the fastest run is kept (noise only adds time). A compressed copy holds the
emulated link for its compressed bytes plus its expansion (runtime/cpu_engine.py), so the stall includes the
expansion. Reported: bytes per copy vs bf16, decode time and stall per token, the share of lossless stall
removed (against lossless on-demand, and against lossless with the same predictor), speedup, and the
expansion's cost per expert against the link time it saves.

    PYTHONPATH=. python benchmarks/format_speed.py [--model builtin] [--link-ratios 8,32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.config import MIN_LINK_GBPS  # noqa: E402
from m2r2_moe.corpus import resolve_text, token_stream  # noqa: E402
from m2r2_moe.loading import load_model  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402
from m2r2_moe.profile.runs import offloaded_run, reference_run  # noqa: E402


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["time_per_token_s"])


def measure(model, ref, args, cache: int, gbps: float, predictor: str) -> dict[str, dict]:
    """{format: fastest run} for one ratio and predictor, formats interleaved in every round."""
    runs: dict[str, list[dict]] = {f: [] for f in args.formats}
    for _ in range(args.repeats):
        for fmt in args.formats:
            run = offloaded_run(model, ref, args.new_tokens, predictor, cache, gbps, "predictive", None,
                                args.lookahead, "cpu", None, fmt)
            run.pop("recorder")
            runs[fmt].append(run)
    return {fmt: best(r) for fmt, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--formats", default="model,int8,int4")
    parser.add_argument("--predictors", default="none,m2r2")
    parser.add_argument("--link-ratios", default="8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    args.formats = args.formats.split(",")
    assert args.formats[0] == "model", "the lossless format comes first: every ratio is against it"
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, torch.bfloat16)
    _, layers = find_moe_layers(model)
    total = sum(int(layer.experts.num_experts) for layer in layers)
    stream = token_stream(tokenizer, resolve_text(["builtin:heldout" if args.model == "builtin"
                                                   else f"{args.model}:heldout"]), max_tokens=args.prompt_tokens * 8)
    prompt = stream[: args.prompt_tokens].unsqueeze(0)  # [1, P]
    ref = min((reference_run(model, prompt, args.new_tokens, max(int(x.experts.num_experts) for x in layers))
               for _ in range(args.repeats)), key=lambda r: r.decode_seconds_per_token)
    compute_layer = ref.decode_seconds_per_token / len(layers)
    full = sum(getattr(layers[0].experts, n)[0].numel() * 2 for n in layers[0].param_names)  # bf16 expert bytes
    rows, costs = [], []
    ratios = [float(r) for r in args.link_ratios.split(",")]
    slow = [r for r in ratios if full / (r * compute_layer) / 1e9 < MIN_LINK_GBPS]
    if slow:
        raise SystemExit(f"link ratio {slow[0]:g} at {compute_layer * 1e3:.2f} ms of compute per layer needs an emulated "
                         f"link below the runtime's minimum of {MIN_LINK_GBPS * 1e3:g} MB/s: more --threads, or a "
                         "quieter machine (compute per layer is measured)")
    for ratio in ratios:
        gbps = full / (ratio * compute_layer) / 1e9
        lossless_none = None
        for predictor in args.predictors.split(","):
            runs = measure(model, ref, args, total // 2, gbps, predictor)
            base = runs["model"]
            lossless_none = lossless_none or base
            for fmt, run in runs.items():
                removed = 1 - run["stall_s_per_token"] / lossless_none["stall_s_per_token"]
                same = 1 - run["stall_s_per_token"] / base["stall_s_per_token"]
                rows.append([f"{ratio:g}", predictor, fmt, f"{run['expert_bytes'] / full:.3f}",
                             f"{run['time_per_token_s'] * 1e3:.1f}", f"{run['stall_s_per_token'] * 1e3:.1f}",
                             f"{removed:.2f}", f"{same:.2f}",
                             f"{lossless_none['time_per_token_s'] / run['time_per_token_s']:.2f}x",
                             "yes" if run["tokens_identical"] else "no"])
                if fmt != "model" and run["copies"]:
                    per_copy = run["expand_s_per_token"] * (args.new_tokens - 1) / run["copies"]
                    saved = (full - run["expert_bytes"]) / (gbps * 1e9)
                    costs.append(f"ratio {ratio:g}, {predictor}, {fmt}: expansion {per_copy * 1e3:.2f} ms per expert "
                                 f"copy vs {saved * 1e3:.2f} ms of link time saved per copy")
    headers = ["link ratio", "predictor", "format", "bytes/copy vs bf16", "ms/token", "stall ms/token",
               "stall removed vs lossless on-demand", "vs lossless, same predictor", "speedup vs lossless on-demand",
               "tokens = lossless"]
    extra = (f"\n- {args.model} in bf16 on CPU, {args.threads} thread(s); {total // 2} of {total} experts cached, policy "
             f"predictive, lookahead {args.lookahead}; one held-out prompt of {args.prompt_tokens} tokens, "
             f"{args.new_tokens} new tokens, fastest of {args.repeats} interleaved rounds; layer compute "
             f"{compute_layer * 1e3:.2f} ms, bf16 expert {full / 1e3:.1f} kB\n- " + "\n- ".join(costs))
    publish("Compressed experts: bytes, stall and time per token on an emulated link", markdown_table(headers, rows),
            extra, record=not args.no_record)


if __name__ == "__main__":
    main()
