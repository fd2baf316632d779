"""Which checkpoint tensor goes where: non-expert tensors → model state keys, expert tensors → byte
ranges of packed host-store rows.

Checkpoint names are first renamed the way transformers renames them when it loads (e.g. Mixtral's
`block_sparse_moe` → `mlp`, an added or stripped `model.` prefix); expert names are then matched against
the layouts the model adapter lists (`MoEAdapter.checkpoint_expert_names`). Everything is checked here,
before any memory is allocated: every model tensor found with the right shape, each MoE layer's experts
complete in one layout.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .reader import Checkpoint, TensorEntry
from ..errors import WeightsMismatchError
from ..models.base import CheckpointTensor, MoEAdapter, MoELayer
from ..runtime.store import ExpertPacking

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertPiece:
    """A byte range of the checkpoint that fills `numel` elements of one packed expert row from `dst`."""

    layer: int
    expert: int
    entry: TensorEntry
    offset: int  # absolute byte offset in entry.file
    numel: int
    dst: int  # element offset inside the packed row


@dataclass
class WeightMap:
    dense: dict[str, TensorEntry]  # model state key (parameter or persistent buffer) → checkpoint tensor
    pieces: list[ExpertPiece]  # in file order
    layouts: list[str]  # per MoE layer: the on-disk layout found
    unexpected: list[str] = field(default_factory=list)

    def expert_pieces(self) -> dict[tuple[int, int], list[ExpertPiece]]:
        by_expert: dict[tuple[int, int], list[ExpertPiece]] = {}
        for piece in self.pieces:
            by_expert.setdefault((piece.layer, piece.expert), []).append(piece)
        return by_expert

    @property
    def dense_bytes(self) -> int:
        return sum(e.nbytes for e in self.dense.values())


def map_checkpoint(model: nn.Module, adapter: MoEAdapter, layers: list[MoELayer], packings: list[ExpertPacking],
                   ckpt: Checkpoint) -> WeightMap:
    """Place every tensor of `ckpt` in `model` (a meta skeleton); raise `WeightsMismatchError` on any gap."""
    names = _renamed(model, list(ckpt.tensors))
    expert_param_ids = {id(getattr(l.experts, n)) for l in layers for n in l.param_names}
    wanted = {k: t for k, t in _state_tensors(model).items() if id(t) not in expert_param_ids}
    dense, rest = {}, {}
    for disk_name, name in names.items():
        (dense if name in wanted else rest)[name] = ckpt.tensors[disk_name]
    for name, entry in dense.items():
        if tuple(wanted[name].shape) != entry.shape:
            raise WeightsMismatchError(
                f"{ckpt.path}: {entry.name} has shape {list(entry.shape)} but the model built from config.json "
                f"expects {list(wanted[name].shape)}: the config and the weights do not belong together."
            )
    module_names = {id(m): n for n, m in model.named_modules()}
    pieces, layouts = [], []
    for i, (layer, packing) in enumerate(zip(layers, packings)):
        prefix = module_names[id(layer.experts)]
        style, layout = _pick_layout(adapter.checkpoint_expert_names(layer, prefix), rest, prefix, ckpt)
        layouts.append(style)
        for name, target in layout.items():
            pieces += _pieces(i, rest.pop(name), target, packing, int(layer.experts.num_experts), ckpt)
    pieces.sort(key=lambda p: (str(p.entry.file), p.offset))
    return WeightMap(dense, pieces, layouts, sorted(e.name for e in rest.values()))


def missing_dense(model: nn.Module, layers: list[MoELayer], wmap: WeightMap) -> list[str]:
    """Model state keys (non-expert) that the checkpoint does not provide."""
    expert_param_ids = {id(getattr(l.experts, n)) for l in layers for n in l.param_names}
    return [k for k, t in _state_tensors(model).items() if id(t) not in expert_param_ids and k not in wmap.dense]


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict key (tied parameters under each of their names)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    for name, buf in model.named_buffers(remove_duplicate=False):
        parent, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(parent)._non_persistent_buffers_set:
            out[name] = buf
    return out


def _renamed(model: nn.Module, disk_names: list[str]) -> dict[str, str]:
    """Checkpoint name → name in the model, applying transformers' own renaming rules for the model."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # another transformers version: names as saved, plus the base-model prefix
        return {n: _with_prefix(model, n) for n in disk_names}
    renamings = [t for t in get_model_conversion_mapping(model) if not isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    return {n: rename_source_key(n, renamings, [], prefix, meta_state)[0] for n in disk_names}


def _with_prefix(model: nn.Module, name: str) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    keys = model.state_dict()
    if name not in keys and prefix and f"{prefix}.{name}" in keys:
        return f"{prefix}.{name}"
    return name


def _pick_layout(layouts: dict[str, dict[str, CheckpointTensor]], available: dict[str, TensorEntry], prefix: str,
                 ckpt: Checkpoint) -> tuple[str, dict[str, CheckpointTensor]]:
    best, best_found = None, -1
    for style, layout in layouts.items():
        found = sum(name in available for name in layout)
        if found == len(layout):
            return style, layout
        if found > best_found:
            best, best_found = style, found
    layout = layouts[best]
    missing = [n for n in layout if n not in available]
    if best_found == 0:
        near = sorted(n for n in available if n.startswith(prefix + "."))[:3]
        raise WeightsMismatchError(
            f"{ckpt.path}: no expert tensors for {prefix} in any known layout ({', '.join(layouts)}; e.g. "
            f"{next(iter(layout))}). Checkpoint names there: {near or 'none'}. If the family stores experts under "
            "other names, its adapter must override checkpoint_expert_names."
        )
    raise WeightsMismatchError(
        f"{ckpt.path}: {len(missing)} of the {len(layout)} expert tensors of {prefix} ({best} layout) are missing, "
        f"e.g. {', '.join(missing[:3])}: the checkpoint has fewer experts than config.json says, or is incomplete."
    )


def _pieces(layer: int, entry: TensorEntry, target: CheckpointTensor, packing: ExpertPacking, num_experts: int,
            ckpt: Checkpoint) -> list[ExpertPiece]:
    slot = packing.names.index(target.param)
    shape, base = packing.shapes[slot], packing.offsets[slot]  # per-expert shape [rows, ...]
    row_numel = _numel(shape[1:])
    start, stop = target.rows or (0, shape[0])
    expected = (stop - start, *shape[1:]) if target.expert is not None else (num_experts, *shape)
    if entry.shape != expected:
        raise WeightsMismatchError(
            f"{ckpt.path}: expert tensor {entry.name} has shape {list(entry.shape)}, the model built from config.json "
            f"expects {list(expected)}: the config and the weights do not belong together."
        )
    if not (entry.dtype.is_floating_point and packing.dtype.is_floating_point):
        raise WeightsMismatchError(f"{ckpt.path}: expert tensor {entry.name} is {entry.dtype}; quantized or integer "
                                   "expert weights are not supported.")
    if target.expert is not None:
        return [ExpertPiece(layer, target.expert, entry, entry.offset, entry.nbytes // entry.dtype.itemsize,
                            base + start * row_numel)]
    per_expert = entry.nbytes // num_experts
    return [ExpertPiece(layer, e, entry, entry.offset + e * per_expert, _numel(shape), base)
            for e in range(num_experts)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def dtype_plan(model: nn.Module, dtype: torch.dtype) -> list[tuple[re.Pattern, torch.dtype]]:
    """transformers' keep-in-fp32 rules for `model` at `dtype` (empty when the version has none)."""
    get_plan = getattr(model, "_get_dtype_plan", None)
    plan = get_plan(dtype) if callable(get_plan) else {}
    return [(re.compile(pattern), d) for pattern, d in plan.items()]


def read_piece(reader, piece: ExpertPiece, row: torch.Tensor) -> None:
    """Read `piece` into the packed row `row` (`[numel]`, CPU): straight in when the dtypes agree, else
    through a temporary of the piece's size and a cast (rounding as `Tensor.to` does, like transformers)."""
    dst = row[piece.dst : piece.dst + piece.numel]
    if piece.entry.dtype == row.dtype:
        reader.read_into(piece.entry.file, piece.offset, dst)
        return
    tmp = torch.empty(piece.numel, dtype=piece.entry.dtype)
    reader.read_into(piece.entry.file, piece.offset, tmp)
    dst.copy_(tmp)
