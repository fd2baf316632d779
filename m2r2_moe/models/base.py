"""What the runtime needs to know about a model family, and the generic fused-experts adapter.

transformers 5.x keeps the routed experts of a sparse MoE block in one module with fused 3-D tensors
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, optional biases) and a
`forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]` dispatched through
transformers' `ExpertsInterface` (`@use_experts_implementation`). Every family that follows that layout is
handled here; family adapters (one file each) say only what differs: routing rule, top-k, names.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .routing import block_args, call_router, sigmoid_bias_scores, softmax_scores

# Expert tensors that follow the fused layout, in the order they are packed into one buffer per expert.
FUSED_EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "up_proj", "up_proj_bias", "down_proj", "down_proj_bias")
# Where transformers families keep things, tried in order.
BLOCK_NAMES = ("mlp", "block_sparse_moe", "moe", "feed_forward", "mixer")  # decoder layer → sparse MoE block
ROUTER_NAMES = ("gate", "router")  # block → router
# decoder layer → the norm in front of the block (sandwich-norm families: the pre-feed-forward one first)
NORM_NAMES = ("pre_feedforward_layernorm", "pre_ff_layernorm", "pre_mlp_layernorm", "pre_moe_layernorm",
              "post_attention_layernorm", "ffn_norm", "norm")
# block → always-active modules beside the routed experts: kept resident on the device, never offloaded
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_expert_gate", "shared_mlp")


@dataclass
class MoELayer:
    """One sparse MoE block of a model: where its parts are."""

    index: int  # position among the model's MoE blocks (0..n_moe-1), the cache key's layer part
    decoder_index: int  # index of the decoder layer that holds the block
    block: nn.Module  # the sparse MoE block (router + experts)
    experts: nn.Module  # the fused routed-experts module whose compute the runtime takes over
    router: nn.Module | None  # the router module (its own forward is the family's routing function)
    norm: nn.Module | None = None  # the norm applied to the residual before the block
    param_names: tuple[str, ...] = field(default_factory=tuple)  # expert tensors, packing order
    shared: tuple[nn.Module, ...] = ()  # shared experts (and their gates): resident, not offloaded


@dataclass(frozen=True)
class CheckpointTensor:
    """Where one on-disk expert tensor goes: rows `[start, stop)` (None: all) of fused tensor `param` of
    `expert` (None: the on-disk tensor already holds every expert, `[E, *shape]`)."""

    param: str
    expert: int | None = None
    rows: tuple[int, int] | None = None


# On-disk per-expert names of each fused tensor (split along dim 0 in this order), Qwen- and Mixtral-style.
PER_EXPERT_NAMES = {
    "qwen": {"gate_up_proj": ("gate_proj.weight", "up_proj.weight"), "up_proj": ("up_proj.weight",),
             "down_proj": ("down_proj.weight",), "gate_up_proj_bias": ("gate_proj.bias", "up_proj.bias"),
             "up_proj_bias": ("up_proj.bias",), "down_proj_bias": ("down_proj.bias",)},
    "mixtral": {"gate_up_proj": ("w1.weight", "w3.weight"), "down_proj": ("w2.weight",)},
}


class MoEAdapter:
    """Finds the MoE blocks of a model; the default works for any fused-layout family."""

    name = "generic"
    model_types: tuple[str, ...] = ()  # config.model_type values the adapter is for (empty: any)

    def __init__(self) -> None:
        self._ranking_checked: weakref.WeakSet = weakref.WeakSet()  # routers whose scores were checked once

    def matches(self, model: nn.Module) -> bool:
        return not self.model_types or getattr(model.config, "model_type", None) in self.model_types

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        inner = getattr(model, "model", model)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: no `model.layers` decoder stack found; m2r2_moe supports "
                "transformers decoder-only causal LMs."
            )
        return list(layers)

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        found = []
        for decoder_index, layer in enumerate(self.decoder_layers(model)):
            block = self.moe_block(layer)
            if block is None:
                continue
            experts = getattr(block, "experts", None)
            if experts is None:
                continue
            found.append(
                MoELayer(
                    index=len(found),
                    decoder_index=decoder_index,
                    block=block,
                    experts=experts,
                    router=self.router(block),
                    norm=self.norm(layer),
                    param_names=check_fused_layout(experts),
                    shared=self.shared_experts(block),
                )
            )
        return found

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        for name in BLOCK_NAMES:
            block = getattr(layer, name, None)
            if isinstance(block, nn.Module) and isinstance(getattr(block, "experts", None), nn.Module):
                return block
        return None

    def router(self, block: nn.Module) -> nn.Module | None:
        return _first_module(block, ROUTER_NAMES)

    def norm(self, layer: nn.Module) -> nn.Module | None:
        """The norm whose output the block reads; None when the block reads the residual itself."""
        if hasattr(layer, "post_feedforward_layernorm") and not hasattr(layer, "pre_feedforward_layernorm"):
            return None  # OLMo2-style post-norms: post_attention_layernorm normalises the attention output
        norm = _first_module(layer, NORM_NAMES)
        # Parallel attention + MLP (Cohere): both read input_layernorm(layer input)
        return norm if norm is not None else _first_module(layer, ("input_layernorm",))

    def shared_experts(self, block: nn.Module) -> tuple[nn.Module, ...]:
        return tuple(m for name in SHARED_NAMES if isinstance(m := getattr(block, name, None), nn.Module))

    def route(self, layer: MoELayer, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's own routing applied to `hidden [T, H]` (already normed as the block sees it).

        Returns (`scores [T, E]`, `top_k_index [T, K]`): `top_k_index` is what the block's router picks
        (its own forward, called without hooks, so transformers' router-logit recording is not fed);
        `scores` (see `models/routing.py`) are float32, non-negative, sum to 1, rank the picked experts
        first and are differentiable: softmax probabilities for softmax routers. Predictors call this to
        turn a (predicted) residual into expert choices. On its first call for a router the ranking is
        checked against the router's pick; a family whose rule the adapter does not know is refused."""
        logits, indices = self.router_output(layer, hidden)
        scores = self.scores(layer, logits)
        if layer.router not in self._ranking_checked:
            self._check_ranking(layer, scores, indices)
            self._ranking_checked.add(layer.router)
        return scores, indices

    def router_output(self, layer: MoELayer, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`router_logits [T, E]`, `top_k_index [T, K]`): the router's own forward (see `call_router`)."""
        if layer.router is None:
            raise UnsupportedModelError(
                f"{type(layer.block).__name__} has no `gate`/`router` module; add a family adapter"
            )
        return call_router(layer.router, layer.block, hidden)

    def scores(self, layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
        """Scores from `logits [T, E]` by the router's rule: softmax, unless the router carries a score
        correction bias (DeepSeek-V3-style sigmoid + bias, group-limited when it has groups)."""
        router = layer.router
        bias = getattr(router, "e_score_correction_bias", None)
        if not isinstance(bias, torch.Tensor):
            bias = next((a for n, a in block_args(router, layer.block).items()
                         if "bias" in n and isinstance(a, torch.Tensor)), None)
        if bias is None:
            return softmax_scores(logits)
        groups = getattr(router, "num_group", None) or getattr(router, "n_group", None)
        return sigmoid_bias_scores(logits, bias, groups, getattr(router, "topk_group", None))

    def _check_ranking(self, layer: MoELayer, scores: torch.Tensor, indices: torch.Tensor) -> None:
        """Every picked expert scores at least as high as every other one (ties allowed)."""
        with torch.no_grad():
            scores = scores.detach()
            picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)  # [T, E]
            lowest_picked = scores.masked_fill(~picked, float("inf")).amin(dim=-1)
            best_other = scores.masked_fill(picked, float("-inf")).amax(dim=-1)
            consistent = bool((lowest_picked >= best_other).all())  # host sync: once per router
        if not consistent:
            raise UnsupportedModelError(
                f"{type(layer.router).__name__}: the {self.name!r} adapter's expert scores do not rank the router's "
                "own choice first, so predictors would prefetch the wrong experts; this routing rule needs a family "
                "adapter in m2r2_moe/models/ (see tools/check_families.py)."
            )

    def top_k(self, model: nn.Module) -> int:
        """Experts each token uses per MoE layer: from the config, else from the first router."""
        config = model.config
        config = getattr(config, "text_config", None) or config
        for name in ("num_experts_per_tok", "moe_top_k", "moe_topk", "top_k", "num_experts_per_token"):
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        for module in model.modules():
            value = getattr(module, "top_k", None)
            if isinstance(value, int) and not isinstance(value, bool) and module is not model:
                return value
        raise UnsupportedModelError(f"{type(model).__name__}: cannot find the routing top-k in its config")

    def checkpoint_expert_names(self, layer: MoELayer, prefix: str) -> dict[str, dict[str, CheckpointTensor]]:
        """On-disk names of `layer`'s expert tensors, one dict per layout a checkpoint may use (the loader
        takes the layout the checkpoint has): `fused` (`{prefix}.gate_up_proj`), `qwen`
        (`{prefix}.{e}.gate_proj.weight`, ...) and `mixtral` (`{prefix}.{e}.w1.weight`: w1 gate, w3 up,
        w2 down). `prefix` is the experts module's name in the model, e.g. `model.layers.3.mlp.experts`."""
        experts = layer.experts
        layouts = {"fused": {f"{prefix}.{n}": CheckpointTensor(n) for n in layer.param_names}}
        for style, names in PER_EXPERT_NAMES.items():
            if not all(n in names for n in layer.param_names):
                continue
            layout = {}
            for n in layer.param_names:
                parts, rows = names[n], getattr(experts, n).shape[1]
                step = rows // len(parts)
                for i, part in enumerate(parts):
                    span = None if len(parts) == 1 else (i * step, (i + 1) * step)
                    for e in range(int(experts.num_experts)):
                        layout[f"{prefix}.{e}.{part}"] = CheckpointTensor(n, e, span)
            layouts[style] = layout
        return layouts


def check_fused_layout(experts: nn.Module) -> tuple[str, ...]:
    """The expert tensor names of a fused experts module, or a clear error naming the class.

    Besides the tensors, the class must dispatch through transformers' `ExpertsInterface`
    (`@use_experts_implementation`): the runtime runs that forward on device slots."""
    params = dict(experts.named_parameters(recurse=False))
    names = tuple(n for n in FUSED_EXPERT_PARAMS if n in params)
    num_experts = getattr(experts, "num_experts", None)
    has_up = "gate_up_proj" in names or "up_proj" in names
    if not has_up or "down_proj" not in names or not isinstance(num_experts, int):
        raise UnsupportedModelError(
            f"{type(experts).__name__} is not a fused experts module (expected `gate_up_proj`/`up_proj` and "
            f"`down_proj` tensors of shape [num_experts, ...] and a `num_experts` attribute; found parameters "
            f"{sorted(params)}). This layout is not supported yet."
        )
    if not hasattr(experts, "has_gate") or getattr(experts, "config", None) is None:
        raise UnsupportedModelError(
            f"{type(experts).__name__} keeps fused expert tensors but its forward is its own (the class is not "
            "decorated with transformers' @use_experts_implementation), so m2r2_moe cannot run it on device "
            "slots. This layout is not supported yet."
        )
    extra = sorted(set(params) - set(names))
    if extra:
        raise UnsupportedModelError(
            f"{type(experts).__name__} has expert parameters m2r2_moe does not know how to offload: {extra}"
        )
    dtypes = {params[n].dtype for n in names}
    if len(dtypes) != 1:
        raise UnsupportedModelError(f"{type(experts).__name__}: expert tensors of mixed dtypes {dtypes} are not supported")
    for n in names:
        if params[n].dim() < 2 or params[n].shape[0] != num_experts:
            raise UnsupportedModelError(
                f"{type(experts).__name__}.{n} has shape {tuple(params[n].shape)}; expected [num_experts={num_experts}, ...]"
            )
    return names


def expert_param_bytes(layer: MoELayer) -> int:
    """Bytes of one expert of this layer (all its tensors)."""
    total = 0
    for n in layer.param_names:
        p = getattr(layer.experts, n)
        total += p[0].numel() * p.element_size()
    return total


def shared_param_bytes(layer: MoELayer) -> int:
    """Bytes of the layer's shared experts (resident on the device, counted apart from the routed ones)."""
    return sum(p.numel() * p.element_size() for m in layer.shared for p in m.parameters())


def _first_module(parent: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"
