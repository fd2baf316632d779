"""The accelerators trained for one model, and their file (safetensors + a JSON-ish header).

Two kinds, one file:
- `linear`: low-rank adapters of the residual, r̂_{l→l+d} = r_l + (x_l @ U_{l,d}) @ V_{l,d} + b_{l,d}, routed by
  the target layer's own router (the M2R2 accelerated residual; `U [F, R]`, `V [R, H]`, `b [H]`);
- `mlp`: nonlinear heads from x_l straight to the target's router logits (`mlp.py`), with cross-token heads.
`kind` names the one the m2r2 predictor runs: the trainer writes the one that predicted better on a
validation split of the calibration text.

File format version 2: tensors `U`, `V`, `b` and, with heads, `mlp.w1`, `mlp.b1`, `mlp.w2`, `mlp.b2`; header
`format`, `version`, `fingerprint` (the model), geometry, `kind` and `info` (the training report, JSON).
Version 1 files (linear adapters only) still load, as kind `linear`; any other version is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import M2R2Error
from ..models.base import MoELayer
from .mlp import MLPHeads

FORMAT = "m2r2-adapters"
VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("linear", "mlp")
_MLP_TENSORS = ("w1", "b1", "w2", "b2")


class AdapterFileError(M2R2Error, ValueError):
    """The adapters file is missing, corrupted, of another format version or not an m2r2 adapters file."""


class AdapterMismatchError(M2R2Error, ValueError):
    """The adapters were trained for another model."""


def model_fingerprint(model: nn.Module, layers: list[MoELayer]) -> str:
    """Hash of what the adapters depend on: geometry, routers and pre-MoE norms (values rounded to bf16,
    so an fp32 and a bf16 copy of one checkpoint share a fingerprint)."""
    h = hashlib.sha256()
    cfg = model.config
    geometry = [getattr(cfg, "model_type", ""), getattr(cfg, "hidden_size", 0), len(layers),
                [int(layer.experts.num_experts) for layer in layers]]
    h.update(json.dumps(geometry).encode())
    for layer in layers:
        for module in (layer.router, layer.norm):
            if module is None:
                continue
            for name, t in sorted(module.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


class AcceleratorAdapters(nn.Module):
    """Accelerators `A_{l,d}` for every source layer l and rate d = 1..depth: the low-rank linear adapters
    (`U`, `V`, `b`, always present) and, when given, the nonlinear heads `mlp`; `kind` is the one the m2r2
    predictor runs (default: `mlp` when there are heads, else `linear`)."""

    def __init__(self, num_layers: int, hidden: int, depth: int, rank: int, route_features: int = 0,
                 mlp: MLPHeads | None = None, kind: str | None = None):
        super().__init__()
        self.num_layers, self.hidden, self.depth, self.rank = num_layers, hidden, depth, rank
        self.route_features = route_features  # E when the source layer's expert choice is an input, else 0
        self.U = nn.Parameter(torch.zeros(num_layers, depth, hidden + route_features, rank))  # [L, D, F, R]
        self.V = nn.Parameter(torch.zeros(num_layers, depth, rank, hidden))  # [L, D, R, H]
        self.b = nn.Parameter(torch.zeros(num_layers, depth, hidden))  # [L, D, H]
        if mlp is not None and (mlp.num_layers, mlp.hidden, mlp.depth) != (num_layers, hidden, depth):
            raise ValueError(f"the heads cover {mlp.num_layers} layers x {mlp.depth} depths of width {mlp.hidden}; "
                             f"the adapters {num_layers} x {depth} of {hidden}")
        self.mlp = mlp
        self.kind = kind or ("mlp" if mlp is not None else "linear")
        if self.kind not in KINDS or (self.kind == "mlp" and mlp is None):
            raise ValueError(f"kind must be one of {KINDS} ('mlp' needs heads), got {self.kind!r}")
        self.meta: dict = {}

    def features(self, normed: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
        """x_l `[T, F]` float32 from `normed [T, H]` and the source layer's `chosen [T, K]` experts."""
        x = normed.float()
        if not self.route_features:
            return x
        if chosen is None:
            raise ValueError("these adapters take the source layer's expert choice: pass chosen [T, K]")
        hot = torch.zeros(x.shape[0], self.route_features, device=x.device).scatter_(1, chosen.long(), 1.0)
        return torch.cat([x, hot], dim=-1)

    def delta(self, layer: int, depth: int, normed: torch.Tensor, chosen: torch.Tensor | None = None) -> torch.Tensor:
        """Linear `A_{l,d}(x)` for `normed [T, H]` (any float dtype) and `chosen [T, K]` → `[T, H]` float32."""
        i = depth - 1
        return (self.features(normed, chosen) @ self.U[layer, i]) @ self.V[layer, i] + self.b[layer, i]

    @property
    def num_parameters(self) -> int:
        """Parameters of the kind in use."""
        if self.kind == "mlp":
            return sum(p.numel() for p in self.mlp.parameters())
        return sum(p.numel() for p in (self.U, self.V, self.b))

    def flops_per_token(self, layer: int) -> int:
        """Multiply-adds x2 of the linear adapters evaluated at one source layer (all rates)."""
        per_rate = 2 * (self.hidden + self.route_features) * self.rank + 2 * self.rank * self.hidden
        return sum(per_rate for d in range(1, self.depth + 1) if layer + d < self.num_layers)

    def save(self, path: str | Path, fingerprint: str, extra: dict | None = None,
             dtype: torch.dtype = torch.float32) -> None:
        """Write the adapters (both kinds, `kind` in the header) for the model of `fingerprint`, their tensors in
        `dtype` (bfloat16 halves the file; loading reads either back as float32)."""
        meta = {"format": FORMAT, "version": str(VERSION), "fingerprint": fingerprint, "num_layers": str(self.num_layers),
                "hidden": str(self.hidden), "depth": str(self.depth), "rank": str(self.rank),
                "route_features": str(self.route_features), "kind": self.kind, "info": json.dumps(extra or {})}
        tensors = {n: getattr(self, n).detach().to(dtype).contiguous() for n in ("U", "V", "b")}
        if self.mlp is not None:
            meta |= {"mlp_width": str(self.mlp.width), "num_experts": str(self.mlp.num_experts),
                     "wraps": str(int(self.mlp.wraps)), "activation": "relu"}
            tensors |= {f"mlp.{n}": getattr(self.mlp, n).detach().to(dtype).contiguous() for n in _MLP_TENSORS}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> "AcceleratorAdapters":
        """Load adapters; with `fingerprint`, refuse a file trained for another model."""
        path = Path(path)
        meta, tensors = _read(path)
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise AdapterMismatchError(
                f"{path} was trained for another model (fingerprint {meta.get('fingerprint')}, this model has "
                f"{fingerprint}); train adapters for this model with `m2r2-moe train-adapters`."
            )
        try:
            geometry = [int(meta[k]) for k in ("num_layers", "hidden", "depth", "rank")]
            mlp = None
            if "mlp.w1" in tensors:
                if meta.get("activation") != "relu":
                    raise ValueError(f"heads with activation {meta.get('activation')!r} (this version runs relu)")
                mlp = MLPHeads(geometry[0], geometry[1], geometry[2], int(meta["mlp_width"]), int(meta["num_experts"]),
                               wraps=meta.get("wraps") == "1")
            adapters = cls(*geometry, int(meta.get("route_features", 0)), mlp=mlp, kind=meta.get("kind", "linear"))
            with torch.no_grad():
                for name in ("U", "V", "b"):
                    getattr(adapters, name).copy_(tensors[name])
                for name in _MLP_TENSORS if mlp is not None else ():
                    getattr(mlp, name).copy_(tensors[f"mlp.{name}"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise AdapterFileError(f"{path}: adapter tensors do not match its header ({e}); retrain them with "
                                   f"`m2r2-moe train-adapters`") from e
        adapters.meta = {**meta, "info": json.loads(meta.get("info", "{}"))}
        return adapters


def _read(path: Path) -> tuple[dict, dict]:
    """(header, tensors) of an adapters file of a readable version, or AdapterFileError saying what to do."""
    if path.is_dir():
        raise AdapterFileError(f"{path} is a folder; pass the adapters .safetensors file inside it")
    if not path.is_file():
        raise AdapterFileError(f"adapters file {path} does not exist; train one with `m2r2-moe train-adapters`")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({e}); re-train or re-download it") from e
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not an m2r2 adapters file (format={meta.get('format')!r})")
    version = meta.get("version", "")
    if not version.isdigit() or int(version) not in READABLE_VERSIONS:
        raise AdapterFileError(
            f"{path} is an adapters file of format version {version or '?'}; this m2r2_moe reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: retrain them with `m2r2-moe train-adapters`")
    return meta, tensors
