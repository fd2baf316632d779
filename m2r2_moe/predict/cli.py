"""`m2r2-moe train-adapters` and `m2r2-moe eval-predictor` (also tools/train_accelerator.py)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..cli_common import (BUDGET_HELP, UsageError, add_model_argument, auto_lookahead, check_adapters, existing_file,
                          listed, memory, need_tokenizer, nonnegative_float, nonnegative_int, one_of, positive_int,
                          probability, require_matplotlib, text_files)
from ..config import DEFAULT_LOOKAHEAD
from ..corpus import token_stream
from ..builtin import resolve_name
from ..loading import is_builtin, load_model
from ..models import find_moe_layers
from . import PREDICTORS, make_predictor, model_fingerprint
from .collect import chunk_tokens, collect
from .cost import cost_table, predictor_cost
from .evaluate import evaluate, evaluate_next_token
from .report import depth_table, layer_table, next_token_table, plot, training_summary
from .train import train_adapters
from .train_mlp import EPOCHS

__all__ = ["add_train_parser", "add_eval_parser", "train_command", "eval_command", "cost_table"]

logger = logging.getLogger(__name__)


# `train-adapters --lookahead auto`: every distance within the model, up to this many. The prefetcher asks the
# adapters for one transfer over one layer's compute in distances: 8 covers a link that takes 8 layers' compute
# per expert; training time and the file grow with the depth, so a deeper one is asked for by number.
# The runtime looks DEFAULT_LOOKAHEAD layers ahead unless told more (config.py says what deeper measured).
AUTO_TRAIN_LOOKAHEAD = 8


def _depth(text: str) -> str | int:
    return "auto" if text == "auto" else positive_int(text)


def _load_model(args: argparse.Namespace, auto_depth):
    """(model, tokenizer, adapter, layers) of `--model`, refused when it has no tokenizer or `--lookahead` exceeds it;
    `--lookahead auto` becomes `auto_depth(model, layers)`."""
    model, tokenizer = load_model(args.model, args.dtype)
    need_tokenizer(tokenizer, args.model)
    adapter, layers = find_moe_layers(model)
    if args.lookahead == "auto":
        args.lookahead = auto_depth(model, layers)
    if args.lookahead >= len(layers):
        raise UsageError(f"--lookahead {args.lookahead}: this model has {len(layers)} MoE layers, so the lookahead is "
                         f"1..{len(layers) - 1}")
    return model, tokenizer, adapter, layers


def _default_text(model_spec: str, split: str) -> str:
    """The `--text` default: a built-in model's own corpus split, else the default corpus's."""
    return f"builtin:{resolve_name(model_spec)}:{split}" if is_builtin(model_spec) else f"builtin:{split}"


def _check_lengths(args: argparse.Namespace) -> None:
    if args.max_tokens < args.seq_len:
        raise UsageError(f"--max-tokens {args.max_tokens} holds no sequence of --seq-len {args.seq_len}: "
                         f"use --max-tokens >= {args.seq_len}")


def _tokens(tokenizer, files, args: argparse.Namespace, skip: int = 0) -> torch.Tensor:
    """[N] token ids of the text after `skip`, refused when they fill no sequence of `--seq-len`."""
    ids = token_stream(tokenizer, files, skip + args.max_tokens)[skip:]
    if len(ids) < args.seq_len:
        after = f" after --offset-tokens {skip}" if skip else ""
        raise UsageError(f"--text has {len(ids)} tokens{after}, fewer than --seq-len {args.seq_len}: give more "
                         f"text or a smaller --seq-len")
    return ids


def add_train_parser(sub) -> None:
    p = sub.add_parser("train-adapters", help="train M2R2 accelerator adapters for a model",
                       description="Train the accelerators of both kinds on calibration text — linear accelerated-"
                                   "residual adapters and nonlinear heads, within the token and across it — and make "
                                   "the one that predicts better on a validation split the default "
                                   "(the method: docs/design.md).")
    add_model_argument(p)
    p.add_argument("--text", nargs="+", default=None,
                   help="calibration files/folders (default: a built-in model's own corpus, e.g. builtin:tiny-mixtral:train; "
                        "builtin:train for other models)")
    p.add_argument("--lookahead", "--depth", dest="lookahead", type=_depth, default=DEFAULT_LOOKAHEAD,
                   help=f"layers ahead the adapters predict: distances d = 1..lookahead (default "
                        f"{DEFAULT_LOOKAHEAD}, the runtime's); 'auto' = every distance within the model, at most "
                        f"{AUTO_TRAIN_LOOKAHEAD}, for a runtime told to look that far (OffloadConfig.lookahead)")
    p.add_argument("--rank", type=positive_int, default=32, help="rank of each low-rank adapter")
    p.add_argument("--out", required=True, help="adapters .safetensors file to write")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per calibration sequence")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per forward")
    p.add_argument("--max-tokens", type=positive_int, default=131072,
                   help="calibration tokens to use (the last --validation share of the sequences validates)")
    p.add_argument("--host-memory", type=memory, default=None,
                   help=f"host memory the training may hold ({BUDGET_HELP}; default: what is available when it "
                        "starts, less the runtime's margin); the heads then train on as many calibration tokens as "
                        "fit, and what does not scale with the text must fit or nothing runs")
    p.add_argument("--validation", type=probability, default=0.125,
                   help="share of the calibration sequences held out to stop training and choose the default kind")
    p.add_argument("--kinds", type=listed(one_of(("linear", "mlp"))), default="linear,mlp",
                   help="accelerators to train: linear (always fitted), mlp (nonlinear heads)")
    p.add_argument("--width", type=positive_int, default=128, help="hidden width of each nonlinear head")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS,
                   help="most passes over the calibration tokens for the heads (early-stopped on validation)")
    p.add_argument("--within-token", action="store_true",
                   help="no heads for the next token's first layers (the predictor then does not wrap)")
    p.add_argument("--ridge", type=nonnegative_float, default=1e-3, help="ridge penalty of the closed-form fit")
    p.add_argument("--kl-steps", type=nonnegative_int, default=0,
                   help="Adam steps per (layer, rate) on the routing loss; 0 = closed form only")
    p.add_argument("--route-features", action="store_true",
                   help="adapters also see the source layer's expert choice (multi-hot)")
    p.add_argument("--kl-samples", type=positive_int, default=16384, help="tokens kept for the routing fine-tune")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the model's weights' dtype while training")
    p.add_argument("--file-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the tensors written to --out (bfloat16: half the file; on the CPU the runtime's "
                        "native heads compute in bfloat16 either way)")
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    """Train adapters for `--model` on `--text` and write them to `--out`."""
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a folder; name the file to write, e.g. "
                         f"{Path(args.out) / 'adapters.safetensors'}")
    _check_lengths(args)
    files = text_files(args.text, _default_text(args.model, "train"))
    torch.manual_seed(args.seed)
    model, tokenizer, adapter, layers = _load_model(
        args, lambda model, layers: min(len(layers) - 1, AUTO_TRAIN_LOOKAHEAD))
    ids = _tokens(tokenizer, files, args)
    adapters, report = train_adapters(
        model, adapter, layers, chunk_tokens(ids, args.seq_len, args.batch), depth=args.lookahead, rank=args.rank,
        ridge=args.ridge, kl_steps=args.kl_steps, kl_samples=args.kl_samples, seed=args.seed,
        route_features=args.route_features, kinds=tuple(args.kinds), width=args.width, wraps=not args.within_token,
        epochs=args.epochs, validation=args.validation,
        host_memory=args.host_memory,
    )
    settings = {k: getattr(args, k) for k in ("max_tokens", "seq_len", "validation", "rank", "ridge", "kl_steps",
                                              "kl_samples", "width", "epochs", "within_token", "seed", "file_dtype")}
    info = {"model": args.model, "files": len(files), "seconds": round(report["seconds"], 1),
            "stage_seconds": report["stage_seconds"], **settings,
            **{k: report[k] for k in ("tokens", "heads_tokens", "validation_tokens", "kind", "validation",
                                      "mean_final", "by_depth", "route_features")},
            "mlp": report.get("mlp")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    adapters.save(args.out, model_fingerprint(model, layers), info, dtype=getattr(torch, args.file_dtype))
    heads = ""
    if adapters.mlp is not None:
        pairs = adapters.mlp.pairs()
        wrapped = sum(l + d >= len(layers) for l, d in pairs)
        heads = f" and {len(pairs)} mlp heads (width {args.width}, {wrapped} for the next token)"
    print(f"trained {len(report['pairs'])} adapters (depth {args.lookahead}, rank {args.rank}){heads} on "
          f"{report['tokens']} tokens in {report['seconds']:.1f} s → {args.out}")
    if report["heads_tokens"] and report["heads_tokens"] < report["tokens"]:
        print(f"  the heads trained on the first {report['heads_tokens']} of those tokens (the memory budget: "
              f"--host-memory)")
    print("  stages (s): " + ", ".join(f"{k} {v}" for k, v in report["stage_seconds"].items())
          + f"; torch threads {torch.get_num_threads()}")
    print(f"default kind: {report['kind']} (the better top-k recall on {report['validation_tokens']} validation tokens)")
    print(training_summary(report, len(layers)))
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval-predictor", help="recall/precision of predictors per lookahead depth on held-out text",
                       description="Recall, precision and width of each predictor per lookahead depth and per "
                                   "source layer on held-out text, the next token's first layers for a predictor "
                                   "that wraps (next to the previous token's experts), and what each predictor "
                                   "costs: parameters, FLOPs per token, time per layer at batch 1.")
    add_model_argument(p)
    p.add_argument("--predictors", type=listed(one_of(PREDICTORS)), default="history,gate,m2r2,oracle",
                   help=f"comma-separated, from: {', '.join(PREDICTORS)}")
    p.add_argument("--lookahead", "--depth", dest="lookahead", type=_depth, default="auto",
                   help="layers ahead to evaluate: distances d = 1..lookahead; 'auto' = the depth of the m2r2 "
                        "adapters (`--adapters`, else the shipped ones), else 4")
    p.add_argument("--adapters", type=existing_file, default=None,
                   help="m2r2 adapters file (default: the shipped ones of a built-in model)")
    p.add_argument("--kind", default=None, choices=["linear", "mlp"],
                   help="which of the adapters' accelerators m2r2 runs (default: the one the file names)")
    p.add_argument("--text", nargs="+", default=None, help="held-out files/folders (default: a built-in model's own corpus, e.g. "
                                                                "builtin:tiny-mixtral:heldout; builtin:heldout for other models)")
    p.add_argument("--max-tokens", type=positive_int, default=16384, help="held-out tokens to evaluate")
    p.add_argument("--offset-tokens", type=nonnegative_int, default=0,
                   help="skip this many tokens of the text first (e.g. a validation window of the train split)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per held-out sequence")
    p.add_argument("--mass", type=probability, default=0.9,
                   help="confidence widening: predicted probability mass, in (0, 1]")
    p.add_argument("--json", default=None, help="write the results (with the cost) here (default: not written)")
    p.add_argument("--plot", default=None, help="write a recall-vs-depth PNG here; needs matplotlib "
                                                "(default: not drawn)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    p.set_defaults(func=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    """Evaluate `--predictors` on held-out text; print the table and the cost, write `--json`, `--plot`."""
    if args.plot:
        require_matplotlib("--plot")
    names = [n for n in dict.fromkeys(args.predictors) if n != "none"]
    if not names:
        raise UsageError("--predictors: 'none' predicts nothing; name at least one of "
                         + ", ".join(n for n in PREDICTORS if n != "none"))
    _check_lengths(args)
    files = text_files(args.text, _default_text(args.model, "heldout"))
    model, tokenizer, adapter, layers = _load_model(
        args, lambda model, layers: auto_lookahead(model, layers, args.adapters, runtime=False))
    if "m2r2" in names:
        check_adapters(model, layers, args.model, args.adapters, "--predictors")
    top_k = adapter.top_k(model)
    dummy_trace = torch.zeros(1, len(layers), top_k, dtype=torch.long)  # [1, L, K], replaced per sequence
    predictors = {n: make_predictor(n, model, adapter, layers, args.lookahead, adapters=args.adapters,
                                    trace=dummy_trace if n == "oracle" else None,
                                    kind=args.kind if n == "m2r2" else None) for n in names}
    sequences = chunk_tokens(_tokens(tokenizer, files, args, skip=args.offset_tokens), args.seq_len, 1)
    tokens = sum(s.numel() for s in sequences)
    widths = sorted({top_k, top_k + 1, 2 * top_k})
    held_out = list(collect(model, layers, sequences))  # [(residuals [L, S, H], chosen [L, S, K])], collected once
    results = evaluate(predictors, held_out, top_k, args.lookahead, widths, mass=args.mass)
    next_token = evaluate_next_token(predictors, held_out, top_k)
    out = {"model": args.model, "tokens": tokens, "top_k": top_k, "num_layers": len(layers),
           "num_experts": max(int(layer.experts.num_experts) for layer in layers), "mass": args.mass,
           "results": {n: {str(d): v for d, v in r.items()} for n, r in results.items()},
           "next_token": next_token, "cost": predictor_cost(model, layers, predictors)}
    print(depth_table(results, args.lookahead, widths))
    print()
    print(layer_table(results))
    if next_token:
        print()
        print(next_token_table(next_token, len(layers)))
    print()
    print(cost_table(out["cost"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(results, args.lookahead, args.plot, args.model, tokens)
    return 0
