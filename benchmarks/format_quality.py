"""What the compressed expert formats cost in quality, against the lossless model, on held-out text.

For each built-in model and each format: held-out loss (nats/token, teacher-forced windows of the model's
held-out corpus split) and its change relative to the lossless model, the mean KL divergence of the
next-token distributions KL(lossless || compressed) over the same positions, and greedy-token agreement
over generated continuations (share of positions where the compressed model picks the lossless model's
token, and the mean length of the identical prefix), plus the bytes one expert moves (vs the model dtype).

The compressed model is evaluated as the plain model with its expert weights replaced by their expansions:
exactly what an offloaded model with that format computes (tests/test_compressed.py checks it bit for bit
for every family; this script checks it again on one window per format and refuses to report otherwise).

    PYTHONPATH=. python benchmarks/format_quality.py [--models tiny-mixtral,tiny-qwen3-moe] [--windows 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import m2r2_moe  # noqa: E402
from _report import markdown_table, publish  # noqa: E402
from m2r2_moe.config import parse_expert_format  # noqa: E402
from m2r2_moe.corpus import resolve_text, token_stream  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402
from m2r2_moe.runtime.compressed import make_compressed_store  # noqa: E402

FORMATS = "int8,int8-sym,int8-g128,int8-g32,int4,int4-sym,int4-g32,int4-g128,int4-g32-sym,int4-g128-sym"


def expanded_model(model, spec: str):
    """(a copy of `model` whose experts are their `spec` expansions, bytes of one compressed expert)."""
    _, layers = find_moe_layers(model)
    store = make_compressed_store(layers, parse_expert_format(spec), pin_memory=False)
    out = copy.deepcopy(model)
    _, copies = find_moe_layers(out)
    for i, (layer, twin) in enumerate(zip(layers, copies)):
        store.fill_layer(i, {n: getattr(layer.experts, n).data for n in layer.param_names})
        for name, value in store.compressed_layer(i).items():
            getattr(twin.experts, name).data = value
    return out, store.link_bytes[0]


def same_as_offloaded(model, twin, spec: str, window: torch.Tensor) -> bool:
    """Whether the offloaded model with `spec` (half of the experts cached) computes `twin`'s logits."""
    _, layers = find_moe_layers(model)
    total = sum(int(layer.experts.num_experts) for layer in layers)
    with torch.no_grad():
        want = twin(window).logits
        m2r2_moe.offload(model, device="cpu", cache_experts=total // 2, expert_format=spec)
        try:
            got = model(window).logits
        finally:
            m2r2_moe.remove_offload(model)
    return torch.equal(got, want)


@torch.no_grad()
def teacher_forced(model, windows: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Next-token log-probabilities [B, T-1, V] (float32) per batch of windows."""
    return [F.log_softmax(model(windows[i : i + batch]).logits[:, :-1].float(), dim=-1)
            for i in range(0, len(windows), batch)]


def loss_and_kl(reference: list[torch.Tensor], logps: list[torch.Tensor], windows: torch.Tensor,
                batch: int) -> tuple[float, float]:
    """(mean nats/token of the true next tokens, mean KL(reference || this) per position)."""
    nll, kl, count = 0.0, 0.0, 0
    for i, (ref, lp) in enumerate(zip(reference, logps)):
        targets = windows[i * batch : (i + 1) * batch, 1:]  # [B, T-1]
        nll -= lp.gather(-1, targets.unsqueeze(-1)).sum().item()
        kl += (ref.exp() * (ref - lp)).sum().item()
        count += targets.numel()
    return nll / count, kl / count


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, tokens: int) -> torch.Tensor:
    """[P, tokens] greedy continuations of each prompt."""
    out = [model.generate(input_ids=p.unsqueeze(0), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          pad_token_id=0)[0, prompts.shape[1]:] for p in prompts]
    return torch.stack(out)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(share of positions with the reference's token, mean length of the identical prefix)."""
    same = reference == other  # [P, N]
    prefix = [int(row.long().cumprod(0).sum()) for row in same]
    return same.float().mean().item(), sum(prefix) / len(prefix)


def evaluate(name: str, args) -> tuple[list[list], str]:
    torch.manual_seed(0)
    model, tokenizer = m2r2_moe.load_builtin(dtype=getattr(torch, args.dtype), name=name)
    need = args.windows * args.seq_len + args.prompts * 64
    stream = token_stream(tokenizer, resolve_text([f"builtin:{name}:heldout"]), max_tokens=need)
    windows = stream[: args.windows * args.seq_len].view(args.windows, args.seq_len)  # [W, T]
    prompts = stream[-args.prompts * 64 :].view(args.prompts, 64)[:, : args.prompt_tokens]  # [P, p]
    reference = teacher_forced(model, windows, args.batch)
    base_loss, _ = loss_and_kl(reference, reference, windows, args.batch)
    base_tokens = greedy(model, prompts, args.new_tokens)
    _, layers = find_moe_layers(model)
    full = sum(getattr(layers[0].experts, n)[0].numel() for n in layers[0].param_names) * 2  # bf16 bytes
    rows = [[name, "model (bf16, lossless)", "1.000", f"{base_loss:.4f}", "0.00%", "0", "100.0%", f"{args.new_tokens:.1f}"]]
    for spec in args.formats:
        start = time.perf_counter()
        twin, row_bytes = expanded_model(model, spec)
        if not same_as_offloaded(model, twin, spec, windows[:2, :64]):
            raise SystemExit(f"{name} {spec}: the offloaded model does not compute the expanded model's logits")
        loss, kl = loss_and_kl(reference, teacher_forced(twin, windows, args.batch), windows, args.batch)
        share, prefix = agreement(base_tokens, greedy(twin, prompts, args.new_tokens))
        rows.append([name, parse_expert_format(spec).name, f"{row_bytes / full:.3f}", f"{loss:.4f}",
                     f"{(loss - base_loss) / base_loss:+.2%}", f"{kl:.5f}", f"{share:.1%}", f"{prefix:.1f}"])
        print(" | ".join(rows[-1]), f"({time.perf_counter() - start:.0f} s)", flush=True)
    note = (f"{name}: {args.windows} held-out windows x {args.seq_len} tokens (builtin:{name}:heldout), "
            f"{args.prompts} prompts of {args.prompt_tokens} tokens x {args.new_tokens} greedy tokens, {args.dtype}")
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mixtral,tiny-qwen3-moe")
    parser.add_argument("--formats", default=FORMATS, help="comma-separated expert_format values")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    args.formats = args.formats.split(",")
    torch.set_num_threads(args.threads)
    rows, notes = [], []
    for name in args.models.split(","):
        r, n = evaluate(name, args)
        rows += r
        notes.append(n)
    headers = ["model", "expert format", "bytes/expert vs bf16", "held-out nats/token", "loss change",
               "mean KL (nats)", "greedy agreement", "identical prefix (tokens)"]
    extra = ("\n" + "\n".join(f"- {n}" for n in notes) + "\n- the compressed rows are the offloaded model's own "
             "(checked bit for bit against an offloaded run per format); bytes include scales, zero points, "
             "raw tensors and alignment")
    publish("Compressed experts: quality against the lossless model", markdown_table(headers, rows), extra,
            record=not args.no_record)


if __name__ == "__main__":
    main()
