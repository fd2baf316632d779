"""Disk expert store: the slow tier for hosts whose RAM cannot hold the experts (edge devices).

Same interface as `HostExpertStore` (`packings`, `nbytes`, `expert(layer, e)`, `layer_tensors(layer)`), but
the experts stay in the checkpoint's safetensors files. `expert(layer, e)` reads that expert's byte ranges
with `pread` (served from the OS page cache when warm) into a fresh staging buffer (pinned where CUDA
exists: torch's caching host allocator recycles them, and keeps a block alive until the non-blocking
copy that reads it has finished) and assembles the packed row there, splitting or fusing the on-disk
tensors as the checkpoint's layout needs. `pread` instead of a memory map: the same page cache, but no
mapped pages counted in the process's RSS and no SIGBUS if a file shrinks under us.
"""

from __future__ import annotations

import torch

from ..checkpoint.reader import Reader
from ..checkpoint.weight_map import ExpertPiece, read_piece
from .store import ExpertPacking


class DiskExpertStore:
    """Packed experts read on demand from safetensors files; `pieces[(l, e)]` says which bytes go where."""

    def __init__(self, packings: list[ExpertPacking], num_experts: list[int],
                 pieces: dict[tuple[int, int], list[ExpertPiece]], pin_memory: bool):
        self.packings = packings
        self.num_experts = num_experts
        self.pin_memory = pin_memory
        self._pieces = pieces
        self._gaps = [_padding(p) for p in packings]  # alignment padding of a row: zeroed, never read
        self._reader = Reader()

    @property
    def nbytes(self) -> int:
        """Bytes of packed experts this store serves (on disk, not in RAM)."""
        return sum(p.nbytes * n for p, n in zip(self.packings, self.num_experts))

    @property
    def link_bytes(self) -> list[int]:
        """Bytes one expert copy moves, per layer (the packed row)."""
        return [p.nbytes for p in self.packings]

    def expansion(self, layer: int) -> None:
        return None  # rows are the slot's own bytes

    def drain_expand_seconds(self) -> float:
        return 0.0

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        """The packed row of one expert, `[numel]`, read from disk into a fresh staging buffer."""
        packing = self.packings[layer]
        row = torch.empty(packing.numel, dtype=packing.dtype, pin_memory=self.pin_memory)  # [numel]
        for start, stop in self._gaps[layer]:
            row[start:stop].zero_()
        for piece in self._pieces[(layer, expert)]:
            read_piece(self._reader, piece, row)
        return row

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """Fresh contiguous `[E, *shape]` tensors of a layer (for `remove_offload`): reads the whole layer."""
        packing = self.packings[layer]
        rows = torch.empty(self.num_experts[layer], packing.numel, dtype=packing.dtype)  # [E, numel]
        for e in range(self.num_experts[layer]):
            rows[e] = self.expert(layer, e)
        return {name: v.clone(memory_format=torch.contiguous_format) for name, v in packing.views(rows).items()}

    def close(self) -> None:
        self._reader.close()


def _padding(packing: ExpertPacking) -> list[tuple[int, int]]:
    """Element ranges of a packed row that no tensor covers."""
    gaps, cursor = [], 0
    for shape, offset in sorted(zip(packing.shapes, packing.offsets), key=lambda so: so[1]):
        if offset > cursor:
            gaps.append((cursor, offset))
        numel = 1
        for s in shape:
            numel *= s
        cursor = offset + numel
    if cursor < packing.numel:
        gaps.append((cursor, packing.numel))
    return gaps
