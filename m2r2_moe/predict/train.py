"""Training the accelerators of both kinds on calibration text, and choosing the default kind.

1. One pass of the model over the calibration text (`collect.collect_normed`): the last `validation` share of
   its rows is set aside; on the rest the linear adapters' sufficient statistics are accumulated and the
   router inputs and distributions kept for the nonlinear heads (`collect.RoutingSet`).
2. `linear`: reduced-rank ridge regression in closed form, optionally fine-tuned on the routing loss
   (`linear_fit.py`).
3. `mlp`: nonlinear heads for every (layer, depth) pair, within the token and, with `wraps`, across it, trained
   with Adam on the KL to the target routers, early-stopped on the validation split (`train_mlp.py`).
4. Both kinds, and the `gate` baseline, are scored on the validation split (top-k recall of the experts used);
   the kind with the better mean recall within the token becomes the file's `kind`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from ..budget import gb
from ..checkpoint.plan import host_margin
from ..checkpoint.plan import host_memory as probe_host
from ..errors import HostMemoryError
from ..values import budget_bytes
from ..models.base import MoEAdapter, MoELayer
from .accelerators import AcceleratorAdapters
from .collect import RoutingSet, RoutingSetBuilder, collect_normed
from .linear_fit import _finetune_pair, _pair_losses, _recall, _solve, _Stats  # noqa: F401  (re-exported)
from .train_mlp import EPOCHS, fit_heads, head_recalls

logger = logging.getLogger(__name__)
KEYS = ("nmse", "kl", "recall_topk", "gate_recall_topk")


def train_adapters(model, adapter: MoEAdapter, layers: list[MoELayer], batches: Iterable[torch.Tensor],
                   depth: int = 4, rank: int = 32, ridge: float = 1e-3, kl_steps: int = 0, kl_weight: float = 1.0,
                   kl_samples: int = 8192, lr: float = 3e-3, seed: int = 0, route_features: bool = False,
                   progress: bool = True, kinds: tuple[str, ...] = ("linear", "mlp"), width: int = 128,
                   wraps: bool = True, epochs: int = EPOCHS, validation: float = 0.125,
                   host_memory: int | str | None = None) -> tuple[AcceleratorAdapters, dict]:
    """Train accelerators on calibration `batches` of token ids `[B, S]`. Returns (adapters, report).

    `kinds`: which to train (the linear adapters are always fitted; `mlp` adds the heads, of hidden `width`,
    across the token boundary with `wraps`); the better on the validation split (the last `validation` share
    of the rows) becomes the default. `route_features`: the linear adapters also see which experts the source
    layer routes to (off by default: on the built-in model it changed recall by < 0.2 points).

    `host_memory`: the host memory the training may hold, bytes or text like '8GiB' (default: what is available now
    less the runtime's margin, as `offload` reckons it; see `memory_plan`). What does not scale with the text (the linear statistics, the validation split, the routing
    fine-tune's sample) must fit, or `HostMemoryError` is raised before the model runs; the heads then train on as
    many of the training tokens as fit (whole sequences, from the first; a warning says so, the report's
    `heads_tokens` how many)."""
    if not 1 <= depth < len(layers):
        raise ValueError(f"depth {depth}: a model of {len(layers)} MoE layers is predicted 1..{len(layers) - 1} ahead")
    batches = list(batches)
    rows = torch.cat(batches) if batches else torch.zeros(0, 1, dtype=torch.long)  # [rows, S]
    if len(rows) < 2:
        raise ValueError("the calibration text fills fewer than 2 sequences (one to train on, one to validate): "
                         "give more text or a smaller --seq-len")
    held = min(max(1, round(len(rows) * validation)), len(rows) - 1)
    train_rows, val_rows = rows[:-held], rows[-held:]
    batch, seq_len = batches[0].shape
    hidden, experts = model.config.hidden_size, int(layers[0].experts.num_experts)
    route = experts if route_features else 0  # the linear adapters' routing features
    plan = memory_plan(len(layers), hidden, experts, adapter.top_k(model), hidden + route, depth, train_rows.numel(),
                       val_rows.numel(), batch * seq_len, seq_len, kl_samples, "mlp" in kinds,
                       free_host_memory() if host_memory is None else budget_bytes("host_memory", host_memory))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # gradients flow through the routers to the adapters only
    try:
        adapters = AcceleratorAdapters(len(layers), hidden, depth, rank, route)
        opts = dict(ridge=ridge, kl_steps=kl_steps, kl_weight=kl_weight, kl_samples=kl_samples, lr=lr, seed=seed,
                    progress=progress, kinds=kinds, width=width, wraps=wraps, epochs=epochs,
                    heads_tokens=plan["heads_tokens"])
        return _train(model, adapter, layers, train_rows.split(batch), val_rows, adapters, opts)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)


def _train(model, adapter, layers, batches, val_rows, adapters, opts):
    torch.manual_seed(opts["seed"])
    clock = _StageClock()
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point() and p.numel())
    train, sample, stats = _collect_train(model, adapter, layers, batches, adapters, dtype, opts)
    val = _collect(model, adapter, layers, val_rows.split(len(batches[0])), dtype, val_rows.numel(),
                   keep_residuals=True)
    clock.lap("collect")
    report = {"tokens": stats[0].n, "heads_tokens": train.tokens if train is not None else 0,
              "validation_tokens": val.tokens, "depth": adapters.depth, "rank": adapters.rank,
              "ridge": opts["ridge"], "route_features": adapters.route_features}
    report |= _fit_linear(adapters, adapter, layers, stats, sample, dtype, opts)
    clock.lap("linear")
    if "mlp" in opts["kinds"]:
        heads, report["mlp"] = fit_heads(train, val, adapters.depth, opts["width"], opts["wraps"], opts["epochs"],
                                         seed=opts["seed"], progress=opts["progress"])
        adapters.mlp = heads
        clock.lap("mlp")
    report["validation"] = validation_recalls(adapters, adapter, layers, val, dtype)
    clock.lap("validate")
    scores = {kind: _mean(report["validation"][kind]) for kind in ("linear", "mlp") if kind in report["validation"]}
    adapters.kind = max(scores, key=scores.get)
    report |= {"kind": adapters.kind, "seconds": clock.total, "stage_seconds": clock.stages}
    logger.info("accelerators: validation recall within the token %s; default kind %s",
                {k: round(v, 4) for k, v in scores.items()}, adapters.kind)
    return adapters, report


def free_host_memory() -> int:
    """The default budget: the host memory available now less the margin `offload` keeps (checkpoint/plan.py)."""
    available, total = probe_host()
    return available - host_margin(total)


def memory_plan(num_layers: int, hidden: int, experts: int, top_k: int, features: int, depth: int,
                train_tokens: int, val_tokens: int, batch_tokens: int, seq_len: int, kl_samples: int, heads: bool,
                budget: int | None) -> dict:
    """Host bytes the training holds, and how many training tokens the heads' set can keep within `budget`.
    Fixed (not scaling with the text the heads keep): the linear statistics (float64 `[F, F]` and per depth
    `[F, H]` per layer), the validation split (residuals and router inputs, distributions, choices), the routing
    fine-tune's sample and a few batches' activations in flight. Per token the heads keep: router inputs `[L, H]`
    float32, the routers' distributions `[L, E]`, the choices `[L, K]`. Raises `HostMemoryError` when the fixed part
    alone exceeds the budget, or the heads could not keep two sequences."""
    floats = 4
    linear = num_layers * 8 * (features * features + features + depth * (features * hidden + hidden))
    val = val_tokens * (num_layers * (2 * hidden * floats + experts * floats + top_k * 8) + 8)
    sample = min(kl_samples, train_tokens) * num_layers * (hidden * floats + top_k * 8)
    batches = 6 * batch_tokens * num_layers * hidden * floats  # a batch's residuals and normed, their copies, the stats
    fixed = linear + val + sample + batches
    per_token = num_layers * (hidden * floats + experts * floats + top_k * 8) + 8
    plan = {"fixed": fixed, "per_token": per_token, "budget": budget, "heads_tokens": train_tokens if heads else 0}

    if budget is None:
        return plan
    if fixed > budget:
        raise HostMemoryError(
            f"training these adapters needs {gb(fixed)} of host memory before the heads keep any text and the "
            f"budget is {gb(budget)}: linear statistics {gb(linear)} ({num_layers} layers x {depth} distances, "
            f"hidden size {hidden}: --lookahead), validation split of {val_tokens} tokens {gb(val)} (--max-tokens, "
            f"--validation), routing sample {gb(sample)} (--kl-samples), batches in flight {gb(batches)} "
            f"(--batch, --seq-len); lower those, or raise --host-memory; nothing was trained")
    if not heads:
        return plan
    fits = (budget - fixed) // per_token // seq_len * seq_len  # whole sequences
    if fits < train_tokens:
        if fits < 2 * seq_len:
            raise HostMemoryError(
                f"the heads' training set needs {gb(per_token * seq_len)} per sequence of {seq_len} tokens and "
                f"{gb(max(budget - fixed, 0))} of the {gb(budget)} budget is left after the fixed part "
                f"({gb(fixed)}); lower --max-tokens or --validation, train --kinds linear, or raise --host-memory; "
                f"nothing was trained")
        logger.warning("the heads train on the first %d of %d calibration tokens: %s per token of a budget of %s "
                       "(%s fixed); --host-memory sets the budget", fits, train_tokens, gb(per_token), gb(budget),
                       gb(fixed))
        plan["heads_tokens"] = fits
    return plan


class _StageClock:
    """Wall seconds per training stage (`lap(name)` closes the stage since the previous lap)."""

    def __init__(self):
        self.start = self.mark = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name], self.mark = round(now - self.mark, 1), now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def _collect(model, adapter, layers, batches, dtype, capacity, keep_residuals=False) -> RoutingSet:
    builder = RoutingSetBuilder(adapter, layers, dtype, capacity=capacity, keep_residuals=keep_residuals)
    for residuals, normed, chosen in collect_normed(model, layers, batches):
        builder.add(residuals, normed, chosen, batches[0].shape[1])
    return builder.build()


def _collect_train(model, adapter, layers, batches, adapters, dtype, opts):
    """One pass over the training rows: the linear statistics, the routing fine-tune's reservoir and, for the
    heads, the router inputs and distributions."""
    num_layers, depth = len(layers), adapters.depth
    stats = [_Stats(adapters.hidden + adapters.route_features, adapters.hidden, depth) for _ in range(num_layers)]
    heads_tokens = opts["heads_tokens"]
    builder = RoutingSetBuilder(adapter, layers, dtype, capacity=heads_tokens) if heads_tokens else None
    kept_r, kept_c, kept = [], [], 0
    for residuals, normed, chosen in tqdm(collect_normed(model, layers, batches), total=len(batches),
                                          desc="collect residuals", disable=not opts["progress"]):
        for l in range(num_layers):
            ds = [d for d in range(1, depth + 1) if l + d < num_layers]
            stats[l].add(adapters.features(normed[l], chosen[l]), [residuals[l + d] - residuals[l] for d in ds])
        if builder is not None:
            builder.add(residuals, normed, chosen, batches[0].shape[1])
        if kept < opts["kl_samples"]:
            kept_r.append(residuals[:, : opts["kl_samples"] - kept])
            kept_c.append(chosen[:, : opts["kl_samples"] - kept])
            kept += kept_r[-1].shape[1]
    sample = (torch.cat(kept_r, dim=1), torch.cat(kept_c, dim=1))  # [L, N, H], [L, N, K]
    return (builder.build() if builder is not None else None), sample, stats


def _fit_linear(adapters, adapter, layers, stats, sample, dtype, opts) -> dict:
    """Closed form for every in-token pair, then the optional routing fine-tune; in-sample losses per pair."""
    num_layers, depth = len(layers), adapters.depth
    pairs = [(l, d) for l in range(num_layers) for d in range(1, depth + 1) if l + d < num_layers]
    with torch.no_grad():
        for l, d in pairs:
            adapters.U[l, d - 1], adapters.V[l, d - 1], adapters.b[l, d - 1] = _solve(stats[l], d - 1, adapters.rank,
                                                                                    opts["ridge"])
    report = {"pairs": {}}
    steps = opts["kl_steps"]
    for l, d in tqdm(pairs, desc="fine-tune on routing (KL)", disable=not opts["progress"] or steps == 0):
        before = after = _pair_losses(adapters, adapter, layers, sample, l, d, dtype)
        if steps:
            _finetune_pair(adapters, adapter, layers, sample, l, d, dtype, steps, opts["kl_weight"], opts["lr"])
            after = _pair_losses(adapters, adapter, layers, sample, l, d, dtype)
        report["pairs"][f"{l}->{l + d}"] = {"closed_form": before, "final": after}
    report["mean_final"] = {k: sum(p["final"][k] for p in report["pairs"].values()) / len(pairs) for k in KEYS}
    report["by_depth"] = {}
    for d in range(1, depth + 1):
        rows = [report["pairs"][f"{l}->{l + d}"] for l, dd in pairs if dd == d]
        report["by_depth"][d] = {f"{stage}_{k}": sum(r[stage][k] for r in rows) / len(rows)
                                 for stage in ("closed_form", "final") for k in KEYS}
    return report


def _mean(by_pair: dict) -> float:
    """Mean recall over the in-token pairs of `{"l->t": recall}` (a wrapped pair is named `l->next:j`)."""
    values = [v for k, v in by_pair.items() if "next" not in k]
    return sum(values) / len(values)


@torch.no_grad()
def validation_recalls(adapters: AcceleratorAdapters, adapter, layers, val: RoutingSet, dtype) -> dict:
    """Top-k recall per pair on `val` (`{kind: {"l->t": recall}}`) of gate, the linear adapters, the heads (with
    their next-token pairs `l->next:j`) and, for the next token's layers, the experts of the current token."""
    num_layers, depth, k = len(layers), adapters.depth, val.chosen.shape[-1]
    out = {"gate": {}, "linear": {}}
    for l in range(num_layers):
        for d in range(1, min(depth, num_layers - 1 - l) + 1):
            target, used, source = layers[l + d], val.chosen[l + d], val.residuals[l]
            gate = adapter.route(target, target.norm(source.to(dtype)))[0]
            r_hat = source + adapters.delta(l, d, val.normed[l], val.chosen[l])
            linear = adapter.route(target, target.norm(r_hat.to(dtype)))[0]
            out["gate"][f"{l}->{l + d}"], out["linear"][f"{l}->{l + d}"] = _recall(gate, used, k), _recall(linear, used, k)
    if adapters.mlp is not None:
        out["mlp"], out["previous_token"] = head_recalls(adapters.mlp, val, k)
    return out
