"""The expansion of compressed expert rows, without the quantizer: rows of random codes, scales and zero points
(every byte pattern a row can hold), expanded by the CPU path, the reference twin and, on a GPU, the fused
CUDA kernel and its torch-ops fallback; all must agree bit for bit."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from m2r2_moe.config import parse_expert_format
from m2r2_moe.runtime.compressed import RowLayout, codec
from m2r2_moe.runtime.store import ExpertPacking

SPECS = ["int8", "int4", "int8-sym", "int4-sym", "int4-g32", "int8-g256-sym"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_row(spec: str, dtype: torch.dtype, seed: int = 0) -> tuple[RowLayout, torch.Tensor]:
    """A GPT-OSS-like expert layout (transposed gate_up with a bias, down with a bias) and a row of random
    bytes whose scales are finite float16 values of either sign and any magnitude a weight group may have."""
    names = ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"]
    packing = ExpertPacking.from_shapes(names, [(64, 96), (96,), (48, 64), (64,)], dtype)
    layout = RowLayout.build(packing, parse_expert_format(spec))
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8, generator=g)
    for seg in layout.segments:
        if seg.quantized:
            scales = layout.sections(row, seg)[1]
            scales.copy_((torch.rand(seg.groups, generator=g) * 2 - 1) * 10 ** torch.randint(-4, 1, (seg.groups,),
                                                                                             generator=g))
        else:
            layout.raw(row, seg).copy_(torch.randn(seg.numel, generator=g))
    return layout, row


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def covered(layout: RowLayout) -> torch.Tensor:
    mask = torch.zeros(layout.numel, dtype=torch.bool)
    for seg in layout.segments:
        mask[seg.dst : seg.dst + seg.numel] = True
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS)
def test_cpu_expansion_equals_the_twin_on_random_rows(spec, dtype):
    layout, row = random_row(spec, dtype)
    fast = torch.full((layout.numel,), 7.0, dtype=dtype)
    codec.Expansion(layout).expand(fast, row)
    reference = codec.expand_reference(layout, row)
    mask = covered(layout)
    assert torch.equal(bits(fast)[mask], bits(reference)[mask])
    assert (fast[~mask] == 7.0).all()  # the alignment gaps are never written


def test_layout_sections_do_not_overlap_and_fit():
    for spec in SPECS:
        layout, _ = random_row(spec, torch.bfloat16)
        spans = []
        for seg in layout.segments:
            if seg.quantized:
                spans.append((seg.codes, seg.codes + seg.numel * layout.format.bits // 8))
                spans.append((seg.scales, seg.scales + 2 * seg.groups))
                if seg.zeros >= 0:
                    spans.append((seg.zeros, seg.zeros + seg.groups))
            else:
                spans.append((seg.codes, seg.codes + seg.numel * 2))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= layout.nbytes
        assert all(start % 16 == 0 for start, _ in spans) and layout.nbytes % 64 == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_expansion_equals_the_twin(spec, dtype, path, monkeypatch):
    """On the copy stream: the fused CuPy kernel (when CuPy is installed) and the torch-ops fallback."""
    from m2r2_moe.runtime.compressed import cuda_kernel

    if path == "fused":
        pytest.importorskip("cupy")
        monkeypatch.setattr(cuda_kernel, "_cupy_failed", None)
    else:
        monkeypatch.setattr(cuda_kernel, "_cupy_failed", "the torch-ops path is under test")
    layout, row = random_row(spec, dtype, seed=1)
    row = row.pin_memory()
    dst = torch.full((layout.numel,), 7.0, dtype=dtype, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        codec.Expansion(layout).on_device(dst, row, stream)
    stream.synchronize()
    if path == "fused":
        assert cuda_kernel._cupy_failed is None, cuda_kernel._cupy_failed  # the kernel ran, no fallback
    mask = covered(layout)
    got = dst.cpu()
    assert torch.equal(bits(got)[mask], bits(codec.expand_reference(layout, row))[mask])
    assert (got[~mask] == 7.0).all()


HOST_HARNESS = """
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
struct D3 { long long x; }; D3 blockIdx{0}, blockDim{1}, threadIdx{0}, gridDim{1};
inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
SOURCE
int main(int argc, char** argv) {  // row file, row bytes, table file, table entries, slot elements, element size, total, out
  std::vector<unsigned char> row(atol(argv[2]));
  std::vector<long long> table(atol(argv[4]));
  FILE* f = fopen(argv[1], "rb"); if (fread(row.data(), 1, row.size(), f) != row.size()) return 2; fclose(f);
  f = fopen(argv[3], "rb"); if (fread(table.data(), 8, table.size(), f) != table.size()) return 3; fclose(f);
  std::vector<unsigned char> out(atol(argv[5]) * atoi(argv[6]), 0xAB);
  NAME((unsigned long long)row.data(), (unsigned long long)out.data(), (unsigned long long)table.data(),
       (int)(table.size() / 8), atoll(argv[7]));
  f = fopen(argv[8], "wb"); fwrite(out.data(), 1, out.size(), f); fclose(f);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_source_run_on_the_host_equals_the_twin(dtype, tmp_path):
    """The CUDA kernel's own source, compiled for the host (one thread; its two PTX float16 conversions
    replaced by the compiler's `_Float16` ones, both round to nearest even): its indexing, nibble order, zero
    points and rounding give the twin's bits, and it leaves the gaps alone. On a GPU the real thing is tested
    by test_cuda_expansion_equals_the_twin."""
    from m2r2_moe.runtime.compressed.cuda_kernel import kernel_source

    name, source = kernel_source(dtype)
    source = source.replace('float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;',
                            "_Float16 x; memcpy(&x, &h, 2); return (float)x;")
    source = source.replace('unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h;',
                            "_Float16 x = (_Float16)v; unsigned short h; memcpy(&h, &x, 2); return h;")
    assert "asm" not in source
    (tmp_path / "k.cpp").write_text(HOST_HARNESS.replace("SOURCE", source).replace("NAME", name))
    build = subprocess.run(["g++", "-O1", "-ffp-contract=off", "-o", str(tmp_path / "k"), str(tmp_path / "k.cpp")],
                           capture_output=True, text=True)
    if build.returncode != 0 and "_Float16" in build.stderr:
        pytest.skip("this compiler has no _Float16")
    assert build.returncode == 0, build.stderr[-2000:]
    for spec in SPECS:
        layout, row = random_row(spec, dtype, seed=4)
        row.numpy().tofile(tmp_path / "row.bin")
        table = np.array(layout.table(), dtype=np.int64)
        table.tofile(tmp_path / "table.bin")
        run = subprocess.run([str(tmp_path / "k"), str(tmp_path / "row.bin"), str(layout.nbytes),
                              str(tmp_path / "table.bin"), str(table.size), str(layout.numel), str(dtype.itemsize),
                              str(layout.total), str(tmp_path / "out.bin")], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        out = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.uint8))
        mask = covered(layout)
        assert torch.equal(bits(out.view(dtype))[mask], bits(codec.expand_reference(layout, row))[mask]), spec
        assert (out.view(-1, dtype.itemsize)[~mask] == 0xAB).all(), spec
