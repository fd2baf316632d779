"""What prefetching costs and what it saves, per MoE layer call, in the runtime itself.

For each link regime and predictor the built-in model decodes the same prompts, offloaded with the
`predictive` policy at half of all experts, while timers wrap the pieces of the hot path:

- `kernel`: the experts kernel on the slots; `wait`: waiting for copies (the stall);
- `prefetch path`: the prefetcher's whole per-layer step (`Prefetcher.on_layer`), of which `predict`
  (the predictor's scores: `predict_host` at batch 1, else `predict_stacked`), `plan` (the planner's one call:
  settle, rank, admit) and `issue` (placing and queueing copies). With `--split-heads` the m2r2 heads at batch 1
  go through `predict_host` and are timed as `predict`; by default they run inside the planner's call, as the
  runtime runs them (`Predictor.host_heads`), and are part of `plan`.

`saved` is the wait the predictor removed against `none` in the same regime, `net` = saved − prefetch path
− the kernel's slowdown (copies landing while the kernel runs): positive when prefetching pays for itself.
The timers' own cost is in every row alike. Prints a table and appends it to BENCHMARKS.md.

    python benchmarks/prefetch_cost.py [--link-ratios 0.5,2,8] [--predictors none,gate,m2r2,oracle]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import m2r2_moe  # noqa: E402
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.config import DEFAULT_LOOKAHEAD  # noqa: E402
from m2r2_moe.loading import load_model  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402
from m2r2_moe.models.base import expert_param_bytes  # noqa: E402
from m2r2_moe.predict import OraclePredictor, make_predictor  # noqa: E402
from m2r2_moe.profile.cli import references  # noqa: E402

PARTS = ("run_experts", "kernel", "wait", "on_layer", "predict", "plan", "issue")


class _TimedPlanner:
    """Stands in for the prefetcher's planner (C++ or Python): times `layer`, forwards the rest."""

    def __init__(self, planner, timed):
        self._planner, self.layer = planner, timed(planner.layer, "plan")

    def __getattr__(self, name):
        return getattr(self._planner, name)


class Timers:
    """Wall seconds per part, summed, through instance-level wrappers (removed by `restore`)."""

    def __init__(self, offloader):
        self.seconds = collections.Counter()
        self.calls, self.misses, self.active = 0, 0, False  # decode layer calls (batch 1) only
        self.offloader, self._kernels = offloader, list(offloader.kernels)
        self._wrapped = [(offloader, "run_experts"), (offloader.cache, "wait"), (offloader.cache, "prefetch")]
        run = offloader.run_experts

        def run_experts(layer, hidden_states, *args):
            self.active = hidden_states.shape[0] == 1
            misses = offloader.stats.misses
            try:
                return run(layer, hidden_states, *args)
            finally:
                self.calls += self.active
                self.misses += (offloader.stats.misses - misses) * self.active

        offloader.run_experts = run_experts
        self._wrap(offloader, "run_experts", "run_experts")
        self._wrap(offloader.cache, "wait", "wait")
        self._wrap(offloader.cache, "prefetch", "issue")
        pf = offloader.prefetcher
        if pf is not None:
            # decode at batch 1 predicts through `predict_host` (one native call or table read), else `predict_stacked`
            for obj, name, part in ((pf, "on_layer", "on_layer"), (pf.predictor, "predict_host", "predict"),
                                    (pf.predictor, "predict_stacked", "predict")):
                self._wrap(obj, name, part)
                self._wrapped.append((obj, name))
            self._planner, pf.planner = pf.planner, _TimedPlanner(pf.planner, self._timed)
        offloader.kernels = [self._timed(k, "kernel") for k in self._kernels]

    def _timed(self, fn, part):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.active:
                    self.seconds[part] += time.perf_counter() - start
        return timed

    def _wrap(self, obj, name, part):
        setattr(obj, name, self._timed(getattr(obj, name), part))

    def restore(self):
        for obj, name in self._wrapped:
            obj.__dict__.pop(name, None)
        self.offloader.kernels = self._kernels
        if self.offloader.prefetcher is not None:
            self.offloader.prefetcher.planner = self._planner


def measure(model, ref, name, gbps, depth, cache, tokens, split_heads=False) -> dict:
    """One offloaded decode of `ref.prompt`: µs per MoE layer call for each part, ms per token, misses."""
    adapter, layers = find_moe_layers(model)
    if name in ("oracle", "oracle-wrap"):
        predictor = OraclePredictor(len(layers), int(layers[0].experts.num_experts), adapter.top_k(model), depth,
                                    ref.trace, wrap=name == "oracle-wrap")
    else:
        predictor = name if name == "none" else make_predictor(name, model, adapter, layers, depth)
    m2r2_moe.offload(model, cache_experts=cache, link_gbps=gbps, predictor=predictor, lookahead=depth)
    offloader = m2r2_moe.get_offloader(model)
    if offloader.prefetcher is not None:
        offloader.prefetcher._plans_heads = not split_heads
    try:
        gen = dict(input_ids=ref.prompt, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            offloader.reset_sequence()
            model.generate(max_new_tokens=1, **gen)  # warm-up prefill
            timers = Timers(offloader)
            start = time.perf_counter()
            model.generate(max_new_tokens=1, **gen)
            prefill = time.perf_counter() - start
            offloader.reset_sequence()
            start = time.perf_counter()
            model.generate(max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, **gen)
            total = time.perf_counter() - start
            timers.restore()
    finally:
        m2r2_moe.remove_offload(model)
    row = {part: timers.seconds[part] / timers.calls * 1e6 for part in PARTS}
    row.update(ms_per_token=(total - prefill) / tokens * 1e3, misses=timers.misses)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--link-ratios", default="0.5,2,8")
    parser.add_argument("--predictors", default="none,gate,m2r2,oracle")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split-heads", action="store_true",
                        help="time the m2r2 heads apart (`predict_host`) instead of inside the planner's call")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("builtin", torch.float32)
    _, layers = find_moe_layers(model)
    total_experts = sum(int(x.experts.num_experts) for x in layers)
    refs = references(model, tokenizer, layers, args.prompts, 64, args.tokens)
    layer_s = statistics.mean(r.decode_seconds_per_token for r in refs) / len(layers)
    ratios, names = [float(r) for r in args.link_ratios.split(",")], args.predictors.split(",")
    results = collections.defaultdict(list)
    for ref in refs:  # prompts outermost: every configuration sees the machine's drift alike
        for ratio in ratios:
            gbps = expert_param_bytes(layers[0]) / (ratio * layer_s) / 1e9
            depth = DEFAULT_LOOKAHEAD  # the runtime's default; the prefetcher trims it to the link's horizon
            for name in names:
                results[ratio, name].append(measure(model, ref, name, gbps, depth, total_experts // 2, args.tokens,
                                                     args.split_heads))
    table = markdown_table(["link ratio", "predictor", "ms/token", "decode misses", *(f"{p} µs" for p in PARTS),
                            "saved µs", "net µs"], _rows(results, ratios, names))
    extra = (f"\nPer MoE layer call (decode), mean of {args.prompts} prompt(s) x {args.tokens} tokens; built-in model, "
             f"cache {total_experts // 2} of {total_experts} experts, `predictive` policy, lookahead "
             f"{DEFAULT_LOOKAHEAD} (the default); "
             f"un-offloaded compute {layer_s * 1e6:.0f} µs per layer. `prefetch path` = on_layer; the m2r2 heads are "
             f"{'timed apart (`--split-heads`)' if args.split_heads else 'inside `plan` (as the runtime runs them)'}.\n")
    publish("Prefetch cost per layer (benchmarks/prefetch_cost.py)", table, extra, record=not args.no_record)


def _rows(results, ratios, names) -> list[list]:
    rows = []
    for ratio in ratios:
        base = {p: statistics.mean(r[p] for r in results[ratio, "none"]) for p in PARTS} if "none" in names else None
        for name in names:
            mean = {p: statistics.mean(r[p] for r in results[ratio, name]) for p in (*PARTS, "ms_per_token", "misses")}
            saved = net = ""
            if base is not None:
                saved_us = base["wait"] - mean["wait"]
                saved, net = f"{saved_us:.0f}", f"{saved_us - mean['on_layer'] - (mean['kernel'] - base['kernel']):.0f}"
            rows.append([f"{ratio:g}", name, f"{mean['ms_per_token']:.2f}", f"{mean['misses']:.0f}",
                         *(f"{mean[p]:.0f}" for p in PARTS), saved, net])
    return rows


if __name__ == "__main__":
    main()
