"""`gate`: router_{l+d} applied to r_l — speculative loading (Eliseev & Mazur), the baseline to beat."""

from __future__ import annotations

import torch

from ..models.base import MoEAdapter, MoELayer
from .base import Predictor, as_probabilities
from .stacked import StackedRouting


class GatePredictor(Predictor):
    """Scores for layer l+d are the family's routing of `norm_{l+d}(r_l)` (no training)."""

    name = "gate"
    needs_residual = True
    scores_are_probabilities = True

    def __init__(self, num_layers, num_experts, top_k, depth, adapter: MoEAdapter, layers: list[MoELayer]):
        super().__init__(num_layers, num_experts, top_k, depth)
        self.adapter, self.layers = adapter, layers
        # per source layer: the targets' routing batched (predict/stacked.py), or None for the reference path
        self.stacked = self._stack()
        self._host = self._host_weights()

    def _stack(self) -> list[StackedRouting | None]:
        return [StackedRouting.build(self.adapter, self.layers, [l + d for d in self.depths(l)])
                for l in range(self.num_layers)]

    def to(self, device: torch.device | str) -> "GatePredictor":
        """The reference path computes with the model's own norms and routers, wherever they are; the
        stacked copies of their weights are rebuilt from them as they are now (after the model moved to
        `device`, and in its dtype if that changed since the predictor was built)."""
        self.stacked = self._stack()
        self._host = self._host_weights()
        return self

    def _host_weights(self) -> list:
        """Per source layer, numpy views (no copy) of the stacked routers for the native batch-1 path: (all
        targets' folded routers [H, D*E], eps, D), or None where it does not apply (not on the CPU in float32,
        no shared stacked weights, or no native heads in this build)."""
        from .. import _ext  # the only door to native code

        out = []
        for stacked in self.stacked:
            shared = stacked.shared if stacked is not None and _ext.HAS_PLANNER else None
            if shared is None or shared[0].device.type != "cpu":
                out.append(None)
                continue
            weight, eps = shared
            out.append((weight.numpy(), eps, stacked.router_weight_t.shape[0]))
        return out

    def target_scores(self, target: int, residual: torch.Tensor) -> torch.Tensor:
        """The family's expert scores `[T, E]` at layer `target` for a (predicted) residual `[T, H]`."""
        layer = self.layers[target]
        hidden = layer.norm(residual) if layer.norm is not None else residual
        scores, _ = self.adapter.route(layer, hidden)
        return scores

    def _scores(self, layer: int, residuals: torch.Tensor) -> dict[int, torch.Tensor]:
        """`residuals [D, T, H]` predicted for targets layer+1..layer+D → `{d: scores [T, E]}`."""
        depths = self.depths(layer)
        if self.stacked[layer] is not None:
            scores = self.stacked[layer].scores(residuals)  # [D, T, E]
            return {d: scores[i] for i, d in enumerate(depths)}
        return {d: self.target_scores(layer + d, residuals[i]) for i, d in enumerate(depths)}

    def _probabilities(self, layer: int, residuals: torch.Tensor) -> torch.Tensor:
        """`residuals [D, T, H]` → scores `[D, T, E]` normalised to sum to 1 per token (softmax routers
        already do; the stacked path is only taken for those)."""
        if self.stacked[layer] is not None:
            return self.stacked[layer].scores(residuals)
        return as_probabilities(torch.stack(list(self._scores(layer, residuals).values())))

    @torch.no_grad()
    def predict(self, layer: int, residual: torch.Tensor | None, chosen: torch.Tensor | None = None,
                ) -> dict[int, torch.Tensor]:
        depths = self.depths(layer)
        return self._scores(layer, residual.expand(len(depths), *residual.shape)) if len(depths) else {}

    def predict_host(self, layer, residual, chosen=None, normed=None, count=None):
        host = self._host[layer]
        if host is None or residual.shape[0] != 1 or residual.dtype != torch.float32 or residual.device.type != "cpu":
            return None
        from .. import _ext

        weight, eps, count = host
        return _ext.planner.rms_linear_softmax(residual.reshape(-1).numpy(), eps, weight, count)  # [1, (1,) H]

    @torch.no_grad()
    def predict_stacked(self, layer, residual, chosen=None, normed=None):
        depths = list(self.depths(layer))
        if not depths:
            return [], None
        stacked = self.stacked[layer]
        shared = stacked.scores_shared(residual) if stacked is not None else None  # one residual, every target
        if shared is not None:
            return depths, shared
        return depths, self._probabilities(layer, residual.expand(len(depths), *residual.shape))
