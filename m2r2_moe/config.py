"""`OffloadConfig`: every knob of the runtime in one frozen, self-validating dataclass, and `RuntimePlan`: the
config resolved once against a model (every default applied, every check done), which is all the runtime reads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass

import torch

from .errors import OffloadConfigError
from .values import (  # noqa: F401 (the option values' parsers, importable from here as before)
    EXPERT_FORMATS, FORMAT_GRAMMAR, ExpertFormat, budget_bytes, parse_bytes, parse_expert_format)

logger = logging.getLogger(__name__)

PREDICTORS = ("none", "history", "gate", "m2r2")  # "oracle" needs a trace: pass an OraclePredictor object
POLICIES = ("lru", "predictive")
DEFAULT_LOOKAHEAD = 4  # layers a predictor looks ahead unless told (see OffloadConfig.lookahead)
MIN_LINK_GBPS = 1e-3  # an emulated link slower than 1 MB/s would stall for minutes per expert
MAX_LINK_LATENCY_US = 1e6


@dataclass(frozen=True)
class OffloadConfig:
    """How `m2r2_moe.offload` places a model's experts.

    Args:
        device: where experts are computed (`"cuda"`, `"cuda:1"`, `"cpu"`). `None` picks `"cuda"` when
            a GPU is present, else `"cpu"`.
        cache_experts: number of expert slots on the device, shared by all MoE layers. Must be at least
            the model's top-k. `None` means half of all experts (at least top-k).
        policy: slot eviction policy. `"lru"`: least recently used. `"predictive"` (runtime/policy.py): evict
            the expert used least per turn of its layer lately (uses decayed with a half-life of 32 tokens),
            of equally frequent ones the one whose layer's turn comes last — not the next layer's experts,
            which plain LRU evicts in a pool shared by all layers; experts a prediction still wants go last.
            The default: replayed on recorded decode traffic of each model tried, on its own held-out text,
            it loads 0.45-0.89x the experts `lru` loads at a quarter, half and three quarters of the experts
            (`benchmarks/policies.py`, BENCHMARKS.md; on far-off text with a thrashing cache it can load more).
        predictor: what drives prefetching: `"none"` (on-demand loading only), `"history"`, `"gate"`
            (next layers' routers on the current residual), `"m2r2"` (accelerated residual adapters), or a
            `m2r2_moe.predict.Predictor` object (e.g. an `OraclePredictor` replaying a recorded trace).
        lookahead: how many layers ahead a predictor looks (D). `None` (the default): `DEFAULT_LOOKAHEAD` (4), or
            as far as the predictor reaches when that is less (m2r2 adapters trained shallower), without a
            warning; a `Predictor` object's own depth. Adapters trained deeper (`train-adapters --lookahead
            auto`) look farther only when asked (`lookahead=N`): at a link of 8 layer times per expert, depth 7
            made one model 2.6 % faster, depth 8 left a second within noise and made a third 2.5 % slower
            (`benchmarks/lookahead_ab.py`, BENCHMARKS.md).
        prefetch_min_prob: a floor, in (0, 1], on the probability of use (as calibrated online from the
            predictions' outcomes) below which no expert is prefetched. `None` (the default): no floor: a copy is
            queued when its expected value is positive — the stall it can hide times its calibrated probability,
            against the link time it takes and the expert it evicts (runtime/admission.py). A floor only ever
            makes prefetching more cautious than that test.
        adapters: path of a trained adapters file for predictors that need one.
        pin_memory: page-lock the host expert store. `None` means yes when CUDA is available.
        link_gbps: CPU only: emulate a host→device link of this bandwidth in GB/s (10^9 bytes per
            second) so that transfer stalls can be studied without a GPU. `None`: no emulation.
        link_latency_us: CPU only: fixed latency added to every emulated transfer, in microseconds.
        copy_timeout_s: longest the compute side waits for one expert copy before it raises
            `CopyTimeoutError` naming the layer and expert (a copy that never lands must not hang a
            generate). CPU copy engine; CUDA waits happen on the device.
        gpu_memory: the device memory the runtime may use, in bytes or as text (`"4GiB"`, `"512MB"`): the
            non-expert weights, a KV-cache reserve of `context_length` tokens and as many expert slots as fit
            (m2r2_moe/budget.py). Instead of `cache_experts`. `None` with `host_memory` given: the free device
            memory. On `device="cpu"` it is the memory of the emulated device.
        host_memory: the host memory the expert store may use (bytes or text); it decides whether the store is
            page-locked and, for `from_pretrained`, whether experts stay on disk. `None` with `gpu_memory`
            given: the available host memory.
        unified_memory: whether the GPU shares one memory with the host (Jetson-class devices): then the two
            budgets come out of one pool and are counted once. `None`: asked of the device
            (`is_integrated`); always one pool on `device="cpu"`.
        context_length: tokens of KV cache reserved on the device when slots are sized from `gpu_memory`.
        warm_start: a profile file written by `m2r2_moe.save_profile` for this model: the slots are filled
            with its likeliest experts in the background (demand loads go first) and the prefetch planner
            starts from what it learned (m2r2_moe/warm.py).
        expert_format: how experts are kept in host memory and moved over the link. `"model"` (the
            default): the model's own dtype, lossless. `"int8"` / `"int4"`: group-wise affine integers
            (a scale and a zero point per group of weights), expanded back to the model's dtype in the
            slot, so the model's kernels run unchanged; outputs CHANGE (README.md, "Compressed experts").
            Suffixes pick the scheme's options: `"int4-g32"` (group size), `"-sym"` (no zero points).
    """

    device: str | None = None
    cache_experts: int | None = None
    policy: str = "predictive"
    predictor: object = "none"
    lookahead: int | None = None
    prefetch_min_prob: float | None = None
    adapters: str | os.PathLike | None = None
    pin_memory: bool | None = None
    link_gbps: float | None = None
    link_latency_us: float = 0.0
    copy_timeout_s: float = 120.0
    gpu_memory: int | str | None = None
    host_memory: int | str | None = None
    unified_memory: bool | None = None
    context_length: int = 4096
    warm_start: str | os.PathLike | None = None
    expert_format: str = "model"

    def __post_init__(self) -> None:
        _check_device(self.device)
        self._check_budgets()
        parse_expert_format(self.expert_format)
        if self.cache_experts is not None:
            if isinstance(self.cache_experts, bool) or not isinstance(self.cache_experts, int):
                hint = (" (byte budgets like '8GB' and 'auto' are m2r2_moe.from_pretrained's)"
                        if isinstance(self.cache_experts, str) else "")
                raise OffloadConfigError(
                    f"cache_experts must be a whole number of expert slots, got {self.cache_experts!r}{hint}"
                )
            if self.cache_experts < 1:
                raise OffloadConfigError(f"cache_experts must be >= 1, got {self.cache_experts}")
        _check_choice("policy", self.policy, POLICIES)
        _check_predictor(self.predictor)
        if self.adapters is not None and not isinstance(self.adapters, (str, os.PathLike)):
            raise OffloadConfigError(f"adapters must be a path to an adapters file, got {type(self.adapters).__name__}")
        if self.lookahead is not None and (isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int)
                                           or self.lookahead < 1):
            raise OffloadConfigError(f"lookahead must be an integer >= 1 or None, got {self.lookahead!r}")
        if self.prefetch_min_prob is not None and not (_is_number(self.prefetch_min_prob)
                                                       and 0 < self.prefetch_min_prob <= 1):
            raise OffloadConfigError(f"prefetch_min_prob must be a probability in (0, 1], got {self.prefetch_min_prob!r}")
        if not any(self.pin_memory is v for v in (None, True, False)):  # `is`: 1 == True would slip through
            raise OffloadConfigError(f"pin_memory must be True, False or None, got {self.pin_memory!r}")
        # bounded: an emulated copy sleeps latency + bytes / bandwidth, and an absurd value is a hang, not a link
        if self.link_gbps is not None and not (_is_number(self.link_gbps) and self.link_gbps >= MIN_LINK_GBPS):
            raise OffloadConfigError(f"link_gbps must be a positive number of GB/s, at least {MIN_LINK_GBPS} (1 MB/s); "
                                     f"got {self.link_gbps!r}")
        if not (_is_number(self.link_latency_us) and 0 <= self.link_latency_us <= MAX_LINK_LATENCY_US):
            raise OffloadConfigError(f"link_latency_us must be a number of microseconds in "
                                     f"[0, {MAX_LINK_LATENCY_US:g}] (1 s), got {self.link_latency_us!r}")
        if not (_is_number(self.copy_timeout_s) and 0 < self.copy_timeout_s < math.inf):
            raise OffloadConfigError(f"copy_timeout_s must be a finite number of seconds > 0, got {self.copy_timeout_s!r}")
        if (self.link_gbps is not None or self.link_latency_us) and self.resolved_device().type != "cpu":
            raise OffloadConfigError(
                "link_gbps / link_latency_us emulate a link on CPU only; on a GPU the real link is used. "
                "Drop them or use device='cpu'."
            )

    def _check_budgets(self) -> None:
        for name in ("gpu_memory", "host_memory"):
            value = getattr(self, name)
            if value is not None and budget_bytes(name, value) <= 0:
                raise OffloadConfigError(f"{name} must be more than 0 bytes, got {value!r}")
        if self.gpu_memory is not None and self.cache_experts is not None:
            raise OffloadConfigError(f"cache_experts={self.cache_experts} and gpu_memory={self.gpu_memory!r} both size the "
                                     "device slots: give one of them (a number of slots, or a memory budget).")
        if not any(self.unified_memory is v for v in (None, True, False)):
            raise OffloadConfigError(f"unified_memory must be True, False or None, got {self.unified_memory!r}")
        if isinstance(self.context_length, bool) or not isinstance(self.context_length, int) or self.context_length < 0:
            raise OffloadConfigError(f"context_length must be a whole number of tokens >= 0, got {self.context_length!r}")
        if self.warm_start is not None and not isinstance(self.warm_start, (str, os.PathLike)):
            raise OffloadConfigError(f"warm_start must be the path of a profile file (m2r2_moe.save_profile), got "
                                     f"{type(self.warm_start).__name__}")

    @property
    def has_budget(self) -> bool:
        """Whether slots (and pinning) are to be derived from memory budgets (m2r2_moe/budget.py)."""
        return self.gpu_memory is not None or self.host_memory is not None

    def resolved_device(self) -> torch.device:
        """The device experts run on, with `None` resolved."""
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return _as_device(self.device)

    def resolved_pin_memory(self) -> bool:
        if self.pin_memory is None:
            return torch.cuda.is_available()
        return self.pin_memory

    def resolved_format(self) -> "ExpertFormat | None":
        """The compressed expert format, None for the model's own dtype."""
        return parse_expert_format(self.expert_format)

    def replace(self, **changes) -> "OffloadConfig":
        return dataclasses.replace(self, **changes)

    def resolve(self, *, top_k: int, total_experts: int, predictor_lookahead: int | None = None) -> "RuntimePlan":
        """This config for a model whose tokens use `top_k` of its `total_experts` routed experts, with a
        predictor that looks `predictor_lookahead` layers ahead at most (None: no limit)."""
        lookahead = self.lookahead
        if lookahead is None:  # the default: as far as the predictor looks (a named one is built DEFAULT_LOOKAHEAD
            # deep, or shallower when its adapters are: attach.py)
            lookahead = predictor_lookahead if predictor_lookahead is not None else DEFAULT_LOOKAHEAD
        elif predictor_lookahead is not None and predictor_lookahead < lookahead:
            if self.predictor == "m2r2":  # its adapters were trained for a depth: say so, it is the user's choice
                logger.warning("lookahead=%d: the m2r2 adapters were trained to predict %d layers ahead; using %d "
                               "(train adapters with --lookahead %d to look farther)", lookahead,
                               predictor_lookahead, predictor_lookahead, lookahead)
            else:
                logger.info("lookahead=%d: the predictor looks %d layers ahead", lookahead, predictor_lookahead)
            lookahead = predictor_lookahead
        return RuntimePlan(
            device=self.resolved_device(), num_slots=resolve_slots(self.cache_experts, top_k, total_experts),
            policy=self.policy, lookahead=lookahead,
            prefetch_min_prob=self.prefetch_min_prob if self.prefetch_min_prob is not None else 0.0,
            pin_memory=self.resolved_pin_memory(), link_gbps=self.link_gbps, link_latency_us=self.link_latency_us,
            copy_timeout_s=self.copy_timeout_s, expert_format=parse_expert_format(self.expert_format),
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class RuntimePlan:
    """An `OffloadConfig` resolved against one model (`OffloadConfig.resolve`): what the runtime reads."""

    device: torch.device
    num_slots: int  # device expert slots, top-k <= num_slots <= all experts
    policy: str
    lookahead: int  # layers a predictor looks ahead (capped at what the predictor can see)
    prefetch_min_prob: float  # a floor on the calibrated probability of use (0: the value test alone decides)
    pin_memory: bool
    link_gbps: float | None
    link_latency_us: float
    copy_timeout_s: float
    expert_format: "ExpertFormat | None" = None  # None: the model's own dtype (lossless)


def default_slots(top_k: int, total_experts: int) -> int:
    """Slots when none are asked for: half of all experts, at least top-k."""
    return max(top_k, total_experts // 2)


def resolve_slots(cache_experts: int | None, top_k: int, total_experts: int) -> int:
    """`cache_experts` (a count or None) checked against the model: below top-k is an error (a token needs its
    top-k experts of a layer at once), above all experts is all experts."""
    if cache_experts is None:
        return default_slots(top_k, total_experts)
    if cache_experts < top_k:
        raise OffloadConfigError(
            f"cache_experts={cache_experts} is below the model's top-k ({top_k}): each token needs {top_k} experts "
            f"of a layer at once. Use cache_experts >= {top_k}."
        )
    if cache_experts > total_experts:
        logger.info("cache_experts=%d exceeds the model's %d experts; using %d", cache_experts, total_experts,
                    total_experts)
        return total_experts
    return cache_experts


def _check_predictor(predictor) -> None:
    if isinstance(predictor, str):
        _check_choice("predictor", predictor, PREDICTORS)
        return
    from .predict.base import Predictor  # lazy: predict/ imports the models, which config must not

    if not isinstance(predictor, Predictor):
        raise OffloadConfigError(
            f"predictor must be one of {', '.join(map(repr, PREDICTORS))} or a m2r2_moe.predict.Predictor object "
            f"(e.g. an OraclePredictor); got {type(predictor).__name__} {predictor!r}"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OffloadConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_device(device) -> torch.device:
    """`device` as a torch.device; a bare integer N means `cuda:N`, as in torch (without needing CUDA)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device)
    return torch.device(device)


def _check_device(device) -> None:
    if device is None:
        return
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise OffloadConfigError(
            f"device must be a string like 'cpu', 'cuda' or 'cuda:1', a torch.device or a CUDA index; got "
            f"{type(device).__name__} {device!r}"
        )
    if isinstance(device, int) and device < 0:
        raise OffloadConfigError(f"device {device} is not a CUDA index (>= 0)")
    try:
        dev = _as_device(device)
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
