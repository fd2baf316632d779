"""Expanding compressed experts on a CUDA copy stream: one fused kernel per expert copy.

`DeviceExpander.run(dst, src, stream)` queues on `stream`: the copy of the compressed host row (pinned) into a
device staging row, then the expansion of every tensor of the expert into the slot row `dst`, in one launch
of a CuPy `RawKernel` (compiled at run time by NVRTC: no nvcc needed). The staging row is reused by the next
copy on the same stream, which stream order queues after this kernel. Without CuPy (or when its first
compile or launch fails) the expansion runs as torch ops on the same stream, with a warning once: the same
arithmetic, a few kernels instead of one.

The kernel computes what codec.expand_into computes, bit for bit: `float(q - z) * float(scale)` (one rounding;
no multiply-add to contract) rounded to the slot's dtype to nearest even (bfloat16 by its bits, float16 by
`cvt.rn.f16.f32`). It has not been run on a GPU where this was written: `benchmarks/gpu_check.sh` runs its
twin test and measures it.
"""

from __future__ import annotations

import logging

import torch

from .layout import RowLayout

logger = logging.getLogger(__name__)

THREADS = 256
MAX_BLOCKS = 4096  # a grid-stride loop covers the rest

_SOURCE = r"""
__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short to_bf16(float v) {
    unsigned int x = __float_as_uint(v);
    x += 0x7FFFu + ((x >> 16) & 1u);
    return (unsigned short)(x >> 16);
}
__device__ __forceinline__ unsigned short to_f16(float v) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h;
}
__device__ __forceinline__ float to_f32(float v) { return v; }

extern "C" __global__ void NAME(unsigned long long src_ptr, unsigned long long dst_ptr,
                                unsigned long long table_ptr, int nseg, long long total) {
    const unsigned char* src = (const unsigned char*)src_ptr;
    OUT* dst = (OUT*)dst_ptr;
    const long long* table = (const long long*)table_ptr;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int s = 0;
        while (s + 1 < nseg && i >= table[(s + 1) * 8]) ++s;
        const long long* t = table + s * 8;
        long long j = i - t[0];
        long long out = t[2] + j;
        int kind = (int)t[3];
        if (kind == 0) { dst[out] = ((const OUT*)(src + t[4]))[j]; continue; }
        int q;
        if (kind == 8) q = src[t[4] + j];
        else { int b = src[t[4] + (j >> 1)]; q = (j & 1) ? (b >> 4) : (b & 15); }
        long long g = j / t[7];
        float scale = half_to_float(((const unsigned short*)(src + t[5]))[g]);
        int zero = t[6] >= 0 ? (int)src[t[6] + g] : (1 << (kind - 1));
        float v = (float)(q - zero) * scale;
        dst[out] = CONVERT(v);
    }
}
"""

_KERNELS = {  # slot dtype -> (kernel name, element type, conversion)
    torch.bfloat16: ("expand_bf16", "unsigned short", "to_bf16"),
    torch.float16: ("expand_f16", "unsigned short", "to_f16"),
    torch.float32: ("expand_f32", "float", "to_f32"),
}
_compiled: dict = {}
_cupy_failed: str | None = None  # why the fused kernel is not used (warned once)


def kernel_source(dtype: torch.dtype) -> tuple[str, str]:
    """(name, CUDA source) of the expansion kernel writing `dtype` slots."""
    name, out, convert = _KERNELS[dtype]
    return name, _SOURCE.replace("NAME", name).replace("OUT", out).replace("CONVERT", convert)


def _kernel(dtype: torch.dtype):
    if dtype not in _compiled:
        import cupy  # optional: imports without a GPU, fails on the first device call

        name, source = kernel_source(dtype)
        _compiled[dtype] = cupy.RawKernel(source, name)
    return _compiled[dtype]


class DeviceExpander:
    """Copy-and-expand of one layer's compressed rows on CUDA streams (the segment table is uploaded once
    per device; one staging row per stream)."""

    def __init__(self, layout: RowLayout, fallback):
        self.layout = layout
        self.fallback = fallback  # fallback(layout, row, dst): the same expansion as torch ops (codec.expand_into)
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._staging: dict[int, torch.Tensor] = {}  # stream handle -> [nbytes] uint8 on its device

    def run(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """Queue on `stream` (the current stream inside `torch.cuda.stream(stream)`): row copy, expansion."""
        staging = self._staging.get(stream.cuda_stream)
        if staging is None:
            staging = self._staging[stream.cuda_stream] = torch.empty(self.layout.nbytes, dtype=torch.uint8,
                                                                       device=dst.device)
        staging[: src.numel()].copy_(src, non_blocking=True)
        if not self._fused(dst, staging, stream):
            self.fallback(self.layout, staging, dst)

    def _fused(self, dst: torch.Tensor, staging: torch.Tensor, stream) -> bool:
        global _cupy_failed
        if _cupy_failed is not None or dst.dtype not in _KERNELS:
            return False
        try:
            import cupy

            table = self._table(dst.device)
            kernel = _kernel(dst.dtype)
            total = self.layout.total
            blocks = max(1, min(MAX_BLOCKS, -(-total // THREADS)))
            with cupy.cuda.Device(dst.device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
                kernel((blocks,), (THREADS,), (cupy.uint64(staging.data_ptr()), cupy.uint64(dst.data_ptr()),
                                               cupy.uint64(table.data_ptr()), cupy.int32(len(self.layout.segments)),
                                               cupy.int64(total)))
            return True
        except Exception as e:  # noqa: BLE001 — no CuPy, no NVRTC, no driver: the torch ops do the same
            _cupy_failed = repr(e)
            logger.warning("the fused CUDA expansion kernel is unavailable (%s); expanding compressed experts with "
                           "torch ops on the copy stream instead (same values, a few kernels per copy). Install "
                           "the CuPy wheel for torch's CUDA (e.g. pip install cupy-cuda12x) for the fused kernel.", e)
            return False

    def _table(self, device: torch.device) -> torch.Tensor:
        table = self._tables.get(device)
        if table is None:  # once per device, on the copy stream (the current one here)
            table = self._tables[device] = torch.tensor(self.layout.table(), dtype=torch.int64).to(device)
        return table
