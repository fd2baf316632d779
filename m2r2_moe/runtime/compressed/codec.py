"""Quantizing an expert into its compressed row, and expanding the row back into a slot.

Quantization is torchao's group-wise affine scheme (`choose_qparams_affine` / `quantize_affine`, min-max
scales, zero points in the integer domain, round half to even): the math is the library's; the packing
(layout.py) and the expansion are ours, so that our own kernels can expand the bytes that cross the link.
The expansion computes, per weight, `float32(q - z) * float32(s)` (one rounding) and rounds that to the
model's dtype (round to nearest even), exactly as torchao's `dequantize_affine(..., output_dtype=float32)`
followed by `.to(dtype)`. Three implementations compute it: `expand_into` (torch ops, the CPU copy engine's
worker runs it), `expand_reference` (its plain twin: per-element integer arithmetic in numpy, the bytes read
by hand) and the CUDA kernel (cuda_kernel.py); tests hold them equal bit for bit.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from .layout import RowLayout, Segment

logger = logging.getLogger(__name__)

CHUNK = 1 << 18  # weights quantized at once (1 MB of float32 temporaries)
SCALE_EPS = 2.0**-14  # smallest normal float16: a scale below it would lose precision (or be 0)
_torchao = None


class MissingDependencyError(ImportError):
    """A compressed expert format needs torchao (`pip install 'm2r2_moe[compress]'`)."""


def quant_primitives():
    """torchao's affine quantization primitives, imported on first use (its import is slow and chatty)."""
    global _torchao
    if _torchao is None:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # its optional kernels it cannot load here, each with a warning
        try:
            from torchao.quantization import quant_primitives as qp
        except ImportError as e:
            raise MissingDependencyError(
                "expert_format='int8' / 'int4' quantizes with torchao, which is not installed: "
                "pip install 'm2r2_moe[compress]' (or pip install torchao)") from e
        finally:
            logging.disable(previous)
        _torchao = qp
    return _torchao


def quantize(weights: torch.Tensor, layout: RowLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [G, group] uint8, scales [G] float16, zero points [G] int32) of `weights` (any shape, the
    model's dtype), grouped along its row-major flattening. Scales are chosen in float32 and stored in
    float16; the codes are computed with the stored scales, so the expansion reproduces what torchao's
    dequantization gives for exactly these parameters."""
    qp = quant_primitives()
    fmt = layout.format
    w = weights.detach().reshape(-1, fmt.group_size).to(torch.float32)  # [G, group]
    mapping = qp.MappingType.SYMMETRIC if fmt.symmetric else qp.MappingType.ASYMMETRIC
    block = (1, fmt.group_size)
    scale, zero = qp.choose_qparams_affine(w, mapping, block, torch.uint8, 0, fmt.qmax, eps=SCALE_EPS,
                                           scale_dtype=torch.float16, zero_point_dtype=torch.int32)
    if not torch.isfinite(scale).all():
        raise ValueError("expert weights too large for float16 group scales (|w| > 65504 * 7.5); keep "
                         "expert_format='model' for this model")
    codes = qp.quantize_affine(w, block, scale, zero, torch.uint8, 0, fmt.qmax)  # [G, group]
    return codes, scale.reshape(-1), zero.reshape(-1)


def encode(tensors: dict[str, torch.Tensor], layout: RowLayout, row: torch.Tensor) -> None:
    """Write one expert (`name -> tensor` in the model's dtype, per-expert shapes) into its compressed row
    `[nbytes]` uint8. Quantized in chunks of `CHUNK` weights: the float32 temporaries stay small (host memory
    while from_pretrained streams a large model is the compressed store plus little more)."""
    fmt = layout.format
    for seg in layout.segments:
        value = tensors[seg.name].reshape(-1)
        if not seg.quantized:
            layout.raw(row, seg).copy_(value)
            continue
        out_codes, out_scales, out_zeros = layout.sections(row, seg)
        step = max(CHUNK // fmt.group_size, 1) * fmt.group_size  # weights per chunk, whole groups
        for start in range(0, seg.numel, step):
            codes, scales, zeros = quantize(value[start : start + step], layout)
            flat = codes.reshape(-1)  # [chunk]
            g0, g1 = start // fmt.group_size, start // fmt.group_size + scales.numel()
            if fmt.bits == 4:
                flat = flat[0::2] | (flat[1::2] << 4)
            out_codes[start * fmt.bits // 8 : start * fmt.bits // 8 + flat.numel()].copy_(flat)
            out_scales[g0:g1].copy_(scales)
            if out_zeros is not None:
                out_zeros[g0:g1].copy_(zeros.to(torch.uint8))


def expand_into(layout: RowLayout, row: torch.Tensor, dst: torch.Tensor) -> None:
    """Expand a compressed row `[nbytes]` uint8 into a slot row `dst` `[numel]` (the model's dtype); the
    alignment gaps of `dst` are not written. On CPU the integer work is numpy's (several times faster than
    torch's uint8 ops at these sizes), on CUDA torch ops on the current stream (the fused kernel's fallback)."""
    for seg in layout.segments:
        out = dst[seg.dst : seg.dst + seg.numel]
        if not seg.quantized:
            out.copy_(layout.raw(row, seg))
            continue
        codes, scales, zeros = layout.sections(row, seg)
        if row.device.type == "cpu":
            values = torch.from_numpy(_values_numpy(layout, seg, codes.numpy(), scales.numpy(),
                                                    None if zeros is None else zeros.numpy()))
        else:
            values = _values_torch(layout, seg, codes, scales, zeros)
        out.view(seg.groups, -1).copy_(values)  # [G, group], rounded to the slot's dtype


def _values_numpy(layout: RowLayout, seg: Segment, codes, scales, zeros) -> np.ndarray:
    """float32 (q - z) * s `[G, group]` with numpy (codes unpacked straight into the float32 result)."""
    if layout.format.bits == 8:
        values = codes.astype(np.float32).reshape(seg.groups, -1)
    else:
        values = np.empty((codes.size, 2), dtype=np.float32)  # [numel / 2, 2]: low nibble first
        np.bitwise_and(codes, 15, out=values[:, 0], casting="unsafe")
        np.right_shift(codes, 4, out=values[:, 1], casting="unsafe")
        values = values.reshape(seg.groups, -1)
    values -= layout.zero_point if zeros is None else zeros.astype(np.float32)[:, None]
    values *= scales.astype(np.float32)[:, None]
    return values


def _values_torch(layout: RowLayout, seg: Segment, codes, scales, zeros) -> torch.Tensor:
    """float32 (q - z) * s `[G, group]` with torch ops (CUDA tensors: on the current stream)."""
    if layout.format.bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=1)
    values = codes.to(torch.float32).view(seg.groups, -1)
    values.sub_(layout.zero_point if zeros is None else zeros.to(torch.float32).unsqueeze(1))
    return values.mul_(scales.to(torch.float32).unsqueeze(1))


def expand_reference(layout: RowLayout, row: torch.Tensor) -> torch.Tensor:
    """The plain twin of `expand_into`: a fresh `[numel]` slot row (model dtype, gaps zero) computed element by
    element with numpy integers from the bytes, for tests and for checking a fast path."""
    data = row.cpu().numpy()
    dtype = layout.packing.dtype
    out = torch.zeros(layout.numel, dtype=dtype)
    for seg in layout.segments:
        if not seg.quantized:
            out[seg.dst : seg.dst + seg.numel] = layout.raw(row.cpu(), seg)
            continue
        out[seg.dst : seg.dst + seg.numel] = torch.from_numpy(_reference_values(layout, seg, data)).to(dtype)
    return out


def _reference_values(layout: RowLayout, seg: Segment, data: np.ndarray) -> np.ndarray:
    """float32 (q - z) * s of every element of one quantized tensor, read from the raw bytes."""
    fmt, index = layout.format, np.arange(seg.numel)
    if fmt.bits == 8:
        q = data[seg.codes + index].astype(np.int32)
    else:
        byte = data[seg.codes + index // 2].astype(np.int32)
        q = np.where(index % 2 == 0, byte & 0xF, byte >> 4)
    group = index // fmt.group_size
    scales = data[seg.scales : seg.scales + 2 * seg.groups].view(np.float16).astype(np.float32)
    zeros = (np.full(seg.groups, layout.zero_point, np.int32) if seg.zeros < 0
             else data[seg.zeros : seg.zeros + seg.groups].astype(np.int32))
    return (q - zeros[group]).astype(np.float32) * scales[group]


class Expansion:
    """What a copy engine is handed with a compressed copy (`submit(..., expand=...)`): expands the row it
    moved into the slot. `expand` runs on the host (the CPU engine's worker, timed: `seconds`);
    `on_device` queues the copy of the row and its expansion on a CUDA stream (cuda_kernel.py)."""

    def __init__(self, layout: RowLayout):
        self.layout = layout
        self.numel = layout.numel  # slot elements the expansion covers (the model-dtype row)
        self.nbytes = layout.nbytes
        self._seconds = 0.0  # host seconds spent expanding (CPU) since the last drain
        self._lock = threading.Lock()  # the copy engine's worker adds, the runtime's counters drain
        self._device = None

    def expand(self, dst: torch.Tensor, src: torch.Tensor) -> float:
        """Expand the compressed row `src` into `dst` on the host; returns the seconds it took."""
        start = time.perf_counter()
        expand_into(self.layout, src, dst)
        spent = time.perf_counter() - start
        with self._lock:
            self._seconds += spent
        return spent

    def on_device(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        """Queue, on `stream`, the copy of the host row `src` to the device and its expansion into `dst`."""
        from .cuda_kernel import DeviceExpander

        if self._device is None:
            self._device = DeviceExpander(self.layout, expand_into)
        self._device.run(dst, src, stream)

    def drain_seconds(self) -> float:
        """Host seconds spent expanding since the last call."""
        with self._lock:
            spent, self._seconds = self._seconds, 0.0
        return spent
