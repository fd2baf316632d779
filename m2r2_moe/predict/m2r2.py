"""`m2r2`: accelerated-residual adapters (our reading of M2R2, arXiv 2502.02040).

For source layer l and rate d, the accelerated residual is

    r̂_{l→l+d} = r_l + (x_l @ U_{l,d}) @ V_{l,d} + b_{l,d}        U [F, R], V [R, H], b [H]

where x_l = norm_l(r_l) [H] — with routing features, x_l = [norm_l(r_l), multi-hot of the experts layer l
routes to] [H + E]: the router of layer l has already run when the prediction is made, and its choice
says much about what the residual will become — trained to land on r_{l+d}; the experts of layer l+d
are predicted by the model's own router applied to `norm_{l+d}(r̂)`. Adapters are saved as safetensors with a JSON header (model fingerprint, depth, rank,
losses) and refused, with a clear error, for a model they were not trained on.
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
from .gate import GatePredictor

FORMAT = "m2r2-adapters"
VERSION = 1


class AdapterFileError(M2R2Error, ValueError):
    """The adapters file is missing, corrupted or not an m2r2 adapters file."""


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


def _float(t: torch.Tensor) -> torch.Tensor:
    """`t` as float32 (no op dispatched when it already is: this runs per layer per token)."""
    return t if t.dtype == torch.float32 else t.float()


class AcceleratorAdapters(nn.Module):
    """Low-rank adapters `A_{l,d}` for every source layer l and rate d = 1..depth."""

    def __init__(self, num_layers: int, hidden: int, depth: int, rank: int, route_features: int = 0):
        super().__init__()
        self.num_layers, self.hidden, self.depth, self.rank = num_layers, hidden, depth, rank
        self.route_features = route_features  # E when the source layer's expert choice is an input, else 0
        self.U = nn.Parameter(torch.zeros(num_layers, depth, hidden + route_features, rank))  # [L, D, F, R]
        self.V = nn.Parameter(torch.zeros(num_layers, depth, rank, hidden))  # [L, D, R, H]
        self.b = nn.Parameter(torch.zeros(num_layers, depth, hidden))  # [L, D, H]
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
        """`A_{l,d}(x)` for `normed [T, H]` (any float dtype) and `chosen [T, K]` → `[T, H]` float32."""
        i = depth - 1
        return (self.features(normed, chosen) @ self.U[layer, i]) @ self.V[layer, i] + self.b[layer, i]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, layer: int) -> int:
        """Multiply-adds ×2 of the adapters evaluated at one source layer (all rates)."""
        per_rate = 2 * (self.hidden + self.route_features) * self.rank + 2 * self.rank * self.hidden
        return sum(per_rate for d in range(1, self.depth + 1) if layer + d < self.num_layers)

    def save(self, path: str | Path, fingerprint: str, extra: dict | None = None) -> None:
        meta = {"format": FORMAT, "version": str(VERSION), "fingerprint": fingerprint, "num_layers": str(self.num_layers),
                "hidden": str(self.hidden), "depth": str(self.depth), "rank": str(self.rank),
                "route_features": str(self.route_features),
                "info": json.dumps(extra or {})}
        tensors = {"U": self.U.detach().contiguous(), "V": self.V.detach().contiguous(), "b": self.b.detach().contiguous()}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> "AcceleratorAdapters":
        """Load adapters; with `fingerprint`, refuse a file trained for another model."""
        path = Path(path)
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
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise AdapterMismatchError(
                f"{path} was trained for another model (fingerprint {meta.get('fingerprint')}, this model has "
                f"{fingerprint}); train adapters for this model with `m2r2-moe train-adapters`."
            )
        try:
            adapters = cls(int(meta["num_layers"]), int(meta["hidden"]), int(meta["depth"]), int(meta["rank"]),
                           int(meta.get("route_features", 0)))
            with torch.no_grad():
                for name in ("U", "V", "b"):
                    getattr(adapters, name).copy_(tensors[name])
        except (KeyError, RuntimeError, ValueError) as e:
            raise AdapterFileError(f"{path}: adapter tensors do not match its header ({e})") from e
        adapters.meta = {**meta, "info": json.loads(meta.get("info", "{}"))}
        return adapters


class M2R2Predictor(GatePredictor):
    """Routes the accelerated residual `r̂_{l→l+d}` with the model's own router of layer l+d."""

    name = "m2r2"

    def __init__(self, num_layers, num_experts, top_k, depth, adapter, layers, adapters: AcceleratorAdapters):
        if adapters.num_layers != num_layers:
            raise AdapterMismatchError(f"adapters cover {adapters.num_layers} MoE layers, the model has {num_layers}")
        super().__init__(num_layers, num_experts, top_k, min(depth, adapters.depth), adapter, layers)
        self.adapters = adapters
        self._fused = [self._fuse(layer) for layer in range(num_layers)]

    def to(self, device: torch.device | str) -> "M2R2Predictor":
        """The adapters (and their fused per-layer matrices) on `device`; the routing as `GatePredictor.to`."""
        super().to(device)
        self.adapters.to(device)
        self._fused = [self._fuse(layer) for layer in range(self.num_layers)]
        return self

    @torch.no_grad()
    def _fuse(self, layer: int):
        """The rates of `layer` side by side, for `_accelerated`: U as one matrix `[F, D*R]` (split into
        the normed-residual rows and the routing-feature rows `[E, D*R]`), V `[D, R, H]`, b `[D, 1, H]`."""
        n = len(self.depths(layer))
        if not n:
            return None
        a = self.adapters
        u = a.U[layer, :n].detach().permute(1, 0, 2).reshape(a.hidden + a.route_features, n * a.rank).contiguous()
        return u[: a.hidden], u[a.hidden :], a.V[layer, :n].detach(), a.b[layer, :n].detach().unsqueeze(1)

    def _accelerated(self, layer: int, residual: torch.Tensor, chosen: torch.Tensor | None,
                     normed: torch.Tensor | None = None) -> torch.Tensor:
        """`r̂_{l→l+d}` for every rate d of `layer` at once, `[D, T, H]` in the residual's dtype (`accelerate`
        is the per-rate reference). In few ops, as it runs per layer per token: one matmul for every rate's
        down-projection, the routing features as a row gather instead of a multi-hot product, the
        up-projection fused with the bias and the residual. `normed`: norm_l(residual) when known."""
        if normed is None:
            source = self.layers[layer]
            normed = source.norm(residual) if source.norm is not None else residual
        u_normed, u_route, v, b = self._fused[layer]
        z = _float(normed) @ u_normed  # [T, D*R]
        if self.adapters.route_features:
            if chosen is None:
                raise ValueError("these adapters take the source layer's expert choice: pass chosen [T, K]")
            rows = u_route[chosen if chosen.dtype == torch.long else chosen.long()]  # [T, K, D*R]
            z = z + rows.sum(1)  # the multi-hot's product: a sum of the chosen rows
        z = z.view(z.shape[0], v.shape[0], -1).transpose(0, 1)  # [D, T, R]
        out = torch.baddbmm(_float(residual) + b, z, v)  # [D, T, H]
        return out if out.dtype == residual.dtype else out.to(residual.dtype)

    def accelerate(self, layer: int, depth: int, residual: torch.Tensor, chosen: torch.Tensor | None = None,
                   ) -> torch.Tensor:
        """`r̂_{l→l+d}` for `residual [T, H]` (and the layer's `chosen [T, K]`), in the residual's dtype."""
        source = self.layers[layer]
        normed = source.norm(residual) if source.norm is not None else residual
        return (residual.float() + self.adapters.delta(layer, depth, normed, chosen)).to(residual.dtype)

    @torch.no_grad()
    def predict(self, layer: int, residual: torch.Tensor | None, chosen: torch.Tensor | None = None,
                ) -> dict[int, torch.Tensor]:
        if not len(self.depths(layer)):
            return {}
        return self._scores(layer, self._accelerated(layer, residual, chosen))

    @torch.no_grad()
    def predict_stacked(self, layer, residual, chosen=None, normed=None):
        depths = list(self.depths(layer))
        if not depths:
            return [], None
        return depths, self._probabilities(layer, self._accelerated(layer, residual, chosen, normed))
