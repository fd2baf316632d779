"""The compressed row of one expert: where each tensor's codes, scales and zero points sit.

An expert's packed row in the model's dtype (`ExpertPacking`: `gate_up_proj`, `down_proj`, biases at aligned
offsets) becomes one row of bytes. Each weight matrix (2-D or more) whose size is a multiple of the group
size is *quantized*: its elements, flattened in row-major order, are cut into groups of `group_size`
consecutive weights; each group has a float16 scale s and, for asymmetric formats, a uint8 zero point z
(symmetric formats use z = 2^(bits-1)), and each weight a `bits`-bit code q, with w ≈ (q - z) * s. int4
codes are packed two per byte, element 2i in the low nibble, 2i+1 in the high one. Other tensors (biases,
odd sizes) are kept *raw*, in the model's dtype. Every section starts at a multiple of `SECTION_ALIGN` bytes,
and the row's length is a multiple of `ROW_ALIGN`:

    [codes | scales (float16) | zero points (uint8, asymmetric only)]  per quantized tensor
    [values in the model's dtype]                                       per raw tensor
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import ExpertFormat
from ..store import ExpertPacking

SECTION_ALIGN = 16  # bytes: float16 / float32 views of a section stay aligned, vector loads too
ROW_ALIGN = 64  # bytes: a row's length (the host store's row alignment, so the row is exactly what is copied)


@dataclass(frozen=True)
class Segment:
    """One tensor of an expert inside the compressed row (byte offsets) and the slot row (element offset)."""

    name: str
    numel: int
    dst: int  # element offset in the slot row (the model-dtype packing's offset)
    quantized: bool
    codes: int  # byte offset of the codes (or of the raw values)
    scales: int = -1  # byte offset of the float16 scales
    zeros: int = -1  # byte offset of the uint8 zero points; -1: symmetric (fixed zero point)
    groups: int = 0


@dataclass(frozen=True)
class RowLayout:
    """Where everything of one compressed expert is; one per MoE layer."""

    packing: ExpertPacking  # the slot row this layout expands into (model dtype)
    format: ExpertFormat
    segments: tuple[Segment, ...]
    nbytes: int  # bytes of one compressed row (what crosses the link)

    @classmethod
    def build(cls, packing: ExpertPacking, fmt: ExpertFormat) -> "RowLayout":
        segments, cursor = [], 0
        esize = packing.dtype.itemsize
        for name, shape, offset in zip(packing.names, packing.shapes, packing.offsets):
            numel = _numel(shape)
            if len(shape) >= 2 and numel % fmt.group_size == 0:
                groups = numel // fmt.group_size
                codes = cursor
                scales = _aligned(codes + numel * fmt.bits // 8)
                zeros = -1 if fmt.symmetric else _aligned(scales + 2 * groups)
                cursor = _aligned((scales + 2 * groups) if fmt.symmetric else (zeros + groups))
                segments.append(Segment(name, numel, offset, True, codes, scales, zeros, groups))
            else:
                segments.append(Segment(name, numel, offset, False, cursor))
                cursor = _aligned(cursor + numel * esize)
        return cls(packing, fmt, tuple(segments), -(-cursor // ROW_ALIGN) * ROW_ALIGN)

    @property
    def numel(self) -> int:
        """Elements of the slot row the expansion writes into (the model-dtype packing's row)."""
        return self.packing.numel

    @property
    def zero_point(self) -> int:
        """The fixed zero point of a symmetric format."""
        return 1 << (self.format.bits - 1)

    def sections(self, row: torch.Tensor, seg: Segment) -> tuple[torch.Tensor, ...]:
        """Views of one quantized tensor's (codes [numel or numel/2] uint8, scales [G] float16, zeros [G]
        uint8 or None) inside a compressed row `[nbytes]` uint8."""
        codes = row[seg.codes : seg.codes + seg.numel * self.format.bits // 8]
        scales = row[seg.scales : seg.scales + 2 * seg.groups].view(torch.float16)
        zeros = None if seg.zeros < 0 else row[seg.zeros : seg.zeros + seg.groups]
        return codes, scales, zeros

    def raw(self, row: torch.Tensor, seg: Segment) -> torch.Tensor:
        """The model-dtype values of a raw tensor inside a compressed row."""
        return row[seg.codes : seg.codes + seg.numel * self.packing.dtype.itemsize].view(self.packing.dtype)

    def table(self) -> list[int]:
        """The segment table the CUDA kernel reads: 8 int64 per segment (first element in the flat space of
        all segments' elements, numel, slot offset, kind 0 raw / 4 / 8 bits, codes, scales, zeros, group)."""
        out, start = [], 0
        for seg in self.segments:
            kind = self.format.bits if seg.quantized else 0
            out += [start, seg.numel, seg.dst, kind, seg.codes, seg.scales, seg.zeros, self.format.group_size]
            start += seg.numel
        return out

    @property
    def total(self) -> int:
        """Elements the expansion writes (every tensor's, not the alignment padding)."""
        return sum(seg.numel for seg in self.segments)


def _aligned(n: int) -> int:
    return -(-n // SECTION_ALIGN) * SECTION_ALIGN


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
