"""On a GPU: one compressed expert copy (row copy + expansion kernel on the copy stream) against the plain bf16
copy it replaces, on Mixtral-8x7B expert geometry (gate_up [28672, 4096], down [4096, 14336]: 352 MB in bf16).

Rows hold random bytes (codes, float16 scales, zero points: the expansion's cost does not depend on the
values, and no quantizer is needed on the GPU machine). Times are CUDA events on one stream, fastest of
`--repeats`: the plain copy, the compressed copy with its expansion, and the expansion alone. Run by
benchmarks/gpu_check.sh; prints a table and writes --json.

    PYTHONPATH=. python benchmarks/gpu_expand.py [--json expand.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from m2r2_moe.config import parse_expert_format
from m2r2_moe.runtime.compressed import RowLayout, codec, cuda_kernel
from m2r2_moe.runtime.store import ExpertPacking

NAMES, SHAPES = ["gate_up_proj", "down_proj"], [(28672, 4096), (4096, 14336)]


def timed(fn, stream: torch.cuda.Stream, repeats: int) -> float:
    """Fastest of `repeats` runs of `fn()` (queued on `stream`), in seconds, from CUDA events."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up (kernel compile, staging allocation)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="int8,int4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    stream = torch.cuda.Stream()
    packing = ExpertPacking.from_shapes(NAMES, SHAPES, torch.bfloat16)
    plain = torch.zeros(packing.numel, dtype=torch.bfloat16).pin_memory()
    slot = torch.empty(packing.numel, dtype=torch.bfloat16, device="cuda")
    results = {"expert_bytes_bf16": packing.nbytes,
               "plain_copy_s": timed(lambda: slot.copy_(plain, non_blocking=True), stream, args.repeats)}
    for spec in args.formats.split(","):
        layout = RowLayout.build(packing, parse_expert_format(spec))
        row = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8)
        for seg in layout.segments:
            layout.sections(row, seg)[1].copy_(torch.rand(seg.groups) * 0.01)  # finite scales
        row = row.pin_memory()
        expansion = codec.Expansion(layout)
        copy_and_expand = timed(lambda: expansion.on_device(slot, row, stream), stream, args.repeats)
        staging = expansion._device._staging[stream.cuda_stream]
        fused = cuda_kernel._cupy_failed is None
        expand_only = timed(lambda: (expansion._device._fused(slot, staging, stream) if fused
                                     else codec.expand_into(layout, staging, slot)), stream, args.repeats)
        results[spec] = {"row_bytes": layout.nbytes, "copy_and_expand_s": copy_and_expand, "expand_s": expand_only,
                         "kernel": "fused cupy" if fused else f"torch ops ({cuda_kernel._cupy_failed})"}
    print("| format | bytes | copy (+ expansion) ms | expansion ms | vs bf16 copy | kernel |\n|---|---|---|---|---|---|")
    print(f"| bf16 | {packing.nbytes / 1e6:.0f} MB | {results['plain_copy_s'] * 1e3:.2f} | - | 1.00 | copy_ |")
    for spec in args.formats.split(","):
        r = results[spec]
        print(f"| {spec} | {r['row_bytes'] / 1e6:.0f} MB | {r['copy_and_expand_s'] * 1e3:.2f} | {r['expand_s'] * 1e3:.2f} "
              f"| {r['copy_and_expand_s'] / results['plain_copy_s']:.2f} | {r['kernel']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
