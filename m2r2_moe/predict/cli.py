"""`m2r2-moe train-adapters` and `m2r2-moe eval-predictor` (also tools/train_accelerator.py)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from ..cli_common import (UsageError, add_model_argument, check_adapters, existing_file, listed, need_tokenizer,
                          nonnegative_float, nonnegative_int, one_of, positive_int, probability, require_matplotlib,
                          text_files)
from ..corpus import token_stream
from ..loading import load_model
from ..models import find_moe_layers
from . import PREDICTORS, make_predictor, model_fingerprint
from .collect import chunk_tokens, collect
from .evaluate import evaluate
from .train import train_adapters

logger = logging.getLogger(__name__)


def _load_model(args: argparse.Namespace):
    """(model, tokenizer, adapter, layers) of `--model`, refused when it has no tokenizer or `--lookahead` exceeds it."""
    model, tokenizer = load_model(args.model, args.dtype)
    need_tokenizer(tokenizer, args.model)
    adapter, layers = find_moe_layers(model)
    if args.lookahead >= len(layers):
        raise UsageError(f"--lookahead {args.lookahead}: this model has {len(layers)} MoE layers, so the lookahead is "
                         f"1..{len(layers) - 1}")
    return model, tokenizer, adapter, layers


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
                       description="Train accelerated-residual adapters on calibration text "
                                   "(the method: docs/design.md).")
    add_model_argument(p)
    p.add_argument("--text", nargs="+", default=None,
                   help="calibration files/folders (default: builtin:train, the built-in model's training split)")
    p.add_argument("--lookahead", "--depth", dest="lookahead", type=positive_int, default=4,
                   help="layers ahead the adapters predict: distances d = 1..lookahead")
    p.add_argument("--rank", type=positive_int, default=32, help="rank of each low-rank adapter")
    p.add_argument("--out", required=True, help="adapters .safetensors file to write")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per calibration sequence")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per forward")
    p.add_argument("--max-tokens", type=positive_int, default=262144, help="calibration tokens to use")
    p.add_argument("--ridge", type=nonnegative_float, default=1e-3, help="ridge penalty of the closed-form fit")
    p.add_argument("--kl-steps", type=nonnegative_int, default=0,
                   help="Adam steps per (layer, rate) on the routing loss; 0 = closed form only")
    p.add_argument("--route-features", action="store_true",
                   help="adapters also see the source layer's expert choice (multi-hot)")
    p.add_argument("--kl-samples", type=positive_int, default=16384, help="tokens kept for the routing fine-tune")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    """Train adapters for `--model` on `--text` and write them to `--out`."""
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a folder; name the file to write, e.g. "
                         f"{Path(args.out) / 'adapters.safetensors'}")
    _check_lengths(args)
    files = text_files(args.text, "builtin:train")
    torch.manual_seed(args.seed)
    model, tokenizer, adapter, layers = _load_model(args)
    ids = _tokens(tokenizer, files, args)
    adapters, report = train_adapters(
        model, adapter, layers, chunk_tokens(ids, args.seq_len, args.batch), depth=args.lookahead, rank=args.rank,
        ridge=args.ridge, kl_steps=args.kl_steps, kl_samples=args.kl_samples, seed=args.seed,
        route_features=args.route_features,
    )
    info = {"model": args.model, "files": len(files), "tokens": report["tokens"], "seconds": round(report["seconds"], 1),
            "kl_steps": args.kl_steps, "ridge": args.ridge, "seed": args.seed, "mean_final": report["mean_final"],
            "by_depth": report["by_depth"], "max_tokens": args.max_tokens, "kl_samples": args.kl_samples,
            "route_features": report["route_features"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    adapters.save(args.out, model_fingerprint(model, layers), info)
    m = report["mean_final"]
    print(f"trained {len(report['pairs'])} adapters (depth {args.lookahead}, rank {args.rank}) on {report['tokens']} tokens "
          f"in {report['seconds']:.1f} s → {args.out}")
    print(f"calibration (mean over pairs): normalized MSE {m['nmse']:.3f}, KL {m['kl']:.4f}, "
          f"top-k recall {m['recall_topk']:.3f} (gate on the same pairs {m['gate_recall_topk']:.3f})")
    for d, r in report["by_depth"].items():
        print(f"  depth {d}: top-k recall gate {r['final_gate_recall_topk']:.3f}, closed form "
              f"{r['closed_form_recall_topk']:.3f}, after routing fine-tune {r['final_recall_topk']:.3f}")
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval-predictor", help="recall/precision of predictors per lookahead depth on held-out text",
                       description="Recall, precision and width of each predictor per lookahead depth on\n"
                                   "held-out text, and what each predictor costs per token.")
    add_model_argument(p)
    p.add_argument("--predictors", type=listed(one_of(PREDICTORS)), default="history,gate,m2r2,oracle",
                   help=f"comma-separated, from: {', '.join(PREDICTORS)}")
    p.add_argument("--lookahead", "--depth", dest="lookahead", type=positive_int, default=4,
                   help="layers ahead to evaluate: distances d = 1..lookahead")
    p.add_argument("--adapters", type=existing_file, default=None,
                   help="m2r2 adapters file (default: the shipped ones of a built-in model)")
    p.add_argument("--text", nargs="+", default=None, help="held-out files/folders (default: builtin:heldout)")
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
    files = text_files(args.text, "builtin:heldout")
    model, tokenizer, adapter, layers = _load_model(args)
    if "m2r2" in names:
        check_adapters(model, layers, args.model, args.adapters, "--predictors")
    top_k = adapter.top_k(model)
    dummy_trace = torch.zeros(1, len(layers), top_k, dtype=torch.long)  # [1, L, K], replaced per sequence
    predictors = {n: make_predictor(n, model, adapter, layers, args.lookahead, adapters=args.adapters,
                                    trace=dummy_trace if n == "oracle" else None) for n in names}
    sequences = chunk_tokens(_tokens(tokenizer, files, args, skip=args.offset_tokens), args.seq_len, 1)
    tokens = sum(s.numel() for s in sequences)
    widths = sorted({top_k, top_k + 1, 2 * top_k})
    results = evaluate(predictors, collect(model, layers, sequences), top_k, args.lookahead, widths, mass=args.mass)
    out = {"model": args.model, "tokens": tokens, "top_k": top_k, "num_layers": len(layers),
           "num_experts": max(int(layer.experts.num_experts) for layer in layers), "mass": args.mass,
           "results": {n: {str(d): v for d, v in r.items()} for n, r in results.items()},
           "cost": _cost(model, layers, predictors)}
    print(_table(results, args.lookahead, widths))
    print()
    print(cost_table(out["cost"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        _plot(results, args.lookahead, args.plot, args.model, tokens)
    return 0


def _table(results: dict, depth: int, widths: list[int]) -> str:
    head = "predictor  set        " + "".join(f"  d={d}: recall/prec/width" for d in range(1, depth + 1))
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        rows = [("top-k", lambda v: v)] + [(f"width {w}", lambda v, w=w: v["at_width"][w]) for w in widths[1:]]
        rows.append(("widened", lambda v: v["widened"]))
        for label, get in rows:
            cells = "".join(f"  {get(r[d])['recall']:.3f} / {get(r[d])['precision']:.3f} / {get(r[d])['width']:.2f}   "
                            for d in range(1, depth + 1))
            lines.append(f"{name:<10} {label:<10}{cells}")
    return "\n".join(lines)


def _cost(model, layers, predictors) -> dict:
    """Adapter size and compute relative to the model (per token), and measured predictor time per token."""
    from .m2r2 import M2R2Predictor

    hidden = model.config.hidden_size
    top_k = predictors[next(iter(predictors))].top_k if predictors else 2
    experts = sum(p.numel() for layer in layers for p in layer.experts.parameters())
    expert_share = top_k / max(int(layers[0].experts.num_experts), 1)
    embed = model.get_input_embeddings().weight.numel()
    active = sum(p.numel() for p in model.parameters()) - experts - embed + experts * expert_share
    cost = {"model_active_params": int(active), "model_flops_per_token": int(2 * active)}
    residual = torch.randn(1, hidden, dtype=next(model.parameters()).dtype)
    chosen = torch.arange(top_k).unsqueeze(0)  # [1, K]
    for name, p in predictors.items():
        if name == "oracle":
            continue
        start = time.perf_counter()
        for _ in range(20):
            for l in range(len(layers)):
                p.predict(l, residual, chosen)
        entry = {"seconds_per_token": (time.perf_counter() - start) / 20}
        if isinstance(p, M2R2Predictor):
            flops = sum(p.adapters.flops_per_token(l) for l in range(len(layers)))
            entry |= {"adapter_params": p.adapters.num_parameters, "adapter_flops_per_token": flops,
                      "adapter_flops_share": flops / cost["model_flops_per_token"],
                      "adapter_params_share": p.adapters.num_parameters / int(active)}
        cost[name] = entry
    return cost


def cost_table(cost: dict) -> str:
    """The cost `_cost` measured, as a labelled table: predictor time per token; adapter parameters and
    FLOPs per token, with their share of the model's active ones."""
    head = f"{'cost per token':<16}{'time':>12}{'params (share of model)':>28}{'FLOPs (share of model)':>28}"
    model = f"{_si(cost['model_active_params'])} (active)", _si(cost["model_flops_per_token"])
    lines = [head, "-" * len(head), f"{'model':<16}{'':>12}{model[0]:>28}{model[1]:>28}"]
    for name, entry in cost.items():
        if not isinstance(entry, dict):
            continue
        params = flops = "-"
        if "adapter_params" in entry:
            params = f"{_si(entry['adapter_params'])} ({entry['adapter_params_share']:.1%})"
            flops = f"{_si(entry['adapter_flops_per_token'])} ({entry['adapter_flops_share']:.1%})"
        lines.append(f"{name:<16}{entry['seconds_per_token'] * 1e3:>9.3f} ms{params:>28}{flops:>28}")
    return "\n".join(lines)


def _si(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:g}"


def _plot(results: dict, depth: int, path: str, model: str, tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    depths = list(range(1, depth + 1))
    for name, r in results.items():
        line, = ax.plot(depths, [r[d]["recall"] for d in depths], marker="o", label=f"{name} (top-k)")
        if name != "oracle":
            ax.plot(depths, [r[d]["widened"]["recall"] for d in depths], marker="x", linestyle="--",
                    color=line.get_color(), alpha=0.7,
                    label=f"{name} (widened, width {sum(r[d]['widened']['width'] for d in depths) / depth:.1f})")
    ax.set_xlabel("lookahead depth d (layers ahead)")
    ax.set_ylabel("recall of the experts used")
    ax.set_xticks(depths)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Expert prediction on held-out text — {model}, {tokens} tokens")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
