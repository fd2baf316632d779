"""Warm starts: what a run learned about a model, kept in a small file, so the next process starts warm.

Every offloaded model counts how often each expert of each MoE layer is used (`UsageCounter`, fed by the
offloader's layer calls: one `index_add_` per layer call on the device, no host sync). `save_profile(model, path)`
writes that popularity and what the prefetch planner learned online (its calibration of P(used | source,
distance, score) and each layer's usage prior, runtime/planner.py) to a JSON file with a version and the
model's fingerprint (`predict.model_fingerprint`: routers, norms, geometry). `offload(..., warm_start=path)`
and `from_pretrained(..., warm_start=path)` read it back — another model's file is refused before anything
moves — fill the free slots with the likeliest experts in the background (runtime/warm_fill.py: the first
forward's demand loads go first) and start the planner from what it had learned.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import M2R2Error
from .runtime.planner import checked_state

logger = logging.getLogger(__name__)

FORMAT = "m2r2_moe.profile"
VERSION = 1


class ProfileError(M2R2Error, ValueError):
    """A profile file cannot be used: unreadable, of another version, or made for another model."""


@dataclass
class Profile:
    """Expert popularity per MoE layer and the prefetch planner's learned state, for one model."""

    fingerprint: str
    model_type: str
    num_experts: list[int]  # per MoE layer
    usage: list[list[float]]  # [L, E_l] uses of each expert
    tokens: int = 0  # token positions the usage was counted over
    planner: dict | None = field(default=None)  # runtime/planner.py export_state, when a predictor ran

    def likeliest(self, limit: int) -> list[tuple[int, int]]:
        """The `limit` most used (layer, expert) pairs, in the order a forward needs them: by layer, then by use."""
        ranked = sorted(((-count, layer, expert) for layer, row in enumerate(self.usage)
                         for expert, count in enumerate(row) if count > 0))[:max(limit, 0)]
        return [(layer, expert) for _, layer, expert in sorted(ranked, key=lambda r: (r[1], r[0], r[2]))]

    def save(self, path: str | os.PathLike) -> None:
        """Write the file whole or not at all (a temporary file moved into place)."""
        path = Path(path)
        data = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "model_type": self.model_type,
                "num_experts": self.num_experts, "tokens": self.tokens, "usage": self.usage, "planner": self.planner}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read and check a profile file; `ProfileError` names what is wrong with it."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise ProfileError(f"cannot read the profile {str(path)!r}: {e.strerror or e}") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise ProfileError(f"{str(path)!r} is not a profile file (not JSON: {e})") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"{str(path)!r} is not a m2r2_moe profile (write one with m2r2_moe.save_profile)")
        if data.get("version") != VERSION:
            raise ProfileError(f"{str(path)!r} is a version {data.get('version')!r} profile; this m2r2_moe reads "
                               f"version {VERSION}: save the profile again with this version")
        try:
            profile = cls(str(data["fingerprint"]), str(data["model_type"]), [int(n) for n in data["num_experts"]],
                          [[float(c) for c in row] for row in data["usage"]], int(data["tokens"]), data["planner"])
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{str(path)!r} is a damaged profile ({e!r}); save it again") from e
        if [len(row) for row in profile.usage] != profile.num_experts or any(c < 0 for r in profile.usage for c in r):
            raise ProfileError(f"{str(path)!r} is a damaged profile (usage does not match its experts); save it again")
        if profile.planner is not None:
            try:
                checked_state(profile.planner, len(profile.num_experts), max(profile.num_experts))
            except ValueError as e:
                raise ProfileError(f"{str(path)!r} is a damaged profile (its planner state: {e}); save it again") from e
        return profile

    def check(self, fingerprint: str, num_experts: list[int], path) -> None:
        """Refuse a profile made for another model."""
        if self.fingerprint != fingerprint or self.num_experts != num_experts:
            raise ProfileError(
                f"the profile {str(path)!r} was saved for another model ({self.model_type}, {len(self.num_experts)} "
                f"MoE layers, fingerprint {self.fingerprint}); this one has {len(num_experts)} MoE layers and "
                f"fingerprint {fingerprint}. Save a profile of this model (m2r2_moe.save_profile) or drop warm_start."
            )


def read_profile(path, model, layers) -> Profile:
    """The profile at `path`, checked against `model` (before anything of the model changes)."""
    from .predict import model_fingerprint

    profile = Profile.load(path)
    profile.check(model_fingerprint(model, layers), [int(layer.experts.num_experts) for layer in layers], path)
    return profile


class UsageCounter:
    """Uses of each expert of each MoE layer, counted as the model routes, with no host sync of their own: a forward
    of many tokens on the device (`count`), a decode step at batch 1 on the host from the routing the hot path has
    read already (`count_host`: three tensor ops per layer cost the decode step 3 % of its time on the built-in
    model, benchmarks/overhead.py). The offloader calls one of them with each layer call's routing."""

    def __init__(self, layers, device: torch.device, start: Profile | None = None):
        width = max(int(layer.experts.num_experts) for layer in layers)
        self._device = torch.zeros(len(layers), width, dtype=torch.float64, device=device)  # [L, E]
        self._host = [[0.0] * width for _ in layers]  # [L][E], the uses `count_host` was told of
        self.tokens = 0
        if start is not None:  # a warm start goes on counting from the profile's figures
            for layer, row in enumerate(start.usage):
                self._host[layer][: len(row)] = [float(x) for x in row]
            self.tokens = start.tokens
        self._ones = torch.ones(0, dtype=torch.float64, device=device)

    @property
    def counts(self) -> torch.Tensor:
        """`[L, E]` float64 on the counter's device: every use counted so far."""
        return self._device + torch.tensor(self._host, dtype=torch.float64, device=self._device.device)

    def count(self, layer: int, top_k_index: torch.Tensor) -> None:
        """One layer call's routing, `top_k_index [T, K]` (on the device: no host sync)."""
        chosen = top_k_index.reshape(-1)  # [T * K]
        if chosen.numel() > self._ones.numel():
            self._ones = torch.ones(chosen.numel(), dtype=torch.float64, device=self._device.device)
        self._device[layer].index_add_(0, chosen, self._ones[: chosen.numel()])
        if layer == 0:
            self.tokens += top_k_index.shape[0]

    def count_host(self, layer: int, experts: list[int]) -> None:
        """One token's routing at `layer`, already read to the host: the K experts it chose."""
        row = self._host[layer]
        for expert in experts:
            row[expert] += 1.0
        if layer == 0:
            self.tokens += 1

    def usage(self, num_experts: list[int]) -> list[list[float]]:
        counts = self.counts.cpu()
        return [counts[layer, :n].tolist() for layer, n in enumerate(num_experts)]


class WarmState:
    """One offloaded model's usage counter and, after a warm start, the fill of its slots."""

    def __init__(self, model, offloader, profile: Profile | None = None, path=None):
        from .runtime.warm_fill import WarmFill

        self.offloader, self.path = offloader, path
        self.counter = offloader.usage = UsageCounter(offloader.layers, offloader.device, profile)
        self.fill = None
        if profile is None:
            return
        try:
            if profile.planner is not None and offloader.prefetcher is not None:
                offloader.prefetcher.planner.import_state(profile.planner)
            self.fill = WarmFill(offloader, model, profile.likeliest(offloader.num_slots),
                                 background=offloader.device.type != "cpu")
        except BaseException as e:
            self.close()
            if isinstance(e, ValueError):
                raise ProfileError(f"the profile {str(path)!r} cannot be used: {e}") from e
            raise

    def profile(self, model) -> Profile:
        """This model's profile as of now (call it while no forward runs)."""
        from .predict import model_fingerprint

        layers = self.offloader.layers
        num_experts = [int(layer.experts.num_experts) for layer in layers]
        prefetcher = self.offloader.prefetcher
        return Profile(fingerprint=model_fingerprint(model, layers), model_type=str(model.config.model_type),
                       num_experts=num_experts, usage=self.counter.usage(num_experts), tokens=self.counter.tokens,
                       planner=prefetcher.planner.export_state() if prefetcher is not None else None)

    def info(self) -> dict:
        """The warm start's state, for stats pages: the profile, and how many copies it planned and queued."""
        if self.fill is None:
            return {"profile": None}
        return {"profile": str(self.path), "planned": self.fill.planned, "queued": self.fill.queued,
                "filling": not self.fill.done}

    def close(self) -> None:
        if self.fill is not None:
            self.fill.close()
        self.offloader.usage = None
