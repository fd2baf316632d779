"""Counters of an offloaded model: what `m2r2_moe.stats(model)` returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class PhaseStats:
    """The share of one phase in the counters: `prefill` (forwards computing more than one token per layer
    call: a prompt, a chunk of one; also a decode step of several sequences, which computes one token of each)
    or `decode` (one token per layer call).

    - forwards, tokens: forwards of this phase and the token positions they computed.
    - seconds: wall time from the start of each forward's first MoE layer to the end of its last.
    - stall_seconds, bytes_to_device, misses, prefetches: what these counters grew by during those forwards.
    """

    forwards: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stall_seconds: float = 0.0
    bytes_to_device: int = 0
    misses: int = 0
    prefetches: int = 0

    def __str__(self) -> str:
        return (f"{self.forwards} forwards, {self.tokens} tokens, {self.seconds * 1e3:.1f} ms, "
                f"stall {self.stall_seconds * 1e3:.1f} ms, {self.bytes_to_device / 1e6:.2f} MB")


@dataclass
class OffloadStats:
    """Every expert use of an offloaded model is exactly one of hit / prefetch hit / late prefetch / miss.

    - hits: the expert was resident before it was needed or predicted.
    - prefetch_hits: brought in by a prediction, complete in time.
    - late_prefetches: predicted, but its copy was still in flight: compute waited for part of it.
    - misses: not resident, not predicted: compute waited for a full demand load.
    - bytes_to_device: bytes copied host→device (demand loads and prefetches).
    - stall_seconds: time the compute side waited for experts to arrive.
    - expand_seconds: time spent expanding compressed experts into their slots (`expert_format` int8 /
      int4; measured by the CPU copy engine, part of each copy's link time; 0 on CUDA, where the expansion
      kernels run on the copy stream).
    - tokens: token positions processed (prefill and decode, all sequences of a batch).
    - failed_copies: copies that failed and were redone as demand loads (outputs unaffected).
    - predictor_failures: predictors that raised and were switched off (prefetching stops, outputs
      unaffected).
    - prefill, decode (`PhaseStats`): time, stall, bytes, misses and prefetches of forwards of many tokens
      and of one token per layer call, apart (the totals above count both).
    """

    hits: int = 0
    prefetch_hits: int = 0
    late_prefetches: int = 0
    misses: int = 0
    bytes_to_device: int = 0
    stall_seconds: float = 0.0
    tokens: int = 0
    evictions: int = 0
    layer_calls: int = 0
    waves: int = 0
    prefetches: int = 0
    cancelled_prefetches: int = 0
    wasted_bytes: int = 0
    failed_copies: int = 0
    predictor_failures: int = 0
    prefill: PhaseStats = field(default_factory=PhaseStats)
    decode: PhaseStats = field(default_factory=PhaseStats)
    expand_seconds: float = 0.0

    @property
    def expert_uses(self) -> int:
        return self.hits + self.prefetch_hits + self.late_prefetches + self.misses

    @property
    def hit_rate(self) -> float:
        """Share of expert uses that did not wait for a copy (hits and prefetch hits)."""
        uses = self.expert_uses
        return (self.hits + self.prefetch_hits) / uses if uses else 0.0

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["expert_uses"] = self.expert_uses
        out["hit_rate"] = self.hit_rate
        return out

    def copy(self) -> "OffloadStats":
        return dataclasses.replace(self, prefill=dataclasses.replace(self.prefill),
                                   decode=dataclasses.replace(self.decode))

    def __str__(self) -> str:
        rows = [
            ("tokens", f"{self.tokens}"),
            ("expert uses", f"{self.expert_uses}"),
            ("  hits", f"{self.hits}"),
            ("  prefetch hits", f"{self.prefetch_hits}"),
            ("  late prefetches", f"{self.late_prefetches}"),
            ("  misses", f"{self.misses}"),
            ("hit rate", f"{self.hit_rate:.1%}"),
            ("evictions", f"{self.evictions}"),
            ("prefetches issued", f"{self.prefetches}"),
            ("bytes to device", f"{self.bytes_to_device / 1e6:.2f} MB"),
            ("  wasted (prefetched, unused)", f"{self.wasted_bytes / 1e6:.2f} MB"),
            ("stall", f"{self.stall_seconds * 1e3:.2f} ms"),
        ]
        if self.expand_seconds:
            rows.append(("expansion (compressed experts)", f"{self.expand_seconds * 1e3:.2f} ms"))
        for name, phase in (("prefill", self.prefill), ("decode", self.decode)):
            if phase.forwards:
                rows += [(f"{name} ({phase.forwards} forwards, {phase.tokens} tokens)", f"{phase.seconds * 1e3:.1f} ms"),
                         ("  stall", f"{phase.stall_seconds * 1e3:.2f} ms"),
                         ("  bytes to device", f"{phase.bytes_to_device / 1e6:.2f} MB")]
        rows += [(name, f"{n}") for name, n in (("failed copies (redone)", self.failed_copies),
                                                  ("predictor failures", self.predictor_failures)) if n]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v:>14}" for k, v in rows)
