"""Public entry points: `offload`, `remove_offload`, `from_pretrained`, `stats`, `reset_stats`, `is_offloaded`,
`save_profile` (a warm start's file), `memory_plan` (what the memory budgets resolved to)."""

from __future__ import annotations

from torch import nn

import os

from .attach import attach, detach, guard_of, is_attached, memory_of, runtime_of, warm_of
from .budget import MemoryPlan
from .checkpoint.loader import from_pretrained
from .config import OffloadConfig
from .runtime.offloader import Offloader
from .stats import OffloadStats
from .warm import Profile

__all__ = ["offload", "remove_offload", "from_pretrained", "stats", "reset_stats", "is_offloaded", "get_offloader",
           "save_profile", "memory_plan"]


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
            `predictor`, `link_gbps`, ...). `gpu_memory="4GiB"` / `host_memory="8GiB"` state budgets instead of
            a slot count (`memory_plan(model)` says what they resolved to); `warm_start=path` starts from a
            profile written by `save_profile`.

    Example:
        >>> model = m2r2_moe.offload(model, device="cuda", cache_experts=64)
        >>> model.generate(**inputs, max_new_tokens=32)
        >>> print(m2r2_moe.stats(model))
    """
    return attach(model, _merge_config(config, kwargs))  # shared with from_pretrained (attach.py)


def remove_offload(model: nn.Module) -> nn.Module:
    """Undo `offload`: expert weights back in the model bit for bit, original forwards, original device."""
    return detach(model)


def is_offloaded(model: nn.Module) -> bool:
    return is_attached(model)


def get_offloader(model: nn.Module) -> Offloader:
    """The runtime attached to an offloaded model (for tools and tests)."""
    return runtime_of(model)


def stats(model: nn.Module) -> OffloadStats:
    """A snapshot of the model's counters: hits, prefetch hits, late prefetches, misses, bytes, stalls."""
    offloader = runtime_of(model)
    offloader.collect_device_stalls()
    return offloader.stats.copy()


def save_profile(model: nn.Module, path: str | os.PathLike) -> Profile:
    """Write what this run learned about the model — how often each expert of each MoE layer was used, and what
    the prefetch planner calibrated online — to `path` (a small JSON file with a version and the model's
    fingerprint), for `offload(..., warm_start=path)` / `from_pretrained(..., warm_start=path)` to start warm.
    Returns the `Profile`. Waits for no forward: one running on another thread makes it raise
    `ConcurrentUseError`."""
    with guard_of(model).hold():
        profile = warm_of(model).profile(model)
    profile.save(path)
    return profile


def memory_plan(model: nn.Module) -> MemoryPlan | None:
    """What the memory budgets (`gpu_memory`, `host_memory`) of an offloaded model resolved to — slots, pinning,
    where the experts are; `.summary()` is one readable line. None when it was sized by a slot count."""
    return memory_of(model)


def reset_stats(model: nn.Module) -> None:
    """Zero the model's counters; device-side stall timings still pending are dropped with them."""
    runtime_of(model).reset_stats()


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


