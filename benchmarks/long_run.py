"""Long run: thousands of decoded tokens on one offloaded model; memory, threads and bookkeeping stay flat.

Generates several sequences back to back (the KV cache grows within a sequence and is dropped between
them) with the built-in model offloaded at half of its experts, the M2R2 predictor and an emulated link,
and samples at intervals: host RSS (psutil), Python and OS thread counts, the prefetch handles the runtime
holds (`offloader.cache._prefetched`), the size of every dict/list/set the runtime keeps (offloader, expert
cache, copy engine, slot manager, prefetcher, predictor, policy, events) and, on a GPU, torch.cuda allocated
memory. Prints a table and appends it to BENCHMARKS.md. benchmarks/tests/test_long_run.py runs a smaller
version with assertions.

    python benchmarks/long_run.py [--sequences 5] [--new-tokens 1024] [--link-gbps 0.14] [--every 256]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

import psutil
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parent))
import m2r2_moe  # noqa: E402
from _report import append_section, markdown_table  # noqa: E402
from m2r2_moe.corpus import split_files, token_stream  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402

CONTAINERS = (dict, list, set, deque, tuple)


def bookkeeping(offloader) -> dict[str, int]:
    """`owner.attribute -> len` of every container the runtime and the objects it owns keep."""
    cache = offloader.cache
    owners = {"offloader": offloader, "cache": cache, "slots": cache.slots, "policy": cache.policy,
              "events": offloader.events}
    for name in ("engine", "prefetcher", "store"):
        if getattr(offloader, name, None) is not None:
            owners[name] = getattr(offloader, name)
    if owners.get("prefetcher") is not None:
        owners["predictor"] = owners["prefetcher"].predictor
    sizes = {}
    for owner_name, owner in owners.items():
        for attr, value in getattr(owner, "__dict__", {}).items():
            if isinstance(value, CONTAINERS):
                sizes[f"{owner_name}.{attr}"] = len(value)
    return sizes


class Monitor(StoppingCriteria):
    """Called by `generate` once per new token (it never stops generation); samples every `every` tokens."""

    def __init__(self, offloader, every: int):
        self.offloader, self.every = offloader, every
        self.process = psutil.Process()
        self.tokens, self.samples, self.start = 0, [], time.perf_counter()

    def __call__(self, input_ids, scores, **kwargs):
        self.tokens += input_ids.shape[0]
        if self.tokens % self.every == 0:
            self.sample()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def sample(self) -> dict:
        gc.collect(1)  # young generations: the garbage of the last tokens (a full collection costs ~0.3 s)
        row = dict(tokens=self.tokens, seconds=time.perf_counter() - self.start,
                   rss_mb=self.process.memory_info().rss / 1e6, py_threads=threading.active_count(),
                   os_threads=self.process.num_threads(), prefetched=len(self.offloader.cache._prefetched),
                   containers=bookkeeping(self.offloader))
        if torch.cuda.is_available() and self.offloader.device.type == "cuda":
            row["cuda_mb"] = torch.cuda.memory_allocated(self.offloader.device) / 1e6
        self.samples.append(row)
        return row


def quarters(samples: list[dict], warmup_tokens: int) -> tuple[list[dict], list[dict]]:
    """Samples of the first and the last quarter of the run after `warmup_tokens`."""
    measured = [s for s in samples if s["tokens"] > warmup_tokens]
    n = max(1, len(measured) // 4)
    return measured[:n], measured[-n:]


def growth(samples: list[dict], key: str, warmup_tokens: int) -> float:
    """Median of `key` over the last quarter minus its median over the first (after warm-up)."""
    first, last = quarters(samples, warmup_tokens)
    return statistics.median(s[key] for s in last) - statistics.median(s[key] for s in first)


def run(model, prompts: list[torch.Tensor], new_tokens: int, every: int, **offload_kwargs):
    """Offload, generate `new_tokens` after each prompt (sampled decoding, seeded), remove; (monitor, stats)."""
    m2r2_moe.offload(model, **offload_kwargs)
    try:
        monitor = Monitor(m2r2_moe.get_offloader(model), every)
        monitor.sample()
        torch.manual_seed(0)
        for ids in prompts:
            with torch.no_grad():
                model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                               top_k=50, pad_token_id=0, stopping_criteria=StoppingCriteriaList([monitor]))
        monitor.sample()
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    return monitor, stats


def _table(samples: list[dict], stride: int) -> str:
    rows, previous = [], None
    for s in samples:
        repeated = previous is not None and s["tokens"] == previous["tokens"]
        if repeated or previous is not None and s is not samples[-1] and s["tokens"] % stride:
            continue
        rate = "" if previous is None or s["seconds"] == previous["seconds"] else \
            f"{(s['tokens'] - previous['tokens']) / (s['seconds'] - previous['seconds']):.1f}"
        largest = max(s["containers"].items(), key=lambda kv: kv[1])
        rows.append([s["tokens"], f"{s['seconds']:.0f}", rate, f"{s['rss_mb']:.1f}", s["py_threads"],
                     s["os_threads"], s["prefetched"], f"{largest[0]} {largest[1]}",
                     f"{s['cuda_mb']:.1f}" if "cuda_mb" in s else "-"])
        previous = s
    return markdown_table(["decoded tokens", "s", "tok/s", "RSS MB", "py threads", "OS threads", "prefetch handles",
                           "largest runtime container", "cuda MB"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--link-gbps", type=float, default=0.14, help="CPU: emulated link (0.14: link ratio ~2)")
    parser.add_argument("--predictor", default="m2r2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--every", type=int, default=128, help="sample every N tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = m2r2_moe.load_builtin()
    experts = sum(int(layer.experts.num_experts) for layer in find_moe_layers(model)[1])
    stream = token_stream(tokenizer, split_files("heldout"), max_tokens=64 * 50 * args.sequences)
    prompts = [stream[i * 64 * 50 : i * 64 * 50 + 64].unsqueeze(0) for i in range(args.sequences)]  # held-out text
    link = args.link_gbps if args.device == "cpu" else None
    monitor, stats = run(model, prompts, args.new_tokens, args.every, device=args.device,
                         cache_experts=experts // 2, predictor=args.predictor, link_gbps=link)
    samples, warmup = monitor.samples, args.new_tokens  # the first sequence warms up allocator and threads
    first, last = quarters(samples, warmup)
    summary = (
        f"\n{monitor.tokens} decoded tokens in {args.sequences} sequences of {args.new_tokens} (64-token prompts), "
        f"built-in model fp32 on {args.device}, {experts // 2} of {experts} experts cached, predictor {args.predictor}"
        + (f", emulated link {link} GB/s" if link else "") + f", {args.threads} torch thread(s). "
        f"RSS {samples[0]['rss_mb']:.1f} MB at start, {statistics.median(s['rss_mb'] for s in first):.1f} MB (median, "
        f"first quarter after the warm-up sequence) -> {statistics.median(s['rss_mb'] for s in last):.1f} MB (last "
        f"quarter): growth {growth(samples, 'rss_mb', warmup):+.2f} MB; OS threads "
        f"{min(s['os_threads'] for s in samples[1:])}-{max(s['os_threads'] for s in samples[1:])}, Python threads "
        f"{min(s['py_threads'] for s in samples)}-{max(s['py_threads'] for s in samples)}; prefetch handles held "
        f"<= {max(s['prefetched'] for s in samples)}; runtime containers at the end: "
        + ", ".join(f"{k} {v}" for k, v in sorted(samples[-1]["containers"].items()) if v) + ".\n"
        f"Stats: {stats.expert_uses} expert uses, hit rate {stats.hit_rate:.1%} ({stats.prefetch_hits} prefetch hits, "
        f"{stats.late_prefetches} late, {stats.misses} misses), stall {stats.stall_seconds:.1f} s, "
        f"{stats.bytes_to_device / 1e9:.2f} GB moved.\n"
    )
    table = _table(samples, stride=max(args.every, args.new_tokens // 2))
    print(table + "\n" + summary)
    if not args.no_record:
        title = "Long run: memory, threads, bookkeeping (benchmarks/long_run.py)"
        print(f"appended to {append_section(title, table + chr(10) + summary)}")


if __name__ == "__main__":
    main()
