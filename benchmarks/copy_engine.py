"""What the CPU copy engines cost the compute thread: queueing a copy, waiting for it, and torch ops while copies fly.

Side by side in one run, for the Python worker (`runtime/cpu_engine.py`), the C++ worker sleeping between copies
and the C++ worker polling (`runtime/cpu_native.py`, polling where torch leaves a core free):

- `submit µs`: the time `submit` takes in the compute thread, for a copy of one expert's size after ~100 µs of
  Python work (the worker idle since its last copy, as between two layers);
- `wait overshoot µs`: how long after the emulated link time `wait` returns (the waiter's wake-up);
- `detach µs`: a trivial torch op (`x.detach()`) in the compute thread while prefetches hold the link, mean and
  max: the GIL handoffs a Python worker makes (the compute thread's ops release the GIL and must take it back).

Prints a table and appends it to BENCHMARKS.md.

    python benchmarks/copy_engine.py [--copies 300] [--expert-mb 0.4] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.runtime import cpu_native  # noqa: E402
from m2r2_moe.runtime.cpu_engine import ThreadCopyEngine  # noqa: E402
from m2r2_moe.runtime.transfer import PREFETCH  # noqa: E402

LINK_S = 0.0006  # emulated link time of one copy: about link ratio 0.5 on the built-in model


def _python_work() -> None:
    x = 0
    for _ in range(2000):  # ~100 µs of interpreter work, no GIL release
        x += 1


def measure(make, copies: int, numel: int) -> dict:
    """Median submit time, wait overshoot and detach time for one engine."""
    src, dst = torch.randn(numel), torch.zeros(numel)
    engine = make(numel * 4 / LINK_S / 1e9)
    submit, overshoot, detach = [], [], []
    try:
        for i in range(copies):
            _python_work()
            start = time.perf_counter()
            transfer = engine.submit(i, 0, dst, src, PREFETCH)
            queued = time.perf_counter()
            transfer.wait()
            submit.append(queued - start)
            overshoot.append(time.perf_counter() - queued - LINK_S)
        x = torch.randn(8)
        for i in range(copies // 10):  # ten prefetches queued, then torch ops while they hold the link
            transfers = [engine.submit(i * 10 + j, j, torch.zeros(numel), src, PREFETCH) for j in range(10)]
            while not transfers[-1].ready():
                start = time.perf_counter()
                x.detach()
                detach.append(time.perf_counter() - start)
    finally:
        engine.close()
    return {"submit": statistics.median(submit), "overshoot": statistics.median(overshoot),
            "detach": statistics.fmean(detach), "detach_max": max(detach)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--expert-mb", type=float, default=0.4)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a core left free: the native worker polls
    numel = int(args.expert_mb * 1e6 / 4)
    engines = [("Python worker (cpu_engine)", lambda gbps: ThreadCopyEngine(gbps))]
    if cpu_native.available():
        engines += [("C++ worker, sleeping", lambda gbps: cpu_native.NativeCopyEngine(gbps, spin=False)),
                    ("C++ worker, polling (default with a free core)",
                     lambda gbps: cpu_native.NativeCopyEngine(gbps, spin=True))]
    else:
        print(f"native copy engine not built: {cpu_native._ext.PLANNER_ERROR}")
    rows = []
    for name, make in engines:
        r = measure(make, args.copies, numel)
        rows.append([name, f"{r['submit'] * 1e6:.1f}", f"{r['overshoot'] * 1e6:.1f}", f"{r['detach'] * 1e6:.1f}",
                     f"{r['detach_max'] * 1e6:.0f}"])
    table = markdown_table(["engine", "submit µs", "wait overshoot µs", "detach µs (mean)", "detach µs (max)"], rows)
    extra = (f"\nsubmit and wait: medians over {args.copies} copies of {args.expert_mb} MB on an emulated link of {LINK_S * 1e3:.1f} ms "
             "per copy, 1 torch thread; `detach`: mean and max of every call while ten prefetches at a time hold the link (a GIL handoff "
             "hits few calls, each by much).\n")
    publish("CPU copy engines: what they cost the compute thread (benchmarks/copy_engine.py)", table, extra,
            record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
