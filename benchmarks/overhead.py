"""All-hit decode overhead: offloaded model with a cache that holds every expert vs the original model.

Side by side in one run, interleaved rounds, medians; plus the runtime's own bookkeeping time per MoE
layer (time in `run_experts` minus time in the experts kernel it calls), the same all-hit decode with
the stall profiler's recorder attached (what leaving it on costs), and with the m2r2 prefetcher on (the runtime
floor with prediction: with nothing to load, what prefetching costs once its balance and guard have seen that it
saves nothing; built-in models' own adapters, or `--adapters`). Prints a table and appends it to BENCHMARKS.md.

    python benchmarks/overhead.py [--model builtin|random|PATH] [--adapters FILE] [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import m2r2_moe  # noqa: E402
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.loading import load_model  # noqa: E402
from m2r2_moe.profile import Recorder  # noqa: E402


def decode_seconds(model, ids, tokens: int) -> float:
    """Seconds per decoded token (prefill excluded: time of N+1 tokens minus time of 1)."""
    gen = dict(input_ids=ids, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(max_new_tokens=1, min_new_tokens=1, **gen)
        t1 = time.perf_counter()
        model.generate(max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, **gen)
        t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / tokens


class LayerTimer:
    """Times `run_experts` and the kernel inside it, to isolate the runtime's bookkeeping."""

    def __init__(self, offloader):
        self.offloader, self.total, self.kernel, self.calls = offloader, 0.0, 0.0, 0
        self._run, self._kernels = offloader.run_experts, list(offloader.kernels)
        offloader.run_experts = self._timed_run
        offloader.kernels = [self._timed_kernel(k) for k in self._kernels]

    def _timed_run(self, *args):
        start = time.perf_counter()
        out = self._run(*args)
        self.total += time.perf_counter() - start
        self.calls += 1
        return out

    def _timed_kernel(self, kernel):
        def timed(*args):
            start = time.perf_counter()
            out = kernel(*args)
            self.kernel += time.perf_counter() - start
            return out
        return timed

    def restore(self):
        self.offloader.__dict__.pop("run_experts", None)
        self.offloader.kernels = self._kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--adapters", default=None, help="m2r2 adapters for the prefetcher's row (built-in: its own)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on small CPUs)")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    plain, offloaded, recorded, timers, predicted = [], [], [], [], []
    predictor = "m2r2" if args.adapters or args.model.startswith("builtin") else None
    for _ in range(args.rounds):
        plain.append(decode_seconds(model, ids, args.tokens))
        m2r2_moe.offload(model, device="cpu", cache_experts=10**9)  # every expert fits
        decode_seconds(model, ids, args.tokens)  # warm: the same greedy run loads every expert it uses
        m2r2_moe.reset_stats(model)
        offloader = m2r2_moe.get_offloader(model)
        offloaded.append(decode_seconds(model, ids, args.tokens))  # no instrumentation
        recorder = Recorder(offloader)
        recorded.append(decode_seconds(model, ids, args.tokens))
        recorder.detach()
        timer = LayerTimer(offloader)  # its own wrappers cost time: used for the split only, not the ratios
        decode_seconds(model, ids, args.tokens)
        timer.restore()
        stats = m2r2_moe.stats(model)
        m2r2_moe.remove_offload(model)
        assert stats.misses == 0, "the all-hit run must not load any expert"
        timers.append(timer)
        if predictor is not None:
            m2r2_moe.offload(model, device="cpu", cache_experts=10**9, predictor=predictor, adapters=args.adapters)
            decode_seconds(model, ids, args.tokens)  # warm, as above
            m2r2_moe.reset_stats(model)
            predicted.append(decode_seconds(model, ids, args.tokens))
            misses = m2r2_moe.stats(model).misses
            m2r2_moe.remove_offload(model)
            assert misses == 0, "the all-hit run must not load any expert on demand"
    t_plain, t_off, t_rec = statistics.median(plain), statistics.median(offloaded), statistics.median(recorded)
    per_layer = statistics.median((t.total - t.kernel) / t.calls for t in timers) * 1e6
    kernel_per_layer = statistics.median(t.kernel / t.calls for t in timers) * 1e6
    rows = [
        ["original", f"{1 / t_plain:.1f}", f"{t_plain * 1e3:.2f}", "1.00"],
        ["offloaded, all hits", f"{1 / t_off:.1f}", f"{t_off * 1e3:.2f}", f"{t_off / t_plain:.3f}"],
        ["offloaded, all hits, profiler recording", f"{1 / t_rec:.1f}", f"{t_rec * 1e3:.2f}", f"{t_rec / t_plain:.3f}"],
    ]
    if predicted:
        t_pred = statistics.median(predicted)
        rows.append(["offloaded, all hits, m2r2 prefetcher on", f"{1 / t_pred:.1f}", f"{t_pred * 1e3:.2f}",
                     f"{t_pred / t_plain:.3f}"])
    table = markdown_table(["model", "decode tok/s", "ms/token", "time ratio"], rows)
    extra = (f"\nRuntime bookkeeping per MoE layer call (run_experts minus the experts kernel): "
             f"{per_layer:.1f} µs; the experts kernel itself: {kernel_per_layer:.1f} µs. "
             f"Model: {args.model}, {args.tokens} decode tokens, median of {args.rounds} interleaved rounds, "
             f"{args.threads} torch thread(s). Targets: all hits ≤ 1.3; with the m2r2 prefetcher on ≤ 1.10.\n")
    publish("All-hit decode overhead (benchmarks/overhead.py)", table, extra, record=not args.no_record)


if __name__ == "__main__":
    main()
