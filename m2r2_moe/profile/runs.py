"""The runs a profile compares: a reference run, then offloaded runs of the same prompts, measured alike.

For each prompt the un-offloaded model generates greedily (the reference tokens, the routing trace,
and the compute time per decode token); each offloaded run (predictor × link ratio × cache size ×
policy) generates the same prompt and is checked token for token against the reference.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from .. import api
from ..models import find_moe_layers
from ..models.tap import LayerTap
from ..predict import OraclePredictor, make_predictor
from ..runtime.clock import host_seconds
from ..runtime.virtual import virtual_time
from .belady import belady_loads, lru_loads
from .recorder import Recorder


@dataclass
class Reference:
    """What the un-offloaded model did on one prompt."""

    prompt: torch.Tensor  # [1, P]
    tokens: torch.Tensor  # [1, P + N]
    trace: torch.Tensor  # [positions, L, K] experts per position, in the order the model saw them
    requests: list[frozenset[int]]  # per (forward, layer): the key set it needed
    prefill_requests: int  # how many of `requests` belong to the prefill
    decode_seconds_per_token: float
    prefill_seconds: float = 0.0  # the prompt's forward


def reference_run(model, prompt: torch.Tensor, new_tokens: int, key_stride: int) -> Reference:
    _, layers = find_moe_layers(model)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    chosen_per_forward: list[list[torch.Tensor]] = []
    last = len(layers) - 1

    def keep_forward(layer: int) -> None:  # the last MoE layer of a forward: every layer's choice is known
        if layer == last:
            chosen_per_forward.append([c.clone() for c in tap.chosen])

    stamps = _Stamps()
    with LayerTap(layers, residual=False, on_routing=keep_forward) as tap, torch.no_grad():
        tokens = model.generate(input_ids=prompt, streamer=stamps, **gen)
    trace = torch.cat([torch.stack(f, dim=1) for f in chosen_per_forward])  # [positions, L, K]
    requests = [frozenset(l * key_stride + e for e in torch.unique(f[l]).tolist())
                for f in chosen_per_forward for l in range(len(layers))]
    return Reference(prompt, tokens, trace, requests, len(layers), stamps.decode_seconds_per_token(),
                     stamps.prefill_seconds())


class _Stamps:
    """A `generate` streamer that only notes when each token came: the prompt, then one per forward."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def prefill_seconds(self) -> float:
        """From the call (the prompt is put first) to the first generated token: the prompt's forward."""
        return self.times[1] - self.times[0] if len(self.times) > 1 else 0.0

    def decode_seconds_per_token(self) -> float:
        """From the first generated token (the prompt's forward) to the last: the decode forwards alone."""
        decoded = self.times[2:]
        return (decoded[-1] - self.times[1]) / len(decoded) if decoded else 0.0


def limit_per_token(ref: Reference, cache_experts: int, expert_bytes: int, link_bytes_per_s: float | None,
                    new_tokens: int, compute: float | None = None) -> tuple[float, int]:
    """(max(compute, Belady's decode bytes / link bandwidth) per token, Belady's decode loads). `compute`: the
    un-offloaded compute per token on the clock the runs are timed on (simulated time: the fixed compute of its MoE
    layers); None: the reference's, as measured on the host."""
    loads = belady_loads(ref.requests, cache_experts, count_from=ref.prefill_requests)
    transfer = 0.0 if not link_bytes_per_s else loads * expert_bytes / link_bytes_per_s / max(new_tokens - 1, 1)
    return max(ref.decode_seconds_per_token if compute is None else compute, transfer), loads


def lru_curve(ref: Reference, sizes: list[int]) -> dict[int, tuple[int, int]]:
    """{cache size: (LRU loads, Belady loads)} over the decode requests, without prefetching."""
    return {c: (lru_loads(ref.requests, c, ref.prefill_requests), belady_loads(ref.requests, c, ref.prefill_requests))
            for c in sizes}


def offloaded_run(model, ref: Reference, new_tokens: int, predictor_name: str, cache_experts: int,
                  link_gbps: float | None, policy: str, adapters=None, depth: int = 4, device=None,
                  min_prob: float | None = None, expert_format: str = "model",
                  virtual: float | None = None, free_prefetcher: bool = False) -> dict:
    """Offload, generate the reference prompt, compare, measure; the model is restored afterwards.
    `min_prob`: the prefetcher's `prefetch_min_prob` (None: the default); `expert_format`: "model" (lossless)
    or a compressed format (its tokens may then differ from the reference's: `tokens_identical` says so);
    `virtual`: run on simulated time (runtime/virtual.py), a decode step's MoE layer costing `virtual` seconds of
    compute and the prompt's forward the reference's time; `free_prefetcher` (with `virtual`): the prefetcher's
    per-layer work is not charged (`virtual_time`)."""
    adapter, layers = find_moe_layers(model)
    top_k = adapter.top_k(model)
    if predictor_name in ("oracle", "oracle-wrap"):
        predictor = OraclePredictor(len(layers), max(int(x.experts.num_experts) for x in layers), top_k, depth,
                                    ref.trace, wrap=predictor_name == "oracle-wrap")
    elif predictor_name == "none":
        predictor = "none"
    else:
        predictor = make_predictor(predictor_name, model, adapter, layers, depth, adapters=adapters, device=device)
    extra = {} if min_prob is None else {"prefetch_min_prob": min_prob}
    api.offload(model, device=device, cache_experts=cache_experts, link_gbps=link_gbps, policy=policy,
                predictor=predictor, lookahead=depth, expert_format=expert_format, **extra)
    offloader = api.get_offloader(model)
    try:
        prefill = ref.prefill_seconds / len(layers) if virtual else None
        with virtual_time(offloader, virtual, prefill, free_prefetcher) if virtual else contextlib.nullcontext():
            recorder = Recorder(offloader)
            try:
                offloader.reset_sequence()
                with torch.no_grad():
                    start = host_seconds()
                    out = model.generate(input_ids=ref.prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         do_sample=False, pad_token_id=0)
                    end = host_seconds()
                stats = api.stats(model)
            finally:
                recorder.detach()
    finally:
        api.remove_offload(model)
    first_decode = next((e.start for e in recorder.layers if e.step == 1), end - start)
    decode_seconds = end - (recorder.t0 + first_decode)
    decode = recorder.decode_layers()
    return {
        "tokens_identical": bool(torch.equal(out, ref.tokens)),
        "time_per_token_s": decode_seconds / max(new_tokens - 1, 1),
        "stall_s_per_token": sum(e.stall for e in decode) / max(new_tokens - 1, 1),
        "hits": sum(e.hits for e in decode),
        "prefetch_hits": sum(e.prefetch_hits for e in decode),
        "late_prefetches": sum(e.late_prefetches for e in decode),
        "misses": sum(e.misses for e in decode),
        "bytes_to_device": sum(c.nbytes for c in recorder.copies if c.step >= 1 and not c.cancelled),
        "wasted_bytes": stats.wasted_bytes,
        "prefetches": stats.prefetches,
        "link_busy_s": recorder.link_busy_seconds(),
        "recorder": recorder,
        "expert_bytes": offloader.expert_bytes[0],  # bytes one copy moves (compressed formats: the row)
        "expand_s_per_token": stats.expand_seconds / max(new_tokens - 1, 1),  # prefill's copies included
        "copies": sum(1 for c in recorder.copies if not c.cancelled),
    }
