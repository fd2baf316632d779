"""`OffloadConfig`: every knob of the runtime in one frozen, self-validating dataclass."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

PREDICTORS = ("none", "history", "gate", "m2r2")  # "oracle" needs a trace: pass an OraclePredictor object
POLICIES = ("lru", "predictive")


class OffloadConfigError(ValueError):
    """An `OffloadConfig` field has a value the runtime cannot use."""


@dataclass(frozen=True)
class OffloadConfig:
    """How `m2r2_moe.offload` places a model's experts.

    Args:
        device: where experts are computed (`"cuda"`, `"cuda:1"`, `"cpu"`). `None` picks `"cuda"` when
            a GPU is present, else `"cpu"`.
        cache_experts: number of expert slots on the device, shared by all MoE layers. Must be at least
            the model's top-k. `None` means half of all experts (at least top-k).
        policy: slot eviction policy. `"lru"`: least recently used. `"predictive"`: LRU order in which
            experts predicted for the next layers are refreshed every layer (nearest target last), so the
            victim is an expert no prediction wants, oldest first. Same as `"lru"` without a predictor.
        predictor: what drives prefetching: `"none"` (on-demand loading only), `"history"`, `"gate"`
            (next layers' routers on the current residual), `"m2r2"` (accelerated residual adapters), or a
            `m2r2_moe.predict.Predictor` object (e.g. an `OraclePredictor` replaying a recorded trace).
        lookahead: how many layers ahead a predictor looks (D).
        adapters: path of a trained adapters file for predictors that need one.
        pin_memory: page-lock the host expert store. `None` means yes when CUDA is available.
        link_gbps: CPU only: emulate a host→device link of this bandwidth in GB/s (10^9 bytes per
            second) so that transfer stalls can be studied without a GPU. `None`: no emulation.
        link_latency_us: CPU only: fixed latency added to every emulated transfer, in microseconds.
    """

    device: str | None = None
    cache_experts: int | None = None
    policy: str = "lru"
    predictor: object = "none"
    lookahead: int = 4
    adapters: str | os.PathLike | None = None
    pin_memory: bool | None = None
    link_gbps: float | None = None
    link_latency_us: float = 0.0

    def __post_init__(self) -> None:
        _check_device(self.device)
        if self.cache_experts is not None:
            if isinstance(self.cache_experts, bool) or not isinstance(self.cache_experts, int):
                raise OffloadConfigError(
                    f"cache_experts must be a whole number of expert slots, got {self.cache_experts!r}"
                )
            if self.cache_experts < 1:
                raise OffloadConfigError(f"cache_experts must be >= 1, got {self.cache_experts}")
        _check_choice("policy", self.policy, POLICIES)
        if not hasattr(self.predictor, "predict"):
            _check_choice("predictor", self.predictor, PREDICTORS)
        if self.adapters is not None and not isinstance(self.adapters, (str, os.PathLike)):
            raise OffloadConfigError(f"adapters must be a path to an adapters file, got {type(self.adapters).__name__}")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise OffloadConfigError(f"lookahead must be an integer >= 1, got {self.lookahead!r}")
        if self.pin_memory not in (None, True, False):
            raise OffloadConfigError(f"pin_memory must be True, False or None, got {self.pin_memory!r}")
        if self.link_gbps is not None:
            if not isinstance(self.link_gbps, (int, float)) or not self.link_gbps > 0:
                raise OffloadConfigError(f"link_gbps must be a positive number of GB/s, got {self.link_gbps!r}")
        if not isinstance(self.link_latency_us, (int, float)) or self.link_latency_us < 0:
            raise OffloadConfigError(f"link_latency_us must be >= 0, got {self.link_latency_us!r}")
        if (self.link_gbps is not None or self.link_latency_us) and self.resolved_device().type != "cpu":
            raise OffloadConfigError(
                "link_gbps / link_latency_us emulate a link on CPU only; on a GPU the real link is used. "
                "Drop them or use device='cpu'."
            )

    def resolved_device(self) -> torch.device:
        """The device experts run on, with `None` resolved."""
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_pin_memory(self) -> bool:
        if self.pin_memory is None:
            return torch.cuda.is_available()
        return self.pin_memory

    def replace(self, **changes) -> "OffloadConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OffloadConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OffloadConfigError(f"device {device!r} is not a device torch knows ('cpu', 'cuda', 'cuda:1'): {e}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OffloadConfigError(
                f"device {device!r} asked for, but CUDA is not available here; use device='cpu' "
                "(optionally with link_gbps to emulate a link)."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OffloadConfigError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    elif dev.type != "cpu":
        raise OffloadConfigError(f"device type {dev.type!r} is not supported; use 'cuda' or 'cpu'.")
