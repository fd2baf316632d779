"""How far ahead, and at how many layers, m2r2 should look: the same adapters (or two files) at two or more
lookaheads, side by side, on simulated time.

On simulated time (runtime/virtual.py), for each link ratio (one expert's transfer time over one layer's compute),
half of the experts in the slots, `predictive` eviction, one torch thread, each arm is m2r2 with an adapters file
and a lookahead (`FILE@D`, or `@D` for the model's shipped adapters); `FILE@D!free` runs it with the prefetch path
not charged (`virtual_time(free_prefetcher=True)`), which splits a difference between what the predictions do
and what computing them costs; `@D/kN` predicts at every N-th layer only, whatever the planner's balance says
(the planner's `every` pinned at N; it is otherwise 1 unless prefetching does not pay), each predicting layer
looking N-1 layers farther, as the runtime does when it backs off. `none` (on-demand loading) runs beside them; every arm is given as x `none`.
The arms are interleaved per prompt, each the fastest of `--rounds`; the table also sums, over the prompts, the
prefetches that landed in time, those still in flight when needed (late), the demand loads and the megabytes
prefetched and evicted unused. Tokens are compared with the un-offloaded model's in every run.

    python benchmarks/lookahead_ab.py --arms @4,@7,@4/k2 [--model builtin] [--text FILES] [--link-ratios 0.5,2,8]
                                      [--prompts 3] [--new-tokens 128] [--rounds 2] [--no-record]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _simulated as simulated  # noqa: E402
from _report import markdown_table  # noqa: E402
from _simulated import add_options, footer, setup  # noqa: E402
from m2r2_moe.config import DEFAULT_LOOKAHEAD  # noqa: E402
from m2r2_moe.models.base import expert_param_bytes  # noqa: E402
from m2r2_moe.profile.runs import offloaded_run  # noqa: E402
from m2r2_moe.runtime import prefetcher as prefetcher_module  # noqa: E402

COUNTS = ("prefetch_hits", "late_prefetches", "misses")


def parse_arm(text: str) -> tuple[str | None, int, bool, int]:
    """`[FILE]@D[/kN][!free]` -> (adapters file or None for the shipped ones, lookahead, free path, every: N, or 0
    for the planner's own choice)."""
    body, bang, flag = text.partition("!")
    path, at, depth = body.rpartition("@")
    depth, slash, every = depth.partition("/k")
    if (not at or not depth.isdigit() or int(depth) < 1 or (bang and flag != "free")
            or (slash and not (every.isdigit() and int(every) >= 1))):
        raise argparse.ArgumentTypeError(f"an arm is [FILE]@D[/kN][!free] with D, N >= 1, got {text!r}")
    return path or None, int(depth), bool(bang), int(every) if slash else 0


class PinnedEvery:
    """Stands in for the prefetcher's planner (C++ or the twin): `every` pinned at `every`, the rest forwarded (the
    per-layer calls bound once: this runs at every layer)."""

    def __init__(self, planner, every: int):
        self._planner, self.every = planner, every
        for name in ("layer", "issued", "withdrawn", "add_spent", "resync", "step"):
            setattr(self, name, getattr(planner, name))

    def __getattr__(self, name):
        return getattr(self._planner, name)

    @property
    def late_saving(self):
        return self._planner.late_saving

    @late_saving.setter
    def late_saving(self, seconds):
        self._planner.late_saving = seconds


@contextlib.contextmanager
def pinned_every(every: int):
    """While open, prefetchers built predict at every `every`-th layer (0: as the planner decides)."""
    if not every:
        yield
        return
    make = prefetcher_module.make_planner
    prefetcher_module.make_planner = lambda *args: PinnedEvery(make(*args), every)
    try:
        yield
    finally:
        prefetcher_module.make_planner = make


def arm_list(text: str) -> list[str]:
    """`--arms`: each arm once and well formed (`parse_arm`; `none` is none of them: it always runs)."""
    out = text.split(",")
    for arm in out:
        parse_arm(arm)
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError("each arm once")
    return out


def run(args) -> tuple[str, str]:
    env = setup(args)
    model, layers, total, refs, compute = env.model, env.layers, env.total, env.refs, env.compute
    arms = [("none", None, 0, False, 0)] + [(label, *parse_arm(label)) for label in args.arms]
    best: dict[tuple[float, str, int], dict] = {}  # (ratio, arm, prompt) -> its fastest run
    identical = True
    for rnd in range(args.rounds):  # rounds outermost: each arm sees the machine at the same moments as the others
        for ratio in args.link_ratios:
            gbps = expert_param_bytes(layers[0]) / (ratio * compute) / 1e9
            for i, ref in enumerate(refs):
                for label, adapters, depth, free, every in arms:
                    with pinned_every(every):
                        out = offloaded_run(model, ref, args.new_tokens, "m2r2" if depth else "none", total // 2,
                                            gbps, "predictive", adapters, depth or DEFAULT_LOOKAHEAD, virtual=compute,
                                            free_prefetcher=free)
                    identical &= out["tokens_identical"]
                    key = (ratio, label, i)
                    if key not in best or out["time_per_token_s"] < best[key]["time_per_token_s"]:
                        best[key] = out
            print(f"round {rnd + 1}/{args.rounds}: link ratio {ratio:g} done", file=sys.stderr, flush=True)
    rows = []
    for ratio in args.link_ratios:
        ms = {label: statistics.mean(best[ratio, label, i]["time_per_token_s"] for i in range(len(refs))) * 1e3
              for label, *_ in arms}
        for label, *_ in arms:
            runs = [best[ratio, label, i] for i in range(len(refs))]
            rows.append([f"{ratio:g}", label, f"{ms[label]:.2f}", f"{ms[label] / ms['none']:.3f}"]
                        + [str(sum(r[k] for r in runs)) for k in COUNTS]
                        + [f"{sum(r['wasted_bytes'] for r in runs) / 1e6:.1f}"])
    headers = ["link ratio", "arm", "ms/token", "x none", "pf hits", "late", "misses", "MB wasted"]
    extra = (f"\nmodel {args.model}: {len(layers)} MoE layers, {total} experts, {total // 2} slots; arm = adapters "
             f"file (blank: the shipped ones) @ lookahead, `/kN`: predicting at every N-th layer only, `!free`: "
             f"prefetch path not charged; "
             + footer(args, compute, identical, " (counts summed over the prompts)"))
    return markdown_table(headers, rows), extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", required=True, type=arm_list,
                   help="comma-separated [FILE]@D[/kN][!free], e.g. @4,@7 or @4,@4/k2 or a.safetensors@4,b.safetensors@8")
    add_options(p)
    return simulated.main(p, argv, run, "m2r2 at several lookaheads (simulated time)")


if __name__ == "__main__":
    sys.exit(main())
