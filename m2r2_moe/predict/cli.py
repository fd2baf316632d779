"""`m2r2-moe train-adapters` and `m2r2-moe eval-predictor` (also tools/train_accelerator.py)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from ..corpus import resolve_text, token_stream
from ..models import find_moe_layers
from . import PREDICTORS, make_predictor, model_fingerprint
from .collect import chunk_tokens, collect
from .evaluate import evaluate
from .train import train_adapters

logger = logging.getLogger(__name__)


def _load_model(name: str, dtype: str):
    from ..cli import _load

    model, tokenizer = _load(name, getattr(torch, dtype))
    if tokenizer is None:
        raise SystemExit("this command needs a model with a tokenizer ('builtin' or a checkpoint folder)")
    return model, tokenizer


def add_train_parser(sub) -> None:
    p = sub.add_parser("train-adapters", help="train M2R2 accelerator adapters for a model",
                       description="Train accelerated-residual adapters on calibration text (see DESIGN.md).")
    p.add_argument("--model", default="builtin", help="'builtin' or a checkpoint folder")
    p.add_argument("--text", nargs="+", default=None,
                   help="calibration files/folders; 'builtin:train' = the built-in model's training split (default)")
    p.add_argument("--depth", type=int, default=4, help="rates d = 1..depth")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--out", required=True, help="adapters .safetensors file to write")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=262144, help="calibration tokens to use")
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--kl-steps", type=int, default=0, help="Adam steps per (layer, rate) on the routing loss")
    p.add_argument("--route-features", action="store_true",
                   help="adapters also see the source layer's expert choice (multi-hot)")
    p.add_argument("--kl-samples", type=int, default=16384, help="tokens kept for the routing fine-tune")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model, tokenizer = _load_model(args.model, args.dtype)
    files = resolve_text(args.text or ["builtin:train"])
    ids = token_stream(tokenizer, files, args.max_tokens)
    adapter, layers = find_moe_layers(model)
    adapters, report = train_adapters(
        model, adapter, layers, chunk_tokens(ids, args.seq_len, args.batch), depth=args.depth, rank=args.rank,
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
    print(f"trained {len(report['pairs'])} adapters (depth {args.depth}, rank {args.rank}) on {report['tokens']} tokens "
          f"in {report['seconds']:.1f} s → {args.out}")
    print(f"calibration (mean over pairs): normalized MSE {m['nmse']:.3f}, KL {m['kl']:.4f}, "
          f"top-k recall {m['recall_topk']:.3f} (gate on the same pairs {m['gate_recall_topk']:.3f})")
    for d, r in report["by_depth"].items():
        print(f"  depth {d}: top-k recall gate {r['final_gate_recall_topk']:.3f}, closed form "
              f"{r['closed_form_recall_topk']:.3f}, after routing fine-tune {r['final_recall_topk']:.3f}")
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval-predictor", help="recall/precision of predictors per lookahead depth on held-out text")
    p.add_argument("--model", default="builtin")
    p.add_argument("--predictors", default="history,gate,m2r2,oracle")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--adapters", default=None, help="adapters file (default: the shipped ones for the built-in model)")
    p.add_argument("--text", nargs="+", default=None, help="held-out files; default 'builtin:heldout'")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--offset-tokens", type=int, default=0,
                   help="skip this many tokens of the text first (e.g. a validation window of the train split)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--mass", type=float, default=0.9, help="confidence widening: predicted probability mass")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a recall-vs-depth PNG here")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    model, tokenizer = _load_model(args.model, args.dtype)
    names = [n.strip() for n in args.predictors.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PREDICTORS))
    if unknown:
        raise SystemExit(f"unknown predictor(s) {unknown}; choose from {', '.join(PREDICTORS)}")
    adapter, layers = find_moe_layers(model)
    top_k = adapter.top_k(model)
    dummy_trace = torch.zeros(1, len(layers), top_k, dtype=torch.long)  # replaced per sequence
    predictors = {n: make_predictor(n, model, adapter, layers, args.depth, adapters=args.adapters,
                                    trace=dummy_trace if n == "oracle" else None) for n in names if n != "none"}
    ids = token_stream(tokenizer, resolve_text(args.text or ["builtin:heldout"]), args.offset_tokens + args.max_tokens)
    ids = ids[args.offset_tokens :]
    sequences = chunk_tokens(ids, args.seq_len, 1)
    tokens = sum(s.numel() for s in sequences)
    widths = sorted({top_k, top_k + 1, 2 * top_k})
    results = evaluate(predictors, collect(model, layers, sequences), top_k, args.depth, widths, mass=args.mass)
    out = {"model": args.model, "tokens": tokens, "top_k": top_k, "num_layers": len(layers),
           "num_experts": predictors[names[0]].num_experts if names else None, "mass": args.mass,
           "results": {n: {str(d): v for d, v in r.items()} for n, r in results.items()},
           "cost": _cost(model, layers, predictors)}
    print(_table(results, args.depth, widths))
    print(json.dumps(out["cost"], indent=None))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        _plot(results, args.depth, args.plot, args.model, tokens)
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
