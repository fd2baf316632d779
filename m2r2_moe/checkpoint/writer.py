"""`save_pretrained` of an offloaded model: a standard transformers checkpoint, streamed from the expert store.

transformers' own `save_pretrained` takes `state_dict()`, drops tied and ignored keys, reverts the family's
weight conversions (Mixtral's fused `mlp.experts.gate_up_proj [E, 2I, H]` goes back to per-expert
`block_sparse_moe.experts.{e}.w1.weight` / `w3.weight`), splits the result into shards and writes them. An
offloaded model keeps its experts in the host store (or, disk tier, in the checkpoint files), so this writer
takes the same steps with each expert tensor stood in for by a meta tensor of its shape and dtype — all that
naming and shard planning read (views of one meta tensor share its storage, as the real views do) — and reads
the real values one MoE layer at a time while writing the shard that holds them:

1. plan: names, shapes and shards, exactly as transformers plans them for the un-offloaded model; a host
   memory check for the largest shard;
2. into a temporary folder next to the target: config and generation config by the class's own
   `save_pretrained` (given no weights), then every shard, then the index;
3. move into place: the folder itself when the target does not exist, else file by file, then remove the
   stale shards of an older save as transformers does. A failure before step 3 leaves the target untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import plan as memory
from ..errors import HostMemoryError, OffloadedOperationError

logger = logging.getLogger(__name__)

METADATA = {"format": "pt"}  # what transformers writes into every safetensors shard it saves


@dataclass
class SavePlan:
    """What to write: `split` (hub's StateDictSplit: file → names), the resident tensors by name, and for
    every tensor made from experts the MoE layer it comes from and its (shape, dtype)."""

    split: object
    dense: dict[str, torch.Tensor]
    layer_of: dict[str, int]
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]]
    variant: str | None


def plan_save(model: nn.Module, raw_state: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
              max_shard_size, variant: str | None, revert: bool) -> SavePlan:
    """`raw_state`: the model's state dict with the expert tensors still empty placeholders; `experts[l]`:
    layer l's state keys → meta tensors of the real shape and dtype."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    from huggingface_hub.serialization._torch import get_torch_storage_id, get_torch_storage_size
    from transformers.modeling_utils import _add_variant, remove_tied_weights_from_state_dict
    from transformers.utils import SAFE_WEIGHTS_NAME

    convert = _converter(model, revert)
    state = dict(raw_state)
    for layer in experts:
        state.update({k: v for k, v in layer.items() if k in state})  # in place: the state's key order is kept
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    experts = [{k: v for k, v in layer.items() if k in state} for layer in experts]
    state = convert(state)
    layer_of = {name: i for i, layer in enumerate(experts) for name in convert(layer)}
    made_of_experts = {k for k, v in state.items() if v.device.type == "meta"}
    if made_of_experts != set(layer_of):
        raise OffloadedOperationError(
            f"{type(model).__name__}: its weight conversion mixes expert and other tensors "
            f"({sorted(made_of_experts ^ set(layer_of))[:3]}), so save_pretrained cannot stream the experts layer by "
            "layer. Call m2r2_moe.remove_offload(model), then model.save_pretrained(folder). Nothing was written."
        )

    def storage_id(t: torch.Tensor):  # meta views of one fused tensor share its storage, as the real views do
        if t.device.type == "meta":
            return "meta", t.untyped_storage()._cdata, t.untyped_storage().nbytes()
        return get_torch_storage_id(t)

    pattern = _add_variant(SAFE_WEIGHTS_NAME, variant).replace(".safetensors", "{suffix}.safetensors")
    split = split_state_dict_into_shards_factory(state, get_storage_size=get_torch_storage_size,
                                                 get_storage_id=storage_id, filename_pattern=pattern,
                                                 max_shard_size=max_shard_size)
    dense = {k: v for k, v in state.items() if k not in layer_of}
    expected = {k: (tuple(state[k].shape), state[k].dtype) for k in layer_of}
    return SavePlan(split, dense, layer_of, expected, variant)


def _converter(model: nn.Module, revert: bool) -> Callable[[dict], dict]:
    """transformers' reversal of the family's load-time weight conversion (identity with `revert=False`)."""
    if not revert:
        return dict
    from transformers.core_model_loading import revert_weight_conversion

    return lambda state: revert_weight_conversion(model, state)


def check_host_memory(save: SavePlan, layer_bytes: list[int], max_shard_size) -> None:
    """A shard is built in host memory before it is written (as transformers does), plus the layer being read."""
    peak = 0
    for names in save.split.filename_to_tensors.values():
        shard = sum(_nbytes(*save.expected[n]) for n in names if n in save.layer_of)
        peak = max(peak, shard)
    peak += max(layer_bytes, default=0)
    available, _ = memory.host_memory()
    if peak > 0.9 * available:
        raise HostMemoryError(
            f"save_pretrained would hold {peak / 2**30:.2f} GiB of experts in host memory at once (its largest shard "
            f"at max_shard_size={max_shard_size!r} and one MoE layer), {available / 2**30:.2f} GiB is available: pass "
            "a smaller max_shard_size, e.g. save_pretrained(folder, max_shard_size='2GB'). Nothing was written."
        )


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def write_shards(model: nn.Module, save: SavePlan, read_layer: Callable[[int], dict[str, torch.Tensor]],
                 folder: Path, revert: bool) -> None:
    """Write every shard of `save` into `folder`; expert tensors come from `read_layer(l)` (state keys → fused
    `[E, ...]` tensors of MoE layer l), one layer held at a time."""
    from safetensors.torch import save_file

    convert, cached, tensors = _converter(model, revert), -1, {}
    names_of: dict[int, list[str]] = {}
    for name, layer in save.layer_of.items():
        names_of.setdefault(layer, []).append(name)
    for filename, names in save.split.filename_to_tensors.items():
        shard = {}
        for name in sorted(names, key=lambda n: save.layer_of.get(n, -1)):  # resident first, then layer by layer
            if name in save.dense:
                shard[name] = save.dense[name].contiguous()
                continue
            layer = save.layer_of[name]
            if layer != cached:
                tensors = {}  # free the previous layer before reading the next one
                tensors, cached = _checked(convert(read_layer(layer)), save, layer, names_of[layer]), layer
            shard[name] = tensors[name].clone(memory_format=torch.contiguous_format)  # the shard's bytes only
        save_file(shard, str(folder / filename), metadata=METADATA)
        del shard
    if save.split.is_sharded:
        from transformers.modeling_utils import _add_variant
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

        index = {"metadata": {"total_parameters": model.num_parameters(), **save.split.metadata},
                 "weight_map": save.split.tensor_to_filename}
        with open(folder / _add_variant(SAFE_WEIGHTS_INDEX_NAME, save.variant), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _checked(tensors: dict[str, torch.Tensor], save: SavePlan, layer: int, names: list[str]) -> dict[str, torch.Tensor]:
    """The converted tensors of one layer must be those the plan expects (names, shapes, dtypes)."""
    for name in names:
        shape, dtype = save.expected[name]
        if name not in tensors or tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
            raise OffloadedOperationError(f"MoE layer {layer}: {name} read back from the expert store does not match "
                                          f"the plan ({list(shape)}, {dtype}); nothing was written to the target.")
    return tensors


def atomic_folder(target: Path, fill: Callable[[Path], None], weights_name: str | None) -> None:
    """`fill(tmp)` writes a checkpoint into a temporary folder next to `target`, which is then moved into place.
    On failure the temporary folder (and any parent folder made for it) is removed; `target` is untouched."""
    if target.is_file():
        raise NotADirectoryError(f"{target} is a file; save_pretrained writes a checkpoint folder. Pick another path.")
    made = _first_missing(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".saving", dir=target.parent))
    try:
        fill(tmp)
        written = {p.name for p in tmp.iterdir()}
        if not target.exists():
            os.replace(tmp, target)
        else:
            for entry in sorted(tmp.iterdir()):
                os.replace(entry, target / entry.name)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    if weights_name is not None:
        _remove_stale_shards(target, weights_name, written)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (None when it exists)."""
    missing = None
    while not folder.exists():
        missing, folder = folder, folder.parent
    return missing


def _remove_stale_shards(folder: Path, weights_name: str, written: set[str]) -> None:
    """Shards of an older, differently sharded save (`model-0000i-of-0000n.safetensors` not written now):
    removed, with the rule transformers' save_pretrained applies."""
    stem = weights_name.replace(".safetensors", "")
    shard_name = re.compile(r"(.*?)-\d{5}-of-\d{5}")
    for path in folder.iterdir():
        if (path.name.startswith(stem) and path.is_file() and path.name not in written
                and shard_name.fullmatch(path.name.replace(".safetensors", "")) is not None):
            path.unlink()


def save_pretrained(model: nn.Module, source, save_directory: str | os.PathLike, *, is_main_process: bool = True,
                    state_dict: dict | None = None, push_to_hub: bool = False, max_shard_size: int | str = "50GB",
                    variant: str | None = None, save_original_format: bool = True,
                    distributed_checkpoint: bool = False, **kwargs) -> None:
    """`model.save_pretrained` of an offloaded model (same arguments as transformers'): the checkpoint the
    un-offloaded model would write, the experts read from `source` (`raw_state()`, `meta_experts()`,
    `read_layer(l)`, `layer_bytes()`: see `model_hooks.ExpertSource`) one MoE layer at a time."""
    from transformers.modeling_utils import _add_variant
    from transformers.utils import SAFE_WEIGHTS_NAME

    _refuse_unsupported(model, push_to_hub, distributed_checkpoint)
    save_class = type(model).save_pretrained
    common = dict(variant=variant, save_original_format=save_original_format, **kwargs)
    if not is_main_process:  # transformers writes nothing on the other processes
        save_class(model, save_directory, is_main_process=False, state_dict={}, **common)
        return
    target, weights_name = Path(save_directory), _add_variant(SAFE_WEIGHTS_NAME, variant)
    if state_dict is not None:  # the caller's own tensors: transformers writes them as given
        atomic_folder(target, lambda tmp: save_class(model, tmp, state_dict=state_dict, max_shard_size=max_shard_size,
                                                     **common), weights_name)
        return
    save = plan_save(model, source.raw_state(), source.meta_experts(), max_shard_size, variant, save_original_format)
    check_host_memory(save, source.layer_bytes(), max_shard_size)

    def fill(tmp: Path) -> None:
        save_class(model, tmp, state_dict={}, **common)  # config.json, generation_config.json (and custom code)
        write_shards(model, save, source.read_layer, tmp, save_original_format)

    atomic_folder(target, fill, weights_name)
    logger.info("saved offloaded %s to %s (%d shard(s), experts streamed from the expert store)",
                type(model).__name__, target, len(save.split.filename_to_tensors))


def _refuse_unsupported(model: nn.Module, push_to_hub: bool, distributed_checkpoint: bool) -> None:
    name = type(model).__name__
    if push_to_hub:
        raise OffloadedOperationError(f"save_pretrained(..., push_to_hub=True) of an offloaded {name}: save to a "
                                      "folder with save_pretrained(folder), then upload that folder "
                                      "(huggingface_hub.upload_folder). Nothing was written.")
    if distributed_checkpoint:
        raise OffloadedOperationError(f"save_pretrained(..., distributed_checkpoint=True) of an offloaded {name}: "
                                      "an offloaded model is not sharded across ranks; save without it.")
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "_hf_peft_config_loaded", False):
        raise OffloadedOperationError(f"save_pretrained of an offloaded {name} with a quantizer or PEFT adapters "
                                      "attached: call m2r2_moe.remove_offload(model) first, then save.")
