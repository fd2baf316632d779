"""Compressed experts (`expert_format="int8" | "int4"`): group-wise affine integer codes in the host store and
on the link, expanded back to the model's dtype inside the device slot.

- `layout.py`: where each tensor's codes, scales and zero points sit in one compressed expert row;
- `codec.py`: quantizing a row (torchao's affine primitives) and expanding it (a fast torch path and its
  plain reference twin, equal bit for bit);
- `cuda_kernel.py`: the expansion on a CUDA copy stream (one fused CuPy kernel per expert copy, or torch ops);
- `store.py`: `CompressedExpertStore`, the host store of compressed rows that keeps the way back to the
  original weights.
"""

from .layout import RowLayout
from .store import CompressedExpertStore, make_compressed_store

__all__ = ["RowLayout", "CompressedExpertStore", "make_compressed_store"]
