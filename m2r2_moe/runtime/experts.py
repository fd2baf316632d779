"""Expert compute on device slots, with the model's own kernels.

The experts module of each MoE block keeps its class and config; only its instance `forward` is swapped
for one that asks the runtime for slots and then calls the class's own forward (which dispatches through
transformers' `ExpertsInterface` to eager / grouped_mm / batched_mm exactly as the model would) on a
`SlotView`: an object that looks like the experts module, but whose expert tensors are the device slot
pool (`[S, ...]`) and whose routing indices are remapped from expert ids to slot ids. Same kernels, same
per-row arithmetic: offloaded logits are bit-identical to the original on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DeviceMemoryError


class SlotView:
    """Stands in for an experts module: expert tensors are slot-pool views, all else is the module's.

    The kernel reads a handful of the module's attributes on every call (`act_fn`, `has_gate`, `config`, ...):
    they are copied onto the view once, so that no per-call lookup falls through to the module, and `config`
    is a stand-in that answers `_experts_implementation` (read per call by transformers' dispatch, and slow
    on a real config) from the value the runtime read at install."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor], num_slots: int,
                 attributes: dict | None = None):
        if attributes is None:
            attributes = _kernel_attributes(module)
        self.__dict__.update(attributes)
        self.__dict__["_module"] = module
        self.__dict__["_attributes"] = attributes
        self.__dict__["_tensors"] = tensors
        self.__dict__.update(tensors)  # gate_up_proj [S, 2I, H], down_proj [S, H, I], biases [S, ...]
        self.__dict__["num_experts"] = num_slots  # one "expert" per slot
        self.__dict__["_is_expert_parallel"] = False  # every routed index is a real slot: no EP sentinels
        self.__dict__["_windows"] = {}

    def window(self, lo: int, hi: int, step: int = 1) -> "SlotView":
        """A view of slots lo, lo + step, ..., hi only (slot lo becomes index 0; a strided view, no copy),
        kept for reuse (at most `MAX_WINDOWS`: the windows decode asks for repeat)."""
        windows = self.__dict__["_windows"]
        view = windows.get((lo, hi, step))
        if view is None:
            if len(windows) >= MAX_WINDOWS:
                windows.clear()
            count = (hi - lo) // step + 1
            view = SlotView(self._module, {n: t[lo : hi + 1 : step] for n, t in self._tensors.items()}, count,
                            self.__dict__["_attributes"])
            windows[(lo, hi, step)] = view
        return view

    def __getattr__(self, name):  # only called for names not set on the view
        return getattr(self.__dict__["_module"], name)


MAX_WINDOWS = 4096


class _ConfigView:
    """The experts' config, with `_experts_implementation` fixed at what the runtime read at install."""

    def __init__(self, config):
        self.__dict__["_config"] = config
        self.__dict__["_experts_implementation"] = getattr(config, "_experts_implementation", None)

    def __getattr__(self, name):
        return getattr(self.__dict__["_config"], name)


def _kernel_attributes(module: nn.Module) -> dict:
    """The module's plain attributes and submodules (`act_fn`), read once, and a config stand-in."""
    found = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}
    found.update(module._modules)
    if getattr(module, "config", None) is not None:
        found["config"] = _ConfigView(module.config)
    return found


def allocate_pool(num_slots: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The device slot pool `[S, numel]`, or `DeviceMemoryError` saying how much did not fit.

    On CUDA the zero fill is queued on the device's current (compute) stream, not run: the copy engine,
    made after the pool, orders its copy stream after it (`ComputeSide.order_before`)."""
    try:
        return torch.zeros(num_slots, numel, dtype=dtype, device=device)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:  # nothing is installed yet: model untouched
        if not isinstance(e, MemoryError) and "allocate memory" not in str(e):  # the CPU allocator's words
            raise
        size = num_slots * numel * torch.empty(0, dtype=dtype).element_size()
        raise DeviceMemoryError(
            f"could not allocate {num_slots} expert slots ({size / 2**30:.2f} GiB) on {device}: {e}. "
            "Lower cache_experts (or free device memory) and offload again."
        ) from e


def slot_range(slots: list[int]) -> tuple[int, int, int]:
    """(lo, hi, step) of the smallest strided range of slots covering `slots`: the slots themselves when
    they are evenly spaced (always so for one or two: top-2 decode), else every slot from lo to hi."""
    if len(slots) == 2:  # top-2 decode, at every layer: no sort
        a, b = slots
        return (a, b, b - a) if a < b else (b, a, a - b)
    ordered = sorted(slots)
    lo, hi = ordered[0], ordered[-1]
    step = ordered[1] - lo if len(ordered) > 1 else 1
    if any(b - a != step for a, b in zip(ordered, ordered[1:])):
        step = 1
    return lo, hi, step


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small table for the device, without a host sync: on CUDA it goes through pinned memory with a
    non-blocking copy (a copy from ordinary host memory would block the host until it lands)."""
    table = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return table if device.type == "cpu" else table.to(device, non_blocking=True)


class IndexTables:
    """The `[1, K]` slot-index tables of batch-1 decode calls, each made once per distinct content: making one
    is a torch op (tens of µs between a layer's kernels on a CPU, a host-to-device copy on CUDA), looking one up
    is a dict read. Kernels only read their index argument; a table one changed in place anyway (its version
    counter moved) is made afresh, so a cached table always holds what its key says."""

    LIMIT = 4096  # distinct tables kept (all dropped when full: decode's working set is rebuilt in a few tokens)

    def __init__(self, device: torch.device):
        self.device = device
        self._tables: dict[tuple[int, ...], torch.Tensor] = {}

    def get(self, values: tuple[int, ...]) -> torch.Tensor:
        table = self._tables.get(values)
        if table is None or table._version:
            if len(self._tables) >= self.LIMIT:
                self._tables.clear()
            table = self._tables[values] = to_device([values], self.device)
        return table


def make_offloaded_forward(runtime, layer: int):
    """The `forward` installed on the experts module of MoE layer `layer`."""

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return runtime.run_experts(layer, hidden_states, top_k_index, top_k_weights)

    forward.__m2r2_offloaded__ = True
    return forward
