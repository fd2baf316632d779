"""What transformers users do with a model, done to an offloaded one: right, or a clear error, never silent loss.

`m2r2_moe.offload` installs these hooks on the model (`ModelHooks.install`, all or nothing) and `remove_offload`
takes them off; a model that is not offloaded is never touched. Instance attributes (as the experts' `forward`)
and torch's module hooks only, no class is patched. Habit by habit:

- `save_pretrained(folder)`: the standard checkpoint the un-offloaded model would write, the experts streamed
  from the store one MoE layer at a time (`saving.py`).
- `state_dict()`: the real expert tensors (a state-dict post-hook on each experts module): fresh copies rebuilt
  from the store (or read from the checkpoint files: disk tier), each with its own storage as the un-offloaded
  model's are, when host memory holds them, else `HostMemoryError`. Changing them does not change the model.
- `load_state_dict` with expert tensors: refused before anything is copied (a pre-hook on every module above an
  experts module; torch runs the pre-hook of the module `load_state_dict` was called on first).
- `parameters()`: an offloaded expert tensor is an empty placeholder (`numel() == 0`, the weights are in the
  store); `num_parameters()` counts the real expert tensors.
- `.to(dtype)`, `.half()`, `.float()`, `.to(device)`, `.cuda()`, `.cpu()`: all go through `nn.Module._apply`; an
  instance `_apply` on every module above an experts module tries the conversion on an empty tensor of the
  experts' dtype and device first, and refuses one that would change them before anything is converted.
- backward through an offloaded experts module: `OffloadedOperationError` when the gradient reaches it.
- `copy.deepcopy`, `copy.copy`, `pickle` / `torch.save(model)`: refused.
"""

from __future__ import annotations

import contextvars
import functools
import logging

import torch
from torch import nn

from .checkpoint import plan as memory
from .checkpoint import writer as saving
from .errors import HostMemoryError, OffloadedOperationError

logger = logging.getLogger(__name__)

_MISSING = object()
_RAW_STATE = contextvars.ContextVar("m2r2_raw_state", default=False)  # state_dict() leaves the placeholders


class ModelHooks:
    """The hooks of one offloaded model; `install` is all or nothing, `remove` restores what was there."""

    def __init__(self, model: nn.Module, offloader):
        self.model = model
        self.offloader = offloader
        names = {id(m): n for n, m in model.named_modules()}
        self.prefixes = [names[id(layer.experts)] for layer in offloader.layers]  # e.g. model.layers.0.mlp.experts
        self.source = ExpertSource(self)
        self._handles: list = []
        self._attrs: list[tuple[nn.Module, str, object]] = []  # (module, attribute, what it replaced)

    def install(self) -> "ModelHooks":
        try:
            self._set(self.model, "save_pretrained", functools.partial(saving.save_pretrained, self.model, self.source))
            self._set(self.model, "num_parameters", self._num_parameters)
            for name, keys in self._ancestors().items():
                module = self.model.get_submodule(name)
                self._set(module, "_apply", functools.partial(self._apply, module._apply))
                self._set(module, "__deepcopy__", functools.partial(_refuse_copy, module))
                self._set(module, "__reduce_ex__", functools.partial(_refuse_copy, module))
                self._handles.append(module.register_load_state_dict_pre_hook(functools.partial(_refuse_load, keys)))
            for i, layer in enumerate(self.offloader.layers):
                self._handles.append(layer.experts.register_state_dict_post_hook(functools.partial(self._state, i)))
                self._set(layer.experts, "forward", _no_backward(layer.experts.__dict__["forward"], i))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, name, previous in reversed(self._attrs):
            if previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous
        self._handles.clear()
        self._attrs.clear()

    def _set(self, module: nn.Module, name: str, value) -> None:
        self._attrs.append((module, name, module.__dict__.get(name, _MISSING)))
        module.__dict__[name] = value

    def _ancestors(self) -> dict[str, list[str]]:
        """Every module on the path to an experts module (root `""` included) → the expert state keys below it,
        relative to it."""
        out: dict[str, list[str]] = {}
        for prefix, layer in zip(self.prefixes, self.offloader.layers):
            parts = prefix.split(".")
            for depth in range(len(parts) + 1):
                rel = ".".join(parts[depth:])
                out.setdefault(".".join(parts[:depth]), []).extend(f"{rel}.{p}" if rel else p for p in layer.param_names)
        return out

    # -- the hooks ---------------------------------------------------------------------------------------------
    def _state(self, layer: int, module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        """State-dict post-hook of experts module `layer`: the placeholders become the real tensors."""
        if _RAW_STATE.get():
            return
        for name, tensor in self.source.layer(layer).items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = tensor

    def _apply(self, apply, fn, *args, **kwargs):
        """`nn.Module._apply` of a module above the experts: refuse a conversion the experts cannot follow."""
        layer = self.offloader.layers[0]
        placeholder = getattr(layer.experts, layer.param_names[0])
        probe = torch.empty(0, dtype=placeholder.dtype, device=placeholder.device)
        out = fn(probe)
        if isinstance(out, torch.Tensor) and (out.dtype != probe.dtype or out.device != probe.device):
            raise OffloadedOperationError(
                f"this {type(self.model).__name__} is offloaded with its experts in {probe.dtype} on {probe.device} "
                f"(a host store and device slots that a module conversion does not reach); converting it to "
                f"{out.dtype} on {out.device} would leave a model of mixed dtypes or devices. Call "
                "m2r2_moe.remove_offload(model), convert, and offload again (or load with "
                "m2r2_moe.from_pretrained(path, dtype=..., device=...)). Nothing was converted."
            )
        return apply(fn, *args, **kwargs)

    def _num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' `num_parameters`, counting each offloaded expert tensor at its real size."""
        count = type(self.model).num_parameters(self.model, only_trainable=only_trainable,
                                                exclude_embeddings=exclude_embeddings)
        for layer, packing in zip(self.offloader.layers, self.offloader.store.packings):
            for name, shape in zip(packing.names, packing.shapes):
                if getattr(layer.experts, name).requires_grad or not only_trainable:
                    count += int(layer.experts.num_experts) * torch.Size(shape).numel()
        return count


class ExpertSource:
    """The expert tensors of an offloaded model as the model's state keys name them (for `state_dict` and
    `save_pretrained`)."""

    def __init__(self, hooks: ModelHooks):
        self.hooks = hooks

    @property
    def store(self):
        return self.hooks.offloader.store

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Param name → fresh `[E, ...]` tensor of MoE layer `layer` (state_dict(): this layer and the ones after
        it are about to be held in host memory at once, so they must fit)."""
        needed = sum(self.layer_bytes()[layer:])
        available, _ = memory.host_memory()
        if needed > 0.9 * available:
            raise HostMemoryError(
                f"state_dict() of this offloaded model builds its experts in host memory ({needed / 2**30:.2f} GiB "
                f"more, {available / 2**30:.2f} GiB available). Save with model.save_pretrained(folder), which streams "
                "them shard by shard, or call m2r2_moe.remove_offload(model) where the model fits."
            )
        return self.store.layer_tensors(layer)

    def raw_state(self) -> dict[str, torch.Tensor]:
        """`state_dict()` with the expert tensors left as the model holds them (empty placeholders)."""
        token = _RAW_STATE.set(True)
        try:
            return self.hooks.model.state_dict()
        finally:
            _RAW_STATE.reset(token)

    def meta_experts(self) -> list[dict[str, torch.Tensor]]:
        """Per MoE layer: state key → meta tensor of the expert tensor's real shape and dtype."""
        out = []
        for prefix, layer, packing in zip(self.hooks.prefixes, self.hooks.offloader.layers, self.store.packings):
            experts = int(layer.experts.num_experts)
            out.append({f"{prefix}.{name}": torch.empty((experts, *shape), dtype=packing.dtype, device="meta")
                        for name, shape in zip(packing.names, packing.shapes)})
        return out

    def read_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """State key → fresh `[E, ...]` tensor of MoE layer `layer`, rebuilt from the store bit for bit."""
        prefix = self.hooks.prefixes[layer]
        return {f"{prefix}.{name}": t for name, t in self.store.layer_tensors(layer).items()}

    def layer_bytes(self) -> list[int]:
        return [p.nbytes * int(layer.experts.num_experts)
                for p, layer in zip(self.store.packings, self.hooks.offloader.layers)]


class _ExpertsNoBackward(torch.autograd.Function):
    """Computes an offloaded experts module without recording a graph; a gradient reaching it is refused."""

    @staticmethod
    def forward(ctx, compute, layer, *inputs):
        ctx.layer = layer
        return compute()

    @staticmethod
    def backward(ctx, grad_output):
        raise OffloadedOperationError(
            f"backward through the offloaded experts of MoE layer {ctx.layer} is not supported: their weights sit in "
            "device slots that the next layers reuse. Supported: inference (generate, forwards under torch.no_grad or "
            "torch.inference_mode, forwards never backpropagated), and training weights after the last MoE block "
            "(e.g. lm_head) with every weight up to it frozen, so no input of an experts module requires grad. To "
            "train through the experts, call m2r2_moe.remove_offload(model) first. Gradients of weights after this "
            "layer may have been accumulated already."
        )


def _no_backward(forward, layer: int):
    """The experts' installed forward, with a graph node that refuses backward when an input requires grad.
    Dynamo does not trace into it (the runtime's slot bookkeeping and copies are host-side Python): a compiled
    model breaks its graph at each experts call and runs the runtime as is."""

    def guarded(*args, **kwargs):
        if torch.is_grad_enabled():  # checked first: generate runs without grad, this stays off its hot path
            needs_grad = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
            if needs_grad:
                return _ExpertsNoBackward.apply(lambda: forward(*args, **kwargs), layer, *needs_grad)
        return forward(*args, **kwargs)

    guarded.__m2r2_offloaded__ = True
    return torch.compiler.disable(guarded)


def _refuse_copy(module: nn.Module, *args) -> None:
    raise OffloadedOperationError(
        f"copy.deepcopy / copy.copy / pickling of an offloaded {type(module).__name__} is not supported: its experts "
        "live in a host store with device slots and a copy engine, which are not copied. Copy the model before "
        "offloading it (and offload each copy), or call m2r2_moe.remove_offload(model) first; to save it, use "
        "model.save_pretrained(folder)."
    )


def _refuse_load(keys: list[str], module, state_dict, prefix, local_metadata, strict, missing_keys,
                 unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook: expert tensors cannot be loaded into an offloaded model."""
    hits = [prefix + k for k in keys if prefix + k in state_dict]
    if hits:
        raise OffloadedOperationError(
            f"load_state_dict would overwrite offloaded expert weights ({hits[0]} and {len(hits) - 1} more), which live "
            "in the host store and device slots. Call m2r2_moe.remove_offload(model), load, and offload again (or "
            "load the checkpoint with m2r2_moe.from_pretrained). Nothing was loaded."
        )
