"""Prefill mode of the profiler (`m2r2-moe profile --prefill 64,256,1024`): time to first token.

For each prompt length, one prefill forward of the original model and of the offloaded one (cache, policy,
each link regime), each timed after a warm-up forward (the fastest of `repeats`), with the offloaded logits
checked against the original's. Every offloaded forward is measured against its limit,
max(the original's forward, bytes it moved / link bandwidth): a forward can end no sooner than its compute,
nor before its copies crossed the link; a runtime that overlaps them perfectly reaches the limit (ratio 1).
On CPU the link is emulated at each regime's speed, set by the link ratio (one expert's transfer time over one
MoE layer's compute time in decode, as in the decode profile).

`chunked_prefill` times the same prompt prefilled in chunks (transformers' `prefill_chunk_size`): each chunk
is a forward that needs nearly every expert again.
"""

from __future__ import annotations

import time

import torch

from .. import api
from ..corpus import resolve_text, token_stream


def prefill_prompts(tokenizer, model_spec: str, lengths: list[int], vocab: int) -> dict[int, torch.Tensor]:
    """{length: [1, length] ids}: the start of the model's held-out text (seeded random ids without a
    tokenizer)."""
    longest = max(lengths)
    if tokenizer is None:
        ids = torch.randint(3, vocab, (longest,), generator=torch.Generator().manual_seed(0))
    else:
        spec = f"{model_spec}:heldout" if model_spec.startswith("builtin") else "builtin:heldout"
        ids = token_stream(tokenizer, resolve_text([spec]), max_tokens=longest)
        if len(ids) < longest:
            raise ValueError(f"the held-out text ({spec}) has {len(ids)} tokens; the longest prompt asks {longest}")
    return {n: ids[:n].view(1, n) for n in lengths}


def _forward(model, prompt: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(seconds, logits on the host) of one forward of `prompt` on its device."""
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(input_ids=prompt, use_cache=True).logits
        if prompt.device.type == "cuda":
            torch.cuda.synchronize(prompt.device)  # measurement only: the forward's kernels have run
        return time.perf_counter() - start, logits.cpu()


def original_prefill(model, prompt: torch.Tensor, repeats: int, device=None) -> tuple[float, torch.Tensor]:
    """(seconds of the fastest of `repeats` forwards after a warm-up, their logits), the model whole on
    `device` for the measurement (and back where it was afterwards)."""
    home = next(model.parameters()).device
    device = torch.device(device or home)
    model.to(device)
    try:
        prompt = prompt.to(device)
        _forward(model, prompt)
        runs = [_forward(model, prompt) for _ in range(repeats)]
    finally:
        model.to(home)
    return min(r[0] for r in runs), runs[0][1]


def offloaded_prefill(model, prompt: torch.Tensor, reference: torch.Tensor, repeats: int, stream: bool = True,
                      **offload) -> dict:
    """Offload with `offload` (options of `m2r2_moe.offload`), warm up, time `repeats` forwards; the model is
    restored afterwards. The fastest forward's seconds, bytes moved, stall and misses (a forward's bytes vary
    with what the one before left resident: each is set against its own), and whether every forward's logits
    equal `reference`. `stream=False`: the layers load on demand only (runtime/prefill.py off)."""
    api.offload(model, **offload)
    offloader = api.get_offloader(model)
    offloader.prefill.enabled = stream
    prompt = prompt.to(offloader.device)
    try:
        identical = torch.equal(_forward(model, prompt)[1], reference)
        runs = []
        for _ in range(repeats):
            api.reset_stats(model)
            seconds, logits = _forward(model, prompt)
            phase = api.stats(model).prefill
            identical = identical and torch.equal(logits, reference)
            runs.append({"seconds": seconds, "bytes": phase.bytes_to_device, "stall": phase.stall_seconds,
                         "misses": phase.misses})
    finally:
        api.remove_offload(model)
    return {**min(runs, key=lambda r: r["seconds"]), "identical": identical}


def prefill_rows(model, prompts: dict[int, torch.Tensor], ratios: list[float], link_gbps: dict[float, float | None],
                 repeats: int, stream: bool = True, **offload) -> list[dict]:
    """One row per (prompt length, link ratio): original and offloaded seconds, bytes, limit, ratio to it.
    `link_gbps`: the emulated link of each ratio (None: the device's own link, whose speed is not known)."""
    rows = []
    for length, prompt in prompts.items():
        original, reference = original_prefill(model, prompt, repeats, offload.get("device"))
        for ratio in ratios:
            gbps = link_gbps[ratio]
            run = offloaded_prefill(model, prompt, reference, repeats, stream, link_gbps=gbps, **offload)
            transfer = run["bytes"] / (gbps * 1e9) if gbps else 0.0
            limit = max(original, transfer)
            rows.append({"prompt_tokens": length, "link_ratio": ratio, "link_gbps": gbps,
                         "original_s": original, "offloaded_s": run["seconds"], "bytes": run["bytes"],
                         "stall_s": run["stall"], "misses": run["misses"], "limit_s": limit,
                         "ratio_to_limit": run["seconds"] / limit, "identical": run["identical"]})
    return rows


def chunked_prefill(model, prompt: torch.Tensor, chunk: int | None, repeats: int) -> float:
    """Seconds to the first token (`generate` of one token; the fastest of `repeats` after a warm-up), the
    prompt prefilled in chunks of `chunk` tokens (None: one forward)."""
    kwargs = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
    if chunk is not None:
        kwargs["prefill_chunk_size"] = chunk

    def once() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(input_ids=prompt, **kwargs)
            return time.perf_counter() - start

    once()
    return min(once() for _ in range(repeats))


def prefill_table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    head = ["prompt tokens", "link ratio", "GB/s", "original ms", "offloaded ms", "MB moved", "stall ms",
            "limit ms", "x limit", "identical"]
    body = [[r["prompt_tokens"], f"{r['link_ratio']:g}", "-" if not r["link_gbps"] else f"{r['link_gbps']:.3f}",
             f"{r['original_s'] * 1e3:.0f}", f"{r['offloaded_s'] * 1e3:.0f}", f"{r['bytes'] / 1e6:.1f}",
             f"{r['stall_s'] * 1e3:.0f}", f"{r['limit_s'] * 1e3:.0f}", f"{r['ratio_to_limit']:.2f}",
             "yes" if r["identical"] else "NO"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "  ".join(str(x).rjust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])
