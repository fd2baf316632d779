"""Fast path: route the residuals predicted for all target layers of one source layer in one go.

The reference is `GatePredictor.target_scores` — per target layer, the family's norm module, then its
router through `MoEAdapter.route` — which costs some 20 small tensor ops per target. For the common case
(an RMSNorm in front of a bias-free linear router with softmax scores: Mixtral, Qwen-MoE, OLMoE, ...)
`StackedRouting` does the same arithmetic for the D targets of a source layer with batched ops. It is
only used after it reproduced the reference on a random probe; otherwise predictors keep the reference.
"""

from __future__ import annotations

import torch

from ..models.base import MoEAdapter, MoELayer


class StackedRouting:
    """RMSNorm + linear router + softmax for several target layers at once. Shapes: D targets, T tokens.

    Its tensors are copies of the model's norm and router weights, made where those weights are (device
    and dtype): a predictor rebuilds it after the model moved (`GatePredictor.to`)."""

    def __init__(self, norm_weight: torch.Tensor, eps: list[float], router_weight: torch.Tensor):
        self.norm_weight = norm_weight  # [D, 1, H]
        # a host list to the device (a synchronizing copy on CUDA): once per build, when the predictor is
        # built or placed, never per token
        self.eps = torch.tensor(eps, device=router_weight.device).view(-1, 1, 1)  # [D, 1, 1] float32
        self.router_weight_t = router_weight.transpose(1, 2)  # [D, H, E]
        # float32 models: the norm's weight folded into the router (diag(g) W^T), and one eps for all targets
        # when they share it, so that scoring is three ops: a fused rms_norm, one bmm, the softmax
        self.folded = self.shared = None
        if router_weight.dtype == torch.float32 and len(set(eps)) == 1:
            folded = norm_weight.transpose(1, 2) * self.router_weight_t  # [D, H, E]
            self.folded = (folded, eps[0])
            # one residual for every target (gate): all targets' routers side by side, [H, D*E]
            self.shared = (folded.permute(1, 0, 2).reshape(folded.shape[1], -1).contiguous(), eps[0])

    @property
    def device(self) -> torch.device:
        return self.router_weight_t.device

    def scores_shared(self, residual: torch.Tensor) -> torch.Tensor | None:
        """The same `residual [T, H]` routed by every target: `[D, T, E]` in three ops (the norm once, one
        matmul for all targets, the softmax); None when the weights do not allow it (then `scores`)."""
        if self.shared is None or residual.dtype != torch.float32:
            return None
        weight, eps = self.shared
        x = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps)  # [T, H]
        logits = (x @ weight).view(residual.shape[0], -1, self.router_weight_t.shape[-1])  # [T, D, E]
        return torch.softmax(logits, dim=-1).transpose(0, 1)

    def scores(self, residuals: torch.Tensor) -> torch.Tensor:
        """`residuals [D, T, H]` (model dtype) → softmax scores `[D, T, E]` float32, as the reference."""
        if self.folded is not None and residuals.dtype == torch.float32:
            weight_t, eps = self.folded
            x = torch.nn.functional.rms_norm(residuals, residuals.shape[-1:], eps=eps)
            return torch.softmax(torch.bmm(x, weight_t), dim=-1)
        x = residuals.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = self.norm_weight * x.to(residuals.dtype)
        return torch.softmax(torch.bmm(normed, self.router_weight_t).float(), dim=-1)

    @classmethod
    def build(cls, adapter: MoEAdapter, layers: list[MoELayer], targets: list[int]) -> "StackedRouting | None":
        """A stacked router for `targets` when every one fits the pattern and reproduces `adapter.route`,
        on the device and in the dtype of the targets' weights as they are now."""
        parts = [_rms_router(layers[t]) for t in targets]
        if not targets or any(p is None for p in parts):
            return None
        weight, eps, router = zip(*parts)
        dtype, device = router[0].dtype, router[0].device
        if (any(w.dtype != dtype for w in weight + router) or len({r.shape for r in router}) != 1
                or any(w.device != device for w in weight + router)):
            return None
        stacked = cls(torch.stack(weight).unsqueeze(1), list(eps), torch.stack(router))
        probe = torch.randn(len(targets), 3, router[0].shape[1], generator=torch.Generator().manual_seed(0))
        probe = probe.to(dtype=dtype, device=device)
        try:
            with torch.no_grad():
                fast = stacked.scores(probe)
                ref = torch.stack([adapter.route(layers[t], layers[t].norm(probe[i]))[0] for i, t in enumerate(targets)])
                # a host read, once per source layer when the predictor is built or placed: never per token
                same = fast.shape == ref.shape and torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)
        except Exception:  # noqa: BLE001 — a mismatch in the pattern, or no data to compare: the reference path
            return None
        return stacked if same else None


def _rms_router(layer: MoELayer):
    """(norm weight [H], eps, router weight [E, H]) when the layer looks like RMSNorm + linear router."""
    norm, router = layer.norm, layer.router
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    router_weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(router_weight, torch.Tensor) or eps is None:
        return None
    if getattr(router, "bias", None) is not None or router_weight.dim() != 2:
        return None
    return weight.detach(), float(eps), router_weight.detach()
