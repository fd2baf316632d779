"""Routing traces: which experts each token used at each MoE layer, and the router's probabilities.

Recorded with forward hooks on the router modules, so it works on any model whose MoE blocks have
`.experts` and a `.gate`/`.router` (all transformers 5 MoE families), offloaded or not, and also
during `generate` (which does not return router logits). A trace feeds predictor evaluation and the
oracle predictor. Independent of the offload runtime.

Shape legend: N tokens (all sequences concatenated), L MoE layers, K experts per token, E experts.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

FORMAT = "m2r2_moe.trace/1"
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")


class ExpertChoices:
    """Shape accessors of a record holding `experts [N, L, K]` (RoutingTrace here, replay.RoutingRecord)."""

    experts: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def check_format(header: dict, expected: str, path, what: str) -> None:
    """A file's header must name the format its reader expects."""
    if header.get("format") != expected:
        raise ValueError(f"{path} is not a {what} ({expected}); header: {header}")


@dataclass
class RoutingTrace(ExpertChoices):
    """Per-token routing of a model over some token sequences.

    experts:   [N, L, K] int64, the experts the router chose (in the router's own order).
    probs:     [N, L, E] float32, softmax of the router logits.
    token_ids: [N] int64; sequence: [N] int64 index of the sequence each token belongs to.
    layers:    decoder-layer index of each of the L MoE layers.
    """

    experts: torch.Tensor
    probs: torch.Tensor
    token_ids: torch.Tensor
    sequence: torch.Tensor
    layers: list[int]
    model_name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n, n_layers, _ = self.experts.shape
        if self.probs.shape[:2] != (n, n_layers) or self.token_ids.shape != (n,) or self.sequence.shape != (n,):
            raise ValueError(
                f"inconsistent trace shapes: experts {tuple(self.experts.shape)}, probs {tuple(self.probs.shape)}, "
                f"token_ids {tuple(self.token_ids.shape)}, sequence {tuple(self.sequence.shape)}"
            )
        if len(self.layers) != n_layers:
            raise ValueError(f"{len(self.layers)} layer indices for {n_layers} traced layers")

    def __len__(self) -> int:
        return self.experts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[2]

    def sequences(self) -> list["RoutingTrace"]:
        """The trace split into one trace per sequence, in order."""
        ids = torch.unique_consecutive(self.sequence)
        return [self._select(self.sequence == s) for s in ids]

    def _select(self, mask: torch.Tensor) -> "RoutingTrace":
        return RoutingTrace(self.experts[mask], self.probs[mask], self.token_ids[mask], self.sequence[mask],
                            list(self.layers), self.model_name, dict(self.meta))

    def save(self, path: str | Path) -> None:
        """Write as safetensors (`.safetensors`) or numpy (`.npz`), chosen by the file suffix."""
        path = Path(path)
        tensors = self._tensors()
        header = {"format": FORMAT, "model_name": self.model_name, "layers": json.dumps(self.layers),
                  "meta": json.dumps(self.meta)}
        if path.suffix == ".safetensors":
            write_safetensors(path, tensors, header)
        elif path.suffix == ".npz":
            np.savez_compressed(path, **{k: v.numpy() for k, v in tensors.items()},
                                header=np.array(json.dumps(header)))
        else:
            raise ValueError(f"unknown trace format {path.suffix!r}: use .safetensors or .npz")

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        """Read a trace written by `save`."""
        path = Path(path)
        if path.suffix == ".safetensors":
            tensors, header = read_safetensors(path)
        elif path.suffix == ".npz":
            with np.load(path) as data:
                header = json.loads(str(data["header"]))
                tensors = {k: torch.from_numpy(data[k]) for k in data.files if k != "header"}
        else:
            raise ValueError(f"unknown trace format {path.suffix!r}: use .safetensors or .npz")
        check_format(header, FORMAT, path, "routing trace")
        return cls(tensors["experts"].long(), tensors["probs"].float(), tensors["token_ids"].long(),
                   tensors["sequence"].long(), json.loads(header["layers"]), header.get("model_name", ""),
                   json.loads(header.get("meta", "{}")))

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"experts": self.experts.to(torch.int16 if self.num_experts < 2**15 else torch.int32),
                "probs": self.probs.float(), "token_ids": self.token_ids.long(), "sequence": self.sequence.long()}


# ----------------------------------------------------------------------------------------------
# finding routers


def find_routers(model: nn.Module) -> list[tuple[int, nn.Module, int]]:
    """(decoder-layer index, router module, top-k) of every MoE block, in layer order.

    An MoE block is any module with an `experts` attribute and a `gate` or `router` module.
    """
    found = []
    for name, module in model.named_modules():
        router = getattr(module, "gate", None)
        if not isinstance(router, nn.Module):
            router = getattr(module, "router", None)
        if not isinstance(router, nn.Module) or getattr(module, "experts", None) is None:
            continue
        match = _LAYER_INDEX.search(name)
        if match is None:
            raise ValueError(f"MoE block {name!r} is not under a numbered decoder layer")
        found.append((int(match.group(1)), router, _top_k(model, module, router)))
    if not found:
        raise ValueError(f"no MoE blocks (modules with .experts and .gate/.router) in {type(model).__name__}")
    found.sort(key=lambda item: item[0])
    return found


def _top_k(model: nn.Module, block: nn.Module, router: nn.Module) -> int:
    for owner, attr in ((router, "top_k"), (block, "top_k"), (getattr(model, "config", None), "num_experts_per_tok")):
        value = getattr(owner, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the top-k of router {type(router).__name__}")


def _parse_router_output(out, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, E], chosen experts [T, K]) from a router's output.

    transformers 5 routers return (logits, weights, indices); a bare nn.Linear gate returns logits,
    and then the choice is recomputed as the top-k of the softmax.
    """
    if isinstance(out, torch.Tensor):
        logits = out
        return logits, logits.float().topk(top_k, dim=-1).indices
    logits = out[0]
    indices = next((t for t in out[1:] if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
    if indices is None:
        indices = logits.float().topk(top_k, dim=-1).indices
    return logits, indices


# ----------------------------------------------------------------------------------------------
# recording


class RouterRecorder:
    """Context manager that records every router call while it is active, e.g. during `generate`.

    Each forward adds its new tokens' routing (a decode step with a KV cache adds one token per
    sequence). `take()` returns and clears what was recorded as [T, L, K] experts and [T, L, E] probs,
    rows in the order the model flattened them (batch-major).
    """

    def __init__(self, model: nn.Module):
        self.routers = find_routers(model)
        self._experts: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._probs: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._handles: list = []

    def __enter__(self) -> "RouterRecorder":
        for slot, (_, router, top_k) in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(slot, top_k)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, slot: int, top_k: int):
        def hook(_module, _inputs, out):
            logits, indices = _parse_router_output(out, top_k)
            num_experts = logits.shape[-1]
            # Copies to host memory: tracing is an analysis tool, not the per-token hot path.
            self._experts[slot].append(indices.reshape(-1, indices.shape[-1]).detach().long().cpu())
            self._probs[slot].append(logits.reshape(-1, num_experts).detach().float().softmax(-1).cpu())

        return hook

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts = {len(calls) for calls in self._experts}
        if len(counts) != 1:
            raise RuntimeError(f"routers were called unequal numbers of times: {sorted(counts)}")
        experts = torch.stack([torch.cat(calls) for calls in self._experts], dim=1)  # [T, L, K]
        probs = torch.stack([torch.cat(calls) for calls in self._probs], dim=1)  # [T, L, E]
        self._experts = [[] for _ in self.routers]
        self._probs = [[] for _ in self.routers]
        return experts, probs

    @property
    def layers(self) -> list[int]:
        return [layer for layer, _, _ in self.routers]


def _as_sequences(inputs) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim == 1:
            return [inputs]
        if inputs.ndim == 2:
            return list(inputs)
        raise ValueError(f"input_ids must be [T] or [B, T], got shape {tuple(inputs.shape)}")
    return [torch.as_tensor(seq) for seq in inputs]


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__


@torch.no_grad()
def record_trace(model: nn.Module, inputs: torch.Tensor | Iterable[Sequence[int]], *,
                 model_name: str | None = None) -> RoutingTrace:
    """Run `model` over token ids and return the routing of every token at every MoE layer.

    `inputs`: a [T] or [B, T] tensor (rows are separate, unpadded sequences) or a list of sequences of
    any lengths. Each sequence is one forward pass without KV cache.
    """
    sequences = [seq.long().reshape(-1) for seq in _as_sequences(inputs)]
    if not sequences or any(len(seq) == 0 for seq in sequences):
        raise ValueError("record_trace needs at least one non-empty sequence")
    device = model.get_input_embeddings().weight.device
    experts, probs = [], []
    was_training = model.training
    model.eval()
    try:
        with RouterRecorder(model) as recorder:
            for seq in sequences:
                model(input_ids=seq.unsqueeze(0).to(device), use_cache=False)
                seq_experts, seq_probs = recorder.take()
                if len(seq_experts) != len(seq):
                    raise RuntimeError(f"routers saw {len(seq_experts)} tokens for a {len(seq)}-token sequence")
                experts.append(seq_experts)
                probs.append(seq_probs)
    finally:
        model.train(was_training)
    sequence = torch.cat([torch.full((len(seq),), i, dtype=torch.long) for i, seq in enumerate(sequences)])
    return RoutingTrace(torch.cat(experts), torch.cat(probs), torch.cat(sequences).cpu(), sequence,
                        recorder.layers, model_name if model_name is not None else _model_name(model))
