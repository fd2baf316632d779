"""Training the nonlinear accelerators (`mlp.py`) on collected routing (`collect.RoutingSet`).

Every (source layer, depth) head is trained at once, one batched forward per step (`MLPHeads.forward_all`):
loss = KL(p_target ‖ softmax(z)), p_target the target router's distribution on its own input, averaged over
the pairs. A cross-token pair's target is the next token of the same sequence (rows without one are masked).
Adam with a short warm-up and a cosine decay over `epochs`; after each epoch the validation KL decides: the best
epoch's weights are kept, and training stops after `patience` epochs without improvement. Seeded. The default of 10
passes: the heads were short of steps at 3 (held-out top-k recall +0.6 to +1.3 points at every distance on three
models with 10; on one of them nearly what four times the calibration text gave with 3; BENCHMARKS.md, "the heads'
training recipe").
"""

from __future__ import annotations

import logging
import math

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .collect import RoutingSet
from .mlp import MLPHeads

logger = logging.getLogger(__name__)
EPOCHS = 10  # most passes over the calibration tokens (early-stopped): the module docstring says why


def pair_table(heads: MLPHeads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair (l, d), flattened `[L*D]`: target layer, whether it is the next token's, whether it is trained."""
    num_layers, depth = heads.num_layers, heads.depth
    target = torch.tensor([(l + d) % num_layers for l in range(num_layers) for d in range(1, depth + 1)])
    cross = torch.tensor([l + d >= num_layers for l in range(num_layers) for d in range(1, depth + 1)])
    trained = ~cross | heads.wraps
    return target, cross, trained


def batch_targets(data: RoutingSet, rows: torch.Tensor, table, field: str = "probs"):
    """(`targets [L*D, B, ...]` of `field` (`probs` or `chosen`), `mask [L*D, B]`) for token `rows [B]`."""
    target, cross, trained = table
    values = getattr(data, field)  # [L, N, ...]
    following = data.next[rows]  # [B]
    here, there = values[:, rows], values[:, following.clamp_min(0)]  # [L, B, ...]
    pick = cross.view(-1, *[1] * (here.dim() - 1))
    out = torch.where(pick, there[target], here[target])  # [L*D, B, ...]
    mask = trained.unsqueeze(1) & (~cross.unsqueeze(1) | (following >= 0).unsqueeze(0))  # [L*D, B]
    return out, mask


def _kl(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked (pair, token) of KL(targets ‖ softmax(logits)); logits/targets `[L*D, B, E]`."""
    log_q = F.log_softmax(logits, dim=-1)
    kl = (targets * (torch.log(targets.clamp_min(1e-12)) - log_q)).sum(-1)  # [L*D, B]
    return (kl * mask).sum() / mask.sum().clamp_min(1)


@torch.no_grad()
def head_logits(heads: MLPHeads, data: RoutingSet, chunk: int = 4096) -> torch.Tensor:
    """Logits `[L*D, N, E]` of every pair on every token of `data`."""
    parts = [heads.forward_all(data.normed[:, i : i + chunk]) for i in range(0, data.tokens, chunk)]
    return torch.cat(parts, dim=2).flatten(0, 1)


@torch.no_grad()
def validation_kl(heads: MLPHeads, data: RoutingSet) -> float:
    table = pair_table(heads)
    rows = torch.arange(data.tokens)
    targets, mask = batch_targets(data, rows, table)
    return _kl(head_logits(heads, data), targets, mask).item()


def fit_heads(train: RoutingSet, val: RoutingSet, depth: int, width: int = 128, wraps: bool = True,
              epochs: int = EPOCHS, lr: float = 4e-3, batch: int = 512, patience: int = 2, seed: int = 0,
              progress: bool = True) -> tuple[MLPHeads, dict]:
    """Train heads for every (layer, depth) pair on `train`, early-stopped on `val`. Returns (heads, report)."""
    num_layers, _, hidden = train.normed.shape
    heads = MLPHeads(num_layers, hidden, depth, width, train.probs.shape[-1], wraps=wraps)
    generator = torch.Generator().manual_seed(seed)
    heads.initialize(generator)
    table = pair_table(heads)
    steps_per_epoch = max(train.tokens // batch, 1)
    total = steps_per_epoch * epochs
    warmup = max(1, total // 20)
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    # a 5% linear warm-up, then a cosine decay to 2% of `lr` at the last epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.02 + 0.49 * (1 + math.cos(math.pi * min(max(s - warmup, 0) / max(total - warmup, 1), 1.0)))))
    best, best_state, history, stale = math.inf, None, [], 0
    bar = tqdm(total=total, desc="train mlp accelerators", disable=not progress)
    for epoch in range(epochs):
        order = torch.randperm(train.tokens, generator=generator)
        for step in range(steps_per_epoch):
            rows = order[step * batch : (step + 1) * batch]
            targets, mask = batch_targets(train, rows, table)
            logits = heads.forward_all(train.normed[:, rows]).flatten(0, 1)  # [L*D, B, E]
            loss = _kl(logits, targets, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            bar.update()
        score = validation_kl(heads, val)
        history.append(score)
        bar.set_postfix(val_kl=f"{score:.4f}")
        if score < best - 1e-4:
            best, best_state, stale = score, {k: v.clone() for k, v in heads.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= patience:
                break
    bar.close()
    heads.load_state_dict(best_state)
    logger.info("mlp accelerators: best validation KL %.4f after %d of %d epochs", best, history.index(best) + 1,
                len(history))
    return heads, {"width": width, "epochs_run": len(history), "best_epoch": history.index(best) + 1,
                   "validation_kl": history, "lr": lr, "batch": batch}


@torch.no_grad()
def head_recalls(heads: MLPHeads, val: RoutingSet, k: int) -> tuple[dict, dict]:
    """Top-k recall of every trained pair on `val` (`{"l->t": recall}`, `{"l->next:j": recall}` across the token),
    and of the current token's experts for the next token's layers j < depth (`{"next:j": recall}`)."""
    table = pair_table(heads)
    rows = torch.arange(val.tokens)
    used, mask = batch_targets(val, rows, table, field="chosen")  # [P, N, K], [P, N]
    top = head_logits(heads, val).topk(k, dim=-1).indices  # [P, N, K]
    hits = (top.unsqueeze(-1) == used.unsqueeze(-2)).any(-2).float().mean(-1)  # [P, N]
    recall = (hits * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # [P]
    mlp, previous = {}, {}
    num_layers = heads.num_layers
    following = val.next.clamp_min(0)
    for i, (l, d) in enumerate((l, d) for l in range(num_layers) for d in range(1, heads.depth + 1)):
        if not table[2][i]:
            continue
        if l + d < num_layers:
            mlp[f"{l}->{l + d}"] = recall[i].item()
            continue
        j = l + d - num_layers
        mlp[f"{l}->next:{j}"] = recall[i].item()
        if l == num_layers - 1:  # the current token's experts at layer j, for the next token's layer j
            same = (val.chosen[j].unsqueeze(-1) == val.chosen[j][following].unsqueeze(-2)).any(-2).float().mean(-1)
            previous[f"next:{j}"] = (same * mask[i]).sum().item() / mask[i].sum().clamp_min(1).item()
    return mlp, previous
