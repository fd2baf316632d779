"""Memory budgets → slots, pinning and the expert tier: the one place that turns bytes into a memory plan.

`offload(model, gpu_memory="4GiB", host_memory="8GiB")` and `from_pretrained(path, ...)` state what the runtime
may use instead of a slot count. Two tiers:
- the device tier holds the non-expert weights, a KV-cache reserve of `context_length` tokens and the expert
  slots: as many slots as `gpu_memory` leaves room for, in whole experts, at most every expert;
- the host tier holds the expert store: page-locked when it fits `host_memory` pinned (and pinning is wanted),
  else pageable; `from_pretrained` leaves the experts in the checkpoint files (the disk tier) when the store
  does not fit at all.
A budget not given is the free memory the probes report (torch.cuda.mem_get_info, NVML, psutil), less a margin.

One pool: on `device="cpu"` (the device tier is emulated in host RAM) and on unified-memory GPUs (Jetson-class:
`torch.cuda.get_device_properties(...).is_integrated`, or `unified_memory=True`) both tiers draw from the same
memory. Then a budget not given is what the pool has left after the other tier's claim, and the two claims are
checked once, together, against the pool: no byte is counted in both tiers. A budget that cannot work is
refused before anything is allocated, naming the smallest one that can.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .checkpoint.plan import device_memory as probe_device
from .checkpoint.plan import expert_store_host_bytes, host_margin
from .checkpoint.plan import host_memory as probe_host
from .config import OffloadConfigError, budget_bytes
from .errors import DeviceMemoryError, HostMemoryError

logger = logging.getLogger(__name__)


class MemoryBudgetError(OffloadConfigError):
    """A stated memory budget is too small for the model; `smallest` is the least number of bytes that works."""

    def __init__(self, message: str, option: str, smallest: int):
        super().__init__(message)
        self.option, self.smallest = option, smallest


@dataclass(frozen=True)
class ModelBytes:
    """What a model needs, in bytes, whatever the budget: the input of `resolve`."""

    layer_bytes: tuple[int, ...]  # each MoE layer's experts, packed
    expert_bytes: int  # one packed expert (the largest layer's): one slot
    total_experts: int
    top_k: int
    dense_bytes: int  # non-expert weights, on the device
    kv_bytes: int  # the KV-cache reserve
    context_length: int  # tokens the KV reserve is for
    held_host_bytes: int = 0  # host bytes the model holds already that stay where they are (offload on CPU)
    disk_tier: bool = False  # the experts may stay in the checkpoint files (from_pretrained)

    def device_bytes(self, slots: int) -> int:
        return self.dense_bytes + self.kv_bytes + slots * self.expert_bytes

    def store_bytes(self, store: str, pin: bool) -> int:
        """Host bytes of the expert store: the RAM store (pinned: whole pages), or the disk tier's staging rows."""
        return expert_store_host_bytes(store, list(self.layer_bytes), self.top_k, self.expert_bytes, pin)


@dataclass(frozen=True)
class MemoryPlan:
    """The budgets resolved: what `offload` / `from_pretrained` allocate, and why (`summary`)."""

    device: torch.device
    unified: bool  # a GPU sharing one memory with the host
    num_slots: int
    pin_memory: bool
    expert_store: str  # "ram" | "disk"
    need: ModelBytes
    device_budget: int
    device_label: str  # the user's words ("4GiB") or where the figure came from ("free")
    host_budget: int
    host_label: str

    @property
    def one_pool(self) -> bool:
        return self.unified or self.device.type == "cpu"

    @property
    def store_host_bytes(self) -> int:
        return self.need.store_bytes(self.expert_store, self.pin_memory)

    def summary(self) -> str:
        """One readable line: slots and what else is on the device, where the experts are, of which budgets."""
        n = self.need
        where = f"{self.device}" + (" (emulated device)" if self.device.type == "cpu" else "")
        store = (f"{gb(self.store_host_bytes)} of experts in {'pinned ' if self.pin_memory else ''}host memory"
                 if self.expert_store == "ram" else
                 f"experts read from the checkpoint files on disk ({gb(self.store_host_bytes)} of host staging)")
        pool = "; unified memory: one pool, each byte counted once" if self.unified else ""
        return (f"{self.num_slots} expert slots ({gb(self.num_slots * n.expert_bytes)}) on {where} with "
                f"{gb(n.dense_bytes)} of non-expert weights and a {gb(n.kv_bytes)} KV reserve ({n.context_length} "
                f"tokens), {gb(n.device_bytes(self.num_slots))} of {self.device_label}; {store} (of "
                f"{self.host_label}){pool}")


def gb(nbytes: int) -> str:
    """Bytes for people: '1.2 GB', '176 MB', '12 kB' (decimal units, as the budgets' 'GB')."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= size:
            value = nbytes / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    return f"{nbytes} B"


def as_option(nbytes: int) -> str:
    """Bytes as a budget one can pass back, rounded up to whole MiB: '1240MiB'."""
    return f"{math.ceil(nbytes / 2**20)}MiB"


def is_unified(device: torch.device, override: bool | None) -> bool:
    """Whether `device` is a GPU that shares one memory with the host (`override` decides when given)."""
    if device.type != "cuda":
        return False
    if override is not None:
        return override
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return bool(getattr(torch.cuda.get_device_properties(index), "is_integrated", False))
    except (RuntimeError, AssertionError) as e:  # no driver: then it is not a device one can allocate on either
        logger.debug("cannot ask %s whether its memory is unified: %s", device, e)
        return False


def resolve(device: torch.device, need: ModelBytes, *, gpu_memory=None, host_memory=None, unified=None,
            pin_memory: bool | None = None, expert_store: str | None = None) -> MemoryPlan:
    """The memory plan for `need` on `device` within the budgets (bytes or text; None: the free memory).
    `expert_store`: "ram", "disk" or None (the disk tier only when the RAM store does not fit, and `need`
    allows it). Raises `MemoryBudgetError` (a stated budget too small), `DeviceMemoryError` /
    `HostMemoryError` (more than there is); allocates nothing."""
    gpu = None if gpu_memory is None else budget_bytes("gpu_memory", gpu_memory)
    host = None if host_memory is None else budget_bytes("host_memory", host_memory)
    unified_gpu = is_unified(device, unified)
    host_available, host_total = probe_host()
    host_free = host_available + need.held_host_bytes
    if device.type == "cpu" or unified_gpu:
        probe = probe_device(device) if unified_gpu else None
        pool = min(probe[0], host_free) if probe is not None else host_free
        room = pool - host_margin(host_total)
        if gpu is not None and host is not None and gpu + host > pool:
            what = "the GPU and the host share (unified memory)" if unified_gpu else "host RAM (device='cpu')"
            raise HostMemoryError(f"gpu_memory={gpu_memory!r} + host_memory={host_memory!r} = {gb(gpu + host)}, "
                                  f"more than the {gb(pool)} free in the one memory {what}; lower one of them.")
        floor = need.device_bytes(need.top_k)  # the least the device tier takes from the pool
        store, pin, host_budget, host_label = _choose_store(
            need, host if host is not None else room - (gpu if gpu is not None else floor),
            _label(host_memory, host_free, "free"), pin_memory, expert_store, device, explicit=host is not None)
        device_budget = gpu if gpu is not None else room - need.store_bytes(store, pin)
        device_label = _label(gpu_memory, device_budget, "left in " + ("unified memory" if unified_gpu else "host RAM"))
    else:
        device_budget, device_label = _device_budget(device, gpu, gpu_memory)
        if host is not None and host > host_free:
            raise HostMemoryError(f"host_memory={host_memory!r} is more than the {gb(host_free)} of host memory "
                                  f"available (psutil); lower it, or free memory.")
        store, pin, host_budget, host_label = _choose_store(
            need, host if host is not None else host_free - host_margin(host_total),
            _label(host_memory, host_free, "free"), pin_memory, expert_store, device, explicit=host is not None)
    slots = _slots(need, device_budget, gpu_memory, device)
    return MemoryPlan(device=device, unified=unified_gpu, num_slots=slots, pin_memory=pin, expert_store=store,
                      need=need, device_budget=device_budget, device_label=device_label, host_budget=host_budget,
                      host_label=host_label)


def _label(option, nbytes: int, what: str) -> str:
    return f"{option}" if option is not None else f"{gb(nbytes)} {what}"


def _device_budget(device: torch.device, gpu: int | None, option) -> tuple[int, str]:
    """A discrete GPU's budget: `gpu_memory` (checked against what is free when that can be read), else its free
    memory less a margin."""
    probe = probe_device(device)
    if probe is None:
        if gpu is None:
            raise DeviceMemoryError(f"cannot read the free memory of {device} (neither torch.cuda.mem_get_info nor "
                                    "NVML answered; NVML comes with pip install 'm2r2_moe[gpu]'): pass "
                                    "gpu_memory='...' or cache_experts.")
        return gpu, f"{option}"
    free, total, source = probe
    if gpu is not None:
        if gpu > free:
            raise DeviceMemoryError(f"gpu_memory={option!r} is more than the {gb(free)} free on {device} ({source}); "
                                    "lower it, or free device memory.")
        return gpu, f"{option}"
    budget = free - max(512 * 2**20, int(0.05 * total))
    return budget, f"{gb(free)} free"


def _choose_store(need: ModelBytes, budget: int, label: str, pin_memory: bool | None, expert_store: str | None,
                  device: torch.device, explicit: bool) -> tuple[str, bool, int, str]:
    """(store, pinned, host budget, its label): the first of pinned RAM, pageable RAM, disk that fits `budget`."""
    want_pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    options = []
    for store in (("ram", "disk") if expert_store is None else (expert_store,)):
        if store == "disk" and not need.disk_tier:
            continue
        options += [(store, True)] if want_pin else []
        options += [(store, False)] if not (want_pin and pin_memory) else []  # pin_memory=True: pinned or nothing
    for store, pin in options:
        if need.store_bytes(store, pin) <= budget:
            return store, pin, budget, label
    smallest = min(need.store_bytes(store, pin) for store, pin in options)
    tiers = " or ".join(dict.fromkeys(f"{'pinned' if p else 'pageable'} {s}" for s, p in options))
    hint = ("" if need.disk_tier and expert_store != "ram" else
            " (from_pretrained(..., expert_store='disk') keeps the experts in the checkpoint files)")
    if explicit:
        raise MemoryBudgetError(
            f"host_memory={label!r} cannot hold the expert store ({tiers}): the smallest host_memory that works is "
            f"{as_option(smallest)!r} ({gb(smallest)}){hint}.", "host_memory", smallest)
    raise HostMemoryError(f"the expert store ({tiers}) needs at least {gb(smallest)} of host memory, but only "
                          f"{gb(max(budget, 0))} can be given to it here{hint}; free memory, or use a smaller dtype.")


def _slots(need: ModelBytes, budget: int, option, device: torch.device) -> int:
    """Whole expert slots in what the device budget leaves after the weights and the KV reserve."""
    slots = min(max(budget - need.dense_bytes - need.kv_bytes, 0) // need.expert_bytes, need.total_experts)
    if slots >= need.top_k:
        return slots
    smallest = need.device_bytes(need.top_k)
    parts = (f"{gb(need.dense_bytes)} of non-expert weights + a {gb(need.kv_bytes)} KV reserve "
             f"({need.context_length} tokens) + top-k={need.top_k} expert slots of {gb(need.expert_bytes)}")
    if option is not None:
        raise MemoryBudgetError(
            f"gpu_memory={option!r} is too small for this model: {parts} need {gb(smallest)}. The smallest "
            f"gpu_memory that works is {as_option(smallest)!r} (or a shorter context_length).", "gpu_memory", smallest)
    error = DeviceMemoryError if device.type == "cuda" else HostMemoryError
    raise error(f"{device} has room for {gb(max(budget, 0))} after its margin; {parts} need {gb(smallest)}. "
                "Options: a smaller dtype, a shorter context_length, the disk tier (from_pretrained), or free memory.")


def checkpoint_slots(cfg, cache_experts, device: torch.device, expert_store: str | None, need: ModelBytes):
    """from_pretrained's slot decision: from the budgets (`cfg.gpu_memory` / `host_memory`) when given, else from
    `cache_experts` (a count, bytes like '8GB' or 'auto': checkpoint/plan.py). Returns (slots, how they were
    decided, the memory probes, the expert store, pinned or not, the `MemoryPlan` or None)."""
    from .checkpoint.plan import resolve_slots

    if not cfg.has_budget:
        store = expert_store or "ram"
        slots, how, mem = resolve_slots(cache_experts, device=device, expert_store=store, top_k=need.top_k,
                                        total_experts=need.total_experts, expert_bytes=need.expert_bytes,
                                        store_bytes=sum(need.layer_bytes), dense_bytes=need.dense_bytes,
                                        kv_bytes=need.kv_bytes)
        return slots, how, mem, store, cfg.resolved_pin_memory(), None
    if cache_experts != "auto":
        raise OffloadConfigError(f"cache_experts={cache_experts!r} and gpu_memory / host_memory both size the device "
                                 "slots: give a number of slots or memory budgets, not both.")
    memory = resolve(device, need, gpu_memory=cfg.gpu_memory, host_memory=cfg.host_memory, unified=cfg.unified_memory,
                     pin_memory=cfg.pin_memory, expert_store=expert_store)
    available, total = probe_host()
    mem = {"host_available": available, "host_total": total, "device": probe_device(device)}
    return memory.num_slots, memory.summary(), mem, memory.expert_store, memory.pin_memory, memory


def offload_need(model: torch.nn.Module, layers, top_k: int, context_length: int, device: torch.device) -> ModelBytes:
    """`ModelBytes` of a loaded model about to be offloaded (its weights on CPU): on `device="cpu"` its
    non-expert weights stay where they are, so the pool already holds them."""
    from .checkpoint.plan import kv_cache_bytes
    from .runtime.offloader import _packing

    packings = [_packing(layer) for layer in layers]
    counts = [int(layer.experts.num_experts) for layer in layers]
    experts = {id(getattr(layer.experts, name)) for layer in layers for name in layer.param_names}
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in experts}
    dense = sum(t.numel() * t.element_size() for t in tensors.values())
    dtype = packings[0].dtype
    return ModelBytes(layer_bytes=tuple(p.nbytes * n for p, n in zip(packings, counts)),
                      expert_bytes=max(p.nbytes for p in packings), total_experts=sum(counts), top_k=top_k,
                      dense_bytes=dense, kv_bytes=kv_cache_bytes(model.config, context_length, dtype),
                      context_length=context_length, held_host_bytes=dense if device.type == "cpu" else 0)
