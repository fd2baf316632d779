"""Where a checkpoint's weights will go, decided before anything is allocated: device slots from a budget
(a count, bytes like "8GB", or "auto" from free memory), and the host/device memory checks.

`Plan` is what `from_pretrained` logs at INFO before it allocates (and what a CLI can print).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..config import OffloadConfigError, default_slots, parse_bytes
from ..errors import DeviceMemoryError, HostMemoryError
from ..runtime.store import pinned_bytes

logger = logging.getLogger(__name__)

GB = 1e9


def host_memory() -> tuple[int, int]:
    """(available, total) host bytes, from psutil."""
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def device_memory(device: torch.device) -> tuple[int, int, str] | None:
    """(free, total, source) bytes of a CUDA device; None on CPU or when no probe works."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        free, total = torch.cuda.mem_get_info(index)
        return int(free), int(total), "torch.cuda.mem_get_info"
    except Exception as e:  # a broken driver/runtime: try NVML before giving up
        logger.debug("torch.cuda.mem_get_info failed: %s", e)
    if os.environ.get("CUDA_VISIBLE_DEVICES"):  # NVML indices are physical: they may not match torch's
        return None
    try:
        import pynvml  # optional; imports fine without a driver and fails on first call, hence the broad except

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            return int(info.free), int(info.total), "pynvml"
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:
        logger.debug("NVML unavailable (the optional nvidia-ml-py package: pip install 'm2r2_moe[gpu]'): %s", e)
        return None


def kv_cache_bytes(config, context_length: int, dtype: torch.dtype) -> int:
    """Bytes of a batch-1 KV cache of `context_length` tokens (full attention in every layer)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * context_length * dtype.itemsize


def pinned_block_bytes(nbytes: int) -> int:
    """Host bytes torch's pinned allocator (its caching host allocator) takes for a block of `nbytes`: it
    rounds every block up to a power of two."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def expert_store_host_bytes(expert_store: str, layer_bytes: list[int], top_k: int, expert_bytes: int,
                            pin: bool) -> int:
    """Host bytes the expert store takes, all of them page-locked when `pin`. The RAM store: one buffer per
    layer (`layer_bytes`), page-locked in whole pages (runtime/store.py). The disk store: the staging rows
    of a layer's demand loads in flight (2 x top-k rows of `expert_bytes`), each, when pinned, a block of
    torch's pinned allocator (`pinned_block_bytes`)."""
    if expert_store == "ram":
        return pinned_bytes(layer_bytes) if pin else sum(layer_bytes)
    return 2 * top_k * (pinned_block_bytes(expert_bytes) if pin else expert_bytes)


@dataclass
class Plan:
    """Where every byte of a checkpoint goes, and why that many slots."""

    path: str
    model_type: str
    adapter: str
    dtype: torch.dtype
    device: torch.device
    expert_store: str  # "ram" | "disk"
    moe_layers: int
    total_experts: int
    top_k: int
    expert_bytes: int  # one packed expert (the largest layer's)
    store_bytes: int  # all packed experts, as the store keeps them (compressed rows for int8 / int4)
    dense_bytes: int  # non-expert weights on the device
    checkpoint_bytes: int
    num_slots: int
    budget: str  # what decided the slot count
    kv_bytes: int
    context_length: int
    pinned_bytes: int
    host_available: int
    host_need: int
    device_free: int | None = None
    device_source: str = ""
    layouts: tuple[str, ...] = ()
    expert_format: str = "model"  # how experts are kept in host RAM and moved ("model": the dtype, lossless)
    link_bytes: int = 0  # one expert over the link (a compressed row; 0: expert_bytes)

    @property
    def bytes_per_copy(self) -> int:
        """Bytes one expert copy moves over the link."""
        return self.link_bytes or self.expert_bytes

    @property
    def pool_bytes(self) -> int:
        return self.num_slots * self.expert_bytes

    def __str__(self) -> str:
        mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
        layouts = "/".join(sorted(set(self.layouts))) or "?"
        store = ("host RAM, pinned" if self.pinned_bytes else "host RAM") if self.expert_store == "ram" else \
            "disk (read on demand from the safetensors files)"
        free = (f"; device free {mb(self.device_free)} ({self.device_source})" if self.device_free is not None else "")
        return "\n".join([
            f"m2r2_moe plan for {self.path}: {self.model_type} ({self.adapter} adapter), {self.dtype}, "
            f"checkpoint {mb(self.checkpoint_bytes)} ({layouts} expert layout)",
            f"  experts : {self.moe_layers} MoE layers, {self.total_experts} experts, top-{self.top_k}, "
            f"{mb(self.expert_bytes)} each, {mb(self.store_bytes)} in {store}" + ("" if self.expert_format == "model"
            else f" as {self.expert_format} ({mb(self.bytes_per_copy)} per expert over the link, changes outputs)"),
            f"  {self.device.type:<8}: {mb(self.dense_bytes)} non-expert weights + {self.num_slots} expert slots "
            f"x {mb(self.expert_bytes)} = {mb(self.dense_bytes + self.pool_bytes)} on {self.device} "
            f"(slots: {self.budget}); KV reserve {mb(self.kv_bytes)} for {self.context_length} tokens",
            f"  host    : needs {mb(self.host_need)} ({mb(self.pinned_bytes)} pinned), available "
            f"{mb(self.host_available)} (psutil){free}",
        ])


def resolve_slots(cache_experts, *, device: torch.device, expert_store: str, top_k: int, total_experts: int,
                  expert_bytes: int, store_bytes: int, dense_bytes: int, kv_bytes: int) -> tuple[int, str, dict]:
    """(slots, how they were decided, memory probes) for `cache_experts` = N | "8GB" | "auto" | None."""
    host_available, host_total = host_memory()
    probe = device_memory(device)
    mem = {"host_available": host_available, "host_total": host_total, "device": probe}
    if cache_experts is None:
        return default_slots(top_k, total_experts), "default: half of the experts", mem
    if isinstance(cache_experts, int) and not isinstance(cache_experts, bool):
        return min(cache_experts, total_experts), f"cache_experts={cache_experts}", mem
    if not isinstance(cache_experts, str):
        raise OffloadConfigError(f"cache_experts must be a number of slots, bytes like '8GB', or 'auto'; got "
                                 f"{cache_experts!r}")
    if cache_experts.strip().lower() != "auto":
        budget = parse_bytes(cache_experts)
        slots = budget // expert_bytes
        if slots < top_k:
            raise OffloadConfigError(
                f"cache_experts={cache_experts!r} holds {slots} expert slot(s) of {expert_bytes / 1e6:.1f} MB; each "
                f"token needs top-k={top_k} at once. Give at least {top_k * expert_bytes / 1e6:.1f} MB."
            )
        return min(slots, total_experts), f"{cache_experts} budget", mem
    return _auto_slots(device, expert_store, top_k, total_experts, expert_bytes, store_bytes, dense_bytes,
                       kv_bytes, mem)


def _auto_slots(device, expert_store, top_k, total_experts, expert_bytes, store_bytes, dense_bytes, kv_bytes, mem):
    if device.type == "cuda":
        if mem["device"] is None:
            raise DeviceMemoryError(f"cache_experts='auto': cannot read the free memory of {device} (neither "
                                    "torch.cuda.mem_get_info nor NVML answered; NVML comes with pip install "
                                    "'m2r2_moe[gpu]'); pass a number of slots or a budget like cache_experts='8GB'.")
        free, total, source = mem["device"]
        margin = max(512 * 2**20, int(0.05 * total))
        where, limit = f"{device} ({source})", free
    else:
        margin = host_margin(mem["host_total"])
        where = "host RAM (psutil)" + (", after the expert store" if expert_store == "ram" else "")
        limit = mem["host_available"] - (store_bytes if expert_store == "ram" else 0)
    budget = limit - dense_bytes - kv_bytes - margin
    if device.type == "cpu":  # the slot pool is a second host copy of what it caches: take half of what is left
        budget //= 2
    slots = max(0, budget) // expert_bytes
    if slots < top_k:
        raise (DeviceMemoryError if device.type == "cuda" else HostMemoryError)(
            f"cache_experts='auto': {where} has {limit / 1e6:,.0f} MB left for this model; after "
            f"{dense_bytes / 1e6:,.1f} MB of non-expert weights, a {kv_bytes / 1e6:,.1f} MB KV reserve and a "
            f"{margin / 1e6:,.0f} MB margin there is "
            f"room for {slots} expert slot(s) of {expert_bytes / 1e6:.1f} MB, below top-k={top_k}. Options: a smaller "
            "dtype, a shorter context_length, expert_store='disk' (on CPU), or free memory."
        )
    return min(slots, total_experts), f"auto: {budget / 1e6:,.0f} MB free for slots on {where}", mem


def host_margin(host_total: int) -> int:
    return 256 * 2**20 + int(0.02 * host_total)


def check_memory(plan: Plan, mem: dict) -> None:
    """Refuse early (before allocating) when the plan cannot fit in host or device memory."""
    if plan.host_need > plan.host_available - host_margin(mem["host_total"]):
        options = []
        if plan.expert_store == "ram":
            options.append("expert_store='disk' (experts stay in the safetensors files and are read on demand)")
        if plan.dtype == torch.float32:
            options.append("dtype=torch.bfloat16 (halves every weight)")
        if plan.device.type == "cpu":
            options.append("fewer device slots (cache_experts)")
        options.append("free host memory")
        raise HostMemoryError(
            f"{plan.path}: this plan needs {plan.host_need / 1e6:,.0f} MB of host memory "
            f"({plan.store_bytes / 1e6:,.0f} MB of experts {'in RAM' if plan.expert_store == 'ram' else 'on disk'}), "
            "but only "
            f"{plan.host_available / 1e6:,.0f} MB are available. Options: " + "; ".join(options) + "."
        )
    if plan.device.type == "cuda" and mem["device"] is not None:
        free = mem["device"][0]
        need = plan.dense_bytes + plan.pool_bytes
        if need > free:
            raise DeviceMemoryError(
                f"{plan.device} has {free / 1e6:,.0f} MB free; {plan.dense_bytes / 1e6:,.0f} MB of non-expert weights "
                f"+ {plan.num_slots} slots x {plan.expert_bytes / 1e6:.1f} MB need {need / 1e6:,.0f} MB. Use fewer "
                "slots (cache_experts) or cache_experts='auto'."
            )
