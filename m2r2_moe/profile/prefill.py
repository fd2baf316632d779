"""Prefill mode of the profiler (`m2r2-moe profile --prefill 64,256,1024`): time to first token.

For each prompt length, one prefill forward of the original model and of the offloaded one (cache, policy,
each link regime), interleaved round by round, the fastest of `repeats`, each offloaded forward after one in
the same mode, with the offloaded logits checked against the original's. Every offloaded forward is measured against its limit,
max(the original's forward, bytes it moved / link bandwidth): a forward can end no sooner than its compute,
nor before its copies crossed the link; a runtime that overlaps them perfectly reaches the limit (ratio 1).
A forward that moves more than it needs (an expert displaced and copied again) raises its own limit, so each is
also measured against its floor, max(the original's forward, bytes of the experts it used that held no slot
when it started / link bandwidth): the copies no schedule can avoid.
On CPU the link is emulated at each regime's speed, set by the link ratio (one expert's transfer time over one
MoE layer's compute time in decode, as in the decode profile).

`chunked_prefill` times the same prompt prefilled in chunks (transformers' `prefill_chunk_size`): each chunk
is a forward that needs nearly every expert again.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from .. import api
from ..corpus import token_stream
from ..warm import UsageCounter


def prefill_prompts(tokenizer, files: list[Path], lengths: list[int], vocab: int) -> dict[int, torch.Tensor]:
    """{length: [1, length] ids}: the start of the text `files` (seeded random ids without a tokenizer)."""
    longest = max(lengths)
    if tokenizer is None:
        ids = torch.randint(3, vocab, (longest,), generator=torch.Generator().manual_seed(0))
    else:
        ids = token_stream(tokenizer, files, max_tokens=longest)
        if len(ids) < longest:
            raise ValueError(f"the text ({', '.join(map(str, files))}) has {len(ids)} tokens; the longest prompt asks {longest}")
    return {n: ids[:n].view(1, n) for n in lengths}


def _forward(model, prompt: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(seconds, logits on the host) of one forward of `prompt` on its device."""
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(input_ids=prompt, use_cache=True).logits
        if prompt.device.type == "cuda":
            torch.cuda.synchronize(prompt.device)  # measurement only: the forward's kernels have run
        return time.perf_counter() - start, logits.cpu()


def measure_prefill(model, prompt: torch.Tensor, repeats: int, streams: tuple[bool, ...] = (True,),
                    **offload) -> tuple[float, dict[bool, dict]]:
    """The prompt's forward, the original against the offloaded one (`offload`: options of `m2r2_moe.offload`)
    with the next layers' experts streamed in (True) and/or loaded on demand only (False), interleaved round
    by round (`repeats` rounds) so that a busy machine slows all alike. Each offloaded forward follows one in
    the same mode (what it finds resident is that mode's). Returns (the original's fastest seconds, {mode:
    the fastest forward's seconds, bytes moved, stall, misses, and whether every forward's logits equal the
    original's}); the model is restored afterwards."""
    device = torch.device(offload.get("device") or "cpu")
    original = copy.deepcopy(model).to(device)  # whole, on the device, as the reference
    api.offload(model, **offload)
    prompt = prompt.to(device)
    base, runs = [], {mode: [] for mode in streams}
    try:
        offloader = api.get_offloader(model)
        reference = _forward(original, prompt)[1]
        for _ in range(repeats):
            base.append(_forward(original, prompt)[0])
            for mode in streams:
                offloader.prefill.enabled = mode
                _forward(model, prompt)
                api.reset_stats(model)
                with _UsedExperts(offloader) as used:
                    seconds, logits = _forward(model, prompt)
                phase = api.stats(model).prefill
                runs[mode].append({"seconds": seconds, "bytes": phase.bytes_to_device, "misses": phase.misses,
                                   "stall": phase.stall_seconds, "needed_bytes": used.needed_bytes,
                                   "identical": torch.equal(logits, reference)})
    finally:
        api.remove_offload(model)
        del original
    best = {mode: {**min(r, key=lambda x: x["seconds"]), "identical": all(x["identical"] for x in r)}
            for mode, r in runs.items()}
    return min(base), best


class _UsedExperts:
    """While open: which experts the offloaded model's layer calls route to, counted on the device by a
    `warm.UsageCounter` beside the offloader's own (no host read inside the timed forward). `needed_bytes`,
    read once it is closed: the bytes of those that held no slot when it opened, the copies the forward cannot
    do without (one each)."""

    def __init__(self, offloader):
        self.offloader, self.inner = offloader, offloader.usage
        self.used = UsageCounter(offloader.layers, offloader.device)
        self.resident = {key for key, _ in offloader.cache.slots.resident()}

    def __enter__(self):
        self.offloader.usage = self
        return self

    def __exit__(self, *exc) -> None:
        self.offloader.usage = self.inner

    def count(self, layer: int, top_k_index: torch.Tensor) -> None:
        self.used.count(layer, top_k_index)
        if self.inner is not None:
            self.inner.count(layer, top_k_index)

    @property
    def needed_bytes(self) -> int:
        stride, sizes = self.offloader.cache.key_stride, self.offloader.expert_bytes
        used = self.used.counts.nonzero().tolist()  # [(layer, expert)]
        return sum(sizes[layer] for layer, expert in used if layer * stride + expert not in self.resident)


def prefill_rows(model, prompts: dict[int, torch.Tensor], ratios: list[float], link_gbps: dict[float, float | None],
                 repeats: int, **offload) -> list[dict]:
    """One row per (prompt length, link ratio): original and offloaded (streamed) seconds, bytes, limit,
    ratio to it. `link_gbps`: the emulated link of each ratio (None: the device's own link, whose speed is
    not known: the limit is then the original's forward)."""
    rows = []
    for length, prompt in prompts.items():
        for ratio in ratios:
            gbps = link_gbps[ratio]
            original, runs = measure_prefill(model, prompt, repeats, link_gbps=gbps, **offload)
            rows.append(prefill_row(length, ratio, gbps, original, runs[True]))
    return rows


def prefill_row(length: int, ratio: float, gbps: float | None, original: float, run: dict) -> dict:
    """One forward's figures against its limit, max(original, bytes moved / link bandwidth), and its floor,
    max(original, bytes of the experts it needed that held no slot / link bandwidth)."""
    limit = max(original, run["bytes"] / (gbps * 1e9) if gbps else 0.0)
    floor = max(original, run["needed_bytes"] / (gbps * 1e9) if gbps else 0.0)
    return {"prompt_tokens": length, "link_ratio": ratio, "link_gbps": gbps, "original_s": original,
            "offloaded_s": run["seconds"], "bytes": run["bytes"], "stall_s": run["stall"], "misses": run["misses"],
            "limit_s": limit, "ratio_to_limit": run["seconds"] / limit, "needed_bytes": run["needed_bytes"],
            "floor_s": floor, "ratio_to_floor": run["seconds"] / floor, "identical": run["identical"]}


def chunked_prefill(model, prompt: torch.Tensor, chunks: list[int | None], repeats: int) -> dict:
    """{chunk: seconds to the first token} (`generate` of one token, the prompt prefilled in chunks of `chunk`
    tokens, None: one forward): the fastest of `repeats` rounds that run every chunk size in turn, after a
    warm-up of each."""
    def once(chunk) -> float:
        kwargs = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        if chunk is not None:
            kwargs["prefill_chunk_size"] = chunk
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(input_ids=prompt, **kwargs)
            return time.perf_counter() - start

    times = {chunk: [] for chunk in chunks}
    for _ in range(repeats + 1):
        for chunk in chunks:
            times[chunk].append(once(chunk))
    return {chunk: min(t[1:]) for chunk, t in times.items()}


def prefill_table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    head = ["prompt tokens", "link ratio", "GB/s", "original ms", "offloaded ms", "MB moved", "stall ms",
            "limit ms", "x limit", "MB needed", "x floor", "identical"]
    body = [[r["prompt_tokens"], f"{r['link_ratio']:g}", "-" if not r["link_gbps"] else f"{r['link_gbps']:.3f}",
             f"{r['original_s'] * 1e3:.0f}", f"{r['offloaded_s'] * 1e3:.0f}", f"{r['bytes'] / 1e6:.1f}",
             f"{r['stall_s'] * 1e3:.0f}", f"{r['limit_s'] * 1e3:.0f}", f"{r['ratio_to_limit']:.2f}",
             f"{r['needed_bytes'] / 1e6:.1f}", f"{r['ratio_to_floor']:.2f}", "yes" if r["identical"] else "NO"]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "  ".join(str(x).rjust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])
