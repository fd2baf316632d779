"""The predictor protocol and set selection.

A predictor sees, at each MoE layer l, the residual entering that layer's MoE block (`r_l`, before its
norm) and the experts the router chose there, and returns expert *scores* for the layers ahead:
`{depth d: scores [T, E]}` for target layer l + d. Higher = more likely used. Turning scores into sets
(`select`) is separate, so evaluation can compare predictors at equal width.
"""

from __future__ import annotations

import torch


class Predictor:
    """Base class: predicts nothing (the `none` predictor)."""

    name = "none"
    needs_residual = False
    # predict_stacked's scores are read as each expert's probability as they are (a softmax router's share, the
    # oracle's 0/1); else the prefetcher normalises them to shares of each token's total
    scores_are_probabilities = False
    wraps = False  # predicts across the token boundary: a target layer l + d >= L is layer l + d - L of the next forward
    # Decode at batch 1 on the CPU, where the predictor is a native heads call: per source layer, None or, for each
    # count c = 1..n of nearest distances, the arguments of `_ext.planner.mlp_softmax_into` after `x` (its output
    # `[c, E]` the probabilities `predict_host` would return). The prefetcher hands (x, *those) to the planner, which
    # runs the heads and decides in one native call. Rebuilt with the weights (`to`); None: no such path.
    host_heads: list | None = None

    def __init__(self, num_layers: int, num_experts: int, top_k: int, depth: int):
        self.num_layers, self.num_experts, self.top_k, self.depth = num_layers, num_experts, top_k, depth

    def to(self, device: torch.device | str) -> "Predictor":
        """Place what the predictor computes with on `device`, where the model now computes (`offload`
        calls it once the model has moved there; predictors are built on CPU, before anything moves).
        Every tensor a prediction reads must be there: a stray CPU tensor fails the first prediction, or
        costs a host sync per layer. Returns the predictor."""
        return self

    def reset(self) -> None:
        """Forget per-sequence state (called at the start of each forward over a new prompt)."""

    def observe(self, layer: int, chosen: torch.Tensor) -> None:
        """Record the experts layer `layer` actually used (`chosen [T, K]`)."""

    def advance(self, tokens: int) -> None:
        """Called after each forward of `tokens` positions (a predictor replaying positions moves on)."""

    def predict(self, layer: int, residual: torch.Tensor | None, chosen: torch.Tensor | None = None,
                ) -> dict[int, torch.Tensor]:
        """Scores for layers `layer + d`, d = 1..depth (only those that exist): `{d: [T, E]}`, from the
        residual `r_l [T, H]` and the experts `chosen [T, K]` layer `layer` routes to."""
        return {}

    def predict_stacked(self, layer: int, residual: torch.Tensor | None, chosen: torch.Tensor | None = None,
                        normed: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor | None]:
        """`predict` as one tensor, for the prefetcher's per-layer path: (depths, scores `[D, T, E]`).
        `normed` is `norm_l(residual)` when the caller has it (the model computed it already)."""
        predictions = self.predict(layer, residual, chosen)
        depths = sorted(predictions)
        return depths, (torch.stack([predictions[d] for d in depths]) if depths else None)

    def predict_host(self, layer: int, residual: torch.Tensor | None, chosen: torch.Tensor | None = None,
                     normed: torch.Tensor | None = None, count: int | None = None):
        """Decode at batch 1 on the CPU: the probabilities of `predict_stacked` as a float32 numpy array `[D, E]`
        from one native call (csrc/heads.cpp), or None when this predictor (or this build) has no such path —
        the caller then uses `predict_stacked`. `residual` and `normed` are the one token's as the model made them,
        `[1, H]` or `[1, 1, H]` (the prefetcher's tap does not flatten them: models/tap.py). `count`: only the
        nearest `count` depths are needed (a predictor may compute fewer rows than D then, never fewer than `count`).
        The array may be the predictor's own, read-only, and overwritten by its next call: read it (or copy it) before
        then."""
        return None

    def depths(self, layer: int) -> range:
        """Distances predicted from `layer`: up to `depth`, within the forward unless the predictor `wraps`
        (then up to one full cycle of layers, into the next forward)."""
        if self.wraps:
            return range(1, min(self.depth, self.num_layers) + 1)
        return range(1, min(self.depth, self.num_layers - 1 - layer) + 1)


def as_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Scores `[..., E]` as shares of each token's total (negative scores count as 0), float32."""
    scores = scores.float().clamp_min(0)
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)


def select(scores: torch.Tensor, width: int | None = None, mass: float | None = None, cap: int | None = None,
           ) -> torch.Tensor:
    """Boolean mask `[T, E]` of predicted experts per token.

    `width`: the top-`width` experts. `mass`: confidence widening — take experts in score order until
    their share of the token's total score reaches `mass` (at most `cap`, only experts scored above 0)."""
    if (width is None) == (mass is None):
        raise ValueError("give exactly one of width or mass")
    num_experts = scores.shape[-1]
    order = scores.argsort(dim=-1, descending=True)  # [T, E]
    if width is not None:
        take = torch.full(scores.shape[:-1], min(width, num_experts), dtype=torch.long, device=scores.device)
    else:
        sorted_scores = scores.gather(-1, order).clamp_min(0)
        share = sorted_scores.cumsum(-1) / sorted_scores.sum(-1, keepdim=True).clamp_min(1e-30)
        take = (share < mass).sum(-1) + 1  # experts needed to reach the mass
        # never more than `cap`, never an expert with no score (an empty prediction stays empty)
        take = torch.minimum(take.clamp(max=cap or num_experts), (sorted_scores > 0).sum(-1))
    ranks = torch.arange(num_experts, device=scores.device).expand_as(order)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order, ranks < take.unsqueeze(-1))
    return mask


def run_host_heads(call: tuple):
    """A heads call (x's address, then a `Predictor.host_heads` entry) run as the C++ planner runs it: its output
    `[n, E]` float32, read in place (the predictor's buffer, overwritten by its next call of that count)."""
    import ctypes

    import numpy as np

    from .. import _ext  # the only door to native code

    if len(call) != 11:
        raise TypeError("planner: a heads call is mlp_softmax_into's 11 arguments as a tuple")
    _ext.planner.mlp_softmax_into(*call)
    n, experts, out = call[6], call[8], call[10]
    return np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_float)), shape=(n, experts))
