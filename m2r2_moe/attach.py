"""Attaching the runtime to a model and taking it off again: what `offload` and `from_pretrained` share.

`attach` checks the model, resolves memory budgets (budget.py) and the config against it
(`OffloadConfig.resolve`), reads a warm start's profile and builds the predictor (before anything moves: a bad
budget, profile or adapters file changes nothing), the runtime (`runtime/offloader.py`), the one-thread guard,
the transformers-habit hooks and the usage counter / warm start (warm.py), and installs them all or nothing: on
any error the model is left exactly as it was. `detach` undoes it, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from . import budget
from .config import DEFAULT_LOOKAHEAD, OffloadConfig, OffloadConfigError
from .errors import AlreadyOffloadedError, NotOffloadedError, UnsupportedModelError
from .guard import UseGuard
from .model_hooks import ModelHooks
from .models import find_moe_layers
from .runtime.compressed import make_compressed_store
from .runtime.offloader import Offloader
from .warm import WarmState, read_profile

logger = logging.getLogger(__name__)

_ATTR = "_m2r2_offloader"
_GUARD = "_m2r2_guard"
_HOOKS = "_m2r2_hooks"
_WARM = "_m2r2_warm"
_MEMORY = "_m2r2_memory"
_KEYS = (_ATTR, _GUARD, _HOOKS, _WARM, _MEMORY)


def is_attached(model: nn.Module) -> bool:
    return _ATTR in getattr(model, "__dict__", {})


def runtime_of(model: nn.Module) -> Offloader:
    offloader = getattr(model, "__dict__", {}).get(_ATTR)
    if offloader is None:
        raise NotOffloadedError(f"{type(model).__name__} is not offloaded; call m2r2_moe.offload(model) first.")
    return offloader


def memory_of(model: nn.Module) -> budget.MemoryPlan | None:
    """The memory plan an offloaded model was sized by (None: no budget was given)."""
    runtime_of(model)
    return model.__dict__.get(_MEMORY)


def warm_of(model: nn.Module) -> WarmState:
    """An offloaded model's usage counter and warm start."""
    runtime_of(model)
    return model.__dict__[_WARM]


def guard_of(model: nn.Module) -> UseGuard:
    runtime_of(model)
    return model.__dict__[_GUARD]


def attach(model: nn.Module, cfg: OffloadConfig, fill_store=None, store=None,
           memory: budget.MemoryPlan | None = None) -> nn.Module:
    """`offload`; with `fill_store` (from_pretrained) the expert params are still on meta and the store is
    filled from the checkpoint by `fill_store(store)`; `store` replaces the host store (disk tier, or
    from_pretrained's compressed store); else `cfg.expert_format` int8 / int4 makes a compressed one. `memory`:
    the memory plan from_pretrained sized it by."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"offload() expects a transformers model (a torch.nn.Module), got {type(model).__name__}")
    if is_attached(model):
        raise AlreadyOffloadedError(
            f"{type(model).__name__} is already offloaded; call m2r2_moe.remove_offload(model) first to change settings."
        )
    if fill_store is None:
        _check_on_cpu(model)
    adapter, layers = find_moe_layers(model)
    if cfg.has_budget:  # slots and pinning from the budgets, refused before anything is allocated
        device = cfg.resolved_device()
        memory = budget.resolve(device, budget.offload_need(model, layers, adapter.top_k(model), cfg.context_length,
                                                            device),
                                gpu_memory=cfg.gpu_memory, host_memory=cfg.host_memory, unified=cfg.unified_memory,
                                pin_memory=cfg.pin_memory, expert_store="ram")
        cfg = cfg.replace(cache_experts=memory.num_slots, pin_memory=memory.pin_memory, gpu_memory=None,
                          host_memory=None)
    profile = read_profile(cfg.warm_start, model, layers) if cfg.warm_start is not None else None
    predictor = _build_predictor(cfg, model, adapter, layers)  # before anything moves: bad adapters change nothing
    plan = cfg.resolve(top_k=adapter.top_k(model), total_experts=sum(int(layer.experts.num_experts) for layer in layers),
                       predictor_lookahead=None if predictor is None else predictor.depth)
    if store is None and plan.expert_format is not None:  # int8 / int4: compressed rows, the originals kept
        store = make_compressed_store(layers, plan.expert_format, plan.pin_memory)
    offloader = Offloader(model, layers, plan, adapter, store=store)
    guard = hooks = warm = None
    try:
        offloader.install(model, fill_store=fill_store)  # rolls itself back on error
        if predictor is not None:
            predictor.to(offloader.device)  # built on CPU: its tensors follow the model to the compute device
        offloader.attach_predictor(predictor)
        guard = UseGuard(model)
        hooks = ModelHooks(model, offloader).install()  # save_pretrained, state_dict, .to, backward, copy
        warm = WarmState(model, offloader, profile, cfg.warm_start)  # counts expert uses; fills slots from a profile
        model.__dict__.update({_ATTR: offloader, _GUARD: guard, _HOOKS: hooks, _WARM: warm, _MEMORY: memory})
    except BaseException:
        if warm is not None:
            warm.close()
        if hooks is not None:
            hooks.remove()
        if guard is not None:
            guard.remove()
        for key in _KEYS:
            model.__dict__.pop(key, None)
        offloader.uninstall(model)  # idempotent: nothing left to undo when install rolled back already
        _release(offloader)
        raise
    logger.info(
        "offloaded %d MoE layers (%s adapter): %d slots on %s, %.1f MB of experts in host memory (%s)",
        len(layers), adapter.name, plan.num_slots, offloader.device, offloader.store.nbytes / 1e6,
        "model dtype" if plan.expert_format is None else plan.expert_format.name,
    )
    if memory is not None:
        logger.info("%s", memory.summary())
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo `attach`: expert weights back in the model bit for bit, original forwards, original device."""
    offloader = runtime_of(model)
    guard = model.__dict__.get(_GUARD)
    predictor = offloader.prefetcher.predictor if offloader.prefetcher is not None else None
    with guard.hold() if guard is not None else contextlib.nullcontext():  # no forward may run meanwhile
        warm = model.__dict__.pop(_WARM, None)
        if warm is not None:
            warm.close()  # the fill stops before the copy engine closes
        hooks = model.__dict__.pop(_HOOKS, None)
        if hooks is not None:
            hooks.remove()  # first: uninstall moves the model back with model.to, which the hooks refuse
        offloader.uninstall(model)
    if guard is not None:
        guard.remove()
    model.__dict__.pop(_GUARD, None)
    model.__dict__.pop(_MEMORY, None)
    del model.__dict__[_ATTR]
    _release(offloader)
    if predictor is not None:
        predictor.to(offloader.original_device)  # with the model: a predictor object can be used again
    return model


def _release(offloader: Offloader) -> None:
    """Free the host store (pinned memory) and the device slot pool now, not when the last reference to the
    runtime goes: a failed `offload`'s traceback, or a handle from `get_offloader`, may outlive it long."""
    store = offloader.store
    if isinstance(getattr(store, "buffers", None), list):
        store.buffers.clear()
    if callable(getattr(store, "close", None)):
        store.close()  # the disk tier's open checkpoint files
    offloader.views = []
    offloader.pool = None


def _build_predictor(cfg: OffloadConfig, model, adapter, layers):
    from .predict import Predictor, make_predictor

    if cfg.adapters is not None and cfg.predictor != "m2r2":
        raise OffloadConfigError(f"adapters={str(cfg.adapters)!r} is only read by predictor='m2r2' (predictor is "
                                 f"{getattr(cfg.predictor, 'name', cfg.predictor)!r}): pass predictor='m2r2' too, "
                                 "or drop adapters.")
    if isinstance(cfg.predictor, Predictor):
        _check_predictor_fits(cfg.predictor, layers)
        return cfg.predictor
    if cfg.predictor == "none":
        return None
    # on CPU, where the model is now: `_offload` moves it (`Predictor.to`) once the model has moved
    depth = cfg.lookahead if cfg.lookahead is not None else DEFAULT_LOOKAHEAD  # m2r2: capped at its adapters' depth
    return make_predictor(cfg.predictor, model, adapter, layers, depth, adapters=cfg.adapters,
                          device=torch.device("cpu"))


def _check_predictor_fits(predictor, layers) -> None:
    """A predictor object built for another model would index past its tables in the middle of a forward."""
    num_experts = max(int(layer.experts.num_experts) for layer in layers)
    if (predictor.num_layers, predictor.num_experts) != (len(layers), num_experts):
        raise OffloadConfigError(
            f"the {type(predictor).__name__} was built for {predictor.num_layers} MoE layers of "
            f"{predictor.num_experts} experts; this model has {len(layers)} MoE layers of {num_experts}. Build it "
            "for this model (m2r2_moe.predict.make_predictor(name, model, ...))."
        )


def _check_on_cpu(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "cpu":
            raise UnsupportedModelError(
                f"offload() expects the model on CPU (it moves the non-expert weights to the device itself), "
                f"but {name} is on {t.device}. Load the model on CPU, e.g. from_pretrained(..., device_map=None)."
            )



