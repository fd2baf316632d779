"""Time per token per predictor on Mixtral-8x7B expert geometry, with the built-in model's routing replayed.

The model: a transformers MixtralForCausalLM with hidden 4096, intermediate 14336, 8 experts, top-2
(352 MB per bf16 expert), a few layers and synthetic weights. Its routers return the routing the
built-in model chose on held-out text (a contiguous block of its 8 layers), and each predictor returns
the scores the built-in model's `history` / `gate` / `m2r2` / `oracle` predictor gave there
(benchmarks/replay.py): Mixtral's expert bytes with a trained model's routing and prediction quality.

Steps: record the built-in model (CPU, seconds); build the replay model on the device; decode it with
every expert resident (the compute time per token, the reference tokens); measure the pinned
host→device bandwidth; offload it once (cache = half of all experts, `predictive` policy) and, per
predictor, attach it, prefill, decode `--warmup` steps, then time the remaining steps (device
synchronised at both ends only) and read `m2r2_moe.stats`. `none` is run again last: the spread of the
two `none` runs is the timing noise. Per token: time, the limit max(compute, Belady's loads at this
cache size x expert bytes / bandwidth), stall, hit classes, GB moved, speedup and share of the
possible gain (T_none - T) / (T_none - T_limit). Replayed predictors cost no compute; the real gate /
m2r2 add a few small kernels per layer.

    python benchmarks/gpu_replay.py --json replay.json [--layers 4] [--append]       # GPU
    python benchmarks/gpu_replay.py --device cpu --hidden 256 --intermediate 512 --link-ratio 4   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import m2r2_moe  # noqa: E402
from _report import append_section, machine, markdown_table  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402
from m2r2_moe.profile.belady import belady_loads  # noqa: E402
from replay import (GreedyDecoder, ReplayClock, ReplayPredictor, RoutingRecord, RoutingTap,  # noqa: E402
                             record_routing, replay_routing)

ON_DEVICE = ("gate", "m2r2")  # predictors whose real versions compute on the device (their scores live there)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=4, help="MoE layers of the replay model (<= the record's 8)")
    p.add_argument("--first-layer", type=int, default=None,
                   help="first recorded layer replayed (default: the middle block)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 128; kv heads / 4)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--predictors", default="none,history,gate,m2r2,oracle")
    p.add_argument("--cache-experts", type=int, default=None, help="device slots (default: half of all experts)")
    p.add_argument("--policy", default="predictive")
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=48, help="decode forwards after the prefill")
    p.add_argument("--warmup", type=int, default=4, help="decode steps before the timed ones")
    p.add_argument("--feed", choices=("text", "greedy"), default="text",
                   help="what the built-in model reads while recorded: held-out text, or its own greedy output")
    p.add_argument("--record", default=None, help="routing record to load; recorded now (and saved there) if missing")
    p.add_argument("--link-ratio", type=float, default=4.0,
                   help="CPU only: emulated link, one expert's transfer time / one layer's compute time")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="skip a predictor whose run would end past this many seconds from the start (0: no limit)")
    p.add_argument("--no-repeat", action="store_true", help="do not run `none` a second time (noise estimate)")
    p.add_argument("--json", default=None)
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    return p.parse_args(argv)


def get_record(args) -> RoutingRecord:
    """The built-in model's routing and predictor scores on held-out text (loaded, or recorded on CPU)."""
    if args.record and Path(args.record).is_file():
        return RoutingRecord.load(args.record)
    from m2r2_moe.corpus import resolve_text, token_stream

    model, tokenizer = m2r2_moe.load_builtin(torch.float32)
    needed = args.prompt_tokens + args.steps
    ids = token_stream(tokenizer, resolve_text(["builtin:heldout"]), max_tokens=needed)
    record = record_routing(model, ids[: args.prompt_tokens].unsqueeze(0), args.steps,
                            predictors=[p for p in args.predictors.split(",") if p != "none"], depth=args.lookahead,
                            continuation=ids[args.prompt_tokens :] if args.feed == "text" else None)
    if args.record:
        record.save(args.record)
    return record


def build_model(args, record: RoutingRecord, device: torch.device):
    """Mixtral of the requested geometry, synthetic weights (N(0, 0.02), norms 1), made on `device`."""
    from transformers import MixtralConfig, MixtralForCausalLM

    heads = args.heads or max(1, args.hidden // 128)
    config = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        num_local_experts=record.num_experts, num_experts_per_tok=record.top_k,
        max_position_embeddings=max(4096, record.positions + 8), pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))
    try:
        with torch.device(device):  # made where it runs: filling 11+ GB with random numbers on a CPU takes minutes
            model = MixtralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # measurement boundary only


def decode(model, layers, clock, prompt, args, device, expected: torch.Tensor, offloaded: bool) -> dict:
    """Prefill, `warmup` steps, then the timed steps; stats cover the timed steps only. `layers`: the
    model's MoE layers (found before offloading: an offloaded model's expert tensors are empty)."""
    tap = RoutingTap(layers)
    decoder = GreedyDecoder(model, clock)
    try:
        with torch.no_grad():
            decoder.prefill(prompt.to(device))
            for _ in range(args.warmup):
                decoder.step()
            sync(device)
            if offloaded:
                m2r2_moe.stats(model)  # drains the device stall events of the warm-up before the reset
                m2r2_moe.reset_stats(model)
            start = time.perf_counter()
            for _ in range(args.steps - args.warmup):
                decoder.step()
            sync(device)
            elapsed = time.perf_counter() - start
    finally:
        tap.remove()
    timed = args.steps - args.warmup
    out = {"time_per_token_s": elapsed / timed, "tokens": decoder.all_tokens(),
           "routing_replayed": tap.matches(expected)}
    if offloaded:
        stats = m2r2_moe.stats(model)
        out.update(stats=stats, uses_accounted=stats.expert_uses == timed * len(layers) * expected.shape[-1])
    return out


def h2d_bandwidth(nbytes: int, device: torch.device, reps: int = 5, copies: int = 4) -> float:
    """Bytes/s of pinned host→device copies of one expert's size on a side stream (best of `reps`)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(7)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record(stream)
        with torch.cuda.stream(stream):
            for _ in range(copies):
                dst.copy_(src, non_blocking=True)
        end.record(stream)
        end.synchronize()  # measurement only
        best = min(best, start.elapsed_time(end) / 1e3)
    return copies * nbytes / best


def run_predictors(model, layers, record, clock, prompt, args, device, block, ref, limit):
    """Per predictor (the model is offloaded once): attach it, decode, read the counters; yields one run
    dict each. `limit`: (s/token, Belady loads). The prefill of every run brings (nearly) every expert of
    every layer through the cache, so the runs start from (nearly) the same cache contents."""
    offloader = m2r2_moe.get_offloader(model)
    expected = record.experts[: args.prompt_tokens + args.steps, block]
    names = [n.strip() for n in args.predictors.split(",")]
    if "none" in names and not args.no_repeat:
        names.append("none#2")
    last = 0.0  # seconds the previous run took: the estimate of the next one
    for name in names:
        if args.budget_s and time.perf_counter() - args.t0 + last > args.budget_s:
            print(f"{name} skipped: it would end past --budget-s {args.budget_s:.0f} s", flush=True)
            continue
        started = time.perf_counter()
        base = name.split("#")[0]
        predictor = None if base == "none" else ReplayPredictor(
            base, record.scores[base][:, block], clock, record.top_k, args.lookahead,
            device=device if base in ON_DEVICE else "cpu")
        offloader.attach_predictor(predictor)
        offloader.reset_sequence()
        result = decode(model, layers, clock, prompt, args, device, expected, offloaded=True)
        stats = result["stats"]
        run = {
            "predictor": name, "cache_experts": offloader.num_slots, "policy": args.policy,
            "lookahead": args.lookahead, "tokens": args.steps - args.warmup,
            "time_per_token_s": result["time_per_token_s"], "limit_per_token_s": limit[0],
            "belady_loads": limit[1], "stall_s_per_token": stats.stall_seconds / (args.steps - args.warmup),
            "hits": stats.hits, "prefetch_hits": stats.prefetch_hits, "late_prefetches": stats.late_prefetches,
            "misses": stats.misses, "bytes_to_device": stats.bytes_to_device, "wasted_bytes": stats.wasted_bytes,
            "prefetches": stats.prefetches, "tokens_identical": bool(torch.equal(result["tokens"], ref["tokens"])),
            "routing_replayed": result["routing_replayed"], "uses_accounted": result["uses_accounted"],
        }
        print(f"{name}: {run['time_per_token_s'] * 1e3:.2f} ms/token, {stats.misses} misses, "
              f"{stats.bytes_to_device / 1e9:.2f} GB", flush=True)
        last = time.perf_counter() - started
        yield run
    offloader.attach_predictor(None)


def share_of_gain(runs: list[dict]) -> None:
    """(T_none - T) / (T_none - T_limit) and T_none / T, against the first `none` run."""
    base = next((r for r in runs if r["predictor"] == "none"), None)
    for r in runs:
        gap = None if base is None else base["time_per_token_s"] - r["limit_per_token_s"]
        r["speedup_vs_none"] = None if base is None else base["time_per_token_s"] / r["time_per_token_s"]
        r["share_of_gain"] = None if not gap or gap <= 0 else (base["time_per_token_s"] - r["time_per_token_s"]) / gap


def table(runs: list[dict]) -> str:
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    rows = [[r["predictor"], f"{r['time_per_token_s'] * 1e3:.2f}", f"{r['limit_per_token_s'] * 1e3:.2f}",
             f"{r['stall_s_per_token'] * 1e3:.2f}", r["hits"], r["prefetch_hits"], r["late_prefetches"], r["misses"],
             f"{r['bytes_to_device'] / 1e9:.2f}", fmt(r["speedup_vs_none"], ".2f"), fmt(r["share_of_gain"], ".2f"),
             "yes" if r["tokens_identical"] and r["routing_replayed"] and r["uses_accounted"] else "NO"]
            for r in runs]
    return markdown_table(["predictor", "ms/token", "limit ms", "stall ms/token", "hits", "pf hits", "late", "misses",
                           "GB moved", "speedup vs none", "share of gain", "identical"], rows)


def reference(model, layers, clock, prompt, args, device, expected) -> dict:
    """Every expert resident: compute time per token and the reference tokens (second of two runs: the
    first warms kernels and allocators)."""
    decode(model, layers, clock, prompt, args, device, expected, offloaded=False)
    return decode(model, layers, clock, prompt, args, device, expected, offloaded=False)


def setup(args, device: torch.device, info: dict):
    """Record, build, reference run. Returns (model, layers, record, clock, prompt, block, ref)."""
    t = time.perf_counter()
    record = get_record(args)
    if record.positions < args.prompt_tokens + args.steps or record.prompt_tokens != args.prompt_tokens:
        raise SystemExit(f"the record has {record.positions} positions, prompt {record.prompt_tokens}; "
                         f"asked for prompt {args.prompt_tokens} + {args.steps} steps")
    first = (record.num_layers - args.layers) // 2 if args.first_layer is None else args.first_layer
    block = slice(first, first + args.layers)
    info["setup_s"] = {"record": time.perf_counter() - t}
    t = time.perf_counter()
    model = build_model(args, record, device)
    clock = ReplayClock()
    replay_routing(model, record, clock, first, device)
    _, layers = find_moe_layers(model)
    info["setup_s"]["build"] = time.perf_counter() - t
    prompt = torch.randint(3, args.vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    expected = record.experts[: args.prompt_tokens + args.steps, block]  # [N, L, K]
    ref = reference(model, layers, clock, prompt, args, device, expected)
    info["setup_s"]["reference"] = time.perf_counter() - t
    t = time.perf_counter()
    model.to("cpu")  # offload() takes a CPU model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    info["setup_s"]["to_cpu"] = time.perf_counter() - t
    info.update(first_layer=first, compute_per_token_s=ref["time_per_token_s"],
                reference_routing_replayed=ref["routing_replayed"],
                experts_implementation=getattr(model.config, "_experts_implementation", None))
    return model, layers, record, clock, prompt, block, ref


def offload_once(model, layers, args, device: torch.device, record: RoutingRecord, info: dict) -> None:
    """Offload once; the link: measured (CUDA) or emulated at `--link-ratio` (CPU). Should page-locking the
    host store fail, the store is left pageable (and the JSON says so): slower copies, but figures."""
    from m2r2_moe.models.base import expert_param_bytes

    compute = info["compute_per_token_s"]
    gbps = None
    if device.type == "cuda":
        t = time.perf_counter()
        info["bandwidth_Bps"] = h2d_bandwidth(expert_param_bytes(layers[0]), device)
        info["setup_s"]["bandwidth"] = time.perf_counter() - t
    else:
        gbps = expert_param_bytes(layers[0]) / (args.link_ratio * compute / len(layers)) / 1e9
        info["bandwidth_Bps"] = gbps * 1e9
    slots = args.cache_experts or len(layers) * record.num_experts // 2
    t = time.perf_counter()
    options = dict(device=str(device), cache_experts=slots, policy=args.policy, predictor="none",
                   lookahead=args.lookahead, link_gbps=gbps)
    try:
        m2r2_moe.offload(model, **options)
        info["pinned"] = device.type == "cuda"
    except RuntimeError as e:  # offload is all or nothing: the model is unchanged, so try again
        if device.type != "cuda":
            raise
        print(f"offload with a pinned host store failed ({e}); again with pin_memory=False", flush=True)
        m2r2_moe.offload(model, pin_memory=False, **options)
        info["pinned"] = False
    info["setup_s"]["offload"] = time.perf_counter() - t
    offloader = m2r2_moe.get_offloader(model)
    info.update(cache_experts=offloader.num_slots, expert_bytes=offloader.expert_bytes[0],
                host_store_bytes=offloader.store.nbytes, engine=type(offloader.engine).__name__,
                link_gbps_emulated=gbps)


def limit_per_token(record: RoutingRecord, args, info: dict) -> tuple[float, int]:
    """max(compute, Belady's loads in the timed steps x expert bytes / bandwidth) per token."""
    timed = args.steps - args.warmup
    requests = record.requests(info["first_layer"], args.layers, args.steps)
    loads = belady_loads(requests, info["cache_experts"], count_from=(1 + args.warmup) * args.layers)
    transfer = loads * info["expert_bytes"] / info["bandwidth_Bps"] / timed
    return max(info["compute_per_token_s"], transfer), loads


def write_json(path, info: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(info, indent=1, default=str))


def summary(args, info: dict) -> str:
    first = info["first_layer"]
    fed = "held-out text" if args.feed == "text" else "its greedy continuation of held-out text"
    link, store = "emulated" if args.device == "cpu" else "measured", "pinned" if info["pinned"] else "pageable"
    return (f"Replay model: Mixtral, {args.layers} MoE layers (the built-in model's layers {first}.."
            f"{first + args.layers - 1}, its routing and predictor scores recorded on {fed}), hidden {args.hidden}, "
            f"intermediate {args.intermediate}, 8 experts top-2, {args.dtype}, synthetic weights; "
            f"{info['expert_bytes'] / 1e6:.1f} MB per expert, {info['cache_experts']} device slots, policy "
            f"{args.policy}, lookahead {args.lookahead}; {info['engine']} on {args.device}; link "
            f"{info['bandwidth_Bps'] / 1e9:.2f} GB/s ({link}), host store {store}; "
            f"compute {info['compute_per_token_s'] * 1e3:.2f} ms/token with every expert resident; "
            f"{args.prompt_tokens}-token prompt, {args.warmup} warm-up + {args.steps - args.warmup} timed steps. "
            f"Limit = max(compute, Belady loads x expert bytes / link). Replayed predictors cost no compute. "
            f"Setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in info["setup_s"].items()) + ".")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    device = torch.device(args.device)
    if device.type == "cpu" and 3 * args.hidden * args.intermediate > 2**26:
        raise SystemExit(f"no GPU: Mixtral-sized experts ({args.hidden} x {args.intermediate}) would take far too long "
                         "on the CPU; pass e.g. --hidden 256 --intermediate 512 for the CPU smoke run")
    info = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "t0"}, "runs": []}
    model, layers, record, clock, prompt, block, ref = setup(args, device, info)
    print(f"compute {info['compute_per_token_s'] * 1e3:.2f} ms/token; setup {info['setup_s']}", flush=True)
    offload_once(model, layers, args, device, record, info)
    limit = limit_per_token(record, args, info)
    info.update(limit_per_token_s=limit[0], belady_loads=limit[1])
    write_json(args.json, info)
    for run in run_predictors(model, layers, record, clock, prompt, args, device, block, ref, limit):
        info["runs"].append(run)
        share_of_gain(info["runs"])
        write_json(args.json, info)  # partial results survive a timeout
    if device.type == "cpu":  # on a GPU the process ends here: copying 11+ GB back would only cost time
        m2r2_moe.remove_offload(model)
    text = table(info["runs"]) + "\n\n" + summary(args, info) + "\n"
    info["table"] = text
    write_json(args.json, info)
    print("\n" + text, flush=True)
    if args.append:
        title = "Offloaded decode on Mixtral-8x7B expert geometry, built-in routing replayed (benchmarks/gpu_replay.py)"
        print(f"appended to {append_section(title, text)}")
    ok = info["reference_routing_replayed"] and all(
        r["tokens_identical"] and r["routing_replayed"] and r["uses_accounted"] for r in info["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
