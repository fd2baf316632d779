"""Predictions → prefetch copies.

At MoE layer l, after the layer's own experts are pinned (so a prefetch can never evict them) and their
demand loads are queued (so a prefetch never delays them), the predictor turns the residual r_l into
expert scores for layers l+1..l+D. The prefetcher takes each target's set (confidence-widened), nearest
layer first — that is deadline order — and:
- skips experts already resident or in flight (de-duplication); with the `predictive` policy it
  refreshes their recency so that eviction picks experts no prediction wants (prediction-aware
  eviction), while plain `lru` leaves recency to actual use;
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

    def __init__(self, offloader, predictor: Predictor, mass: float = 0.9, cap: int | None = None,
                 refresh: bool = True):
        self.offloader, self.predictor = offloader, predictor
        self.refresh = refresh  # the `predictive` policy: predicted resident experts become most recent
        self.mass = mass
        self.cap = cap or 2 * offloader.top_k
        self.residuals: list[torch.Tensor | None] = [None] * len(offloader.layers)
        self._hooks = []
        if predictor.needs_residual:
            for i, layer in enumerate(offloader.layers):
                # no pre-MoE norm (OLMo2-style post-norm families): the block's input is the residual itself
                source = layer.norm if layer.norm is not None else layer.block
                self._hooks.append(source.register_forward_pre_hook(self._keep_residual(i)))

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
        predictions = self.predictor.predict(layer, self.residuals[layer], top_k_index)
        self.predictor.observe(layer, top_k_index)
        targets = {d: self._ranked(scores) for d, scores in predictions.items()}
        if self.refresh:  # farthest target first, so the nearest ends most recent
            for d in sorted(targets, reverse=True):
                for expert in targets[d]:
                    self.offloader.touch(layer + d, expert)
        budget = self.offloader.num_slots - pinned  # slots the predicted experts may occupy together
        for d in sorted(targets):  # deadline order
            for expert in targets[d][: max(budget, 0)]:
                self.offloader.prefetch(layer + d, expert, priority=d)
            budget -= len(targets[d])
        if layer == len(self.offloader.layers) - 1 and hasattr(self.predictor, "advance"):
            self.predictor.advance(top_k_index.shape[0])

    def _ranked(self, scores: torch.Tensor) -> list[int]:
        """The confidence-widened set of a target (union over the batch), most likely first."""
        if scores.shape[0] == 1:  # decode, batch 1: one sort instead of the general mask path
            values, order = scores[0].float().sort(descending=True)
            share = values.clamp_min(0).cumsum(0) / values.clamp_min(0).sum().clamp_min(1e-30)
            # device→host read: the copies to issue depend on it
            take = min(int((share < self.mass).sum()) + 1, self.cap, int((values > 0).sum()))
            return order[:take].tolist()
        mask = select(scores, mass=self.mass, cap=self.cap)  # [T, E]
        total = (scores.float() * mask).sum(0)  # [E]
        # one device→host read per target: which copies to issue depends on it
        return total.argsort(descending=True)[: int(mask.any(0).sum())].tolist()
