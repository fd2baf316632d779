"""Host expert store: every expert's tensors packed into one contiguous buffer, so a transfer is one copy.

Layout (one `ExpertPacking` per MoE layer): expert e of layer l is row e of `buffers[l]` (`[E, numel]`);
inside a row each named tensor (`gate_up_proj [2I, H]`, `down_proj [H, I]`, biases) starts at an offset
aligned to `ALIGN` elements, so device-side views of a slot stay aligned for the matmul kernels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ALIGN = 64  # elements: 128 bytes in bf16, 256 in fp32


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ExpertPacking:
    """Where each tensor of one expert lives inside its packed buffer."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # per-expert shapes (without the leading E)
    offsets: tuple[int, ...]
    numel: int  # aligned length of one packed expert
    dtype: torch.dtype

    @classmethod
    def from_shapes(cls, names, shapes, dtype) -> "ExpertPacking":
        offsets, cursor = [], 0
        for shape in shapes:
            offsets.append(cursor)
            cursor = _align(cursor + _numel(shape))
        return cls(tuple(names), tuple(tuple(s) for s in shapes), tuple(offsets), cursor, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes moved per expert transfer (the packed, aligned row)."""
        return self.numel * torch.empty(0, dtype=self.dtype).element_size()

    def views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-name views `[R, *shape]` into packed rows `[R, numel']` (numel' >= numel)."""
        out = {}
        for name, shape, off in zip(self.names, self.shapes, self.offsets):
            out[name] = rows[:, off : off + _numel(shape)].unflatten(1, shape)
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class HostExpertStore:
    """Packed host copies of the experts of every MoE layer; `buffers[l]` is `[E_l, numel_l]`."""

    def __init__(self, packings: list[ExpertPacking], num_experts: list[int], pin_memory: bool):
        self.packings = packings
        self.pin_memory = pin_memory
        self.buffers: list[torch.Tensor] = []
        for packing, n in zip(packings, num_experts):
            # zeros, not empty: the alignment padding is copied too and must never hold NaN bit patterns
            self.buffers.append(torch.zeros(n, packing.numel, dtype=packing.dtype, pin_memory=pin_memory))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        """The packed buffer of one expert, `[numel]`."""
        return self.buffers[layer][expert]

    def fill_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a layer's fused expert tensors (`name -> [E, *shape]`) into its packed rows."""
        views = self.packings[layer].views(self.buffers[layer])
        for name, dst in views.items():
            dst.copy_(tensors[name])

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """Fresh contiguous `[E, *shape]` tensors rebuilt from the packed rows (bit-identical)."""
        views = self.packings[layer].views(self.buffers[layer])
        return {name: v.clone(memory_format=torch.contiguous_format) for name, v in views.items()}
