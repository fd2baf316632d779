"""`from_pretrained`: load a transformers MoE checkpoint straight into the offloaded layout.

Order of work, so that a bad checkpoint fails before anything is allocated and the model is never held
twice: (1) read config.json and every safetensors header (`Checkpoint.open`: missing shards, truncated
files); (2) build the model on the meta device (no weights); (3) map every checkpoint tensor onto the model
(`map_checkpoint`: renamings, expert layout, shapes); (4) plan slots and check host/device memory
(`Plan`, logged); (5) read the non-expert tensors straight to the device; (6) allocate the host store and
stream the expert bytes into its packed rows, file by file in offset order (compressed formats: expert by
expert through one staging row, checkpoint/compressed.py); (7) attach the runtime exactly as `offload` does.
The result matches `offload(AutoModelForCausalLM.from_pretrained(path), ...)`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import budget
from ..attach import attach
from .reader import Checkpoint, Reader
from ..config import OffloadConfig, OffloadConfigError
from ..errors import UnsupportedModelError, WeightsMismatchError
from ..models import find_moe_layers
from .plan import Plan, check_memory, expert_store_host_bytes, kv_cache_bytes
from ..runtime.compressed import RowLayout
from ..runtime.offloader import _packing
from ..warm import Profile
from .stores import check_format_options, expert_store_and_fill
from .weight_map import WeightMap, dtype_plan, map_checkpoint, missing_dense

logger = logging.getLogger(__name__)

STORES = ("ram", "disk")


def from_pretrained(path: str | os.PathLike, device: str | None = None, cache_experts: int | str | None = "auto",
                    dtype: torch.dtype | str | None = None, predictor: str = "none", adapters: str | None = None,
                    expert_store: str | None = None, context_length: int = 4096, progress: bool = True,
                    save_compressed: bool = False, **options) -> nn.Module:
    """Load a MoE checkpoint folder with its experts offloaded, never materializing the whole model.

    Non-expert weights go straight to `device`; expert tensors stream from the safetensors shards into
    the host store (`expert_store="ram"`, pinned where CUDA exists) or stay in the files and are read on
    demand (`expert_store="disk"`, for hosts with little RAM). The model behaves exactly like
    `m2r2_moe.offload(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), ...)`: same logits.

    Args:
        path: a checkpoint folder (config.json + model.safetensors or sharded *.safetensors + index).
        device: where the model computes (`"cuda"`, `"cuda:1"`, `"cpu"`; default cuda if available).
        cache_experts: device expert slots: a number, a budget like `"8GB"`, or `"auto"` (free device
            memory minus non-expert weights, a KV-cache reserve for `context_length`, and a margin).
        dtype: weights dtype; `None` or `"auto"` uses the config's dtype, as transformers does.
        predictor, adapters, **options: `OffloadConfig` fields (`lookahead`, `pin_memory`, `link_gbps`,
            `warm_start`, ...). `gpu_memory` / `host_memory` (bytes or text like "4GiB") state memory budgets
            instead of `cache_experts`: slots, pinning and the expert store are derived from them (budget.py).
            `expert_format="int8" | "int4"` quantizes the experts while they stream in: the host store holds
            the compressed rows only; `remove_offload` reads the originals from the checkpoint again.
        expert_store: `"ram"` or `"disk"` (the model's dtype only); `None`: `"ram"`, or with memory budgets
            `"disk"` when the store does not fit `host_memory` (with a compressed format always `"ram"`).
        save_compressed: with a compressed `expert_format`, save the compressed store next to the checkpoint
            (`m2r2_moe-experts-<format>-<dtype>.safetensors`); a matching saved store is always read instead
            of quantizing again.
        context_length: tokens of KV cache to reserve when sizing `"auto"` or `gpu_memory`.
        progress: show a progress bar while the weights load.

    Raises:
        NotACheckpointError, MissingShardError, CorruptCheckpointError, WeightsMismatchError,
        UnsupportedModelError, HostMemoryError, DeviceMemoryError: before anything is allocated.
    """
    cfg = _config(device, predictor, adapters, options, context_length)
    for name, flag in (("progress", progress), ("save_compressed", save_compressed)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    check_format_options(cfg, expert_store, save_compressed, path)
    plan, model, layers, packings, wmap, ckpt, memory = _prepare(path, cfg, cache_experts, dtype, expert_store,
                                                                 context_length)
    _check_adapters_file(cfg)  # the fingerprint needs the routers' weights: checked once they are loaded
    if cfg.warm_start is not None:  # its format now; whose model it is, once the routers are loaded
        Profile.load(cfg.warm_start)
    logger.info("%s", plan)
    pin = memory.pin_memory if memory is not None else cfg.resolved_pin_memory()
    reader, store = Reader(), None
    try:
        _load_dense(model, layers, wmap, reader, cfg.resolved_device(), plan.dtype, progress)
        run = cfg.replace(cache_experts=plan.num_slots, pin_memory=pin, gpu_memory=None, host_memory=None)
        store, fill = expert_store_and_fill(plan.expert_store, run, packings, layers, wmap, reader, ckpt,
                                            save_compressed, progress)
        attach(model, run, fill_store=fill, store=store, memory=memory)
    except BaseException:
        if store is not None:
            store.close()  # its open checkpoint files, now rather than when the traceback goes
        raise
    finally:
        reader.close()
    return model


def plan_checkpoint(path: str | os.PathLike, device: str | None = None, cache_experts: int | str | None = "auto",
                    dtype: torch.dtype | str | None = None, expert_store: str | None = None,
                    context_length: int = 4096, **options) -> Plan:
    """The `Plan` that `from_pretrained` would follow, without loading any weight (reads headers only)."""
    cfg = _config(device, "none", None, options, context_length)
    return _prepare(path, cfg, cache_experts, dtype, expert_store, context_length)[0]


def _config(device, predictor, adapters, options, context_length) -> OffloadConfig:
    own = ("cache_experts", "context_length")  # from_pretrained's own arguments
    unknown = sorted(set(options) - set(OffloadConfig.field_names()) | set(options) & set(own))
    if unknown:
        raise TypeError(f"from_pretrained() got unknown option(s) {unknown}; valid options: "
                        f"{', '.join(f for f in OffloadConfig.field_names() if f not in own)}")
    return OffloadConfig(device=device, predictor=predictor, adapters=adapters, context_length=context_length,
                         **options)  # checks context_length too


def _check_adapters_file(cfg: OffloadConfig) -> None:
    """A missing or corrupted adapters file fails before any weight is read."""
    if cfg.predictor == "m2r2" and cfg.adapters is not None:
        from ..predict import AcceleratorAdapters

        AcceleratorAdapters.load(cfg.adapters)


def _prepare(path, cfg: OffloadConfig, cache_experts, dtype, expert_store, context_length):
    """Everything that only reads headers and builds meta tensors: fails fast, allocates nothing."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a checkpoint folder (str or os.PathLike), got {type(path).__name__} {path!r}")
    if expert_store is not None and expert_store not in STORES:
        raise OffloadConfigError(f"expert_store must be one of {STORES} (or None: chosen by the budgets), got "
                                 f"{expert_store!r}")
    fmt = cfg.resolved_format()
    if fmt is not None and expert_store is None:
        expert_store = "ram"  # compressed rows live in RAM: the budgets do not move them to disk
    ckpt = Checkpoint.open(path)
    config = _read_config(ckpt.path)
    dtype = _resolve_dtype(dtype, config, ckpt)
    model = _skeleton(config, dtype)
    _generation_config(model, ckpt.path)
    adapter, layers = find_moe_layers(model)
    packings = [_packing(layer) for layer in layers]
    wmap = map_checkpoint(model, adapter, layers, packings, ckpt)
    _check_complete(model, layers, wmap, ckpt)
    if wmap.unexpected:
        logger.warning("%s: %d checkpoint tensors are not used by %s, e.g. %s", ckpt.path, len(wmap.unexpected),
                       type(model).__name__, ", ".join(wmap.unexpected[:3]))
    device = cfg.resolved_device()
    num_experts = [int(layer.experts.num_experts) for layer in layers]
    expert_bytes = max(p.nbytes for p in packings)  # a slot
    row_bytes = [p.nbytes if fmt is None else RowLayout.build(p, fmt).nbytes for p in packings]  # over the link
    store_bytes = sum(b * n for b, n in zip(row_bytes, num_experts))
    dense_bytes = _dense_bytes(model, wmap, dtype)
    kv_bytes = kv_cache_bytes(config, context_length, dtype)
    top_k = adapter.top_k(model)
    need = budget.ModelBytes(tuple(b * n for b, n in zip(row_bytes, num_experts)), expert_bytes,
                             sum(num_experts), top_k, dense_bytes, kv_bytes, context_length, disk_tier=True)
    slots, budget_text, mem, expert_store, pin, memory = budget.checkpoint_slots(cfg, cache_experts, device,
                                                                                 expert_store, need)
    if slots < top_k:
        raise OffloadConfigError(f"cache_experts={cache_experts} is below the model's top-k ({top_k}); use >= {top_k}")
    store_host = expert_store_host_bytes(expert_store, [b * n for b, n in zip(row_bytes, num_experts)], top_k,
                                         expert_bytes, pin)
    if fmt is not None:
        store_host += expert_bytes  # the staging row of the expert being quantized
    host_need = store_host
    if device.type == "cpu":
        host_need += dense_bytes + slots * expert_bytes + kv_bytes
    plan = Plan(
        path=str(ckpt.path), model_type=config.model_type, adapter=adapter.name, dtype=dtype, device=device,
        expert_store=expert_store, moe_layers=len(layers), total_experts=sum(num_experts), top_k=top_k,
        expert_bytes=expert_bytes, store_bytes=store_bytes, dense_bytes=dense_bytes, checkpoint_bytes=ckpt.nbytes,
        num_slots=slots, budget=budget_text, kv_bytes=kv_bytes, context_length=context_length,
        pinned_bytes=store_host if pin else 0,
        host_available=mem["host_available"], host_need=host_need,
        device_free=mem["device"][0] if mem["device"] else None,
        device_source=mem["device"][2] if mem["device"] else "", layouts=tuple(wmap.layouts),
        expert_format="model" if fmt is None else fmt.name, link_bytes=max(row_bytes),
    )
    check_memory(plan, mem)
    return plan, model, layers, packings, wmap, ckpt, memory


def _read_config(path: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModelError(f"{path}/config.json cannot be read by transformers: {e}") from e
    if getattr(config, "quantization_config", None):
        raise UnsupportedModelError(f"{path} is a quantized checkpoint ({config.quantization_config}); m2r2_moe "
                                    "loads float checkpoints only.")
    return config


def _resolve_dtype(dtype, config, ckpt: Checkpoint) -> torch.dtype:
    """As transformers 5 does: an explicit dtype, else ("auto") the config's, else the weights'."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point or dtype.is_complex:
            raise OffloadConfigError(f"dtype must be a floating-point dtype (torch.bfloat16, torch.float16, "
                                     f"torch.float32), got {dtype}")
        return dtype
    if dtype not in (None, "auto"):
        if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
            return _resolve_dtype(getattr(torch, dtype), config, ckpt)
        raise OffloadConfigError(f"dtype must be a torch.dtype, a dtype name or 'auto', got {dtype!r}")
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    if isinstance(value, torch.dtype):
        return value
    floats = [t.dtype for t in ckpt.tensors.values() if t.dtype.is_floating_point]
    return floats[0] if floats else torch.get_default_dtype()


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM for `config`, every tensor on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise UnsupportedModelError(f"{config.model_type!r} is not a causal LM transformers can build: {e}") from e
    return model.eval()


def _generation_config(model: nn.Module, path: Path) -> None:
    """generation_config.json, else one derived from config.json: what transformers' from_pretrained uses."""
    from transformers import GenerationConfig

    model.config.name_or_path = str(path)
    if not (hasattr(model, "can_generate") and model.can_generate()):
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        model.generation_config = GenerationConfig.from_pretrained(path, config_file_name="config.json",
                                                                   _from_model_config=True)


def _check_complete(model: nn.Module, layers, wmap: WeightMap, ckpt: Checkpoint) -> None:
    """Every non-expert tensor is in the checkpoint, or tied to one that is, or allowed to be missing."""
    missing = set(missing_dense(model, layers, wmap))
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in missing and source not in missing:
            missing.discard(target)
        elif source in missing and target not in missing:
            missing.discard(source)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    missing = sorted(k for k in missing if not any(p.search(k) for p in ignore))
    if missing:
        raise WeightsMismatchError(
            f"{ckpt.path}: {len(missing)} tensors of the model built from config.json are not in the checkpoint, e.g. "
            f"{', '.join(missing[:3])}: the checkpoint is incomplete or belongs to another configuration."
        )


def _dense_bytes(model: nn.Module, wmap: WeightMap, dtype: torch.dtype) -> int:
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    return sum(t.numel() * _target_dtype(k, t, dtype, []).itemsize for k, t in state.items()
               if k in wmap.dense)


def _target_dtype(name: str, skeleton: torch.Tensor, dtype: torch.dtype, rules) -> torch.dtype:
    """As transformers casts a loaded tensor: keep-in-fp32 rules first, else the skeleton tensor's dtype."""
    for pattern, rule_dtype in rules:
        if pattern.search(name):
            return rule_dtype
    return skeleton.dtype


def _load_dense(model: nn.Module, layers, wmap: WeightMap, reader: Reader, device: torch.device,
                dtype: torch.dtype, progress: bool) -> None:
    """Read every non-expert tensor straight to `device`; then non-persistent buffers, ties, inits."""
    rules = dtype_plan(model, dtype)
    expert_ids = {id(getattr(l.experts, n)) for l in layers for n in l.param_names}
    entries = sorted(wmap.dense.items(), key=lambda kv: (str(kv[1].file), kv[1].offset))
    bar = tqdm(total=sum(e.nbytes for _, e in entries), unit="B", unit_scale=True, desc="non-expert weights",
               disable=not progress)
    with torch.no_grad(), bar:
        for name, entry in entries:
            parent, _, leaf = name.rpartition(".")
            module = model.get_submodule(parent)
            skeleton = getattr(module, leaf)
            if skeleton.device.type != "meta":  # tied to a tensor loaded already
                continue
            value = reader.read(entry)
            value = value.to(device=device, dtype=_target_dtype(name, skeleton, dtype, rules))
            _set_tensor(module, leaf, value)
            bar.update(entry.nbytes)
        for p in model.parameters():  # expert params stay on meta until the runtime replaces them
            if id(p) in expert_ids:
                p._is_hf_initialized = True
        _finish_like_transformers(model, device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.device.type == "meta" and id(t) not in expert_ids]
    if leftover:
        raise WeightsMismatchError(f"{len(leftover)} tensors were not loaded, e.g. {', '.join(leftover[:3])}")


def _set_tensor(module: nn.Module, leaf: str, value: torch.Tensor) -> None:
    if leaf in module._parameters:
        value = nn.Parameter(value, requires_grad=value.is_floating_point())
    value._is_hf_initialized = True  # transformers' flag: initialize_weights leaves it alone
    setattr(module, leaf, value)


def _finish_like_transformers(model: nn.Module, device: torch.device) -> None:
    """What transformers does after reading a state dict: tie weights, materialize non-persistent buffers
    and the allowed-missing tensors, and run the model's own init on them (rotary `inv_freq`, ...)."""
    missing = {n for n, t in model.named_parameters(remove_duplicate=False)
               if t.device.type == "meta" and not getattr(t, "_is_hf_initialized", False)}
    try:  # transformers 5: ties a missing tensor to its loaded twin, and leaves two different loaded ones untied
        model.tie_weights(missing_keys=missing, recompute_mapping=False)
    except TypeError:
        model.tie_weights()
    for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
        if tensor.device.type == "meta" and not getattr(tensor, "_is_hf_initialized", False):
            parent, _, leaf = name.rpartition(".")
            module = model.get_submodule(parent)
            value = torch.empty_like(tensor, device=device)
            setattr(module, leaf, nn.Parameter(value, tensor.requires_grad) if leaf in module._parameters else value)
    if hasattr(model, "initialize_weights"):
        model.initialize_weights()
