"""Why a prefetch is late or missing: each decode use that was not a plain hit, traced to what the planner decided
about its expert in the layers before.

On simulated time (runtime/virtual.py), with the m2r2 predictor, half of the experts cached and `predictive` eviction,
at one link ratio, the planner's Python twin (runtime/planner.py: it decides as the C++ planner does,
tests/test_planner_diff.py, and only it can show its candidates) logs at every decode layer call the candidates it
ranked (distance, key, calibrated P(used)), the copies it queued and the prefetches already queued. Every use
served as a prefetch hit, a late prefetch or a demand load is then put in one class, from the farthest distance
(within `--lookback` layers) at which its expert was considered:
- `queued d ahead`: a copy was queued d layers ahead, onto a free link or behind other prefetches as near or nearer
  (queued before, or before it in the same call);
- `resident at d`: predicted while resident (marked needed, not copied), evicted before its use;
- `believed resident at d`: the planner's mirror held it resident but the cache did not (an eviction the planner was
  not told of; how a prompt's streamed evictions were found);
- `in flight at d`: a copy was already on its way;
- considered at d and not queued, because the prefetches queued ahead of it left `no lead` (lead <= 0), `too little
  lead for its eviction` (the share of its transfer it could hide, times q, did not pay for evicting), it was `not
  worth its eviction` with the whole lead, or was `not queued` for another reason (the queue full, the floor);
  `then queued k ahead` when a nearer layer queued it after all;
- `never a candidate`: in none of the ranked lists of those layers (the predictor's top choices missed it).
`q` is the calibrated probability at that farthest consideration. The twin's per-layer cost is higher than the C++
planner's, which moves the timings a little; the classes are what this benchmark is for.

    python benchmarks/late_copies.py [--model builtin] [--adapters FILE] [--text FILES] [--link-ratios 2]
                                     [--prompts 2] [--new-tokens 128] [--lookback 8] [--compute-ms MS] [--no-record]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _simulated as simulated  # noqa: E402
from _report import markdown_table  # noqa: E402
from _simulated import add_options, setup  # noqa: E402
from m2r2_moe.cli_common import auto_lookahead  # noqa: E402
from m2r2_moe.models.base import expert_param_bytes  # noqa: E402
from m2r2_moe.profile.runs import offloaded_run  # noqa: E402
from m2r2_moe.runtime import planner as planner_module  # noqa: E402
from m2r2_moe.runtime.admission import value  # noqa: E402
from m2r2_moe.runtime import prefetcher as prefetcher_module  # noqa: E402

SERVED = {1: "prefetch hit", 2: "late", 3: "miss"}  # as runtime/expert_cache.py (0: a plain hit, not classed)


class LoggingPlanner(planner_module.PlannerCore):
    """The Python twin, with a record of every decode layer call (`log`: one dict per call)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.log: list[dict] = []
        self._call: dict | None = None
        self.cache = None  # the prefetcher's cache (`logging_planner` sets it): the mirror checked against it

    def layer(self, layer, decode, now, keys, served, evicted, probs, wraps, horizon, miss, transfer, compute, free,
              backlog, min_prob):
        self._call = call = {"now": now, "decode": decode, "uses": list(zip(keys, served)), "backlog": list(backlog),
                             "compute": compute, "transfer": transfer, "miss": miss, "regret": self.regret(),
                             "free": free, "resident": set(self._resident), "inflight": set(self._inflight),
                             "candidates": []}
        queue, expect, withdraw = super().layer(layer, decode, now, keys, served, evicted, probs, wraps, horizon, miss,
                                                transfer, compute, free, backlog, min_prob)
        self.log.append(call)
        call["queued"] = {t * self.key_stride + e: d for t, e, d in queue}
        if self.cache is not None:  # candidates the mirror holds resident that the cache does not: a stale mirror
            call["stale"] = {k for _, k, _ in call["candidates"]
                             if k in self._resident and self.cache.slots.lookup(k) < 0}
        return queue, expect, withdraw

    def _candidates(self, *args):
        out = super()._candidates(*args)
        self._call["candidates"] = [(d, t * self.key_stride + e, q) for d, t, e, q in out]
        return out


@contextlib.contextmanager
def logging_planner():
    """While the block runs, prefetchers get a `LoggingPlanner`; yields the list of those made."""
    made = []

    def make(num_layers, num_experts, key_stride, width, max_queued, native=None):
        made.append(LoggingPlanner(num_layers, num_experts, key_stride, width, max_queued))
        return made[-1]

    init = prefetcher_module.Prefetcher.__init__

    def init_with_cache(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if isinstance(self.planner, LoggingPlanner):
            self.planner.cache = self.cache

    with mock.patch.object(prefetcher_module, "make_planner", make), \
            mock.patch.object(prefetcher_module.Prefetcher, "__init__", init_with_cache):
        yield made


def classify(log: list[dict], lookback: int) -> list[tuple[str, str, float | None]]:
    """(served, class, q) for every decode use served as a prefetch hit, late or a miss (see the module docstring)."""
    by_turn = {call["now"]: call for call in log}
    out = []
    for call in log:
        if not call["decode"]:
            continue
        for key, how in call["uses"]:
            if how not in SERVED:
                continue
            out.append((SERVED[how], *_first_look(by_turn, key, call["now"], lookback)))
    return out


def _first_look(by_turn: dict, key: int, turn: int, lookback: int) -> tuple[str, float | None]:
    """The class of `key`'s use at `turn`, from the farthest layer before it that considered `key`, and the calibrated
    P(used) there; `then queued k ahead` when a nearer layer queued it after all."""
    looks = []  # (distance, call, q), farthest first
    for d in range(lookback, 0, -1):
        call = by_turn.get(turn - d)
        q = None if call is None else next((q for dist, k, q in call["candidates"] if k == key and dist == d), None)
        if q is not None:
            looks.append((d, call, q))
    if not looks:
        return "never a candidate", None
    d, call, q = looks[0]
    ahead = sum(1 for b in call["backlog"] if b <= d)
    if key in call["queued"]:  # the planner queues in its candidates' order: those before it went first
        order = {k: i for i, (_, k, _) in reversed(list(enumerate(call["candidates"])))}
        ahead += sum(1 for k in call["queued"] if order[k] < order[key])
        return f"queued {d} ahead, " + ("onto a free link" if not ahead else "behind queued copies"), q
    if key in call.get("stale", ()):
        return f"believed resident at {d}, not in the cache", q
    if key in call["resident"]:
        return f"resident at {d}, evicted before use", q
    if key in call["inflight"]:
        return f"in flight at {d}", q
    ahead += sum(1 for dist in call["queued"].values() if dist <= d)  # those queued at that call go first too
    lead = d * call["compute"] - call["transfer"] * ahead if call["compute"] > 0 else float("inf")
    worth = value(q, call["miss"], call["transfer"], lead, call["free"] <= 0, call["regret"])  # the planner's test
    why = ("no lead" if lead <= 0 else "too little lead for its eviction" if worth <= 0 and lead < call["transfer"]
           else "not worth its eviction" if worth <= 0 else "not queued (queue full or under the floor)")
    later = next((dd for dd, c, _ in looks[1:] if key in c["queued"]), None)
    return f"{why} at {d}" + (f", then queued {later} ahead" if later else ""), q


def run(args) -> tuple[str, str]:
    env = setup(args)
    depth = args.lookahead or auto_lookahead(env.model, env.layers, args.adapters)
    rows, identical = [], True
    for ratio in args.link_ratios:
        gbps = expert_param_bytes(env.layers[0]) / (ratio * env.compute) / 1e9
        uses = []
        for ref in env.refs:
            with logging_planner() as made:
                out = offloaded_run(env.model, ref, args.new_tokens, args.predictor, env.total // 2, gbps, "predictive",
                                    args.adapters, depth, virtual=env.compute)
            identical &= out["tokens_identical"]
            for planner in made:
                uses += classify(planner.log, args.lookback)
        rows += summary(ratio, uses)
    table = markdown_table(["link ratio", "served", "class", "uses", "share of served", "mean q"], rows)
    legend = (f"{args.predictor}, {env.total // 2} of {env.total} experts cached, `predictive`, lookahead {depth}, the planner's "
              f"Python twin; each use of a decode step that was not a plain hit, by the farthest of the "
              f"{args.lookback} layers before it in which its expert was considered; classes under 2 % of their kind "
              f"are summed in `other`. {args.prompts} prompt(s) x {args.new_tokens} new tokens; simulated time at "
              f"{env.compute * 1e3:.2f} ms of compute per MoE layer. Tokens identical to the un-offloaded model's in "
              f"every run: {'yes' if identical else 'NO'}.")
    return table, legend


def summary(ratio: float, uses: list[tuple[str, str, float | None]]) -> list[list]:
    """Table rows for one ratio: per served kind, its classes by count (under 2 % summed as `other`)."""
    rows = []
    for served in SERVED.values():
        kind = [(c, q) for s, c, q in uses if s == served]
        if not kind:
            continue
        counts = collections.Counter(c for c, _ in kind)
        qs = collections.defaultdict(list)
        for c, q in kind:
            if q is not None:
                qs[c].append(q)
        other = 0
        for c, n in counts.most_common():
            if n < 0.02 * len(kind):
                other += n
                continue
            mean = f"{sum(qs[c]) / len(qs[c]):.2f}" if qs[c] else "-"
            rows.append([f"{ratio:g}", served, c, n, f"{n / len(kind):.2f}", mean])
        if other:
            rows.append([f"{ratio:g}", served, "other", other, f"{other / len(kind):.2f}", "-"])
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p)
    p.set_defaults(link_ratios=[2.0], prompts=2, rounds=1)
    p.add_argument("--adapters", default=None, help="adapters for a model not shipped with the package")
    p.add_argument("--predictor", default="m2r2", choices=("m2r2", "gate", "oracle", "oracle-wrap"),
                   help="the predictor traced (default m2r2; an oracle shows what the pipeline loses on its own)")
    p.add_argument("--lookahead", type=int, default=None, help="the prefetcher's lookahead (default: the runtime's)")
    p.add_argument("--lookback", type=int, default=8, help="layers before a use searched for its expert (default 8)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.lookback < 1:
        p.error("--lookback must be >= 1")
    return simulated.main(p, argv, run, "Why prefetches are late or missing (benchmarks/late_copies.py)")


if __name__ == "__main__":
    sys.exit(main())
