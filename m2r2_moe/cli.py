"""`m2r2-moe` command line: demo, train-adapters, eval-predictor, profile, serve."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from . import api
from .cli_common import (HelpFormatter, add_model_argument, check_adapters, check_cache_experts, check_device,
                         existing_file, link_gbps, positive_int, shipped_adapters)
from .config import MIN_LINK_GBPS, OffloadConfig, OffloadConfigError
from .errors import M2R2Error
from .loading import load_model
from .models import find_moe_layers


def _encode(tokenizer, prompt: str, vocab: int) -> torch.Tensor:
    """[1, T] prompt ids: the tokenized prompt, or 16 seeded random ids for a model without tokenizer."""
    if tokenizer is None:
        return torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    return tokenizer(prompt, return_tensors="pt").input_ids


def _decode(tokenizer, ids: torch.Tensor) -> str:
    return " ".join(map(str, ids.tolist())) if tokenizer is None else tokenizer.decode(ids)


def demo(args: argparse.Namespace) -> int:
    """Offload a model, generate, compare with the un-offloaded tokens, print the stats."""
    device = check_device(args.device)
    model, tokenizer = load_model(args.model, args.dtype)
    adapter, layers = find_moe_layers(model)
    total = sum(int(layer.experts.num_experts) for layer in layers)
    if args.cache_experts is not None:
        check_cache_experts([args.cache_experts], adapter.top_k(model), total)
    cache = min(args.cache_experts or max(adapter.top_k(model), total // 4), total)  # more slots than experts: all
    link = args.link_gbps if device.type == "cpu" else None
    predictor = args.predictor or ("m2r2" if args.adapters or shipped_adapters(model, layers) else "none")
    if predictor == "m2r2":
        check_adapters(model, layers, args.model, args.adapters, "--predictor")
    config = OffloadConfig(device=args.device, cache_experts=cache, link_gbps=link, predictor=predictor,
                           adapters=args.adapters)
    ids = _encode(tokenizer, args.prompt, model.config.vocab_size)  # [1, T]
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
    with torch.no_grad():
        reference = model.generate(input_ids=ids, **gen)
    api.offload(model, config)
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
    print(f"model: {args.model} ({args.dtype}), {total} experts in {len(offloader.layers)} MoE layers, "
          f"{offloader.expert_bytes[0] / 1e6:.2f} MB per expert")
    print(f"offload: {cache} device slots on {offloader.device}, predictor {predictor}"
          + (f", emulated link {link} GB/s" if link else ""))
    print(f"prompt: {args.prompt!r}" if tokenizer is not None else f"prompt ids: {ids[0].tolist()}")
    print(f"generated ({len(new)} tokens, {elapsed:.2f} s, {len(new) / elapsed:.1f} tok/s): {_decode(tokenizer, new)!r}")
    identical = torch.equal(out, reference)
    print(f"lossless: offloaded tokens {'==' if identical else '!='} original tokens")
    print(stats)
    return 0 if identical else 1


class _Parser(argparse.ArgumentParser):
    """One-line errors (`m2r2-moe demo: error: ...`, exit 2) and every default shown by `--help`;
    the sub-command parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `m2r2-moe` parser with its five sub-commands."""
    from .predict.cli import add_eval_parser, add_train_parser
    from .profile.cli import add_parser as add_profile_parser
    from .serve.cli import add_parser as add_serve_parser

    parser = _Parser(prog="m2r2-moe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does; tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="demo, train-adapters, eval-predictor, profile or serve (each has --help)")
    _add_demo_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_profile_parser(sub)
    add_serve_parser(sub)
    for p in sub.choices.values():  # -v also after the command; SUPPRESS keeps the top-level value otherwise
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log what the runtime does; tracebacks on errors")
    return parser


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="offload a model (the built-in one by default), generate, check, print stats",
                       description=demo.__doc__)
    add_model_argument(p)
    p.add_argument("--prompt", default="def fibonacci(n):\n    ",
                   help="prompt text; a model without tokenizer gets 16 random ids "
                        "(default: 'def fibonacci(n):', a newline and 4 spaces)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="tokens to generate")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--cache-experts", type=positive_int, default=None,
                   help="device slots, from the model's top-k to its number of experts "
                        "(default: a quarter of the experts, at least top-k)")
    p.add_argument("--link-gbps", type=link_gbps, default=2.0,
                   help=f"CPU only: emulated link bandwidth in GB/s, at least {MIN_LINK_GBPS:g}")
    p.add_argument("--predictor", default=None, choices=["none", "history", "gate", "m2r2"],
                   help="what drives prefetching (default: m2r2 when --adapters is given or the model has shipped "
                        "adapters, else none)")
    p.add_argument("--adapters", type=existing_file, default=None,
                   help="adapters file for --predictor m2r2 (default: the shipped ones of a built-in model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    p.set_defaults(func=demo)


def main(argv: list[str] | None = None) -> int:
    """Run `m2r2-moe` with `argv` (default: the process's arguments); returns the exit status.

    Errors on the user's input print one line `m2r2-moe COMMAND: error: ...` and return 2 (with `--verbose`:
    the traceback); argparse's own refusals exit 2 the same way."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (M2R2Error, OffloadConfigError, OSError) as e:  # the user's input: one line, not a traceback
        if args.verbose:
            raise
        print(f"m2r2-moe {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
