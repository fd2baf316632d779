"""Prefetching against its cap, on simulated time: what the m2r2 predictor saves, and what it would save if its
prefetch path (predicting, planning, issuing copies at every layer) cost nothing.

On simulated time (runtime/virtual.py: a decode step's MoE layer costs the un-offloaded model's measured layer
time, copies hold a simulated serial link, the runtime's own host work counts at its real time), for each link
ratio (one expert's transfer time over one layer's compute), half of the experts in the slots, `predictive`
eviction, one torch thread:

- `none`: on-demand loading;
- `m2r2`: the predictor with the model's adapters (the shipped ones, or `--adapters`);
- `m2r2, free path`: the same, its prefetcher's per-layer work not charged (`virtual_time(free_prefetcher=True)`):
  the same kind of decisions with no cost, the cap of this predictor in this pipeline;
- `oracle-wrap` and its free path: the reference run's own routing, this token's and the next's: the cap of the
  pipeline itself (perfect predictions, looking as far ahead as m2r2: the runtime's default, or `--lookahead`).

The arms are interleaved per prompt, each the fastest of `--rounds`; ms per token is the mean over the prompts and
each arm is given as x `none` of the same run. `share of cap` = (1 - m2r2) / (1 - m2r2 free path): the part of
what this predictor's copies could save that the real path keeps (the rest is its cost); blank where the free path
saves nothing. Tokens are compared with the un-offloaded model's in every run.

    python benchmarks/prefetch_cap.py [--model builtin] [--adapters FILE] [--text FILES] [--link-ratios 0.5,2,8]
                                      [--prompts 3] [--new-tokens 128] [--rounds 2] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _simulated as simulated  # noqa: E402
from _report import markdown_table  # noqa: E402
from _simulated import add_options, footer, setup  # noqa: E402
from m2r2_moe.cli_common import auto_lookahead  # noqa: E402
from m2r2_moe.models.base import expert_param_bytes  # noqa: E402
from m2r2_moe.profile.runs import offloaded_run  # noqa: E402

ARMS = (("none", False), ("m2r2", False), ("m2r2", True), ("oracle-wrap", False), ("oracle-wrap", True))


def label(name: str, free: bool) -> str:
    return f"{name}, free path" if free else name


def run(args) -> tuple[str, str]:
    env = setup(args)
    model, layers, total, refs, compute = env.model, env.layers, env.total, env.refs, env.compute
    depth = args.lookahead or auto_lookahead(model, layers, args.adapters)
    best: dict[tuple[float, str, bool, int], float] = {}  # (ratio, arm, prompt) -> fastest seconds per token
    identical = True
    for rnd in range(args.rounds):  # rounds outermost: each arm sees the machine at the same moments as the others
        for ratio in args.link_ratios:
            gbps = expert_param_bytes(layers[0]) / (ratio * compute) / 1e9
            for i, ref in enumerate(refs):
                for name, free in ARMS:
                    out = offloaded_run(model, ref, args.new_tokens, name, total // 2, gbps, "predictive",
                                        args.adapters, depth, virtual=compute, free_prefetcher=free)
                    identical &= out["tokens_identical"]
                    key = (ratio, name, free, i)
                    best[key] = min(best.get(key, float("inf")), out["time_per_token_s"])
            print(f"round {rnd + 1}/{args.rounds}: link ratio {ratio:g} done", file=sys.stderr, flush=True)
    rows = []
    for ratio in args.link_ratios:
        ms = {(n, f): statistics.mean(best[(ratio, n, f, i)] for i in range(len(refs))) * 1e3 for n, f in ARMS}
        base = ms[("none", False)]
        x = {arm: v / base for arm, v in ms.items()}
        cap = 1 - x[("m2r2", True)]
        share = f"{(1 - x[('m2r2', False)]) / cap:.2f}" if cap > 0 else ""
        rows.append([f"{ratio:g}", f"{base:.1f}"] + [f"{x[arm]:.3f}" for arm in ARMS[1:]] + [share])
    headers = ["link ratio", "none ms/token"] + [f"{label(n, f)} x none" for n, f in ARMS[1:]] + ["share of cap"]
    extra = (f"\nmodel {args.model}{f' (adapters {args.adapters})' if args.adapters else ''}: {len(layers)} MoE "
             f"layers, {total} experts, {total // 2} slots, lookahead {depth}; " + footer(args, compute, identical))
    return markdown_table(headers, rows), extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(p)
    p.add_argument("--adapters", default=None, help="adapters for a model not shipped with the package")
    p.add_argument("--lookahead", type=int, default=None,
                   help="layers ahead, the same for m2r2 and the oracle (default: the runtime's for these adapters)")
    return simulated.main(p, argv, run, "Prefetching against its cap (simulated time)")


if __name__ == "__main__":
    sys.exit(main())
