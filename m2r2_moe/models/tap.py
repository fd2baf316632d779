"""Tapping a MoE layer: what each layer saw at its latest call, captured with forward hooks.

The one way the project reads a model's routing and residuals — for the prefetcher (residuals at run time),
the predictors' training and evaluation (`predict/collect.py`), the profiler's reference runs, routing traces
and the replay benchmark. Hooks, so the model runs unmodified, offloaded or not. Per MoE layer l:

- `residual[l]` `[T, H]`: the residual entering the block — the input of the norm in front of it (or of the
  block itself where there is no such norm) — and `normed[l]`, that norm's output, which the router reads;
- `chosen[l]` / `weights[l]` `[T, K]`: the experts and routing weights the experts module receives;
- `logits[l]` `[T, E]`: the router's logits (routers returning `(logits, weights, indices)` or bare logits).

`on_routing(l)` is called when layer l's experts module is called: by then its residual and routing are known
(accumulating consumers copy what they need there). Tensors are kept as the model made them (no copy, no
host sync); consumers that keep them past the next forward must copy. With `flat=False` the residual and `normed`
are not even flattened nor detached (`[..., H]`, a view the model made): the hook then costs a layer 3 µs instead of
9 in a decode step (in place, the prefetcher's tap), for a consumer that reads them once per forward and reshapes
only what it needs (a forward run with gradients keeps each layer's latest pair, and their graph, until the next).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import MoELayer


class LayerTap:
    """Hooks on `layers` (a model's `MoELayer`s); `remove()` (or leaving the `with` block) takes them off."""

    def __init__(self, layers: list[MoELayer], *, residual: bool = True, routing: bool = True, logits: bool = False,
                 on_routing: Callable[[int], None] | None = None, flat: bool = True):
        count = len(layers)
        self.layers = layers
        self.residual: list[torch.Tensor | None] = [None] * count
        self.normed: list[torch.Tensor | None] = [None] * count
        self.chosen: list[torch.Tensor | None] = [None] * count
        self.weights: list[torch.Tensor | None] = [None] * count
        self.logits: list[torch.Tensor | None] = [None] * count
        self.on_routing = on_routing
        self._flat, self._taps_residual, self._wanted = flat, residual, residual  # (no residual hook after `remove`)
        self._residual_handles = [self._tap_residual(layer, i, flat) for i, layer in enumerate(layers) if residual]
        self._handles = []
        for i, layer in enumerate(layers):
            if routing or on_routing is not None:
                self._handles.append(layer.experts.register_forward_pre_hook(self._routing_hook(i), with_kwargs=True))
            if logits:
                if layer.router is None:
                    raise ValueError(f"MoE layer {i} ({type(layer.block).__name__}) has no router module to tap")
                self._handles.append(layer.router.register_forward_hook(self._logits_hook(i)))

    @property
    def residuals_wanted(self) -> bool:
        """False: the residual hooks are off the model (a consumer pausing, e.g. the prefetcher while prefetching is
        off for a forward); what they last saw stays. A module with a hook takes PyTorch's slower call path even
        when the hook returns at once: taken off, an idle tap costs the model nothing."""
        return self._wanted

    @residuals_wanted.setter
    def residuals_wanted(self, wanted: bool) -> None:
        wanted = bool(wanted) and self._taps_residual
        if wanted == self._wanted:
            return
        for handle in self._residual_handles:
            handle.remove()
        self._residual_handles = ([self._tap_residual(layer, i, self._flat) for i, layer in enumerate(self.layers)]
                                  if wanted else [])
        self._wanted = wanted

    def _tap_residual(self, layer: MoELayer, i: int, flat: bool):
        def as_made(module: nn.Module, args, output):  # flat=False
            self.residual[i], self.normed[i] = args[0], output

        def after_norm(module: nn.Module, args, output):
            x = args[0]
            self.residual[i] = x.detach().reshape(-1, x.shape[-1])
            self.normed[i] = output.detach().reshape(-1, output.shape[-1])

        def before_block(module: nn.Module, args):
            x = args[0]
            self.residual[i] = self.normed[i] = x.detach().reshape(-1, x.shape[-1])

        if layer.norm is not None:
            return layer.norm.register_forward_hook(after_norm if flat else as_made)
        return layer.block.register_forward_pre_hook(before_block)

    def _routing_hook(self, i: int):
        def hook(module: nn.Module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            self.chosen[i] = index.detach()
            self.weights[i] = weights.detach()
            if self.on_routing is not None:
                self.on_routing(i)

        return hook

    def _logits_hook(self, i: int):
        def hook(module: nn.Module, args, output):
            logits = output if isinstance(output, torch.Tensor) else output[0]
            self.logits[i] = logits.detach().reshape(-1, logits.shape[-1])

        return hook

    def remove(self) -> None:
        for h in self._handles + self._residual_handles:
            h.remove()
        self._handles.clear()
        self._residual_handles.clear()
        self._taps_residual = self._wanted = False

    def __enter__(self) -> "LayerTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def router_choice(output, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`logits [T, E]`, `chosen [T, K]`) from a router's output: transformers 5 routers return
    `(logits, weights, indices)`; a bare `nn.Linear` gate returns logits, whose softmax top-k is its choice."""
    if isinstance(output, torch.Tensor):
        return output, output.float().topk(top_k, dim=-1).indices
    logits = output[0]
    indices = next((t for t in output[1:] if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
    if indices is None:
        indices = logits.float().topk(top_k, dim=-1).indices
    return logits, indices
