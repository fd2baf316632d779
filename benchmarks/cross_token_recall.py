"""Can a layer of token t predict the experts of the *next* token's first layers?

A prefetch needs a lead of about `link ratio` layers. Within a token the predictors look up to D layers
ahead, so the first ceil(ratio) layers of every token can only be prefetched from the previous token. This
measures how predictable that is on the built-in model, on held-out text (teacher forced), as top-k recall
of the experts layer j of token t+1 uses, from source layer l of token t (distance d = L − l + j):

- `m2r2`: an accelerated residual fitted for the pair exactly as `predict/train.py` fits within-token pairs
  (reduced-rank ridge regression of r_j(t+1) − r_l(t) on norm_l(r_l(t)), rank 16, on the train split),
  routed by layer j's router;
- `gate`: layer j's router applied to r_l(t) (no training);
- `previous token`: the experts layer j used for token t;
- `within token`: for comparison, the shipped m2r2 adapters' recall at the same distance d inside a token.

Prints a table and appends it to BENCHMARKS.md.

    python benchmarks/cross_token_recall.py [--train-tokens 131072] [--test-tokens 16384]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import m2r2_moe  # noqa: E402
import m2r2_moe.builtin  # noqa: E402
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.corpus import resolve_text, token_stream  # noqa: E402
from m2r2_moe.loading import load_model  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402
from m2r2_moe.predict.collect import chunk_tokens, collect  # noqa: E402
from m2r2_moe.predict.m2r2 import AcceleratorAdapters  # noqa: E402
from m2r2_moe.predict.train import _recall, _solve, _Stats  # noqa: E402

SEQ = 128


def gather(model, tokenizer, layers, split: str, tokens: int):
    """(residuals [L, B, S, H], chosen [L, B, S, K]) over `tokens` of a corpus split, rows of SEQ tokens."""
    ids = token_stream(tokenizer, resolve_text([split]), tokens)
    res, cho = [], []
    for r, c in collect(model, layers, chunk_tokens(ids, SEQ, 16)):
        res.append(r.view(r.shape[0], -1, SEQ, r.shape[-1]))
        cho.append(c.view(c.shape[0], -1, SEQ, c.shape[-1]))
    return torch.cat(res, 1), torch.cat(cho, 1)


@torch.no_grad()
def pair_recalls(adapter, layers, train, test, l: int, j: int, shift: int, rank: int, within=None) -> dict:
    """Recall of layer j's experts at position +`shift` from layer l (shift 1: the next token)."""
    (rtr, _), (rte, cte) = train, test
    hidden, k = rtr.shape[-1], cte.shape[-1]
    src = lambda r: r[l, :, : SEQ - shift].reshape(-1, hidden)  # noqa: E731
    dst = lambda r: r[j, :, shift:].reshape(-1, r.shape[-1])  # noqa: E731
    stats = _Stats(hidden, hidden, 1)
    stats.add(layers[l].norm(src(rtr)), [dst(rtr) - src(rtr)])
    u, v, b = _solve(stats, 0, rank, 1e-3)
    x, used = src(rte), dst(cte)
    route = lambda r: adapter.route(layers[j], layers[j].norm(r))[0]  # noqa: E731
    out = {"m2r2": _recall(route(x + layers[l].norm(x) @ u @ v + b), used, k), "gate": _recall(route(x), used, k)}
    prev = cte[j, :, : SEQ - shift].reshape(-1, k)
    out["previous token"] = (prev.unsqueeze(-1) == used.unsqueeze(-2)).any(-2).float().mean().item()
    return out


@torch.no_grad()
def within_token(adapter, layers, shipped: AcceleratorAdapters, test, d: int) -> float:
    """The shipped adapters' mean top-k recall at distance d inside a token."""
    rte, cte = test
    hidden, k, recalls = rte.shape[-1], cte.shape[-1], []
    for l in range(len(layers) - d):
        x = rte[l].reshape(-1, hidden)
        r_hat = x + shipped.delta(l, d, layers[l].norm(x), None)
        recalls.append(_recall(adapter.route(layers[l + d], layers[l + d].norm(r_hat))[0],
                               cte[l + d].reshape(-1, k), k))
    return sum(recalls) / len(recalls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-tokens", type=int, default=131072)
    parser.add_argument("--test-tokens", type=int, default=16384)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    model, tokenizer = load_model("builtin", torch.float32)
    adapter, layers = find_moe_layers(model)
    shipped = AcceleratorAdapters.load(m2r2_moe.builtin.builtin_adapters_path())
    train = gather(model, tokenizer, layers, "builtin:train", args.train_tokens)
    test = gather(model, tokenizer, layers, "builtin:heldout", args.test_tokens)
    num_layers, rows = len(layers), []
    for d in range(1, args.depth + 1):
        inside = within_token(adapter, layers, shipped, test, d) if d < num_layers else float("nan")
        for j in range(min(d, num_layers)):  # the next token's layer j, from layer l = L - d + j of this token
            l = num_layers - d + j
            r = pair_recalls(adapter, layers, train, test, l, j, 1, args.rank)
            rows.append([d, f"{l} → {j} (next token)", f"{r['m2r2']:.3f}", f"{r['gate']:.3f}",
                         f"{r['previous token']:.3f}", f"{inside:.3f}"])
    k = test[1].shape[-1]
    table = markdown_table(["distance d", "source → target", "m2r2 (fitted)", "gate", "previous token",
                            "within-token m2r2 at d"], rows)
    experts = int(layers[0].experts.num_experts)
    extra = (f"\nTop-{k} recall of {experts} experts (chance: {k / experts:.3f}); "
             f"fitted on {args.train_tokens} train-split tokens, measured on {args.test_tokens} held-out tokens, "
             f"rank {args.rank}.\n")
    publish("Cross-token expert prediction (benchmarks/cross_token_recall.py)", table, extra, record=not args.no_record)


if __name__ == "__main__":
    main()
