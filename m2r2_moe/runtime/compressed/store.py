"""`CompressedExpertStore`: the host store of compressed expert rows, with the way back to the originals.

The interface of `HostExpertStore` (`packings`, `nbytes`, `expert`, `fill_layer`, `layer_tensors`, `close`,
`expansion`, `link_bytes`): `expert(l, e)` is the compressed row `[nbytes]` uint8 that crosses the link, and
`expansion(l)` what turns it back into the model's dtype inside the slot (`packings` stay the model-dtype
slot layout, so the slot pool, the slot views and the kernels are those of a lossless run). The rows live
in a `HostExpertStore` of bytes (page-locked the same way when pinned).

The way back (`layer_tensors`, read by `remove_offload`, `state_dict` and `save_pretrained`) is never the
compressed copy: `offload` keeps the model's own expert tensors (host memory then holds both, the price of
giving the user's weights back bit for bit); `from_pretrained` reads them again from the checkpoint files
(`originals`, a store with `layer_tensors`, e.g. a `DiskExpertStore`), so its host memory holds the
compressed rows only.
"""

from __future__ import annotations

import torch

from ...config import ExpertFormat
from ..store import ExpertPacking, HostExpertStore
from .codec import Expansion, encode
from .layout import RowLayout


class CompressedExpertStore:
    """Compressed experts of every MoE layer; `buffers[l]` is `[E_l, nbytes_l]` uint8."""

    def __init__(self, packings: list[ExpertPacking], num_experts: list[int], fmt: ExpertFormat, pin_memory: bool,
                 originals=None, cudart=None):
        self.packings = packings  # the slot rows (model dtype) the expansions write
        self.format = fmt
        self.num_experts = num_experts
        self.layouts = [RowLayout.build(p, fmt) for p in packings]
        self.expansions = [Expansion(layout) for layout in self.layouts]
        rows = [ExpertPacking.from_shapes(("row",), [(layout.nbytes,)], torch.uint8) for layout in self.layouts]
        self._rows = HostExpertStore(rows, num_experts, pin_memory, cudart)
        self.buffers = self._rows.buffers
        self.pin_memory = pin_memory
        self._originals = originals  # from_pretrained: the checkpoint (a store with layer_tensors)
        self._kept: dict[int, dict[str, torch.Tensor]] = {}  # offload: the model's own tensors, per layer

    @property
    def nbytes(self) -> int:
        """Host bytes of the compressed rows (the originals `offload` keeps are the model's, not counted)."""
        return self._rows.nbytes

    @property
    def pinned_bytes(self) -> int:
        return self._rows.pinned_bytes

    @property
    def link_bytes(self) -> list[int]:
        """Bytes one expert copy moves, per layer (the compressed row, alignment included)."""
        return [p.nbytes for p in self._rows.packings]

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        """The compressed row of one expert, `[nbytes]` uint8."""
        return self._rows.expert(layer, expert)

    def expansion(self, layer: int) -> Expansion:
        return self.expansions[layer]

    def drain_expand_seconds(self) -> float:
        """Host seconds spent expanding copies since the last call (CPU engine; 0 on CUDA)."""
        return sum(e.drain_seconds() for e in self.expansions)

    def fill_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """Quantize a layer's fused expert tensors (`name -> [E, *shape]`) into its rows, and keep the tensors
        themselves: they are the way back."""
        for e in range(self.num_experts[layer]):
            encode({name: t[e] for name, t in tensors.items()}, self.layouts[layer], self.buffers[layer][e])
        self._kept[layer] = dict(tensors)

    def fill_expert(self, layer: int, expert: int, row: torch.Tensor) -> None:
        """Quantize one expert given as its packed model-dtype row `[numel]` (from_pretrained's staging row)."""
        views = self.packings[layer].views(row.unsqueeze(0))
        encode({name: v[0] for name, v in views.items()}, self.layouts[layer], self.buffers[layer][expert])

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The ORIGINAL `[E, *shape]` tensors of a layer (bit for bit), never the compressed ones."""
        if layer in self._kept:
            return {name: t.clone(memory_format=torch.contiguous_format) for name, t in self._kept[layer].items()}
        if self._originals is None:
            raise RuntimeError(f"the original experts of MoE layer {layer} are not available")
        return self._originals.layer_tensors(layer)

    def compressed_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's experts as the slots see them: every row expanded (`[E, *shape]`, model dtype)."""
        packing, layout = self.packings[layer], self.layouts[layer]
        rows = torch.zeros(self.num_experts[layer], packing.numel, dtype=packing.dtype)  # [E, numel]
        for e in range(self.num_experts[layer]):
            self.expansions[layer].expand(rows[e], self.buffers[layer][e])
        self.expansions[layer].drain_seconds()  # not a copy: not counted
        return {name: v.clone() for name, v in packing.views(rows).items()}

    def close(self) -> None:
        """Free the rows (page-locked ones unlocked first) and the way back."""
        self._rows.close()
        self._kept.clear()
        if self._originals is not None and callable(getattr(self._originals, "close", None)):
            self._originals.close()


def make_compressed_store(layers, fmt: ExpertFormat, pin_memory: bool, originals=None) -> CompressedExpertStore:
    """The compressed store for a model's MoE layers (`MoELayer`s: their experts modules' tensors give the
    shapes and the dtype); filled later by `fill_layer` (offload) or `fill_expert` (from_pretrained)."""
    from ..offloader import _packing

    packings = [_packing(layer) for layer in layers]
    return CompressedExpertStore(packings, [int(layer.experts.num_experts) for layer in layers], fmt, pin_memory,
                                 originals)
