"""What the runtime needs to know about a model family, and the generic fused-experts adapter.

transformers 5.x keeps the routed experts of a sparse MoE block in one module with fused 3-D tensors
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, optional biases) and a
`forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`. Every family that
follows that layout is handled here; family adapters only say where the blocks and routers are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModelError

# Expert tensors that follow the fused layout, in the order they are packed into one buffer per expert.
FUSED_EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "up_proj", "up_proj_bias", "down_proj", "down_proj_bias")


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

    def matches(self, model: nn.Module) -> bool:
        return True

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
                    norm=getattr(layer, "post_attention_layernorm", None),
                    param_names=check_fused_layout(experts),
                )
            )
        return found

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        for name in ("mlp", "block_sparse_moe", "moe"):
            block = getattr(layer, name, None)
            if block is not None and hasattr(block, "experts"):
                return block
        return None

    def router(self, block: nn.Module) -> nn.Module | None:
        for name in ("gate", "router"):
            router = getattr(block, name, None)
            if isinstance(router, nn.Module):
                return router
        return None

    def route(self, layer: MoELayer, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's own routing applied to `hidden [T, H]` (already normed as the block sees it).

        Returns (`scores [T, E]` float32, higher = more likely chosen: the family's selection scores,
        softmax probabilities for softmax routers; `top_k_index [T, K]` the experts the block would run).
        Predictors call this to turn a (predicted) residual into expert choices. The default reads the
        transformers 5 router output `(router_logits, router_scores, router_indices)`."""
        out = layer.router(hidden)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise UnsupportedModelError(
                f"{type(layer.router).__name__} does not return (logits, scores, indices); add a family adapter"
            )
        logits, _, indices = out
        return torch.softmax(logits.float(), dim=-1), indices

    def top_k(self, model: nn.Module) -> int:
        config = model.config
        for name in ("num_experts_per_tok", "moe_top_k", "top_k"):
            value = getattr(config, name, None)
            if isinstance(value, int):
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
    """The expert tensor names of a fused experts module, or a clear error naming the class."""
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


def is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"
