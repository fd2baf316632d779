"""Host expert store: every expert's tensors packed into one contiguous buffer, so a transfer is one copy.

Layout (one `ExpertPacking` per MoE layer): expert e of layer l is row e of `buffers[l]` (`[E, numel]`);
inside a row each named tensor (`gate_up_proj [2I, H]`, `down_proj [H, I]`, biases) starts at an offset
aligned to `ALIGN` elements, so device-side views of a slot stay aligned for the matmul kernels.

Pinned stores: torch's pinned allocator rounds every block up to a power of two (a 2.8 GB layer of
Mixtral-8x7B experts would take 4 GB, the whole store ~128 GB instead of ~90 GB). So the store maps
ordinary host memory, whole pages, and page-locks exactly those pages with `cudaHostRegister`
(portable: pinned for every device), unlocked when the store is closed or collected. What it takes is
`pinned_bytes(...)` of its layers, which `Plan` reports.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from dataclasses import dataclass

import torch

from ..config import OffloadConfigError
from ..errors import HostMemoryError

logger = logging.getLogger(__name__)

ALIGN = 64  # elements: 128 bytes in bf16, 256 in fp32
PAGE = mmap.PAGESIZE  # the unit the OS page-locks
REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every device's context, not only the current one


def page_locked_bytes(nbytes: int, page: int = PAGE) -> int:
    """Host bytes page-locked for a buffer of `nbytes`: whole pages."""
    return -(-nbytes // page) * page


def pinned_bytes(buffer_bytes: list[int], page: int = PAGE) -> int:
    """Host bytes a pinned `HostExpertStore` page-locks for buffers (one per layer) of these sizes."""
    return sum(page_locked_bytes(n, page) for n in buffer_bytes)


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
    """Packed host copies of the experts of every MoE layer; `buffers[l]` is `[E_l, numel_l]`.

    `pin_memory`: page-lock the buffers (see the module docstring); `cudart` stands in for
    `torch.cuda.cudart()` (its `cudaHostRegister` / `cudaHostUnregister`), for tests."""

    def __init__(self, packings: list[ExpertPacking], num_experts: list[int], pin_memory: bool, cudart=None):
        self.packings = packings
        self.pin_memory = pin_memory
        self.buffers: list[torch.Tensor] = []
        self._locks = _PageLocks(cudart) if pin_memory else None
        try:
            for layer, (packing, n) in enumerate(zip(packings, num_experts)):
                # zeros, not empty: the alignment padding is copied too and must never hold NaN bit patterns
                if self._locks is None:
                    self.buffers.append(torch.zeros(n, packing.numel, dtype=packing.dtype))
                else:
                    self.buffers.append(self._locks.zeros(n, packing.numel, packing.dtype, layer))
        except BaseException:
            self.close()  # nothing stays locked
            raise

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    @property
    def pinned_bytes(self) -> int:
        """Host bytes page-locked for the store (0 when not pinned)."""
        return 0 if self._locks is None else self._locks.nbytes

    @property
    def link_bytes(self) -> list[int]:
        """Bytes one expert copy moves, per layer (the packed row)."""
        return [p.nbytes for p in self.packings]

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        """The packed buffer of one expert, `[numel]`."""
        return self.buffers[layer][expert]

    def rows(self, layer: int) -> torch.Tensor:
        """The layer's packed rows `[E, numel]`, each the slot's own bytes: a copy engine may read them by address
        (`ExpertCache._copy`). A store without this method hands out each row as `expert` makes it."""
        return self.buffers[layer]

    def expansion(self, layer: int) -> None:
        """None: the row is the slot's own bytes (a compressed store returns what expands it)."""
        return None

    def drain_expand_seconds(self) -> float:
        return 0.0  # nothing is expanded

    def fill_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a layer's fused expert tensors (`name -> [E, *shape]`) into its packed rows."""
        views = self.packings[layer].views(self.buffers[layer])
        for name, dst in views.items():
            dst.copy_(tensors[name])

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """Fresh contiguous `[E, *shape]` tensors rebuilt from the packed rows (bit-identical)."""
        views = self.packings[layer].views(self.buffers[layer])
        return {name: v.clone(memory_format=torch.contiguous_format) for name, v in views.items()}

    def close(self) -> None:
        """Free the rows now (page-locked ones are unlocked first). No copy may still read them."""
        self.buffers.clear()
        if self._locks is not None:
            self._locks.release()


def plain_layout(store, pool: torch.Tensor, layer: int):
    """((pool, rows), the rows' address, bytes per row, bytes per copy) when the store's rows `[E, numel]` of `layer`
    are the slots' own bytes in the pool's dtype, contiguous on the host: a copy engine may then copy a row by address
    (`ExpertCache._copy`, which asks only for a pool `[slots, numel]` contiguous on the host); else None."""
    rows_of = getattr(store, "rows", None)
    if rows_of is None or store.expansion(layer) is not None:
        return None
    rows = rows_of(layer)
    if (rows is None or rows.device.type != "cpu" or rows.dim() != 2 or not rows.is_contiguous()
            or rows.dtype != pool.dtype or rows.shape[1] > pool.shape[1]):
        return None
    return (pool, rows), rows.data_ptr(), rows.stride(0) * rows.element_size(), rows.shape[1] * rows.element_size()


class _PageLocks:
    """Ordinary host buffers page-locked with `cudaHostRegister`; `release` (or the collection of this
    object) unlocks them, then drops them."""

    def __init__(self, cudart=None):
        if cudart is None:
            if not torch.cuda.is_available():
                raise OffloadConfigError("pin_memory=True page-locks host memory for copies to a CUDA device, but "
                                         "torch sees none; use pin_memory=False (or leave it None).")
            cudart = torch.cuda.cudart()
        self.cudart = cudart
        self.regions: list[tuple[int, torch.Tensor]] = []  # (locked address, the tensor owning the memory)
        self.nbytes = 0
        self.release = weakref.finalize(self, _unlock, cudart, self.regions)  # idempotent; also at exit

    def zeros(self, rows: int, numel: int, dtype: torch.dtype, layer: int) -> torch.Tensor:
        """`[rows, numel]` zeros in page-locked host memory: an anonymous mapping of whole pages (page-aligned
        and zero-filled by the OS; its memory goes back when the last tensor viewing it does), all locked."""
        nbytes = rows * numel * torch.empty(0, dtype=dtype).element_size()
        if nbytes == 0:
            return torch.zeros(rows, numel, dtype=dtype)
        size = page_locked_bytes(nbytes)
        raw = torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)  # [size] bytes, sharing the mapping
        status = int(self.cudart.cudaHostRegister(raw.data_ptr(), size, REGISTER_PORTABLE))
        if status != 0:
            raise HostMemoryError(
                f"could not page-lock {size / 1e9:.2f} GB of host memory for the experts of MoE layer {layer} "
                f"(cudaHostRegister returned CUDA error {status}); free host memory, or offload with "
                "pin_memory=False (copies to the device are then staged by the driver, and slower)."
            )
        self.regions.append((raw.data_ptr(), raw))
        self.nbytes += size
        return raw[:nbytes].view(dtype).view(rows, numel)


def _unlock(cudart, regions: list) -> None:
    """Unlock every region, then let its memory go (a locked range must never be freed)."""
    for address, _ in regions:
        status = int(cudart.cudaHostUnregister(address))
        if status != 0:
            logger.warning("cudaHostUnregister of the expert store's memory returned CUDA error %d", status)
    regions.clear()
