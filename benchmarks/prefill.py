"""Prefill (time to first token) against its limit, streamed and on demand, and chunked against one forward.

For each model and prompt length: one prefill forward of the original model, and of the offloaded one with
half of all experts cached at each link ratio (emulated link; ratio = one expert's transfer time over one MoE
layer's decode compute time), with the next layers' experts streamed in while a layer computes
(runtime/prefill.py) and loaded on demand only: the three interleaved round by round (a busy machine slows
all alike), each offloaded forward after one in the same mode, the fastest of --repeats; limit = max(original
forward, bytes moved / link bandwidth). Then, for the longest prompts, time to first token with the prompt
prefilled in one forward against chunks (`prefill_chunk_size`), original and offloaded. Prints the tables and
appends them to BENCHMARKS.md.

    python benchmarks/prefill.py [--models builtin,builtin:tiny-qwen3-moe] [--lengths 64,256,1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe import api  # noqa: E402
from m2r2_moe.loading import load_model  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402
from m2r2_moe.corpus import resolve_text  # noqa: E402
from m2r2_moe.profile.cli import prompt_text  # noqa: E402
from m2r2_moe.profile.prefill import chunked_prefill, measure_prefill, prefill_prompts, prefill_row  # noqa: E402
from m2r2_moe.profile.runs import reference_run  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def decode_layer_seconds(model, layers, prompt: torch.Tensor, repeats: int) -> float:
    """One MoE layer's compute time in decode (sets each link ratio's speed, as the decode profile does)."""
    stride = max(int(x.experts.num_experts) for x in layers)
    best = min(reference_run(model, prompt[:, :64], 17, stride).decode_seconds_per_token for _ in range(repeats))
    return best / len(layers)


def prefill_table(model, spec, prompts, ratios, gbps, cache, total, repeats) -> list[list]:
    """Rows: the original forward, the offloaded one streamed and on demand (interleaved), each against its limit."""
    rows = []
    for length, prompt in prompts.items():
        for ratio in ratios:
            original, runs = measure_prefill(model, prompt, repeats, (True, False), device="cpu", cache_experts=cache,
                                             link_gbps=gbps[ratio])
            # the runtime's own cost in a forward of this size: every expert resident, nothing to copy
            resident = measure_prefill(model, prompt, repeats, (True,), device="cpu", cache_experts=total,
                                       link_gbps=gbps[ratio])[1][True]["seconds"]
            cells = [spec, length, f"{ratio:g}", f"{original * 1e3:.0f}", f"{resident * 1e3:.0f}"]
            for stream in (True, False):
                row = prefill_row(length, ratio, gbps[ratio], original, runs[stream])
                cells += [f"{row['offloaded_s'] * 1e3:.0f}", f"{row['bytes'] / 1e6:.1f}", f"{row['limit_s'] * 1e3:.0f}",
                          f"{row['ratio_to_limit']:.2f}"]
                if stream:
                    cells += [f"{row['needed_bytes'] / 1e6:.1f}", f"{row['ratio_to_floor']:.2f}"]
            speedup = runs[False]["seconds"] / runs[True]["seconds"]
            same = runs[True]["identical"] and runs[False]["identical"]
            rows.append(cells + [f"{speedup:.2f}", "yes" if same else "NO"])
    return rows


def chunk_table(model, spec, prompts, ratios, gbps, cache, chunks, repeats) -> list[list]:
    """Rows: time to first token with the prompt prefilled in one forward and in chunks, original and offloaded."""
    rows = []
    for length, prompt in prompts.items():
        sizes = [None] + [c for c in chunks if c < length]
        plain = chunked_prefill(model, prompt, sizes, repeats)
        for ratio in ratios:
            api.offload(model, device="cpu", cache_experts=cache, link_gbps=gbps[ratio])
            try:
                times = chunked_prefill(model, prompt, sizes, repeats)
            finally:
                api.remove_offload(model)
            for chunk, seconds in times.items():
                rows.append([spec, length, f"{ratio:g}", "one forward" if chunk is None else chunk,
                             f"{plain[chunk] * 1e3:.0f}", f"{seconds * 1e3:.0f}", f"{seconds / times[None]:.2f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="builtin,builtin:tiny-qwen3-moe")
    p.add_argument("--lengths", type=_ints, default="64,256,1024")
    p.add_argument("--link-ratios", type=lambda t: [float(x) for x in t.split(",")], default="2,8")
    p.add_argument("--chunk-lengths", type=_ints, default="1024,2048", help="prompts prefilled in chunks too")
    p.add_argument("--chunks", type=_ints, default="256,512", help="chunk sizes (prefill_chunk_size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prefill_rows, chunk_rows, notes = [], [], []
    for spec in args.models.split(","):
        model, tokenizer = load_model(spec, torch.float32)
        _, layers = find_moe_layers(model)
        total = sum(int(x.experts.num_experts) for x in layers)
        layer = layers[0].experts
        expert_bytes = sum(getattr(layer, n)[0].numel() * getattr(layer, n).element_size() for n in layers[0].param_names)
        text = resolve_text(prompt_text(spec, None))
        prompts = prefill_prompts(tokenizer, text, sorted(set(args.lengths + args.chunk_lengths)),
                                  model.config.vocab_size)
        compute = decode_layer_seconds(model, layers, prompts[max(prompts)], args.repeats)
        gbps = {r: expert_bytes / (r * compute) / 1e9 for r in args.link_ratios}
        cache = total // 2
        prefill_rows += prefill_table(model, spec, {n: prompts[n] for n in args.lengths}, args.link_ratios, gbps,
                                      cache, total, args.repeats)
        chunk_rows += chunk_table(model, spec, {n: prompts[n] for n in args.chunk_lengths}, args.link_ratios, gbps,
                                  cache, args.chunks, args.repeats)
        notes.append(f"{spec}: {len(layers)} MoE layers, {total} experts of {expert_bytes / 1e6:.2f} MB (fp32), "
                     f"{cache} slots; decode compute {compute * 1e3:.2f} ms per MoE layer; link "
                     + ", ".join(f"ratio {r:g} = {g:.3f} GB/s" for r, g in gbps.items()))
    head = ["model", "prompt tokens", "link ratio", "original ms", "all cached ms", "streamed ms", "MB", "limit ms", "x limit",
            "MB needed", "x floor", "on demand ms", "MB", "limit ms", "x limit", "streamed speedup", "identical"]
    table = markdown_table(head, prefill_rows)
    chunks = markdown_table(["model", "prompt tokens", "link ratio", "prefill", "original ms", "offloaded ms",
                             "vs one forward"], chunk_rows)
    extra = ("\n" + "\n".join(f"- {n}" for n in notes) + "\n- original, streamed and on-demand forwards "
             f"interleaved round by round, each offloaded one after one in the same mode, the fastest of "
             f"{args.repeats}; limit = max(original forward, bytes moved / link bandwidth); floor = max(original forward, "
             "bytes of the experts the forward used that held no slot at its start / link bandwidth); all cached = "
             "the offloaded forward with every expert resident (the runtime's own cost, no copies); streamed = the next "
             "layers' experts copied while a layer computes (runtime/prefill.py), on demand = each layer's copies "
             f"when it is reached\n\nTime to first token, one forward against chunks (offloaded, streamed):\n\n"
             f"{chunks}\n")
    publish("Prefill against its limit (benchmarks/prefill.py)", table, extra, record=not args.no_record)


if __name__ == "__main__":
    main()
