"""Host→device bandwidth of the copy engines against one plain large pinned `copy_` (needs a GPU).

For each expert size, the same pinned host bytes (about `--total-gb`) are moved three ways, each timed
with CUDA events on the stream that does the copies (best of `--reps`):

- plain:  one `dst.copy_(src, non_blocking=True)` of the whole buffer, the ceiling of the link;
- native: the native engine (csrc/copy_engine.cu), one submit per expert, one event per expert;
- torch:  the torch twin (cuda_engine.CudaCopyEngine), one submit per expert.

Also the host time per submit (what the per-layer hot path pays). Target: native ≥ 90% of plain.
Writes bandwidth.json and bandwidth.md into --out.

    python benchmarks/copy_bandwidth.py [--out DIR] [--total-gb 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, markdown_table  # noqa: E402

from m2r2_moe import _ext  # noqa: E402
from m2r2_moe.runtime.cuda_engine import CudaCopyEngine  # noqa: E402
from m2r2_moe.runtime.transfer import PREFETCH  # noqa: E402

MiB = 1 << 20


def timed_on(stream: torch.cuda.Stream, enqueue) -> tuple[float, float]:
    """(device seconds between events around `enqueue()` on `stream`, host seconds spent in `enqueue`)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record(stream)
    t0 = time.perf_counter()
    enqueue()
    host = time.perf_counter() - t0
    end.record(stream)
    end.synchronize()  # measurement only
    return start.elapsed_time(end) / 1e3, host


def measure(expert_bytes: int, count: int, reps: int) -> dict:
    numel = expert_bytes  # uint8 buffers: one byte per element
    src = torch.randint(0, 255, (count, numel), dtype=torch.uint8).pin_memory()  # [N, bytes]
    pool = torch.empty(count, numel, dtype=torch.uint8, device="cuda")  # [N, bytes] device slots
    side = torch.cuda.Stream()
    total = count * expert_bytes
    result = {"expert_MiB": expert_bytes / MiB, "experts": count, "total_GB": total / 1e9}

    def plain():
        with torch.cuda.stream(side):
            pool.copy_(src, non_blocking=True)

    result["plain_GBps"] = total / min(timed_on(side, plain)[0] for _ in range(reps)) / 1e9
    engines = {"torch": CudaCopyEngine(torch.device("cuda"))}
    from m2r2_moe.runtime import cuda_native

    reason = cuda_native.available()
    if not reason:
        engines["native"] = cuda_native.NativeCudaCopyEngine(torch.device("cuda"))
    else:
        result["native_error"] = reason
    for name, engine in engines.items():
        runs = []
        for _ in range(reps):
            handles = []
            runs.append(timed_on(engine.stream, lambda: handles.extend(
                engine.submit(i, i, pool[i], src[i], PREFETCH) for i in range(count))))
            del handles
        result[f"{name}_GBps"] = total / min(r[0] for r in runs) / 1e9
        result[f"{name}_submit_us"] = min(r[1] for r in runs) / count * 1e6
        result[f"{name}_vs_plain"] = result[f"{name}_GBps"] / result["plain_GBps"]
        engine.close()
    return result


def check_bytes(count: int = 8, expert_bytes: int = 3 * MiB + 17) -> bool:
    """The native engine's copies land byte for byte (odd size on purpose)."""
    from m2r2_moe.runtime import cuda_native

    if cuda_native.available():
        return False
    src = torch.randint(0, 255, (count, expert_bytes), dtype=torch.uint8).pin_memory()
    pool = torch.zeros(count, expert_bytes, dtype=torch.uint8, device="cuda")
    engine = cuda_native.NativeCudaCopyEngine(torch.device("cuda"))
    for t in [engine.submit(i, i, pool[i], src[i]) for i in range(count)]:
        t.wait()
    torch.cuda.synchronize()
    engine.close()
    return bool(torch.equal(pool.cpu(), src))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--total-gb", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes-mib", default="2,16,64,336", help="expert sizes (336 MiB ≈ one Mixtral-8x7B expert)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    results = {"machine": machine(), "ext": _ext.summary(), "bytes_ok": check_bytes(), "cases": []}
    for size_mib in (float(s) for s in args.sizes_mib.split(",")):
        expert_bytes = int(size_mib * MiB)
        count = max(2, int(args.total_gb * 1e9 // expert_bytes))
        results["cases"].append(measure(expert_bytes, count, args.reps))
        print(json.dumps(results["cases"][-1]), flush=True)
    (out / "bandwidth.json").write_text(json.dumps(results, indent=2))
    rows = [[f"{c['expert_MiB']:g}", c["experts"], f"{c['plain_GBps']:.1f}",
             f"{c.get('native_GBps', float('nan')):.1f}", f"{c.get('native_vs_plain', float('nan')):.1%}",
             f"{c.get('native_submit_us', float('nan')):.1f}", f"{c['torch_GBps']:.1f}",
             f"{c['torch_vs_plain']:.1%}", f"{c['torch_submit_us']:.1f}"] for c in results["cases"]]
    table = markdown_table(["expert MiB", "experts", "plain copy_ GB/s", "native GB/s", "native / plain",
                            "native µs/submit (host)", "torch twin GB/s", "torch / plain", "torch µs/submit"], rows)
    text = (f"{table}\n\nMachine: {results['machine']}. Best of {args.reps}; device time between CUDA events on "
            f"the copying stream. Native copies byte-exact: {results['bytes_ok']}. Target: native ≥ 90% of plain.\n")
    (out / "bandwidth.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
