"""Predictors of the experts upcoming layers will use: `none`, `history`, `gate`, `m2r2`, `oracle`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.base import MoEAdapter, MoELayer
from .base import Predictor, select
from .gate import GatePredictor
from .accelerators import AcceleratorAdapters, AdapterFileError, AdapterMismatchError, model_fingerprint
from .m2r2 import M2R2Predictor
from .mlp import MLPHeads
from .simple import HistoryPredictor, OraclePredictor

PREDICTORS = ("none", "history", "gate", "m2r2", "oracle")


def default_adapters_path(model: nn.Module, layers: list[MoELayer]) -> Path:
    """The shipped adapters when `model` is one of the built-in models; otherwise a clear error."""
    from ..builtin import builtin_adapters_path, builtin_names

    fingerprint = model_fingerprint(model, layers)
    for name in builtin_names():
        path = builtin_adapters_path(name)
        if path is not None and AcceleratorAdapters.load(path).meta.get("fingerprint") == fingerprint:
            return path
    raise AdapterFileError(
        "predictor='m2r2' needs adapters trained for this model: pass adapters=PATH "
        "(train them with `m2r2-moe train-adapters --model PATH --text FILES --out adapters.safetensors`)"
    )


def make_predictor(name: str, model: nn.Module, adapter: MoEAdapter, layers: list[MoELayer], depth: int,
                   adapters: str | Path | AcceleratorAdapters | None = None, trace: torch.Tensor | None = None,
                   device: torch.device | str | None = None, kind: str | None = None) -> Predictor:
    """Build predictor `name` for a model. `adapters`: path or object (m2r2); `kind`: which of the adapters'
    accelerators m2r2 runs, `linear` or `mlp` (default: the one the adapters file names); `trace`: `[N, L, K]`
    (oracle); `device`: where the adapters run (default: the model's device)."""
    num_layers = len(layers)
    num_experts = max(int(layer.experts.num_experts) for layer in layers)
    top_k = adapter.top_k(model)
    common = (num_layers, num_experts, top_k, depth)
    if name == "none":
        return Predictor(*common)
    if name == "history":
        return HistoryPredictor(*common)
    if name == "gate":
        return GatePredictor(*common, adapter, layers)
    if name == "m2r2":
        if not isinstance(adapters, AcceleratorAdapters):
            path = adapters if adapters is not None else default_adapters_path(model, layers)
            adapters = AcceleratorAdapters.load(path, fingerprint=model_fingerprint(model, layers))
        device = device or next(p.device for p in model.parameters() if p.numel())
        return M2R2Predictor(*common, adapter, layers, adapters.to(device), kind=kind)
    if name == "oracle":
        if trace is None:
            raise ValueError("predictor='oracle' replays a recorded routing trace: pass trace=[N, L, K] expert ids")
        return OraclePredictor(*common, trace)
    raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}")


__all__ = [
    "Predictor", "HistoryPredictor", "GatePredictor", "M2R2Predictor", "OraclePredictor", "AcceleratorAdapters", "MLPHeads",
    "AdapterFileError", "AdapterMismatchError", "make_predictor", "model_fingerprint", "select", "PREDICTORS",
]
