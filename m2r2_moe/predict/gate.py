"""`gate`: router_{l+d} applied to r_l — speculative loading (Eliseev & Mazur), the baseline to beat."""

from __future__ import annotations

import torch

from ..models.base import MoEAdapter, MoELayer
from .base import Predictor


class GatePredictor(Predictor):
    """Scores for layer l+d are the family's routing of `norm_{l+d}(r_l)` (no training)."""

    name = "gate"
    needs_residual = True

    def __init__(self, num_layers, num_experts, top_k, depth, adapter: MoEAdapter, layers: list[MoELayer]):
        super().__init__(num_layers, num_experts, top_k, depth)
        self.adapter, self.layers = adapter, layers

    def target_scores(self, target: int, residual: torch.Tensor) -> torch.Tensor:
        """The family's expert scores `[T, E]` at layer `target` for a (predicted) residual `[T, H]`."""
        layer = self.layers[target]
        hidden = layer.norm(residual) if layer.norm is not None else residual
        scores, _ = self.adapter.route(layer, hidden)
        return scores

    @torch.no_grad()
    def predict(self, layer: int, residual: torch.Tensor | None, chosen: torch.Tensor | None = None,
                ) -> dict[int, torch.Tensor]:
        return {d: self.target_scores(layer + d, residual) for d in self.depths(layer)}
