"""Offline evaluation of predictors on held-out text: recall, precision and width per depth and source layer,
and across the token boundary.

For source layer l and depth d, a predictor's set for layer l+d is compared with the experts layer l+d
actually ran, per token; figures are averaged over tokens and over all source layers with l+d < L
(and reported per source layer too: `by_layer`).
- recall: share of the used experts that were predicted;
- precision: share of the predicted experts that were used;
- width: mean number of predicted experts per layer per token.
Each predictor is scored at top-k (width = K), at equal fixed widths, and confidence-widened.

Across the token boundary (`evaluate_next_token`), a predictor that `wraps` predicts from layer l of token t
the experts of layer l + d - L of token t + 1 (teacher forced: the text's next token); its top-k recall is set
next to the simplest guess, the experts the same layer used for token t.
"""

from __future__ import annotations

import torch

from .base import Predictor, select


def _pr(mask: torch.Tensor, chosen: torch.Tensor) -> tuple[float, float, float]:
    """mask [N, E] predicted, chosen [N, K] used → (recall, precision, width) summed over N (not averaged)."""
    used = torch.zeros_like(mask).scatter_(-1, chosen, True)
    inter = (mask & used).sum(-1).float()
    width = mask.sum(-1).float()
    return (inter / used.sum(-1)).sum().item(), (inter / width.clamp_min(1)).sum().item(), width.sum().item()


class _Acc:
    def __init__(self):
        self.n, self.recall, self.precision, self.width = 0, 0.0, 0.0, 0.0

    def add(self, mask, chosen, layer: int | None = None, by_layer: dict | None = None):
        r, p, w = _pr(mask, chosen)
        if by_layer is not None:
            n, total = by_layer.get(layer, (0, 0.0))
            by_layer[layer] = (n + len(chosen), total + r)
        self.n += len(chosen)
        self.recall, self.precision, self.width = self.recall + r, self.precision + p, self.width + w

    def result(self) -> dict:
        n = max(self.n, 1)
        return {"recall": self.recall / n, "precision": self.precision / n, "width": self.width / n}


def sequence_scores(predictor: Predictor, residuals: torch.Tensor, chosen: torch.Tensor, d: int):
    """Yield (l, scores [N, E]) for one sequence: residuals [L, N, H], chosen [L, N, K] in token order.

    Stateless predictors are called once per source layer on all tokens; `history` is replayed token by
    token (it may only know tokens before the current one and layers before the target)."""
    num_layers = residuals.shape[0]
    if predictor.name != "history":
        for l in range(num_layers - d):
            yield l, predictor.predict(l, residuals[l], chosen[l])[d]
        return
    predictor.reset()
    out = [torch.zeros(residuals.shape[1], predictor.num_experts) for _ in range(num_layers)]
    for t in range(residuals.shape[1]):
        for l in range(num_layers):
            if l + d < num_layers:
                out[l][t] = predictor.predict(l, None)[d][0]
            predictor.observe(l, chosen[l, t : t + 1])
    for l in range(num_layers - d):
        yield l, out[l]


def evaluate(predictors: dict[str, Predictor], sequences, top_k: int, depth: int, widths: list[int],
             mass: float = 0.9, cap: int | None = None) -> dict:
    """`sequences`: iterable of (residuals [L, N, H], chosen [L, N, K]) for held-out sequences.

    Returns `{predictor: {depth: {"recall", "precision", "width", "at_width": {w: {...}},
    "widened": {...}}}}`."""
    cap = cap or 2 * top_k
    accs = {name: {d: {"topk": _Acc(), "widened": _Acc(), **{w: _Acc() for w in widths}} for d in range(1, depth + 1)}
            for name in predictors}
    by_layer = {name: {d: {} for d in range(1, depth + 1)} for name in predictors}  # {l: (tokens, recall sum)}
    for residuals, chosen in sequences:
        for name, predictor in predictors.items():
            if hasattr(predictor, "load_sequence"):
                predictor.load_sequence(chosen)
            for d in range(1, depth + 1):
                for l, scores in sequence_scores(predictor, residuals, chosen, d):
                    truth = chosen[l + d]
                    acc = accs[name][d]
                    acc["topk"].add(select(scores, width=top_k), truth, l, by_layer[name][d])
                    acc["widened"].add(select(scores, mass=mass, cap=cap), truth)
                    for w in widths:
                        acc[w].add(select(scores, width=w), truth)
    return {
        name: {d: {**a["topk"].result(), "at_width": {w: a[w].result() for w in widths}, "widened": a["widened"].result(),
                   "by_layer": {l: total / n for l, (n, total) in sorted(by_layer[name][d].items())}}
               for d, a in by_depth.items()}
        for name, by_depth in accs.items()
    }


def by_source_layer(result: dict) -> dict[int, float]:
    """One predictor's `evaluate` result → top-k recall per source layer, averaged over its depths (in-token)."""
    sums: dict[int, list[float]] = {}
    for entry in result.values():
        for l, recall in entry["by_layer"].items():
            sums.setdefault(l, []).append(recall)
    return {l: sum(v) / len(v) for l, v in sorted(sums.items())}


@torch.no_grad()
def evaluate_next_token(predictors: dict[str, Predictor], sequences, top_k: int) -> dict:
    """Top-k recall of the next token's layers from every predictor that `wraps`, per pair (`"l->next:j"`), and
    of the previous token's experts (`"previous token"`: `{"next:j": recall}`). `sequences`: as `evaluate`'s."""
    wrapping = {name: p for name, p in predictors.items() if p.wraps}
    if not wrapping:
        return {}
    num_experts, depth = max(p.num_experts for p in wrapping.values()), max(p.depth for p in wrapping.values())
    sums: dict[str, dict[str, tuple[int, float]]] = {name: {} for name in [*wrapping, "previous token"]}

    def add(name: str, key: str, scores: torch.Tensor, used: torch.Tensor) -> None:
        recall, _, _ = _pr(select(scores, width=top_k), used)
        n, total = sums[name].get(key, (0, 0.0))
        sums[name][key] = (n + len(used), total + recall)

    for residuals, chosen in sequences:  # [L, N, H], [L, N, K]
        num_layers = residuals.shape[0]
        for j in range(min(depth, num_layers)):
            hot = torch.zeros(chosen.shape[1] - 1, num_experts)
            add("previous token", f"next:{j}", hot.scatter_(-1, chosen[j, :-1], 1.0), chosen[j, 1:])
        for name, predictor in wrapping.items():
            for l in range(num_layers):
                for d, scores in predictor.predict(l, residuals[l], chosen[l]).items():
                    if l + d >= num_layers:  # row t predicts token t + 1: the last row has no next token here
                        add(name, f"{l}->next:{l + d - num_layers}", scores[:-1], chosen[l + d - num_layers, 1:])
    return {name: {key: total / max(n, 1) for key, (n, total) in pairs.items()} for name, pairs in sums.items()}
