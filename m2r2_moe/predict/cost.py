"""What a predictor costs: parameters and FLOPs per token against the model's active ones, the measured time of
the prefetcher's per-layer call at batch 1 (`predict_host`, the one native call, where the predictor has it on
this machine; else `predict_stacked`; the fastest of many short bursts, and the median burst), and the FLOP share projected to Mixtral-8x7B.

FLOPs count a multiply-add as 2; the model's active FLOPs per token are 2 x its active parameters (the
non-expert weights without the input embedding, plus top-k / E of the experts).
"""

from __future__ import annotations

import time

import torch

from .base import Predictor

# Mixtral-8x7B's geometry, for projecting a predictor's FLOP share to a model of that size
MIXTRAL_8X7B = {"hidden": 4096, "layers": 32, "experts": 8, "top_k": 2, "intermediate": 14336, "heads": 32,
                "kv_heads": 8, "head_dim": 128, "vocab": 32000}


def mixtral_8x7b_active_params(g: dict = MIXTRAL_8X7B) -> int:
    """Active parameters per token of Mixtral-8x7B's geometry (attention, norms, router, top-k experts, lm_head)."""
    attention = g["hidden"] * g["head_dim"] * (2 * g["heads"] + 2 * g["kv_heads"])
    experts = g["top_k"] * 3 * g["hidden"] * g["intermediate"]
    per_layer = attention + experts + g["hidden"] * g["experts"] + 2 * g["hidden"]
    return g["layers"] * per_layer + g["hidden"] * g["vocab"] + g["hidden"]


def projected_flops(predictor: Predictor, g: dict = MIXTRAL_8X7B) -> int | None:
    """FLOPs per token of `predictor`'s design (kind, width or rank, depth, wrapping) at Mixtral-8x7B's geometry,
    or None for a predictor without accelerators."""
    adapters = getattr(predictor, "adapters", None)
    if adapters is None:
        return None
    hidden, layers, experts = g["hidden"], g["layers"], g["experts"]
    depth = predictor.depth
    counts = [depth if predictor.wraps else min(depth, layers - 1 - l) for l in range(layers)]
    if predictor.kind == "mlp":
        width = adapters.mlp.width  # as `MLPHeads.flops_per_token`
        return sum(2 * n * width * (hidden + n * experts) for n in counts)
    # linear: down- and up-projection of the residual, then the target's norm and router
    rank = adapters.rank
    return sum(n * 2 * (2 * hidden * rank + hidden * experts) for n in counts)


def time_per_layer(predictor: Predictor, layers, hidden: int, dtype: torch.dtype, bursts: int = 200,
                   calls: int = 10) -> dict[str, float]:
    """Seconds per prediction call at batch 1 as the prefetcher makes it (`predict_host` where it answers, else
    `predict_stacked`; the prefetcher's decode path: residual, chosen and the
    model's normed input), averaged over source layers. Timed in short bursts of `calls` calls per layer:
    `best` is the fastest burst (the cost on an otherwise idle core: other jobs only ever add to a burst),
    `median` the median burst (what a busy machine gave)."""
    generator = torch.Generator().manual_seed(0)
    residual = torch.randn(1, hidden, generator=generator).to(dtype)  # [1, H]
    chosen = torch.arange(predictor.top_k).unsqueeze(0)  # [1, K]
    normed = [layer.norm(residual) if layer.norm is not None else residual for layer in layers]
    per_layer = []
    with torch.no_grad():
        for l in range(len(layers)):
            host = predictor.predict_host(l, residual, chosen, normed=normed[l]) is not None
            call = predictor.predict_host if host else predictor.predict_stacked  # as the prefetcher chooses
            for _ in range(calls):  # warm-up: one-time checks and allocations are not per token
                call(l, residual, chosen, normed=normed[l])
            times = []
            for _ in range(bursts):
                start = time.perf_counter()
                for _ in range(calls):
                    call(l, residual, chosen, normed=normed[l])
                times.append((time.perf_counter() - start) / calls)
            per_layer.append(sorted(times))
    return {"best": sum(t[0] for t in per_layer) / len(per_layer),
            "median": sum(t[len(t) // 2] for t in per_layer) / len(per_layer)}


def predictor_cost(model, layers, predictors: dict[str, Predictor]) -> dict:
    """Cost per token of each predictor (oracles excluded: they replay, they do not predict) next to the model's."""
    hidden = model.config.hidden_size
    top_k = next(iter(predictors.values())).top_k if predictors else 2
    experts = sum(p.numel() for layer in layers for p in layer.experts.parameters())
    expert_share = top_k / max(int(layers[0].experts.num_experts), 1)
    embed = model.get_input_embeddings().weight.numel()
    active = sum(p.numel() for p in model.parameters()) - experts - embed + experts * expert_share
    mixtral_flops = 2 * mixtral_8x7b_active_params()
    cost = {"model_active_params": int(active), "model_flops_per_token": int(2 * active),
            "mixtral_8x7b_flops_per_token": mixtral_flops}
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point() and p.numel())
    for name, p in predictors.items():
        if name.startswith("oracle"):
            continue
        timing = time_per_layer(p, layers, hidden, dtype)
        entry = {"seconds_per_layer": timing["best"], "seconds_per_layer_median": timing["median"],
                 "seconds_per_token": timing["best"] * len(layers)}
        if getattr(p, "adapters", None) is not None:
            flops = sum(p.flops_per_token(l) for l in range(len(layers)))
            params = p.adapters.num_parameters
            entry |= {"kind": p.kind, "adapter_params": params, "adapter_flops_per_token": flops,
                      "adapter_flops_share": flops / cost["model_flops_per_token"],
                      "adapter_params_share": params / int(active),
                      "mixtral_8x7b_flops_share": projected_flops(p) / mixtral_flops}
        cost[name] = entry
    return cost


def cost_table(cost: dict) -> str:
    """The cost `predictor_cost` measured, as a labelled table: time per token (all layers) and per layer call at
    batch 1 (best burst, and the median burst in parentheses); accelerator parameters and FLOPs per token with their share of the model's; the FLOP share
    projected to Mixtral-8x7B's geometry."""
    head = (f"{'cost per token':<16}{'time':>12}{'µs per layer':>16}{'params (share of model)':>26}"
            f"{'FLOPs (share of model)':>26}{'at Mixtral-8x7B':>17}")
    mixtral = _si(cost["mixtral_8x7b_flops_per_token"]) if "mixtral_8x7b_flops_per_token" in cost else ""
    model = f"{_si(cost['model_active_params'])} (active)", _si(cost["model_flops_per_token"])
    lines = [head, "-" * len(head), f"{'model':<16}{'':>12}{'':>16}{model[0]:>26}{model[1]:>26}{mixtral:>17}"]
    for name, entry in cost.items():
        if not isinstance(entry, dict):
            continue
        params = flops = projected = "-"
        if "adapter_params" in entry:
            params = f"{_si(entry['adapter_params'])} ({entry['adapter_params_share']:.1%})"
            flops = f"{_si(entry['adapter_flops_per_token'])} ({entry['adapter_flops_share']:.1%})"
        if "mixtral_8x7b_flops_share" in entry:
            projected = f"{entry['mixtral_8x7b_flops_share']:.2%}"
        per_layer = "-"
        if "seconds_per_layer" in entry:  # best burst (median burst)
            per_layer = f"{entry['seconds_per_layer'] * 1e6:.1f}"
            if "seconds_per_layer_median" in entry:
                per_layer += f" ({entry['seconds_per_layer_median'] * 1e6:.0f})"
        label = f"{name} ({entry['kind']})" if "kind" in entry else name
        lines.append(f"{label:<16}{entry['seconds_per_token'] * 1e3:>9.3f} ms{per_layer:>16}{params:>26}{flops:>26}"
                     f"{projected:>17}")
    return "\n".join(lines)


def _si(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:g}"
