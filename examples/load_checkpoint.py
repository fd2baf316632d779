"""Load a MoE checkpoint folder with its experts offloaded, print the plan, generate.

    python examples/load_checkpoint.py [PATH] [--device cuda] [--cache-experts auto|N|8GB] [--disk]

PATH is a transformers checkpoint folder (config.json + *.safetensors); the default is the built-in model.
The experts are streamed from the shards into host memory (or, with --disk, read from the files on demand);
only the non-expert weights and `--cache-experts` expert slots live on the device.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import m2r2_moe
from m2r2_moe.checkpoint.loader import plan_checkpoint


def default_path() -> str | None:
    try:
        from m2r2_moe.builtin import builtin_model_path

        return builtin_model_path()
    except (ImportError, FileNotFoundError):  # no built-in model in this install (or not trained yet)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default=default_path())
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--cache-experts", default="auto", help="slots: a number, a budget like 8GB, or auto")
    parser.add_argument("--disk", action="store_true", help="keep the experts in the files (little host RAM)")
    parser.add_argument("--prompt", default="def fibonacci(n):\n    ")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.path is None:
        parser.error("give a checkpoint folder (the built-in model is not in this install)")
    logging.basicConfig(level=logging.WARNING)
    cache = int(args.cache_experts) if args.cache_experts.isdigit() else args.cache_experts
    store = "disk" if args.disk else "ram"

    print(plan_checkpoint(args.path, device=args.device, cache_experts=cache, expert_store=store))
    start = time.perf_counter()
    model = m2r2_moe.from_pretrained(args.path, device=args.device, cache_experts=cache, expert_store=store)
    print(f"loaded in {time.perf_counter() - start:.2f} s")

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.path)
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    except (OSError, ValueError):  # a checkpoint without a tokenizer: random prompt ids
        tokenizer = None
        ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    device = m2r2_moe.get_offloader(model).device
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), max_new_tokens=args.max_new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new.tolist()))
    print(f"generated {len(new)} tokens in {elapsed:.2f} s ({len(new) / elapsed:.1f} tok/s): {text!r}")
    print(m2r2_moe.stats(model))


if __name__ == "__main__":
    main()
