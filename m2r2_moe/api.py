"""Public entry points: `offload`, `remove_offload`, `stats`, `reset_stats`, `is_offloaded`."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .config import OffloadConfig, OffloadConfigError
from .errors import AlreadyOffloadedError, NotOffloadedError, UnsupportedModelError
from .guard import UseGuard
from .model_hooks import ModelHooks
from .models import find_moe_layers
from .runtime.offloader import Offloader
from .stats import OffloadStats

logger = logging.getLogger(__name__)

_ATTR = "_m2r2_offloader"
_GUARD = "_m2r2_guard"
_HOOKS = "_m2r2_hooks"


def offload(model: nn.Module, config: OffloadConfig | None = None, **kwargs) -> nn.Module:
    """Offload the routed experts of a transformers MoE model, in place; returns the same model.

    Expert weights move to a host store (pinned where CUDA exists) and are freed from the model; a pool of
    `cache_experts` device slots, shared by all layers, holds the experts being used; the rest of the
    model (attention, norms, routers, embeddings) moves to `device`. Outputs are unchanged: same kernels,
    same logits. On any error the model is left exactly as it was.

    One forward at a time: calling the offloaded model from a second thread while it runs raises
    `ConcurrentUseError` (two different offloaded models may run on two threads).

    Args:
        model: a transformers causal LM with sparse MoE blocks, on CPU.
        config: an `OffloadConfig`; keyword arguments override its fields (`device`, `cache_experts`,
            `predictor`, `link_gbps`, ...).

    Example:
        >>> model = m2r2_moe.offload(model, device="cuda", cache_experts=64)
        >>> model.generate(**inputs, max_new_tokens=32)
        >>> print(m2r2_moe.stats(model))
    """
    return _offload(model, _merge_config(config, kwargs))


def _offload(model: nn.Module, cfg: OffloadConfig, fill_store=None, store=None) -> nn.Module:
    """`offload`; with `fill_store` (from_pretrained) the expert params are still on meta and the store is
    filled from the checkpoint by `fill_store(store)`; `store` replaces the host store (disk tier)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"offload() expects a transformers model (a torch.nn.Module), got {type(model).__name__}")
    if is_offloaded(model):
        raise AlreadyOffloadedError(
            f"{type(model).__name__} is already offloaded; call m2r2_moe.remove_offload(model) first to change settings."
        )
    if fill_store is None:
        _check_on_cpu(model)
    adapter, layers = find_moe_layers(model)
    top_k = adapter.top_k(model)
    num_slots = _resolve_slots(cfg, top_k, sum(int(layer.experts.num_experts) for layer in layers))
    predictor = _build_predictor(cfg, model, adapter, layers)  # before anything moves: bad adapters change nothing
    offloader = Offloader(model, layers, cfg, num_slots, adapter, store=store)
    guard = hooks = None
    try:
        offloader.install(model, fill_store=fill_store)  # rolls itself back on error
        if predictor is not None:
            predictor.to(offloader.device)  # built on CPU: its tensors follow the model to the compute device
        offloader.attach_predictor(predictor)
        guard = UseGuard(model)
        hooks = ModelHooks(model, offloader).install()  # save_pretrained, state_dict, .to, backward, copy
        model.__dict__[_ATTR] = offloader
        model.__dict__[_GUARD] = guard
        model.__dict__[_HOOKS] = hooks
    except BaseException:
        if hooks is not None:
            hooks.remove()
        if guard is not None:
            guard.remove()
        for key in (_ATTR, _GUARD, _HOOKS):
            model.__dict__.pop(key, None)
        offloader.uninstall(model)  # idempotent: nothing left to undo when install rolled back already
        _release(offloader)
        raise
    logger.info(
        "offloaded %d MoE layers (%s adapter): %d slots on %s, %.1f MB of experts in host memory",
        len(layers), adapter.name, num_slots, offloader.device, offloader.store.nbytes / 1e6,
    )
    return model


def remove_offload(model: nn.Module) -> nn.Module:
    """Undo `offload`: expert weights back in the model bit for bit, original forwards, original device."""
    offloader = _get(model)
    guard = model.__dict__.get(_GUARD)
    predictor = offloader.prefetcher.predictor if offloader.prefetcher is not None else None
    with guard.hold() if guard is not None else contextlib.nullcontext():  # no forward may run meanwhile
        hooks = model.__dict__.pop(_HOOKS, None)
        if hooks is not None:
            hooks.remove()  # first: uninstall moves the model back with model.to, which the hooks refuse
        offloader.uninstall(model)
    if guard is not None:
        guard.remove()
    model.__dict__.pop(_GUARD, None)
    del model.__dict__[_ATTR]
    _release(offloader)
    if predictor is not None:
        predictor.to(offloader.original_device)  # with the model: a predictor object can be used again
    return model


def is_offloaded(model: nn.Module) -> bool:
    return _ATTR in getattr(model, "__dict__", {})


def get_offloader(model: nn.Module) -> Offloader:
    """The runtime attached to an offloaded model (for tools and tests)."""
    return _get(model)


def stats(model: nn.Module) -> OffloadStats:
    """A snapshot of the model's counters: hits, prefetch hits, late prefetches, misses, bytes, stalls."""
    offloader = _get(model)
    offloader.collect_device_stalls()
    return offloader.stats.copy()


def reset_stats(model: nn.Module) -> None:
    """Zero the model's counters; device-side stall timings still pending are dropped with them."""
    _get(model).reset_stats()


def _get(model: nn.Module) -> Offloader:
    offloader = getattr(model, "__dict__", {}).get(_ATTR)
    if offloader is None:
        raise NotOffloadedError(f"{type(model).__name__} is not offloaded; call m2r2_moe.offload(model) first.")
    return offloader


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


def _merge_config(config: OffloadConfig | None, kwargs: dict) -> OffloadConfig:
    if config is not None and not isinstance(config, OffloadConfig):
        raise TypeError(f"config must be an OffloadConfig, got {type(config).__name__}")
    unknown = sorted(set(kwargs) - set(OffloadConfig.field_names()))
    if unknown:
        raise TypeError(
            f"offload() got unknown option(s) {unknown}; valid options: {', '.join(OffloadConfig.field_names())}"
        )
    base = config or OffloadConfig()
    return base.replace(**kwargs) if kwargs else base


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
    return make_predictor(cfg.predictor, model, adapter, layers, cfg.lookahead, adapters=cfg.adapters,
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


def _resolve_slots(cfg: OffloadConfig, top_k: int, total_experts: int) -> int:
    if cfg.cache_experts is None:
        return max(top_k, total_experts // 2)
    if cfg.cache_experts < top_k:
        raise OffloadConfigError(
            f"cache_experts={cfg.cache_experts} is below the model's top-k ({top_k}): each token needs {top_k} experts "
            f"of a layer at once. Use cache_experts >= {top_k}."
        )
    if cfg.cache_experts > total_experts:
        logger.info("cache_experts=%d exceeds the model's %d experts; using %d", cfg.cache_experts, total_experts,
                    total_experts)
        return total_experts
    return cfg.cache_experts
