"""Predictions → prefetch copies.

At MoE layer l, after the layer's own experts are pinned (so a prefetch can never evict them) and their
demand loads are queued (so a prefetch never delays them), the predictor turns the residual r_l into
expert scores for layers l+1..l+D. The prefetcher takes each target's set (confidence-widened), nearest
layer first — that is deadline order — and:
- skips experts already resident or in flight (de-duplication), refreshing their recency so that this
  round's other prefetches do not evict them;
- stops when the experts predicted this round would fill the slots not pinned by the current layer, so
  that predictions for a nearer layer are never evicted by predictions for a farther one;
- queues each copy with priority d (demand loads have 0): on CPU the copy engine runs them in deadline
  order; on CUDA the single copy stream runs them in submission order, which is the same.
"""

from __future__ import annotations

import torch

from ..predict.base import Predictor, select


class Prefetcher:
    """Drives one predictor for one offloaded model."""

    def __init__(self, offloader, predictor: Predictor, mass: float = 0.9, cap: int | None = None):
        self.offloader, self.predictor = offloader, predictor
        self.mass = mass
        self.cap = cap or 2 * offloader.top_k
        self.residuals: list[torch.Tensor | None] = [None] * len(offloader.layers)
        self._hooks = []
        if predictor.needs_residual:
            for i, layer in enumerate(offloader.layers):
                self._hooks.append(layer.norm.register_forward_pre_hook(self._keep_residual(i)))

    def _keep_residual(self, i: int):
        def hook(module, args):
            x = args[0]
            self.residuals[i] = x.reshape(-1, x.shape[-1])  # r_i [T, H], the input of the pre-MoE norm

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def on_layer(self, layer: int, top_k_index: torch.Tensor, pinned: int) -> None:
        """Called by the offloader at layer `layer` once its `pinned` experts hold slots."""
        residual = self.residuals[layer]
        predictions = self.predictor.predict(layer, residual)
        self.predictor.observe(layer, top_k_index)
        budget = self.offloader.num_slots - pinned
        for d in sorted(predictions):
            scores = predictions[d]  # [T, E]
            mask = select(scores, mass=self.mass, cap=self.cap)  # [T, E]
            # one device→host read per target: the copies to issue depend on it
            ranked = (scores.float() * mask).sum(0).argsort(descending=True)[: int(mask.any(0).sum())].tolist()
            for expert in ranked:
                if budget <= 0:
                    return
                budget -= 1
                self.offloader.prefetch(layer + d, expert, priority=d)
        if layer == len(self.offloader.layers) - 1 and hasattr(self.predictor, "advance"):
            self.predictor.advance(top_k_index.shape[0])
