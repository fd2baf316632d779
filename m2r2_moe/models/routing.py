"""Calling a family's router, and expert scores from its logits (one function per routing rule): what
`MoEAdapter.route` returns.

Contract of every function here: `scores [T, E]` float32, non-negative, summing to 1 over the experts a
token may use, zero for experts it may not (group-limited routing), ranking the experts as the router's
selection does (its top-k are the k highest scores), and differentiable in the logits (the m2r2 adapters
train through them). For sigmoid routers the scores are the selection values (sigmoid + correction
bias, clamped at 0) normalised to sum to 1, a distribution over experts only in that sense.
Shapes: T tokens, E experts, G expert groups.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import UnsupportedModelError


def softmax_scores(logits: torch.Tensor) -> torch.Tensor:
    """Softmax routers (Mixtral, Qwen, OLMoE, Phi-MoE, GPT-OSS): `logits [T, E]` → probabilities."""
    return torch.softmax(logits.float(), dim=-1)


def normalized(values: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """`values [T, E]` clamped at 0, zeroed outside `allowed [T, E]` (bool), scaled to sum to 1 per token."""
    values = values.clamp_min(0)
    if allowed is not None:
        values = values * allowed
    return values / values.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def group_mask(choice: torch.Tensor, num_group: int, topk_group: int, rule: str) -> torch.Tensor:
    """Experts in the `topk_group` best groups, as DeepSeek's group-limited routing keeps them: `[T, E]` bool.

    A group's score is its best expert (`rule="max"`, DeepSeek-V2) or the sum of its best two
    (`rule="top2_sum"`, DeepSeek-V3); same ops as transformers' routers, so the same groups win."""
    num_tokens, num_experts = choice.shape
    grouped = choice.view(num_tokens, num_group, num_experts // num_group)  # [T, G, E/G]
    if rule == "max":
        group_scores = grouped.max(dim=-1).values  # [T, G]
    elif rule == "top2_sum":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    else:
        raise ValueError(f"unknown group rule {rule!r}")
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()  # [T, G]
    return keep.unsqueeze(-1).expand(-1, -1, num_experts // num_group).reshape(num_tokens, num_experts)


def softmax_group_scores(logits: torch.Tensor, num_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V2 `group_limited_greedy`: softmax, experts outside the best groups (by max) zeroed."""
    probs = softmax_scores(logits)
    return normalized(probs, group_mask(probs, num_group, topk_group, "max"))


def sigmoid_bias_scores(logits: torch.Tensor, bias: torch.Tensor | None, num_group: int | None = None,
                        topk_group: int | None = None) -> torch.Tensor:
    """DeepSeek-V3-style routers: the selection value is sigmoid(logit) + correction bias; with groups,
    only experts of the `topk_group` best groups (by the sum of their top two) may be chosen."""
    choice = logits.float().sigmoid()  # [T, E]
    if bias is not None:
        choice = choice + bias
    allowed = group_mask(choice, num_group, topk_group, "top2_sum") if num_group else None
    return normalized(choice, allowed)


def call_router(router: nn.Module, block: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`router_logits [T, E]`, `top_k_index [T, K]`) from the router's own forward on `hidden [T, H]`.

    Called as `router.forward`, not `router(...)`: no hooks, so transformers' router-logit recording
    (`output_router_logits`) is not fed by predictions. Reads the transformers 5 output
    `(router_logits, top_k_weights, top_k_index)`; arguments beyond the hidden states (a correction
    bias some families keep on the block) are taken from the block by name."""
    kwargs = block_args(router, block)
    cls = type(router)
    if cls not in _ROUTER_WANTS_BATCH:
        try:
            out = router.forward(hidden, **kwargs)
            _ROUTER_WANTS_BATCH[cls] = False
        except (ValueError, RuntimeError, IndexError):  # a router written for [B, S, H] only (AFMoE)
            out = router.forward(hidden.unsqueeze(0), **kwargs)
            _ROUTER_WANTS_BATCH[cls] = True
    else:
        out = router.forward(hidden.unsqueeze(0) if _ROUTER_WANTS_BATCH[cls] else hidden, **kwargs)
    well_formed = isinstance(out, tuple) and len(out) == 3 and not out[2].is_floating_point()
    if not well_formed or out[0].shape[-1] < out[2].shape[-1]:
        raise UnsupportedModelError(
            f"{cls.__name__} does not return (logits [T, E], weights [T, K], indices [T, K]); add a family adapter"
        )
    logits, _, indices = out
    return logits.reshape(-1, logits.shape[-1]), indices.reshape(-1, indices.shape[-1])


_EXTRA_PARAMS: dict[type, tuple[tuple[str, bool], ...]] = {}
_ROUTER_WANTS_BATCH: dict[type, bool] = {}  # router class -> takes hidden states as [1, T, H], not [T, H]


def _extra_params(router: nn.Module) -> tuple[tuple[str, bool], ...]:
    """(name, required) of the positional arguments of `router.forward` after the hidden states (per class)."""
    cls = type(router)
    if cls not in _EXTRA_PARAMS:
        params = list(inspect.signature(router.forward).parameters.values())[1:]
        _EXTRA_PARAMS[cls] = tuple((p.name, p.default is inspect.Parameter.empty) for p in params
                                   if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return _EXTRA_PARAMS[cls]


def block_args(router: nn.Module, block: nn.Module) -> dict:
    """The block's attributes the router takes as extra arguments (e.g. MiniMax-M2's correction bias): the
    required ones must be on the block, optional ones are passed when the block has them."""
    args = {}
    for name, required in _extra_params(router):
        if hasattr(block, name):
            args[name] = getattr(block, name)
        elif required:
            raise UnsupportedModelError(
                f"{type(router).__name__}.forward needs `{name}`, which {type(block).__name__} does not have; add a "
                "family adapter"
            )
    return args
