"""Can the next token's first MoE layer be predicted by guessing the next token itself?

The first layers of a token are the ones the in-token lookahead cannot reach; the predictor's heads trained
across the token boundary (`m2r2` adapters that wrap) reach them from the last layers of the previous token, with
low recall. A first MoE layer routes mostly by token identity, so a different route is possible: read the
residual entering the last MoE layer (or the one before) through the model's own final norm and output head (a
"logit lens"), take the likeliest token, and route its input embedding with layer 0's norm and router. This
measures, for the next token's layer-0 experts (top-k recall, the generated part of greedy continuations, where
the next token is the model's own argmax; and held-out text, teacher forced):

- `heads`: the m2r2 predictor's prediction for distance 1 from the last MoE layer (its wrap heads; blank if the
  adapters do not wrap);
- `lens @ l`: the logit-lens guess from the residual entering MoE layer l (its top-1 agreement with the next
  token is given too), its embedding routed by layer 0;
- `true next token`: the next token's embedding routed by layer 0, the ceiling of any guess of the token (layer 0's
  attention output, which the router also reads, is left out);
- `previous token`: the experts layer 0 used for the current token;
- the lens's cost at batch 1 (final norm, output head, argmax, embedding, layer-0 norm and router; warm, median of
  200 calls) against the un-offloaded model's decode time per token.

Prints a table and appends it to BENCHMARKS.md.

    python benchmarks/next_token_lens.py [--model builtin] [--adapters FILE] [--text FILES] [--prompts 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.cli_common import text_files  # noqa: E402
from m2r2_moe.corpus import token_stream  # noqa: E402
from m2r2_moe.loading import load_model  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402
from m2r2_moe.predict import make_predictor  # noqa: E402
from m2r2_moe.predict.collect import collect  # noqa: E402
from m2r2_moe.profile.cli import prompt_text  # noqa: E402


def recall(predicted: torch.Tensor, used: torch.Tensor) -> float:
    """Share of the used experts `[N, K]` among the predicted ones `[N, K']`."""
    return (predicted.unsqueeze(-1) == used.unsqueeze(-2)).any(-2).float().mean().item()


class Lens:
    """The model's final norm and output head on a residual, and layer 0's routing of a token's embedding."""

    def __init__(self, model, adapter, layers):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.final_norm = getattr(decoder, "norm", None)
        if self.final_norm is None:
            raise SystemExit("this model's decoder has no final `norm`: the lens needs one")
        self.head, self.embed = model.get_output_embeddings(), model.get_input_embeddings()
        self.adapter, self.first = adapter, layers[0]

    def guess(self, residual: torch.Tensor) -> torch.Tensor:
        """`[N, H]` → the likeliest next token `[N]`."""
        return self.head(self.final_norm(residual)).argmax(-1)

    def route(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[N]` → layer 0's expert probabilities `[N, E]` for those tokens' embeddings."""
        x = self.embed(tokens)
        return self.adapter.route(self.first, self.first.norm(x) if self.first.norm is not None else x)[0]


@torch.no_grad()
def sequences(model, ids: torch.Tensor, count: int, prompt_tokens: int, new_tokens: int, greedy: bool):
    """(token rows, seconds per generated token or None): greedy continuations of `count` prompts cut from `ids`,
    or (teacher forced) the text itself, `prompt_tokens + new_tokens` long."""
    step, rows, seconds = len(ids) // count, [], []
    for i in range(count):
        prompt = ids[i * step : i * step + prompt_tokens].unsqueeze(0)
        if not greedy:
            rows.append(ids[i * step : i * step + prompt_tokens + new_tokens])
            continue
        start = time.perf_counter()
        out = model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        seconds.append((time.perf_counter() - start) / new_tokens)
        rows.append(out[0])
    return rows, (statistics.median(seconds) if seconds else None)


@torch.no_grad()
def measure(model, adapter, layers, lens: Lens, predictor, rows, prompt_tokens: int) -> dict:
    """The recalls over the generated (or held-out) part of `rows`: each position t predicts token t+1's layer 0."""
    num_layers = len(layers)
    resid, used, current, nxt = [], [], [], []
    for row in rows:
        r, c = next(iter(collect(model, layers, [row.unsqueeze(0)])))
        span = slice(prompt_tokens - 1, row.shape[0] - 1)  # positions whose next token is in the measured part
        resid.append(r[:, span])
        current.append(c[0, span])
        used.append(c[0, prompt_tokens:])
        nxt.append(row[prompt_tokens:])
    resid, used, current, nxt = torch.cat(resid, 1), torch.cat(used), torch.cat(current), torch.cat(nxt)
    k = used.shape[-1]
    top = lambda p: p.topk(k, -1).indices  # noqa: E731
    out = {"tokens": int(nxt.shape[0]), "true": recall(top(lens.route(nxt)), used), "previous": recall(current, used)}
    for source in (num_layers - 1, num_layers - 2):
        guess = lens.guess(resid[source])
        out[f"lens{source}"] = (recall(top(lens.route(guess)), used), (guess == nxt).float().mean().item())
    out["heads"] = None
    if predictor is not None and predictor.wraps:
        depths, scores = predictor.predict_stacked(num_layers - 1, resid[num_layers - 1], None)
        if 1 in depths:
            out["heads"] = recall(top(scores[depths.index(1)]), used)
    return out


@torch.no_grad()
def lens_seconds(lens: Lens, hidden: int, dtype: torch.dtype, calls: int = 200) -> float:
    """Median seconds of one batch-1 lens step (warm)."""
    x, times = torch.randn(1, hidden, dtype=dtype), []
    for _ in range(calls):
        start = time.perf_counter()
        lens.route(lens.guess(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> tuple[str, str]:
    model, tokenizer = load_model(args.model, torch.float32)
    if tokenizer is None:
        raise SystemExit("the lens needs a model with a tokenizer (text to continue)")
    adapter, layers = find_moe_layers(model)
    lens = Lens(model, adapter, layers)
    try:
        predictor = make_predictor("m2r2", model, adapter, layers, 1, adapters=args.adapters)
    except Exception as e:  # noqa: BLE001 — no adapters for this model: the heads column stays blank
        print(f"no m2r2 heads: {e}")
        predictor = None
    ids = token_stream(tokenizer, text_files(prompt_text(args.model, args.text), "builtin:heldout"),
                       max_tokens=args.prompts * (args.prompt_tokens + args.new_tokens) * 4)
    rows, cells, per_token = [], [], None
    for greedy in (True, False):
        seqs, seconds = sequences(model, ids, args.prompts, args.prompt_tokens, args.new_tokens, greedy)
        per_token = seconds if greedy else per_token
        r = measure(model, adapter, layers, lens, predictor, seqs, args.prompt_tokens)
        last, before = len(layers) - 1, len(layers) - 2
        rows.append(["greedy continuation" if greedy else "held-out text", r["tokens"],
                     "" if r["heads"] is None else f"{r['heads']:.3f}",
                     f"{r[f'lens{last}'][0]:.3f} ({r[f'lens{last}'][1]:.2f})",
                     f"{r[f'lens{before}'][0]:.3f} ({r[f'lens{before}'][1]:.2f})",
                     f"{r['true']:.3f}", f"{r['previous']:.3f}"])
    cost = lens_seconds(lens, model.config.hidden_size, next(model.parameters()).dtype)
    headers = ["text", "positions", "heads (last layer, d=1)", f"lens @ {len(layers) - 1} (top-1 agreement)",
               f"lens @ {len(layers) - 2} (top-1 agreement)", "true next token", "previous token"]
    table = markdown_table(headers, rows)
    k, experts = adapter.top_k(model), int(layers[0].experts.num_experts)
    extra = (f"\nModel {args.model}: {len(layers)} MoE layers, top-{k} of {experts} experts (chance {k / experts:.3f}), "
             f"vocabulary {model.config.vocab_size}, hidden {model.config.hidden_size}; {args.prompts} prompt(s) of "
             f"{args.prompt_tokens} tokens, {args.new_tokens} measured positions each. Top-{k} recall of the next "
             f"token's layer-0 experts. The lens at batch 1: {cost * 1e6:.0f} µs per token (warm), "
             f"{cost / per_token * 100:.1f} % of the un-offloaded model's decode time per token "
             f"({per_token * 1e3:.2f} ms here).\n")
    return table, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--adapters", default=None, help="m2r2 adapters (default: a built-in model's own)")
    parser.add_argument("--text", default=None, help="prompt text files (default: the model's held-out split)")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table, extra = run(args)
    publish("The next token's first MoE layer from a logit lens (benchmarks/next_token_lens.py)", table, extra,
            record=not args.no_record)


if __name__ == "__main__":
    main()
