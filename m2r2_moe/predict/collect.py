"""Capture, per MoE layer, the residual entering the block and the experts it ran — with hooks, so
the model runs unmodified (offloaded or not).

r_l is the input of the norm in front of layer l's MoE block (`MoELayer.norm`); the experts come from
the `top_k_index` argument of the experts module's forward, i.e. exactly what the block computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..models.base import MoELayer


class LayerTap:
    """Forward hooks that keep the latest `residual [T, H]` and `chosen [T, K]` of every MoE layer."""

    def __init__(self, layers: list[MoELayer]):
        self.layers = layers
        self.residuals: list[torch.Tensor | None] = [None] * len(layers)
        self.chosen: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = []
        for i, layer in enumerate(layers):
            if layer.norm is None:
                raise ValueError(f"MoE layer {i} has no pre-MoE norm to read the residual from")
            self._handles.append(layer.norm.register_forward_pre_hook(self._residual_hook(i)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._experts_hook(i), with_kwargs=True))

    def _residual_hook(self, i: int):
        def hook(module: nn.Module, args):
            x = args[0]
            self.residuals[i] = x.detach().reshape(-1, x.shape[-1])

        return hook

    def _experts_hook(self, i: int):
        def hook(module: nn.Module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            self.chosen[i] = index.detach()

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "LayerTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def collect(model: nn.Module, layers: list[MoELayer], batches: Iterable[torch.Tensor],
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each batch of token ids `[B, S]` (no padding): (`residuals [L, B*S, H]` float32,
    `chosen [L, B*S, K]` int64), token order = row-major over (batch, position)."""
    device = next(p.device for p in model.parameters() if p.numel())
    with LayerTap(layers) as tap:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
            yield (torch.stack([r.float().cpu() for r in tap.residuals]),
                   torch.stack([c.long().cpu() for c in tap.chosen]))


def chunk_tokens(ids: torch.Tensor, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Split a 1-D token stream into `[B, seq_len]` batches (the tail that does not fill a row is dropped)."""
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
