"""`m2r2-moe profile` (= tools/profile_prefetch.py): expert-switch stalls per predictor, in one run.

Runs the same prompts with several predictors, link regimes, cache sizes and policies; checks that all
of them generate the reference tokens; compares each run with the limit
max(compute time, bytes Belady's optimal policy must move at this cache size / link bandwidth) per token.
On CPU the link is emulated, its bandwidth set by the regime's *link ratio* = one expert's transfer time /
one layer's compute time (bf16 Mixtral-8x7B over PCIe 4 is near 15).

`--prefill 64,256,1024` measures the prompt's forward instead (time to first token, profile/prefill.py): per
prompt length and link ratio, the original and offloaded forward, bytes moved and the limit.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cli_common import (UsageError, add_model_argument, auto_lookahead, checked_by, check_adapters,
                          check_cache_experts, check_device, existing_file, listed, one_of, positive_float, positive_int,
                          probability, require_matplotlib, text_files)
from ..config import MIN_LINK_GBPS, POLICIES, OffloadConfigError, parse_expert_format
from ..corpus import resolve_text, token_stream
from ..loading import load_model
from ..models import find_moe_layers
from ..models.base import expert_param_bytes
from . import report
from .prefill import prefill_prompts, prefill_rows, prefill_table
from .runs import lru_curve, limit_per_token, offloaded_run, reference_run

logger = logging.getLogger(__name__)


PREDICTOR_NAMES = ("none", "history", "gate", "m2r2", "oracle", "oracle-wrap")


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="expert-switch stalls per predictor, link regime and cache size",
                       description=__doc__)
    add_model_argument(p)
    p.add_argument("--predictors", type=listed(one_of(PREDICTOR_NAMES)), default=",".join(PREDICTOR_NAMES),
                   help="comma-separated: none, history, gate, m2r2, oracle, oracle-wrap (the oracle also across the "
                        "token boundary, into the next token's layers: a bound no within-token predictor reaches)")
    p.add_argument("--adapters", type=existing_file, default=None,
                   help="m2r2 adapters file (default: the shipped ones of a built-in model)")
    p.add_argument("--link-ratios", type=listed(positive_float), default="0.5,2,8",
                   help="comma-separated regimes, each an expert's transfer time / a layer's compute time (> 0)")
    p.add_argument("--cache-experts", type=listed(positive_int), default=None,
                   help="comma-separated device slot counts, each from the model's top-k to its number of experts "
                        "(default: half of all experts)")
    p.add_argument("--policies", type=listed(one_of(POLICIES)), default="predictive",
                   help=f"comma-separated: {', '.join(POLICIES)}")
    p.add_argument("--lookahead", "--depth", dest="lookahead", type=_depth, default="auto",
                   help="prefetch lookahead in layers (>= 1), the same for every predictor; 'auto' = the runtime's "
                        "default: 4, or the m2r2 adapters' depth when less; the prefetcher predicts only as far as "
                        "the link's horizon needs")
    p.add_argument("--min-prob", type=probability, default=None,
                   help="prefetch_min_prob: smallest predicted probability worth a prefetch, in (0, 1] "
                        "(default: the runtime's)")
    p.add_argument("--expert-format", default="model", type=checked_by(parse_expert_format, OffloadConfigError),
                   help="how experts cross the link: model (lossless), int8 or int4 (and their options, e.g. "
                        "int4-g32-sym); link ratios stay those of the uncompressed expert")
    p.add_argument("--text", default=None,
                   help="comma-separated text files, folders or corpus splits the prompts are cut from (default: "
                        "a built-in model's own held-out text; for a checkpoint, the default built-in model's)")
    p.add_argument("--prompts", type=positive_int, default=1, help="held-out prompts to run")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="runs of every configuration per prompt, the predictors of a regime interleaved (a machine "
                        "that slows down slows them alike); the fastest is kept (noise only adds time)")
    p.add_argument("--prompt-tokens", type=positive_int, default=64, help="tokens per prompt")
    p.add_argument("--new-tokens", type=_at_least_two, default=32, help="tokens generated per prompt (>= 2)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1: steadier timings)")
    p.add_argument("--device", default="cpu", help="cpu (emulated link) or cuda (real link)")
    p.add_argument("--clock", type=one_of(("host", "virtual")), default="host",
                   help="host, or virtual (CPU): simulated time, each MoE layer's compute the reference's average, the "
                        "link simulated, the runtime's host work at its real cost: steady on a loaded machine "
                        "(runtime/virtual.py) (default: host)")
    p.add_argument("--layer-ms", type=positive_float, default=None, help="with --clock virtual: each MoE layer's "
                   "compute in ms, so that runs of other days or builds compare (default: the references' average)")
    p.add_argument("--json", default=None, help="write every run's figures here (default: not written)")
    p.add_argument("--trace", default=None,
                   help="Chrome/Perfetto trace of one run (m2r2, middle regime) (default: not written)")
    p.add_argument("--plots", default=None, help="folder for timeline.png, stalls.png, hit_rate.png; needs "
                                                 "matplotlib (default: not drawn)")
    p.add_argument("--sweep-cache", action="store_true",
                   help="also run none/m2r2 at 1/4, 1/2, 3/4 of all experts for the hit-rate plot")
    p.add_argument("--prefill", type=listed(positive_int), default=None,
                   help="prefill mode: comma-separated prompt lengths; times one prompt forward (after a warm-up, the "
                        "fastest of --repeats) offloaded at the first --cache-experts and --policies, per link ratio, "
                        "against max(original forward, bytes moved / link bandwidth); predictors are not run (a "
                        "prompt's forward streams its experts without one) (default: the decode profile)")
    p.set_defaults(func=main)


def _depth(text: str) -> str | int:
    return "auto" if text == "auto" else positive_int(text)


def _at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (the first new token is prefill, not decode), got {text}")
    return value


def _fastest(run, repeats: int, key):  # the fastest of `repeats` calls of `run()` by `key` (noise only adds time)
    return min((run() for _ in range(repeats)), key=key)


def prompt_text(model_spec: str, text: str | None) -> list[str]:
    """The prompts' text: `--text`, else a built-in model's own held-out split (a checkpoint: the default's)."""
    if text:
        return [t for t in text.split(",") if t]
    return [f"{model_spec}:heldout" if model_spec.startswith("builtin") else "builtin:heldout"]


def references(model, tokenizer, layers, count: int, prompt_tokens: int, new_tokens: int,
               repeats: int = 1, files: list[Path] | None = None) -> list:
    """The reference run of each of `count` held-out prompts (the fastest of `repeats`), cut from the text
    `files` (default: the default built-in model's held-out split)."""
    stride = max(int(x.experts.num_experts) for x in layers)
    return [_fastest(lambda: reference_run(model, p, new_tokens, stride), repeats,
                     lambda ref: ref.decode_seconds_per_token)
            for p in _prompts(tokenizer, count, prompt_tokens, model.config.vocab_size,
                              files or resolve_text(["builtin:heldout"]))]


def _prompts(tokenizer, count: int, length: int, vocab: int, files: list[Path]) -> list[torch.Tensor]:
    if tokenizer is None:  # a random model: random prompts
        return [torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(i)) for i in range(count)]
    ids = token_stream(tokenizer, files, max_tokens=count * length * 8)
    if len(ids) < count * length:
        raise ValueError(f"the prompt text ({', '.join(map(str, files))}) has {len(ids)} tokens; {count} prompt(s) of {length} "
                         "need more: pass more text with --text, or fewer --prompts / --prompt-tokens")
    step = len(ids) // max(count, 1)
    return [ids[i * step : i * step + length].unsqueeze(0) for i in range(count)]


def main(args: argparse.Namespace) -> int:
    """Run every configuration of the plan on the reference prompts; print the table, write the outputs."""
    if args.plots:
        require_matplotlib("--plots")
    emulated = check_device(args.device).type == "cpu"  # on CPU the link is emulated at each regime's speed
    if args.clock == "virtual" and (not emulated or args.prefill):
        raise UsageError("--clock virtual simulates the CPU engine's link in the decode profile: it needs "
                         "--device cpu and no --prefill")
    if args.layer_ms is not None and args.clock != "virtual":
        raise UsageError("--layer-ms sets the simulated compute: it needs --clock virtual")
    torch.set_num_threads(args.threads)
    files = text_files(prompt_text(args.model, args.text), "builtin:heldout")  # a missing file fails before loading
    model, tokenizer = load_model(args.model, torch.float32)
    adapter, layers = find_moe_layers(model)
    total = sum(int(x.experts.num_experts) for x in layers)
    caches = args.cache_experts or [total // 2]
    check_cache_experts(caches, adapter.top_k(model), total)
    if not args.prefill and ("m2r2" in args.predictors or args.sweep_cache):  # prefill mode runs no predictor
        check_adapters(model, layers, args.model, args.adapters,
                       "--predictors" if "m2r2" in args.predictors else "--sweep-cache (runs m2r2)")
    ratios, policies, predictors = args.link_ratios, args.policies, args.predictors
    refs = references(model, tokenizer, layers, args.prompts, args.prompt_tokens, args.new_tokens, args.repeats, files)
    measured = statistics.mean(r.decode_seconds_per_token for r in refs) / len(layers)
    compute_layer = measured if args.layer_ms is None else args.layer_ms * 1e-3
    expert_bytes = expert_param_bytes(layers[0])
    if emulated:
        _check_link_ratios(ratios, expert_bytes, compute_layer)
    virtual = compute_layer if args.clock == "virtual" else None
    if args.prefill:
        return _prefill_mode(args, model, tokenizer, files, caches[0], expert_bytes, compute_layer, emulated)
    plan = [(ratio, cache, policy, name) for ratio in ratios for cache in caches for policy in policies
            for name in predictors]
    if args.sweep_cache:
        sweep = sorted({total // 4, total // 2, 3 * total // 4})
        plan += [(ratios[len(ratios) // 2], c, pol, n) for c in sweep for pol in ("lru", "predictive")
                 for n in ("none", "m2r2") if (ratios[len(ratios) // 2], c, pol, n) not in plan]
    # every expert cached, no link delay: the runtime's own cost, no stall
    floor_runs = [_fastest(lambda: offloaded_run(model, ref, args.new_tokens, "none", total, None, "lru",
                                                 device=args.device, virtual=virtual), args.repeats, _time)
                  for ref in refs]
    floor = statistics.mean(r["time_per_token_s"] for r in floor_runs)
    depth = auto_lookahead(model, layers, args.adapters) if args.lookahead == "auto" else int(args.lookahead)
    runs, recorders = _run_regimes(args, model, refs, plan, depth, compute_layer, expert_bytes, emulated, virtual)
    _share_of_gain(runs, floor)
    print(report.table(runs))
    print(report.LEGEND)
    print(f"\nmodel {args.model}: {len(layers)} MoE layers, {total} experts, {expert_bytes / 1e6:.2f} MB per expert; "
          f"compute {compute_layer * 1e3:.2f} ms per layer, {compute_layer * len(layers) * 1e3:.1f} ms per token "
          f"(un-offloaded); {len(refs)} prompt(s) x {args.new_tokens} new tokens")
    if virtual:
        print(f"times are simulated (--clock virtual): {virtual * 1e3:.2f} ms per MoE layer, link simulated, host work real")
    print(f"runtime floor (every expert cached, no stall): {floor * 1e3:.1f} ms per token; 'ceiling' = the share of "
          f"gain a run without any stall or prediction cost would reach")
    _outputs(args, runs, recorders, refs, ratios, caches, total)
    checked = runs + floor_runs if parse_expert_format(args.expert_format) is None else floor_runs  # int8/int4 differ
    return 0 if all(r["tokens_identical"] for r in checked) else 1


def _run_regimes(args, model, refs, plan, depth, compute_layer, expert_bytes, emulated,
                 virtual=None) -> tuple[list[dict], dict]:
    """Every (ratio, cache, policy, predictor) of `plan` on every prompt, the predictors of a regime interleaved
    per prompt and repeat (a machine that slows down slows them alike); the fastest run of each kept. Returns
    the merged rows, in plan order, and one recorder per row. `depth`: every predictor's lookahead."""
    runs, recorders = [], {}
    regimes: dict[tuple, list[str]] = {}  # (ratio, cache, policy) -> the predictors compared in it, in plan order
    for ratio, cache, policy, name in plan:
        regimes.setdefault((ratio, cache, policy), []).append(name)
    bar = tqdm(total=len(plan) * args.repeats * len(refs), desc="profile runs")
    for (ratio, cache, policy), names in regimes.items():
        gbps = expert_bytes / (ratio * compute_layer) / 1e9 if emulated else None  # one transfer = ratio layers
        best: dict[tuple[str, int], dict] = {}  # (predictor, prompt) -> its fastest run
        for _ in range(args.repeats):
            for i, ref in enumerate(refs):
                for name in names:
                    run = offloaded_run(model, ref, args.new_tokens, name, cache, gbps, policy, args.adapters, depth,
                                        args.device, args.min_prob, args.expert_format, virtual)
                    if (name, i) not in best or _time(run) < _time(best[name, i]):
                        best[name, i] = run
                    bar.update()
        compute = virtual * len(find_moe_layers(model)[1]) if virtual else None  # simulated: the fixed compute
        limits = [limit_per_token(ref, cache, expert_bytes, gbps and gbps * 1e9, args.new_tokens, compute) for ref in refs]
        for name in names:
            per_prompt = [best[name, i] for i in range(len(refs))]
            recorders[(ratio, cache, policy, name)] = per_prompt[0]["recorder"]
            runs.append(_merge(name, ratio, cache, policy, per_prompt, limits, gbps, args.new_tokens - 1))
            runs[-1]["lookahead"] = depth
    bar.close()
    return runs, recorders


def _prefill_mode(args, model, tokenizer, files, cache, expert_bytes, compute_layer, emulated) -> int:
    """`--prefill`: the prompt forward's table (profile/prefill.py); exit status 1 if any logits differ."""
    prompts = prefill_prompts(tokenizer, files, args.prefill, model.config.vocab_size)
    gbps = {r: expert_bytes / (r * compute_layer) / 1e9 if emulated else None for r in args.link_ratios}
    rows = prefill_rows(model, prompts, args.link_ratios, gbps, args.repeats, device=args.device,
                        cache_experts=cache, policy=args.policies[0], predictor="none")
    print(prefill_table(rows))
    print(f"\nmodel {args.model}: {expert_bytes / 1e6:.2f} MB per expert, {cache} slots, policy {args.policies[0]}; "
          f"decode compute {compute_layer * 1e3:.2f} ms per MoE layer sets each link ratio's speed; limit = "
          f"max(original forward, bytes moved / link bandwidth), floor = max(original forward, bytes of the experts "
          f"used that held no slot / link bandwidth); each forward timed after a warm-up, fastest of "
          f"{args.repeats}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"prefill": rows}, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


def _check_link_ratios(ratios: list[float], expert_bytes: int, compute_layer: float) -> None:
    """Refuse, naming `--link-ratios`, a ratio whose emulated link would be slower than the runtime allows."""
    slowest = expert_bytes / (MIN_LINK_GBPS * 1e9) / compute_layer  # the ratio of the slowest emulated link
    bad = [r for r in ratios if r > slowest]
    if bad:
        raise UsageError(f"--link-ratios {bad[0]:g}: one expert ({expert_bytes / 1e6:.2f} MB) in {bad[0]:g} x "
                         f"{compute_layer * 1e3:.2f} ms of layer compute needs a link slower than the emulated "
                         f"minimum of {MIN_LINK_GBPS:g} GB/s; use ratios up to {int(slowest)}")


def _time(run: dict) -> float:
    return run["time_per_token_s"]


def _merge(name, ratio, cache, policy, per_prompt, limits, gbps, decode_tokens) -> dict:
    mean = lambda key: statistics.mean(p[key] for p in per_prompt)  # noqa: E731
    total = lambda key: sum(p[key] for p in per_prompt)  # noqa: E731
    return {
        "predictor": name, "link_ratio": ratio, "cache_experts": cache, "policy": policy,
        "link_gbps": gbps, "tokens": decode_tokens * len(per_prompt),
        "time_per_token_s": mean("time_per_token_s"), "limit_per_token_s": statistics.mean(x[0] for x in limits),
        "belady_loads": sum(x[1] for x in limits), "stall_s_per_token": mean("stall_s_per_token"),
        "hits": total("hits"), "prefetch_hits": total("prefetch_hits"), "late_prefetches": total("late_prefetches"),
        "misses": total("misses"), "bytes_to_device": total("bytes_to_device"), "wasted_bytes": total("wasted_bytes"),
        "prefetches": total("prefetches"), "link_busy_s": total("link_busy_s"),
        "tokens_identical": all(p["tokens_identical"] for p in per_prompt),
    }


def _share_of_gain(runs: list[dict], floor: float | None = None) -> None:
    """(T_none - T_run) / (T_none - T_limit) against the `none` run of the same regime, cache and policy;
    the share of `none`'s stall the run removed; and, with the runtime's `floor` (time per token with every
    expert cached), the *ceiling*: (T_none - T_floor) / (T_none - T_limit), the share a run with no stall and
    no prediction cost would reach (the rest of the gap is the runtime's own cost, which no predictor removes)."""
    base = {(r["link_ratio"], r["cache_experts"], r["policy"]): r for r in runs if r["predictor"] == "none"}
    for r in runs:
        b = base.get((r["link_ratio"], r["cache_experts"], r["policy"]))
        gap = None if b is None else b["time_per_token_s"] - r["limit_per_token_s"]
        r["speedup_vs_none"] = None if b is None else b["time_per_token_s"] / r["time_per_token_s"]
        r["share_of_gain"] = None if not gap or gap <= 0 else (b["time_per_token_s"] - r["time_per_token_s"]) / gap
        stall = None if b is None else b["stall_s_per_token"]  # the part of the gap that is waiting for copies
        r["stall_removed"] = None if not stall else (stall - r["stall_s_per_token"]) / stall
        r["floor_per_token_s"] = floor
        r["share_ceiling"] = (None if floor is None or not gap or gap <= 0
                              else min(1.0, (b["time_per_token_s"] - floor) / gap))
        bound = None if b is None or floor is None else b["time_per_token_s"] - max(floor, r["limit_per_token_s"])
        r["gap_closed"] = None if not bound or bound <= 0 else (b["time_per_token_s"] - r["time_per_token_s"]) / bound


def _outputs(args, runs, recorders, refs, ratios, caches, total) -> None:
    mid = ratios[len(ratios) // 2]
    key = (mid, caches[0], args.policies[0], "m2r2")
    chosen = recorders.get(key) or next(iter(recorders.values()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": runs}, indent=1, default=float))
    if args.trace:
        report.chrome_trace(chosen, args.trace, f"m2r2_moe profile {key}")
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        report.plot_timeline(chosen, out / "timeline.png", (1, 4), f"decode steps 1-3, {key}")
        series = {}
        for (ratio, cache, policy, name), rec in recorders.items():
            if ratio == mid and cache == caches[0] and policy == key[2]:
                series[name] = [row["stall"] for row in rec.per_step()[1:]]
        report.plot_stalls(series, out / "stalls.png", f"stall per decode token, link ratio {mid:g}, cache {caches[0]}")
        sizes = sorted({r["cache_experts"] for r in runs} | {total // 4, total // 2, 3 * total // 4})
        curves = [lru_curve(ref, sizes) for ref in refs]  # over every prompt, as the measured runs
        uses = sum(len(q) for ref in refs for q in ref.requests[ref.prefill_requests:])
        offline = {c: (1 - sum(cv[c][0] for cv in curves) / uses, 1 - sum(cv[c][1] for cv in curves) / uses)
                   for c in sizes}
        measured: dict[str, dict[int, float]] = {}
        for r in runs:
            if r["link_ratio"] == mid:
                used = r["hits"] + r["prefetch_hits"] + r["late_prefetches"] + r["misses"]
                measured.setdefault(f"{r['predictor']}/{r['policy']}", {})[r["cache_experts"]] = \
                    (r["hits"] + r["prefetch_hits"]) / max(used, 1)
        report.plot_hit_rate(measured, offline, out / "hit_rate.png", f"hit rate vs cache size, link ratio {mid:g}")
