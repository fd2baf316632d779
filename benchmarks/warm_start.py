"""Cold against warm starts: the time an app waits for its first 32 tokens right after offloading.

For each shipped model (CPU, emulated link at each link ratio = one expert's transfer time over one layer's
compute), a profile is saved after the model served a few held-out prompts (`m2r2_moe.save_profile`); then, on
other held-out prompts, each run offloads afresh and times `generate` of 32 tokens (prefill + 31 decode steps):

- `cold`: no profile: every expert the prompt needs is loaded on demand;
- `warm`: `warm_start=profile`, the prompt right away: the fill runs while the prompt is computed (demand
  loads pre-empt it);
- `warm, filled`: `warm_start=profile`, the prompt once the fill has landed (an app that loads at start-up and
  gets its prompt later).

Best of `--repeats` per prompt and mode, summed over the prompts; the ratios are side by side on the same prompts.
Half of the experts fit in the slots, the m2r2 predictor (shipped adapters) prefetches, one torch thread.

    python benchmarks/warm_start.py [--models tiny-mixtral,tiny-qwen3-moe] [--link-ratios 2,8] [--prompts 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import m2r2_moe  # noqa: E402
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.corpus import resolve_text, token_stream  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402

NEW_TOKENS = 32
PROMPT_TOKENS = 48
MODES = ("cold", "warm", "warm, filled")


def prompts(tokenizer, name: str, count: int) -> list[torch.Tensor]:
    """`count` windows of PROMPT_TOKENS held-out tokens of the model's own corpus, each [1, T]."""
    stream = token_stream(tokenizer, resolve_text([f"builtin:{name}:heldout"]), count * PROMPT_TOKENS * 4, seed=1)
    return [stream[i * 4 * PROMPT_TOKENS: i * 4 * PROMPT_TOKENS + PROMPT_TOKENS][None] for i in range(count)]


def layer_seconds(model, ids: torch.Tensor, num_layers: int) -> float:
    """One MoE layer's share of an un-offloaded decode step."""
    gen = dict(input_ids=ids, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(max_new_tokens=1, **gen)
        start = time.perf_counter()
        model.generate(max_new_tokens=1, **gen)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(max_new_tokens=NEW_TOKENS + 1, min_new_tokens=NEW_TOKENS + 1, **gen)
    return (time.perf_counter() - start - prefill) / NEW_TOKENS / num_layers


def first_tokens(model, ids: torch.Tensor, options: dict, mode: str, profile: Path) -> tuple[float, int]:
    """(seconds for NEW_TOKENS tokens, misses) of one fresh offload in `mode`."""
    warm = None if mode == "cold" else profile
    m2r2_moe.offload(model, warm_start=warm, **options)
    try:
        cache = m2r2_moe.get_offloader(model).cache
        if mode == "warm, filled":
            while cache.queued_prefetches():
                time.sleep(0.001)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - start, m2r2_moe.stats(model).misses
    finally:
        m2r2_moe.remove_offload(model)


def save_profile(model, calibration: list[torch.Tensor], options: dict, path: Path) -> None:
    """What an app's earlier sessions leave behind: the model served these prompts, then saved its profile."""
    m2r2_moe.offload(model, **options)
    try:
        with torch.no_grad():
            for ids in calibration:
                model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        m2r2_moe.save_profile(model, path)
    finally:
        m2r2_moe.remove_offload(model)


def measure(name: str, ratios: list[float], count: int, repeats: int, folder: Path) -> list[list]:
    model, tokenizer = m2r2_moe.load_builtin(name=name)
    _, layers = find_moe_layers(model)
    total = sum(int(layer.experts.num_experts) for layer in layers)
    texts = prompts(tokenizer, name, 2 * count)
    calibration, tests = texts[:count], texts[count:]
    expert_bytes = m2r2_moe.budget.offload_need(model, layers, 1, 0, torch.device("cpu")).expert_bytes
    compute = layer_seconds(model, tests[0], len(layers))
    rows = []
    for ratio in ratios:
        options = dict(device="cpu", cache_experts=total // 2, predictor="m2r2",
                       link_gbps=expert_bytes / (ratio * compute) / 1e9)
        profile = folder / f"{name}-{ratio:g}.json"
        save_profile(model, calibration, options, profile)
        seconds, misses = {m: 0.0 for m in MODES}, {m: 0 for m in MODES}
        for ids in tests:
            for mode in MODES:
                runs = [first_tokens(model, ids, options, mode, profile) for _ in range(repeats)]
                best = min(runs)
                seconds[mode] += best[0]
                misses[mode] += best[1]
        cold = seconds["cold"]
        rows.append([name, f"{ratio:g}", *(f"{seconds[m] / len(tests) * 1e3:.0f}" for m in MODES),
                     f"{seconds['warm'] / cold:.2f}", f"{seconds['warm, filled'] / cold:.2f}",
                     " / ".join(str(misses[m] // len(tests)) for m in MODES)])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mixtral,tiny-qwen3-moe")
    parser.add_argument("--link-ratios", default="2,8")
    parser.add_argument("--prompts", type=int, default=3, help="prompts measured (as many again build the profile)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per prompt and mode: the best counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.link_ratios.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for name in args.models.split(",") for row in
                measure(name, ratios, args.prompts, args.repeats, Path(folder))]
    table = markdown_table(["model", "link ratio", *(f"{m} ms" for m in MODES), "warm / cold", "filled / cold",
                            "misses (cold / warm / filled)"], rows)
    extra = (f"\nms for the first {NEW_TOKENS} tokens (prefill of {PROMPT_TOKENS} held-out tokens + "
             f"{NEW_TOKENS - 1} decode steps) right after offloading, mean over {args.prompts} prompts of the best "
             f"of {args.repeats} runs; the profile was saved after {args.prompts} other held-out prompts. CPU, "
             f"emulated link, half of the experts in slots, m2r2 prefetching, {args.threads} torch thread(s). "
             "misses: demand loads per run.\n")
    publish("Warm start: first tokens cold vs warm (benchmarks/warm_start.py)", table, extra,
            record=not args.no_record)


if __name__ == "__main__":
    main()
