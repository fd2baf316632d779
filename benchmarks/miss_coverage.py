"""How much of on-demand loading's stall could a predictor remove at best? An upper bound per link regime.

For each regime the built-in model decodes the profiler's prompts with on-demand loading (`none`, the
`predictive` policy, half of all experts cached) and records which experts it had to load (its demand
loads). For each such load of expert e at layer l the same token's residuals (teacher forced) are fed to a
predictor at every source layer l - d, d = 1..D: the load is *covered* from distance d when e is among the
predictor's top-`width` experts for layer l there. A prefetch issued d layers ahead hides min(1, d / ratio)
of the copy's transfer time (ratio = transfer / layer compute), so a load's best case is the largest such
fraction over the distances it is covered from; `removable` is the mean over all demand loads.

With prediction free, timing perfect and no prefetch ever delaying or evicting anything, a predictor removes
at most `removable` of on-demand loading's stall, so its share of the possible gain is at most
`removable x stall_none / (T_none - T_limit)` (the profiler's definition, same runs). Prints a table and
appends it to BENCHMARKS.md.

    python benchmarks/miss_coverage.py [--link-ratios 0.5,2,8] [--prompts 3] [--width 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.loading import load_model  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402
from m2r2_moe.predict import make_predictor  # noqa: E402
from m2r2_moe.models.tap import LayerTap  # noqa: E402
from m2r2_moe.models.base import expert_param_bytes  # noqa: E402
from m2r2_moe.profile.cli import references  # noqa: E402
from m2r2_moe.profile.runs import limit_per_token, offloaded_run  # noqa: E402


@torch.no_grad()
def removable(predictor, loads, residuals, chosen, start: int, ratio: float, depth: int, width: int) -> list[float]:
    """Per demand load (step, layer, expert): the best min(1, d / ratio) over distances d it is covered from."""
    out = []
    for step, layer, expert in loads:
        pos, best = start + step, 0.0  # decode step s computes position P - 1 + s
        for d in range(1, min(layer, depth) + 1):
            scores = predictor.predict(layer - d, residuals[layer - d][pos : pos + 1], chosen[layer - d][pos : pos + 1])
            if expert in scores[d][0].topk(width).indices.tolist():
                best = max(best, min(1.0, d / ratio))
        out.append(best)
    return out


def regime(model, refs, layers, names, predictors, ratio, width, new_tokens) -> list:
    """One row per predictor: demand loads, removable share of the stall, bound on the share of gain."""
    num_layers, stride = len(layers), max(int(x.experts.num_experts) for x in layers)
    layer_s = statistics.mean(r.decode_seconds_per_token for r in refs) / num_layers
    gbps = expert_param_bytes(layers[0]) / (ratio * layer_s) / 1e9
    cache = sum(int(x.experts.num_experts) for x in layers) // 2
    depth = predictors[names[0]].depth
    runs, limits, fractions = [], [], {n: [] for n in names}
    for ref in refs:
        run = offloaded_run(model, ref, new_tokens, "none", cache, gbps, "predictive")
        runs.append(run)
        limits.append(limit_per_token(ref, cache, expert_param_bytes(layers[0]), gbps * 1e9, new_tokens)[0])
        loads = [(c.step, c.key // stride, c.key % stride) for c in run["recorder"].copies
                 if c.step >= 1 and c.priority == 0]
        with LayerTap(layers) as tap, torch.no_grad():  # the same sequence, teacher forced
            model(input_ids=ref.tokens[:, :-1], use_cache=False)
            residuals, chosen = list(tap.residual), list(tap.chosen)
        for n in names:
            fractions[n] += removable(predictors[n], loads, residuals, chosen, ref.prompt.shape[1] - 1, ratio,
                                      depth, width)
    t_none = statistics.mean(r["time_per_token_s"] for r in runs)
    stall = statistics.mean(r["stall_s_per_token"] for r in runs)
    gap = t_none - statistics.mean(limits)
    rows = []
    for n in names:
        share = statistics.mean(fractions[n]) if fractions[n] else 0.0
        covered = sum(f > 0 for f in fractions[n]) / max(len(fractions[n]), 1)
        rows.append([f"{ratio:g}", n, len(fractions[n]), f"{covered:.2f}", f"{share:.2f}", f"{stall * 1e3:.1f}",
                     f"{gap * 1e3:.1f}", f"{share * stall / gap:.2f}" if gap > 0 else ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--link-ratios", default="0.5,2,8")
    parser.add_argument("--predictors", default="gate,m2r2")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model("builtin", torch.float32)
    adapter, layers = find_moe_layers(model)
    names = args.predictors.split(",")
    predictors = {n: make_predictor(n, model, adapter, layers, args.depth) for n in names}
    refs = references(model, tokenizer, layers, args.prompts, 64, args.new_tokens)
    rows = [row for ratio in (float(r) for r in args.link_ratios.split(","))
            for row in regime(model, refs, layers, names, predictors, ratio, args.width, args.new_tokens)]
    table = markdown_table(["link ratio", "predictor", "demand loads", "covered", "removable stall",
                            "none stall ms/token", "none − limit ms/token", "share of gain at most"], rows)
    extra = (f"\nBuilt-in model, {args.prompts} prompt(s) x {args.new_tokens} new tokens, half of all experts cached "
             f"(`predictive` policy), top-{args.width} predictions from up to {args.depth} layers back within the "
             f"token. `covered`: demand loads predicted from some distance; `removable stall`: mean best "
             f"min(1, d / ratio) (0 for loads no prediction covers).\n")
    publish("Upper bound from miss coverage (benchmarks/miss_coverage.py)", table, extra, record=not args.no_record)


if __name__ == "__main__":
    main()
