"""Predictions → prefetch copies.

At MoE layer l, after the layer's own experts are pinned (so a prefetch can never evict them) and their
demand loads are queued (so a prefetch never delays them), the predictor turns the residual r_l into
expert scores for layers l+1..l+D. For each target the prefetcher takes the top-k experts whose predicted
probability (the target router's softmax on the accelerated residual, for `gate`/`m2r2`) is at least
`min_prob`, and, nearest target first (deadline order):
- skips experts already resident or in flight (de-duplication); with the `predictive` policy it refreshes
  their recency so that eviction picks experts no prediction wants (prediction-aware eviction), while
  plain `lru` leaves recency to actual use;
- withdraws queued copies for a target that the newer prediction no longer wants (cancellation);
- keeps at most `max_queued` prefetch copies unfinished: the link then carries only the most urgent, most
  likely experts, and prefetches cannot evict more of the cache than the link can refill in time. A
  prefetch only ever evicts an unpinned expert, and the copy engine runs demand loads first.
Copies are queued with priority d (demand loads: 0): on CPU the copy engine runs them in deadline order;
on CUDA the single copy stream runs them in submission order, which is the same.
"""

from __future__ import annotations

import torch

from ..predict.base import Predictor


class Prefetcher:
    """Drives one predictor for one offloaded model."""

    def __init__(self, offloader, predictor: Predictor, min_prob: float = 0.15, width: int | None = None,
                 max_queued: int | None = None, refresh: bool = True):
        self.offloader, self.predictor = offloader, predictor
        self.refresh = refresh  # the `predictive` policy: predicted resident experts become most recent
        self.min_prob = min_prob
        self.width = width or offloader.top_k
        self.max_queued = max_queued or 2 * offloader.top_k
        self.residuals: list[torch.Tensor | None] = [None] * len(offloader.layers)
        self._wanted: dict[int, set[int]] = {}  # target layer -> experts the latest prediction wants
        self._hooks = []
        if predictor.needs_residual:
            for i, layer in enumerate(offloader.layers):
                self._hooks.append(self._residual_hook(layer, i))

    def _residual_hook(self, layer, i: int):
        """r_i [T, H]: the input of the pre-MoE norm, or of the block itself where there is no such norm."""
        def keep(module, args):
            x = args[0]
            self.residuals[i] = x.reshape(-1, x.shape[-1])

        module = layer.norm if layer.norm is not None else layer.block
        return module.register_forward_pre_hook(keep)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def on_layer(self, layer: int, top_k_index: torch.Tensor, pinned: int) -> None:
        """Called by the offloader at layer `layer` once its `pinned` experts hold slots."""
        predictions = self.predictor.predict(layer, self.residuals[layer], top_k_index)
        self.predictor.observe(layer, top_k_index)
        targets = {layer + d: self._ranked(scores) for d, scores in predictions.items()}
        self._wanted.pop(layer, None)
        for target, experts in targets.items():
            for expert in self._wanted.get(target, set()) - set(experts):
                self.offloader.withdraw(target, expert)
            self._wanted[target] = set(experts)
        if self.refresh:  # farthest target first, so the nearest ends most recent
            for target in sorted(targets, reverse=True):
                for expert in targets[target]:
                    self.offloader.touch(target, expert)
        queued = self.offloader.queued_prefetches()
        for target in sorted(targets):  # deadline order
            for expert in targets[target]:
                if queued >= self.max_queued:
                    break
                queued += self.offloader.prefetch(target, expert, priority=target - layer)
        if layer == len(self.offloader.layers) - 1 and hasattr(self.predictor, "advance"):
            self.predictor.advance(top_k_index.shape[0])

    def _ranked(self, scores: torch.Tensor) -> list[int]:
        """Experts to bring for one target, most likely first: each token's top `width` experts whose
        share of the token's scores is at least `min_prob` (union over the batch)."""
        scores = scores.float().clamp_min(0)
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)  # [T, E]
        top, order = probs.topk(min(self.width, probs.shape[-1]), dim=-1)  # [T, W]
        keep = (top >= self.min_prob) & (top > 0)  # an empty prediction stays empty
        if probs.shape[0] == 1:  # decode, batch 1
            # one device→host read per target: which copies to issue depends on it
            return order[0][keep[0]].tolist()
        best = torch.zeros_like(probs).scatter_(-1, order, top * keep).amax(0)  # [E]
        ranked = best.argsort(descending=True)
        return ranked[: int((best > 0).sum())].tolist()
