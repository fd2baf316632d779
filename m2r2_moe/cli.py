"""`m2r2-moe` command line: demo, train-adapters, eval-predictor, profile."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from . import api
from .config import OffloadConfigError
from .errors import M2R2Error
from .models import find_moe_layers


def _load(model: str, dtype: torch.dtype):
    """(model, tokenizer or None) for `builtin`, `random` or a checkpoint folder."""
    if model == "builtin":
        from .builtin import load_builtin

        return load_builtin(dtype=dtype)
    if model == "random":
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                               num_experts_per_tok=2, max_position_embeddings=512)
        torch.manual_seed(0)
        return MixtralForCausalLM(config).to(dtype).eval(), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval(), AutoTokenizer.from_pretrained(model)


def _encode(tokenizer, prompt: str) -> torch.Tensor:
    if tokenizer is None:
        return torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    return tokenizer(prompt, return_tensors="pt").input_ids


def _decode(tokenizer, ids: torch.Tensor) -> str:
    return " ".join(map(str, ids.tolist())) if tokenizer is None else tokenizer.decode(ids)


def demo(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    model, tokenizer = _load(args.model, dtype)
    ids = _encode(tokenizer, args.prompt)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
    with torch.no_grad():
        reference = model.generate(input_ids=ids, **gen)
    adapter, layers = find_moe_layers(model)
    total = sum(int(layer.experts.num_experts) for layer in layers)
    cache = args.cache_experts or max(adapter.top_k(model), total // 4)
    link = args.link_gbps if (args.device or "cpu") == "cpu" else None
    predictor = args.predictor or ("m2r2" if args.model == "builtin" or args.adapters else "none")
    api.offload(model, device=args.device, cache_experts=cache, link_gbps=link, predictor=predictor,
                adapters=args.adapters)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, **gen)
        elapsed = time.perf_counter() - start
        stats = api.stats(model)
        offloader = api.get_offloader(model)
    finally:
        api.remove_offload(model)
    new = out[0, ids.shape[1]:]
    print(f"model: {args.model} ({dtype}), {total} experts in {len(offloader.layers)} MoE layers, "
          f"{offloader.expert_bytes[0] / 1e6:.2f} MB per expert")
    print(f"offload: {cache} device slots on {offloader.device}, predictor {predictor}"
          + (f", emulated link {link} GB/s" if link else ""))
    print(f"prompt: {args.prompt!r}" if tokenizer is not None else f"prompt ids: {ids[0].tolist()}")
    print(f"generated ({len(new)} tokens, {elapsed:.2f} s, {len(new) / elapsed:.1f} tok/s): {_decode(tokenizer, new)!r}")
    identical = torch.equal(out, reference)
    print(f"lossless: offloaded tokens {'==' if identical else '!='} original tokens")
    print(stats)
    return 0 if identical else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2r2-moe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="offload the built-in model, generate, print stats")
    p.add_argument("--model", default="builtin", help="'builtin' (default), 'random' or a checkpoint folder")
    p.add_argument("--prompt", default="def fibonacci(n):\n    ")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--cache-experts", type=int, default=None, help="device slots (default: a quarter of experts)")
    p.add_argument("--link-gbps", type=float, default=2.0, help="CPU only: emulated link bandwidth in GB/s")
    p.add_argument("--predictor", default=None, choices=["none", "history", "gate", "m2r2"],
                   help="what drives prefetching (default: m2r2 with the shipped adapters on the built-in model)")
    p.add_argument("--adapters", default=None, help="adapters file for --predictor m2r2 on another model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=demo)
    from .predict.cli import add_eval_parser, add_train_parser

    from .profile.cli import add_parser as add_profile_parser

    add_train_parser(sub)
    add_eval_parser(sub)
    add_profile_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (M2R2Error, OffloadConfigError, FileNotFoundError) as e:  # the user's input: one line, not a traceback
        if args.verbose:
            raise
        print(f"m2r2-moe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
