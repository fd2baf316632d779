"""`m2r2`: the accelerated-residual predictor (our reading of M2R2, arXiv 2502.02040).

For source layer l and rate d it predicts the experts of layer l + d from x_l = norm_l(r_l), with the
accelerators of `accelerators.py`, of the kind the adapters file names:
- `linear`: the accelerated residual r̂_{l→l+d} = r_l + (x_l @ U_{l,d}) @ V_{l,d} + b_{l,d} — with routing
  features, x_l = [norm_l(r_l), multi-hot of the experts layer l routes to] [H + E] — routed by the model's own
  router of layer l+d applied to `norm_{l+d}(r̂)`;
- `mlp`: small nonlinear heads from x_l to the router logits of layer l+d (`mlp.py`). Heads trained across the
  token boundary make the predictor *wrap*: from the last layers it also predicts the next token's first
  layers (target l + d >= L is layer l + d - L of the next forward), which no within-token prediction reaches.
Both give each target's expert probabilities (`scores_are_probabilities`).
"""

from __future__ import annotations

import numpy as np
import torch

from .accelerators import (FORMAT, VERSION, AcceleratorAdapters, AdapterFileError, AdapterMismatchError,
                           model_fingerprint)
from .gate import GatePredictor
from .mlp import fused_probabilities

__all__ = ["FORMAT", "VERSION", "AcceleratorAdapters", "AdapterFileError", "AdapterMismatchError", "M2R2Predictor",
           "model_fingerprint"]


HOST_HEADS_BF16 = True  # the native batch-1 heads read w1 and w2 in bfloat16: half the bytes, cold at every token


def _host(t: torch.Tensor, bf16: bool = False):
    """A contiguous numpy copy of `t` for the native heads: float32, or bfloat16 as its bits (uint16)."""
    t = t.detach()
    if bf16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("uint16")
    return t.contiguous().numpy()


def _host_call(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> tuple:
    """(output `[n, E]` float32, read-only to callers; the native call's arguments after x; the arrays they point
    into, kept alive with them) for the heads w1 `[H, n*M]`, b1 `[n*M]`, w2 `[n, M, E]`, b2 `[n, E]`, laid out once
    (shapes checked here: the native call takes addresses and trusts them)."""
    n, width, experts = w2.shape
    hidden = w1.shape[0]
    if w1.shape != (hidden, n * width) or b1.shape != (n * width,) or b2.shape != (n, experts):
        raise ValueError(f"heads of mismatched shapes: w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, "
                         f"b2 {tuple(b2.shape)}")
    arrays = (_host(w1, HOST_HEADS_BF16), _host(b1), _host(w2, HOST_HEADS_BF16), _host(b2))
    out = np.zeros((n, experts), dtype=np.float32)
    args = (*(a.ctypes.data for a in arrays), hidden, n, width, experts, HOST_HEADS_BF16, out.ctypes.data)
    out.flags.writeable = False  # the native call writes it by address; callers only read
    return out, args, arrays


def _float(t: torch.Tensor) -> torch.Tensor:
    """`t` as float32 (no op dispatched when it already is: this runs per layer per token)."""
    return t if t.dtype == torch.float32 else t.float()


class M2R2Predictor(GatePredictor):
    """Predicts the experts of layer l+d from layer l with the adapters' accelerators of `kind` (default: the
    kind the adapters file names): `linear` routes the accelerated residual `r̂_{l→l+d}` with the model's own
    router of layer l+d; `mlp` runs the nonlinear heads, and wraps into the next token when they were trained to."""

    name = "m2r2"

    def __init__(self, num_layers, num_experts, top_k, depth, adapter, layers, adapters: AcceleratorAdapters,
                 kind: str | None = None):
        if adapters.num_layers != num_layers:
            raise AdapterMismatchError(f"adapters cover {adapters.num_layers} MoE layers, the model has {num_layers}")
        self.kind = kind or adapters.kind
        if self.kind == "mlp":
            if adapters.mlp is None:
                raise AdapterFileError("these adapters hold no nonlinear heads (kind 'mlp'): use kind='linear', or "
                                       "retrain them with `m2r2-moe train-adapters`")
            if adapters.mlp.num_experts != num_experts:
                raise AdapterMismatchError(f"the adapters' heads predict {adapters.mlp.num_experts} experts per layer, "
                                           f"the model has {num_experts}")
            self.wraps = adapters.mlp.wraps
        elif self.kind != "linear":
            raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")
        self.adapters = adapters
        super().__init__(num_layers, num_experts, top_k, min(depth, adapters.depth), adapter, layers)
        self._depth_lists = [list(self.depths(layer)) for layer in range(num_layers)]
        self._fused = [self._fuse(layer) for layer in range(num_layers)]

    def _stack(self):
        """The targets' routing, batched: only the linear kind routes (the heads give probabilities themselves)."""
        return super()._stack() if self.kind == "linear" else [None] * self.num_layers

    def to(self, device: torch.device | str) -> "M2R2Predictor":
        """The adapters (and their fused per-layer matrices) on `device`; the routing as `GatePredictor.to`."""
        super().to(device)
        self.adapters.to(device)
        self._fused = [self._fuse(layer) for layer in range(self.num_layers)]
        return self

    @torch.no_grad()
    def _fuse(self, layer: int):
        """The rates of `layer` side by side. mlp: `MLPHeads.fuse`. linear, for `_accelerated`: U as one matrix
        `[F, D*R]` (split into the normed-residual rows and the routing-feature rows `[E, D*R]`), V `[D, R, H]`,
        b `[D, 1, H]`."""
        n = len(self.depths(layer))
        if not n:
            return None
        a = self.adapters
        if self.kind == "mlp":
            return a.mlp.fuse(layer, n)
        u = a.U[layer, :n].detach().permute(1, 0, 2).reshape(a.hidden + a.route_features, n * a.rank).contiguous()
        return u[: a.hidden], u[a.hidden :], a.V[layer, :n].detach(), a.b[layer, :n].detach().unsqueeze(1)

    def _host_weights(self) -> list:
        """mlp kind: per source layer, for each count c = 1..n of nearest depths, the native batch-1 call's arguments
        (`_host_call`: the heads of those depths laid out contiguously — w1 `[H, c*M]`, b1, w2 `[c, M, E]`, b2 — and
        the output buffer `[c, E]`), or None where it does not apply (not on the CPU in float32, or no native heads
        in this build). The prefix copies let the prefetcher compute only the depths its horizon needs. With
        `HOST_HEADS_BF16` w1 and w2 are kept in bfloat16 (their bits, uint16): the weights are read from memory at
        every token, cold, and half the bytes take about half the time; the probabilities move by the rounding of
        the weights (predictions steer prefetching only; the calibration is learned on what the heads give). The
        linear kind has none: its targets are routed from the accelerated residual."""
        from .. import _ext  # the only door to native code

        heads = self.adapters.mlp
        self.host_heads = None  # (set below: `Predictor.host_heads`, the same calls without their output arrays)
        if self.kind != "mlp" or not _ext.HAS_PLANNER or heads.w1.device.type != "cpu" or heads.w1.dtype != torch.float32:
            return [None] * self.num_layers
        self._heads_into = _ext.planner.mlp_softmax_into
        out = []
        for layer in range(self.num_layers):
            n, m = len(self.depths(layer)), heads.width
            out.append([_host_call(heads.w1[layer, :, : c * m], heads.b1[layer, : c * m], heads.w2[layer, :c],
                                   heads.b2[layer, :c]) for c in range(1, n + 1)] if n else None)
        self.host_heads = [None if calls is None else [args for _, args, _ in calls] for calls in out]
        return out

    def predict_host(self, layer, residual, chosen=None, normed=None, count=None):
        """See `Predictor.predict_host`. The array returned is this predictor's own buffer for (`layer`, `count`),
        read-only, overwritten by the next call for the same layer and count: the prefetcher reads it at once."""
        host = self._host[layer]
        if host is None or residual.shape[0] != 1 or not residual.is_cpu:
            return None
        x = normed if normed is not None else self._normed(layer, residual, None)
        if x.dtype != torch.float32 or not x.is_contiguous():
            return None
        out, args, _ = host[-1] if not count else host[min(count, len(host)) - 1]
        self._heads_into(x.data_ptr(), *args)  # x [1, H] read in place: H is w1's rows, the model's hidden size
        return out

    def _normed(self, layer: int, residual: torch.Tensor, normed: torch.Tensor | None) -> torch.Tensor:
        if normed is not None:
            return normed
        source = self.layers[layer]
        return source.norm(residual) if source.norm is not None else residual

    def _accelerated(self, layer: int, residual: torch.Tensor, chosen: torch.Tensor | None,
                     normed: torch.Tensor | None = None) -> torch.Tensor:
        """`r̂_{l→l+d}` for every rate d of `layer` at once, `[D, T, H]` in the residual's dtype (`accelerate`
        is the per-rate reference). In few ops, as it runs per layer per token: one matmul for every rate's
        down-projection, the routing features as a row gather instead of a multi-hot product, the
        up-projection fused with the bias and the residual. `normed`: norm_l(residual) when known."""
        u_normed, u_route, v, b = self._fused[layer]
        z = _float(self._normed(layer, residual, normed)) @ u_normed  # [T, D*R]
        if self.adapters.route_features:
            if chosen is None:
                raise ValueError("these adapters take the source layer's expert choice: pass chosen [T, K]")
            rows = u_route[chosen if chosen.dtype == torch.long else chosen.long()]  # [T, K, D*R]
            z = z + rows.sum(1)  # the multi-hot's product: a sum of the chosen rows
        z = z.view(z.shape[0], v.shape[0], -1).transpose(0, 1)  # [D, T, R]
        out = torch.baddbmm(_float(residual) + b, z, v)  # [D, T, H]
        return out if out.dtype == residual.dtype else out.to(residual.dtype)

    def accelerate(self, layer: int, depth: int, residual: torch.Tensor, chosen: torch.Tensor | None = None,
                   ) -> torch.Tensor:
        """Linear kind: `r̂_{l→l+d}` for `residual [T, H]` (and the layer's `chosen [T, K]`), in the residual's dtype."""
        normed = self._normed(layer, residual, None)
        return (residual.float() + self.adapters.delta(layer, depth, normed, chosen)).to(residual.dtype)

    def head_scores(self, layer: int, depth: int, residual: torch.Tensor) -> torch.Tensor:
        """mlp kind, the per-pair reference: probabilities `[T, E]` of the target of (`layer`, `depth`)."""
        x = self._normed(layer, residual, None).float()
        return torch.softmax(self.adapters.mlp.head_logits(layer, depth, x), dim=-1)

    @torch.no_grad()
    def predict(self, layer: int, residual: torch.Tensor | None, chosen: torch.Tensor | None = None,
                ) -> dict[int, torch.Tensor]:
        if self.kind == "linear":
            return self._scores(layer, self._accelerated(layer, residual, chosen)) if len(self.depths(layer)) else {}
        depths, scores = self.predict_stacked(layer, residual, chosen)
        return {d: scores[i] for i, d in enumerate(depths)}

    def predict_stacked(self, layer, residual, chosen=None, normed=None):
        depths = self._depth_lists[layer]
        if not depths:
            return [], None
        if self.kind == "mlp":  # [D, T, E] in four ops, on detached weights: no autograd state to switch off
            x = normed if normed is not None else self._normed(layer, residual, None)
            return list(depths), fused_probabilities(self._fused[layer], _float(x))
        with torch.no_grad():
            return list(depths), self._probabilities(layer, self._accelerated(layer, residual, chosen, normed))

    def flops_per_token(self, layer: int) -> int:
        """Multiply-adds x2 of one prediction from `layer` (all its depths), for the kind in use."""
        if self.kind == "mlp":
            return self.adapters.mlp.flops_per_token(len(self.depths(layer)))
        return self.adapters.flops_per_token(layer)
