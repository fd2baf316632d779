"""Training the accelerator adapters.

Two stages, both deterministic:

1. Closed form (reduced-rank ridge regression), streamed: for every source layer l the sufficient
   statistics of x = norm_l(r_l) and, per rate d, of y = r_{l+d} - r_l are accumulated batch by batch
   (sums and [H, H] cross products in float64), so the activation set is never held in memory. The
   full-rank ridge solution W = (C_xx + λI)^-1 C_xy is projected on the top-R eigenvectors of the fitted
   covariance Wᵀ C_xx W, which is the optimal rank-R least-squares map (reduced-rank regression).
   Cost: one pass over the calibration text plus an [H, H] solve per (l, d).
   With routing features, x also holds a multi-hot of the source layer's experts.
2. Router fine-tuning (optional, `kl_steps > 0`; off by default: on the built-in model it raised
   in-sample recall but not recall on unseen text, see BENCHMARKS.md): starting from stage 1, Adam minimises
   normalized MSE(r̂, r_{l+d}) + λ·KL(router_{l+d}(r_{l+d}) ‖ router_{l+d}(r̂)) on a bounded reservoir of
   calibration tokens. MSE alone spends rank on directions the router ignores; the KL term spends it on
   the routing decision, which is what prefetching needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from ..models.base import MoEAdapter, MoELayer
from .collect import collect
from .m2r2 import AcceleratorAdapters

logger = logging.getLogger(__name__)


class _Stats:
    """Streamed sums for one source layer: x statistics and, per rate d, y statistics."""

    def __init__(self, features: int, hidden: int, depths: int):
        self.n = 0
        self.sx = torch.zeros(features, dtype=torch.float64)
        self.xx = torch.zeros(features, features, dtype=torch.float64)
        self.sy = [torch.zeros(hidden, dtype=torch.float64) for _ in range(depths)]
        self.xy = [torch.zeros(features, hidden, dtype=torch.float64) for _ in range(depths)]

    def add(self, x: torch.Tensor, ys: list[torch.Tensor]) -> None:
        x = x.double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.xx += x.T @ x
        for i, y in enumerate(ys):
            y = y.double()
            self.sy[i] += y.sum(0)
            self.xy[i] += x.T @ y


def _normed(layer: MoELayer, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return layer.norm(residual.to(dtype)).float()


def _solve(stats: _Stats, i: int, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` ridge regression of y [H] on x [F] for rate index i → (U [F, R], V [R, H], b [H])."""
    n = stats.n
    mx, my = stats.sx / n, stats.sy[i] / n
    cxx = stats.xx / n - torch.outer(mx, mx)  # [F, F]
    cxy = stats.xy[i] / n - torch.outer(mx, my)  # [F, H]
    scale = cxx.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(cxx + ridge * scale * torch.eye(len(cxx), dtype=cxx.dtype), cxy)  # [F, H]
    fitted = w.T @ cxx @ w  # covariance of the fitted values
    _, vecs = torch.linalg.eigh(fitted)
    q = vecs[:, -rank:]  # top-R eigenvectors of the fitted covariance [H, R]
    u, v = w @ q, q.T
    b = my - mx @ u @ v
    return u.float(), v.float(), b.float()


def train_adapters(model, adapter: MoEAdapter, layers: list[MoELayer], batches: Iterable[torch.Tensor],
                   depth: int = 4, rank: int = 32, ridge: float = 1e-3, kl_steps: int = 0, kl_weight: float = 1.0,
                   kl_samples: int = 8192, lr: float = 3e-3, seed: int = 0, route_features: bool = False,
                   progress: bool = True) -> tuple[AcceleratorAdapters, dict]:
    """Train adapters on calibration `batches` of token ids `[B, S]`. Returns (adapters, report).

    `route_features`: the adapters also see which experts the source layer routes to (see m2r2.py; off
    by default: on the built-in model it changed recall by < 0.2 points, the choice being a function of
    the residual the adapters already see)."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # gradients flow through the routers to the adapters only
    try:
        num_experts = int(layers[0].experts.num_experts) if route_features else 0
        adapters = AcceleratorAdapters(len(layers), model.config.hidden_size, depth, rank, num_experts)
        return _train(model, adapter, layers, list(batches), adapters, ridge, kl_steps, kl_weight, kl_samples, lr,
                      seed, progress)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)


def _train(model, adapter, layers, batches, adapters, ridge, kl_steps, kl_weight, kl_samples, lr, seed, progress):
    torch.manual_seed(seed)
    start = time.perf_counter()
    num_layers, depth, rank = len(layers), adapters.depth, adapters.rank
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point() and p.numel())
    stats = [_Stats(adapters.hidden + adapters.route_features, adapters.hidden, depth) for _ in range(num_layers)]
    kept_r, kept_c, kept = [], [], 0
    for residuals, chosen in tqdm(collect(model, layers, batches), total=len(batches), desc="collect residuals",
                                  disable=not progress):
        for l in range(num_layers):
            ds = [d for d in range(1, depth + 1) if l + d < num_layers]
            x = adapters.features(_normed(layers[l], residuals[l], dtype), chosen[l])
            stats[l].add(x, [residuals[l + d] - residuals[l] for d in ds])
        if kept < kl_samples:
            kept_r.append(residuals[:, : kl_samples - kept])
            kept_c.append(chosen[:, : kl_samples - kept])
            kept += kept_r[-1].shape[1]
    pairs = [(l, d) for l in range(num_layers) for d in range(1, depth + 1) if l + d < num_layers]
    with torch.no_grad():
        for l, d in pairs:
            adapters.U[l, d - 1], adapters.V[l, d - 1], adapters.b[l, d - 1] = _solve(stats[l], d - 1, rank, ridge)
    sample = (torch.cat(kept_r, dim=1), torch.cat(kept_c, dim=1))  # [L, N, H], [L, N, K]
    report = {"tokens": stats[0].n, "depth": depth, "rank": rank, "ridge": ridge, "pairs": {},
              "route_features": adapters.route_features}
    for l, d in tqdm(pairs, desc="fine-tune on routing (KL)", disable=not progress or kl_steps == 0):
        before = _pair_losses(adapters, adapter, layers, sample, l, d, dtype)
        if kl_steps:
            _finetune_pair(adapters, adapter, layers, sample, l, d, dtype, kl_steps, kl_weight, lr)
        after = _pair_losses(adapters, adapter, layers, sample, l, d, dtype)
        report["pairs"][f"{l}->{l + d}"] = {"closed_form": before, "final": after}
    report["seconds"] = time.perf_counter() - start
    keys = ("nmse", "kl", "recall_topk", "gate_recall_topk")
    report["mean_final"] = {k: sum(p["final"][k] for p in report["pairs"].values()) / len(pairs) for k in keys}
    report["by_depth"] = {}
    for d in range(1, depth + 1):
        rows = [report["pairs"][f"{l}->{l + d}"] for l, dd in pairs if dd == d]
        report["by_depth"][d] = {f"{stage}_{k}": sum(r[stage][k] for r in rows) / len(rows)
                                 for stage in ("closed_form", "final") for k in keys}
    return adapters, report


def _targets(adapter, layers, residuals, l, d, dtype):
    target_layer = layers[l + d]
    with torch.no_grad():
        probs, chosen = adapter.route(target_layer, target_layer.norm(residuals[l + d].to(dtype)))
    return probs, chosen


def _route_logp(adapter, layers, target: int, r_hat: torch.Tensor, dtype) -> torch.Tensor:
    """log router probabilities of layer `target` on r̂ (differentiable w.r.t. r̂)."""
    layer = layers[target]
    scores, _ = adapter.route(layer, layer.norm(r_hat.to(dtype)))
    return torch.log(scores.clamp_min(1e-12))


def _pair_losses(adapters, adapter, layers, sample, l, d, dtype) -> dict:
    residuals, chosen = sample
    with torch.no_grad():
        probs, used = _targets(adapter, layers, residuals, l, d, dtype)
        r_hat = residuals[l] + adapters.delta(l, d, _normed(layers[l], residuals[l], dtype), chosen[l])
        logp = _route_logp(adapter, layers, l + d, r_hat, dtype)
        target = residuals[l + d]
        nmse = ((r_hat - target).pow(2).sum() / (target - residuals[l]).pow(2).sum()).item()
        kl = (probs * (torch.log(probs.clamp_min(1e-12)) - logp)).sum(-1).mean().item()
        k = used.shape[-1]
        gate_scores, _ = adapter.route(layers[l + d], layers[l + d].norm(residuals[l].to(dtype)))
        return {"nmse": nmse, "kl": kl, "recall_topk": _recall(logp, used, k), "gate_recall_topk": _recall(gate_scores, used, k)}


def _recall(scores: torch.Tensor, chosen: torch.Tensor, k: int) -> float:
    predicted = scores.topk(k, dim=-1).indices  # [N, K]
    return (predicted.unsqueeze(-1) == chosen.unsqueeze(-2)).any(-2).float().mean().item()


def _finetune_pair(adapters, adapter, layers, sample, l, d, dtype, steps, kl_weight, lr, batch=1024):
    """Adam on one (l, d) pair's own copies of U, V, b; written back at the end."""
    residuals, chosen = sample
    probs, _ = _targets(adapter, layers, residuals, l, d, dtype)
    target, source = residuals[l + d], residuals[l]
    x_all = adapters.features(_normed(layers[l], source, dtype), chosen[l]).detach()  # [N, F]
    scale = (target - source).pow(2).sum(-1).mean()
    i = d - 1
    u, v, b = (t[l, i].detach().clone().requires_grad_() for t in (adapters.U, adapters.V, adapters.b))
    opt = torch.optim.Adam([u, v, b], lr=lr)
    generator = torch.Generator().manual_seed(1000 * l + d)
    for _ in range(steps):
        idx = torch.randint(0, source.shape[0], (min(batch, source.shape[0]),), generator=generator)
        r_hat = source[idx] + (x_all[idx] @ u) @ v + b
        logp = _route_logp(adapter, layers, l + d, r_hat, dtype)
        nmse = (r_hat - target[idx]).pow(2).sum(-1).mean() / scale
        kl = (probs[idx] * (torch.log(probs[idx].clamp_min(1e-12)) - logp)).sum(-1).mean()
        opt.zero_grad()
        (nmse + kl_weight * kl).backward()
        opt.step()
    with torch.no_grad():
        adapters.U[l, i], adapters.V[l, i], adapters.b[l, i] = u, v, b
