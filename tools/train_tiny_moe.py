"""Train the built-in tiny Mixtral-architecture MoE model on the Python standard library, on CPU.

The result is a normal Hugging Face checkpoint (bf16 safetensors + tokenizer files) with a model
card (MODEL_CARD.md + card.json + figures), written by default to m2r2_moe/builtin/tiny-mixtral/.

    python tools/train_tiny_moe.py                 # full run (~30 min on one busy CPU thread)
    python tools/train_tiny_moe.py --dry-run       # a few steps into /tmp, to check the pipeline

Corpus: every *.py of the running interpreter's stdlib, except test directories, site-packages and
machine-specific files. Held-out split by file: a file is held out when the first hex digit of
sha256(relative path) is 0 (1/16 of files, independent of content, stable across machines).

Router balancing loss: the Switch-Transformer loss is computed PER LAYER and averaged over layers.
transformers' `load_balancing_loss_func` concatenates all layers first, which balances expert index
e summed over layers and lets single layers collapse (transformers #28255, #31464).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from m2r2_moe.corpus import EXCLUDED_DIRS, is_heldout, stdlib_files  # noqa: E402  (one split for everything)
DEFAULT_OUT = REPO / "m2r2_moe" / "builtin" / "tiny-mixtral"
EOS = "<|endoftext|>"
# Generated English documentation (pydoc topics), not code: the card also reports held-out loss without it.
PROSE_FILES = {"pydoc_data/topics.py"}


# ----------------------------------------------------------------------------------------------
# corpus and split


def read_corpus(root: Path, rels: list[str]) -> tuple[dict[str, str], str]:
    """Texts by relative path, and sha256 over (path, bytes) of the whole corpus in path order."""
    texts, h = {}, hashlib.sha256()
    for rel in rels:
        raw = (root / rel).read_bytes()
        h.update(rel.encode() + b"\0" + raw + b"\0")
        texts[rel] = raw.decode("utf-8", errors="replace")
    return texts, h.hexdigest()


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(train_texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the train split only, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=2048,
    )


def encode_split(tokenizer, texts: list[str]) -> np.ndarray:
    """One token stream: each file's tokens followed by EOS."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    out = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eos)
    return np.asarray(out, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# model and losses


def build_model(args, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.max_positions,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return MixtralForCausalLM(config)


class RouterTap:
    """Forward hooks that keep each layer's router logits of the current forward pass."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.handles = [
            layer.mlp.gate.register_forward_hook(lambda _m, _i, out: self.logits.append(out[0]))
            for layer in model.model.layers
        ]

    def pop(self) -> list[torch.Tensor]:
        out, self.logits = self.logits, []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def per_layer_balance_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch balancing loss E * sum_e f_e * P_e for each layer separately, averaged over layers.

    router_logits: L tensors [N, E]. f_e: share of the N*k routing choices that went to e (no grad);
    P_e: mean router probability of e. Minimum 1.0 (uniform), maximum E (collapse).
    """
    losses = []
    for logits in router_logits:  # [N, E]
        probs = logits.float().softmax(-1)  # [N, E]
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        f = F.one_hot(chosen, num_experts).float().mean(dim=(0, 1))  # [E]
        losses.append(num_experts * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats. logits [B, T, V], ids [B, T]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# training


def sample_batch(stream: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int) -> torch.Tensor:
    starts = rng.integers(0, len(stream) - seq_len, size=batch)
    return torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int64))


def chunk_stream(stream: np.ndarray, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, seq_len] chunks of a stream (the tail is dropped)."""
    n = len(stream) // seq_len
    if limit is not None:
        n = min(n, limit)
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).astype(np.int64))


@torch.no_grad()
def eval_loss(model, chunks: torch.Tensor, batch: int) -> float:
    """Mean next-token loss (nats) over all predicted positions of the chunks."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch):
        ids = chunks[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits
        n = ids[:, 1:].numel()
        total += lm_loss(logits, ids).item() * n
        count += n
    model.train()
    return total / count


def train(model, train_stream, heldout_probe, args) -> list[dict]:
    """AdamW with warmup + cosine decay; returns the loss log (one dict per logged step)."""
    rng = np.random.default_rng(args.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    tap = RouterTap(model)
    model.train()
    log, t0 = [], time.time()
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True, mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        ids = sample_batch(train_stream, rng, args.batch, args.seq_len)
        logits = model(input_ids=ids, use_cache=False).logits
        loss_lm = lm_loss(logits, ids)
        loss_aux = per_layer_balance_loss(tap.pop(), args.top_k)
        loss = loss_lm + args.aux_coef * loss_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        entry = {"step": step + 1, "train": loss_lm.item(), "aux": loss_aux.item(), "time": time.time() - t0}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            tap.remove()
            entry["heldout"] = eval_loss(model, heldout_probe, args.batch)
            tap = RouterTap(model)
        log.append(entry)
        bar.set_postfix(lm=f"{entry['train']:.3f}", aux=f"{entry['aux']:.3f}", refresh=False)
    tap.remove()
    return log


# ----------------------------------------------------------------------------------------------
# analysis for the card (on the saved bf16 checkpoint, loaded as float32)


@torch.no_grad()
def routing_on(model, chunks: torch.Tensor, batch: int) -> tuple[float, np.ndarray]:
    """Held-out loss (nats/token) and top-k expert choices [n_chunks, T, L, k] over the chunks."""
    model.eval()
    tap = RouterTap(model)
    total, count, choices = 0.0, 0, []
    k = model.config.num_experts_per_tok
    for i in range(0, len(chunks), batch):
        ids = chunks[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits
        n = ids[:, 1:].numel()
        total += lm_loss(logits, ids).item() * n
        count += n
        per_layer = [lg.float().topk(k, dim=-1).indices.view(*ids.shape, k) for lg in tap.pop()]  # L x [B, T, k]
        choices.append(torch.stack(per_layer, dim=2).numpy())  # [B, T, L, k]
    tap.remove()
    return total / count, np.concatenate(choices)


def expert_usage(choices: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] share of routing choices per expert and layer (rows sum to 1)."""
    n_layers = choices.shape[2]
    flat = choices.transpose(2, 0, 1, 3).reshape(n_layers, -1)  # [L, N*k]
    return np.stack([np.bincount(row, minlength=num_experts) / row.size for row in flat])


def mutual_information(a: np.ndarray, b: np.ndarray, num_experts: int) -> float:
    """MI in bits between two aligned integer label arrays, from their joint histogram."""
    joint = np.zeros((num_experts, num_experts))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pa @ pb)[nz])).sum())


def routing_mi(choices: np.ndarray, num_experts: int) -> dict[str, list[float]]:
    """Per-layer MI of the top-1 expert: consecutive tokens (same layer), consecutive layers (same token)."""
    top1 = choices[..., 0]  # [n, T, L]
    n_layers = top1.shape[2]
    tokens = [mutual_information(top1[:, :-1, l].ravel(), top1[:, 1:, l].ravel(), num_experts) for l in range(n_layers)]
    layers = [mutual_information(top1[:, :, l].ravel(), top1[:, :, l + 1].ravel(), num_experts) for l in range(n_layers - 1)]
    return {"consecutive_tokens_bits": tokens, "next_layer_bits": layers}


def unigram_nats(train_stream: np.ndarray, heldout_stream: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under add-one-smoothed train unigram frequencies."""
    counts = np.bincount(train_stream, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout_stream].mean())


def byte_unigram_bits(train_texts: list[str], heldout_texts: list[str]) -> float:
    """Bits/byte of held-out bytes under add-one-smoothed train byte frequencies."""
    counts = np.ones(256)
    for t in train_texts:
        counts += np.bincount(np.frombuffer(t.encode(), dtype=np.uint8), minlength=256)
    logp = np.log2(counts / counts.sum())
    held = np.concatenate([np.frombuffer(t.encode(), dtype=np.uint8) for t in heldout_texts])
    return float(-logp[held].mean())


def generate_samples(model, tokenizer, seed: int) -> list[dict]:
    prompts = ["import os\n\n\ndef ", "class Queue:\n    def __init__(self", '"""Utilities for ']
    out = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        torch.manual_seed(seed + i)
        gen = model.generate(
            ids, max_new_tokens=80, do_sample=True, temperature=0.8, top_k=40,
            pad_token_id=tokenizer.eos_token_id,
        )
        out.append({"prompt": prompt, "text": tokenizer.decode(gen[0], skip_special_tokens=True)})
    return out


# ----------------------------------------------------------------------------------------------
# figures and card


def plot_loss(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([e["step"] for e in log])
    train = np.array([e["train"] for e in log])
    ema, smooth = train[0], []
    for v in train:
        ema = 0.95 * ema + 0.05 * v
        smooth.append(ema)
    held = [(e["step"], e["heldout"]) for e in log if "heldout" in e]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(steps, train, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(steps, smooth, color="tab:blue", label="train (EMA 0.95)")
    if held:
        ax.plot(*zip(*held), "o-", color="tab:orange", ms=3, label="held-out probe")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (nats/token)")
    ax.set_ylim(top=min(float(train.max()), 9.0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_routing(usage: np.ndarray, mi: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    im = ax0.imshow(usage * 100, cmap="viridis", aspect="auto")
    ax0.set_xlabel("expert")
    ax0.set_ylabel("layer")
    ax0.set_title("held-out routing share (%)")
    fig.colorbar(im, ax=ax0)
    n_layers = usage.shape[0]
    x = np.arange(n_layers)
    ax1.bar(x - 0.2, mi["consecutive_tokens_bits"], width=0.4, label="token t vs t+1 (same layer)")
    ax1.bar(x[:-1] + 0.2, mi["next_layer_bits"], width=0.4, label="layer l vs l+1 (same token)")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("MI of top-1 expert (bits)")
    ax1.set_title("routing mutual information")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def usage_table(usage: np.ndarray) -> str:
    head = "| layer | " + " | ".join(f"e{e}" for e in range(usage.shape[1])) + " | max |\n"
    head += "|---" * (usage.shape[1] + 2) + "|\n"
    rows = [
        f"| {l} | " + " | ".join(f"{100 * u:.1f}" for u in row) + f" | {100 * row.max():.1f} |"
        for l, row in enumerate(usage)
    ]
    return head + "\n".join(rows)


def write_card(card: dict, out: Path) -> None:
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    m, c, ev = card["model"], card["corpus"], card["eval"]
    tr = card["training"]
    samples = "\n\n".join(f"Prompt `{s['prompt']!r}`:\n\n```python\n{s['text']}\n```" for s in card["samples"])
    mi = card["routing"]["mutual_information"]
    code = ev["heldout_code"]
    prose_share = 1 - code["bytes"] / c["heldout"]["bytes"]
    prose_note = (
        f"By the hash rule, {', '.join(f'`{f}`' for f in code['excluded'])} (generated English documentation "
        f"inside a Python string) fell into the held-out split: {100 * prose_share:.0f}% of its bytes, and text "
        "unlike anything in the train split. The code-only rows leave it out."
        if code["excluded"] else ""
    )
    mi_rows = "\n".join(
        f"| {l} | {t:.3f} | " + (f"{mi['next_layer_bits'][l]:.3f}" if l < len(mi["next_layer_bits"]) else "–") + " |"
        for l, t in enumerate(mi["consecutive_tokens_bits"])
    )
    text = f"""# tiny-mixtral: the built-in reference MoE model of m2r2_moe

A `MixtralForCausalLM` trained from scratch on CPU on the Python standard library's source code, so that
m2r2_moe has a model with *learned* (input-dependent, per-layer balanced) routing to demo, profile and
benchmark expert prediction on. It writes plausible-looking Python, nothing more.

## Architecture

{m['layers']} layers, {m['experts']} experts per layer, top-{m['top_k']} routing, hidden {m['hidden']},
expert intermediate {m['intermediate']}, {m['heads']} attention heads / {m['kv_heads']} KV heads,
vocabulary {m['vocab']} (byte-level BPE trained with `tokenizers` on the train split), trained context
{tr['seq_len']} tokens. {m['params']:,} parameters ({m['active_params_per_token']:,} active per token).
Weights: bf16 safetensors, {card['files']['model.safetensors'] / 1e6:.2f} MB; whole folder
{card['files']['total'] / 1e6:.2f} MB.

## Corpus and split

Every `*.py` under `{c['stdlib']}` (Python {c['python']}), excluding directories named
{', '.join(sorted(EXCLUDED_DIRS))}, `config-*`, and `_sysconfigdata*` files. A file is held out when the first hex
digit of sha256(relative path) is `0`. sha256 of the corpus (path + bytes, in path order): `{c['sha256']}`.
The file lists are in `card.json` (`corpus.files`).

| split | files | bytes | tokens | bytes/token |
|---|---|---|---|---|
| train | {c['train']['files']} | {c['train']['bytes']:,} | {c['train']['tokens']:,} | {c['train']['bytes'] / c['train']['tokens']:.2f} |
| held-out | {c['heldout']['files']} | {c['heldout']['bytes']:,} | {c['heldout']['tokens']:,} | {c['heldout']['bytes'] / c['heldout']['tokens']:.2f} |

## Training

{tr['steps']} steps of AdamW (lr {tr['lr']}, warmup {tr['warmup']}, cosine to 10%, weight decay
{tr['weight_decay']}), batch {tr['batch']} x {tr['seq_len']} tokens ({tr['tokens_seen']:,} tokens,
{tr['tokens_seen'] / c['train']['tokens']:.2f} epochs), seed {tr['seed']}, one CPU thread. Loss = LM
cross-entropy + {tr['aux_coef']} x router balancing loss, computed **per layer** and averaged (not
transformers' `load_balancing_loss_func`, which balances the concatenation of all layers). Training
took {tr['train_wall_s'] / 60:.1f} min; the whole script {card['wall_s'] / 60:.1f} min.

![loss curve](loss_curve.png)

## Results (held-out split, on the saved bf16 weights loaded as float32)

Evaluated on {ev['chunks']} non-overlapping {tr['seq_len']}-token chunks of the held-out stream
({ev['tokens']:,} predicted tokens). Bits/byte = bits/token x held-out tokens/bytes.

| | nats/token | bits/token | bits/byte |
|---|---|---|---|
| train (last {tr['train_loss_window']} steps, mean) | {ev['train_nats']:.3f} | {ev['train_nats'] / math.log(2):.3f} | {ev['train_bpb']:.3f} |
| **held-out** | **{ev['heldout_nats']:.3f}** | **{ev['heldout_bits_per_token']:.3f}** | **{ev['heldout_bpb']:.3f}** |
| token unigram baseline (held-out) | {ev['unigram_nats']:.3f} | {ev['unigram_nats'] / math.log(2):.3f} | {ev['unigram_bpb']:.3f} |
| byte unigram baseline (held-out) | | | {ev['byte_unigram_bpb']:.3f} |
| held-out code only: without {', '.join(code['excluded']) or '(nothing)'} | {code['nats']:.3f} | {code['nats'] / math.log(2):.3f} | {code['bpb']:.3f} |
| token unigram baseline (held-out code only) | | | {code['unigram_bpb']:.3f} |

{prose_note}

## Routing

Share of held-out routing choices (token x top-{m['top_k']} slot) per expert, in %. Uniform is
{100 / m['experts']:.1f}%. Max share over layers: {100 * card['routing']['max_share']:.1f}%; min share:
{100 * card['routing']['min_share']:.2f}%.

{usage_table(np.asarray(card['routing']['usage']))}

Mutual information (bits) of the top-1 expert between consecutive tokens at the same layer, and between
a layer and the next one for the same token (upper bound log2({m['experts']}) = {math.log2(m['experts']):.0f}):

| layer | token t vs t+1 | layer l vs l+1 |
|---|---|---|
{mi_rows}

![routing](routing.png)

## Samples (temperature 0.8, top-k 40)

{samples}

## Reproduce

```
{card['command']}
```

Deterministic for a given Python stdlib (check the corpus sha256), torch version and thread count
(torch {card['versions']['torch']}, transformers {card['versions']['transformers']}, tokenizers
{card['versions']['tokenizers']}). Another Python version has a different stdlib and gives a
different, similar model.
"""
    (out / "MODEL_CARD.md").write_text(text)


# ----------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--aux-coef", type=float, default=0.02)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--probe-chunks", type=int, default=12, help="held-out chunks for the curve")
    p.add_argument("--eval-chunks", type=int, default=None, help="held-out chunks for the card (default all)")
    p.add_argument("--check-chunks", type=int, default=6, help="held-out chunks stored in card.json for tests")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files (debugging)")
    p.add_argument("--dry-run", action="store_true", help="a few steps on a few files into /tmp")
    p.add_argument("--analyze-only", action="store_true", help="redo the card from the checkpoint in --out")
    args = p.parse_args(argv)
    if args.dry_run:
        args.out = Path("/tmp/tiny-mixtral-dry") if args.out == DEFAULT_OUT else args.out
        args.steps, args.eval_every, args.warmup = 6, 3, 2
        args.max_files = args.max_files or 60
        args.eval_chunks, args.probe_chunks = 8, 4
    return args


def folder_sizes(out: Path, skip: set[str]) -> dict:
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name not in skip}
    sizes["total"] = sum(sizes.values())
    return sizes


def load_log(log_path: Path, card_path: Path) -> dict:
    """The training log: from train_log.json right after training, else from a finished card.json."""
    if log_path.exists():
        return json.loads(log_path.read_text())
    card = json.loads(card_path.read_text())
    return {"log": card["log"], "train_wall_s": card["training"]["train_wall_s"], "wall_s": card["wall_s"],
            "command": card["command"]}


def heldout_code_only(model, tokenizer, train_stream, held_files, texts, args) -> dict:
    """Held-out loss and unigram baseline on the held-out files minus PROSE_FILES."""
    files = [r for r in held_files if r not in PROSE_FILES]
    stream = encode_split(tokenizer, [texts[r] for r in files])
    n_bytes = sum(len(texts[r].encode()) for r in files)
    nats, _ = routing_on(model, chunk_stream(stream, args.seq_len, args.eval_chunks), args.batch)
    uni = unigram_nats(train_stream, stream, len(tokenizer))
    per_byte = len(stream) / n_bytes / math.log(2)
    return {"excluded": sorted(PROSE_FILES & set(held_files)), "files": len(files), "bytes": n_bytes,
            "tokens": int(len(stream)), "nats": nats, "bpb": nats * per_byte, "unigram_bpb": uni * per_byte}


def check_sequences(model, chunks: torch.Tensor, n: int) -> dict:
    """n held-out chunks spread over the split, with their loss: the tests recompute it."""
    idx = np.linspace(0, len(chunks) - 1, n).round().astype(int)
    picked = chunks[idx]
    losses = [eval_loss(model, picked[i : i + 1], 1) for i in range(n)]
    return {"chunk_index": idx.tolist(), "input_ids": picked.tolist(), "nats": losses, "mean_nats": float(np.mean(losses))}


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM

    root, rels = stdlib_files()
    rels = rels[: args.max_files] if args.max_files else rels
    texts, corpus_sha = read_corpus(root, rels)
    train_files = [r for r in rels if not is_heldout(r)]
    held_files = [r for r in rels if is_heldout(r)]
    train_texts = [texts[r] for r in train_files]
    held_texts = [texts[r] for r in held_files]
    print(f"corpus: {len(train_files)} train / {len(held_files)} held-out files, sha256 {corpus_sha[:16]}…", flush=True)

    if args.analyze_only:  # the tokenizer the checkpoint was trained with
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.out)
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab)
    train_stream = encode_split(tokenizer, train_texts)
    held_stream = encode_split(tokenizer, held_texts)
    print(f"tokens: {len(train_stream):,} train / {len(held_stream):,} held-out ({time.time() - t_start:.0f}s)", flush=True)
    held_chunks = chunk_stream(held_stream, args.seq_len)
    probe = held_chunks[np.linspace(0, len(held_chunks) - 1, args.probe_chunks).round().astype(int)]

    log_path = args.out / "train_log.json"
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + (argv or sys.argv[1:]))
    if not args.analyze_only:
        model = build_model(args, tokenizer)
        t_train = time.time()
        log = train(model, train_stream, probe, args)
        train_wall = time.time() - t_train
        args.out.mkdir(parents=True, exist_ok=True)
        model.generation_config.pad_token_id = tokenizer.eos_token_id
        model.to(torch.bfloat16).save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        log_path.write_text(json.dumps({"log": log, "train_wall_s": train_wall, "command": command}))
        del model
    saved = load_log(log_path, args.out / "card.json")
    log, train_wall = saved["log"], saved["train_wall_s"]

    # Everything below is measured on what ships: the bf16 files, loaded the way users load them.
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    eval_chunks = held_chunks if args.eval_chunks is None else held_chunks[: args.eval_chunks]
    held_nats, choices = routing_on(model, eval_chunks, args.batch)
    usage = expert_usage(choices, args.experts)
    mi = routing_mi(choices, args.experts)
    held_bytes = sum(len(t.encode()) for t in held_texts)
    code = heldout_code_only(model, tokenizer, train_stream, held_files, texts, args)
    train_bytes = sum(len(t.encode()) for t in train_texts)
    tok_per_byte = len(held_stream) / held_bytes
    uni = unigram_nats(train_stream, held_stream, len(tokenizer))
    window = min(50, len(log))
    train_nats = float(np.mean([e["train"] for e in log[-window:]]))
    bits = 1 / math.log(2)

    plot_loss(log, args.out / "loss_curve.png")
    plot_routing(usage, mi, args.out / "routing.png")
    card = {
        "name": "tiny-mixtral",
        "command": saved["command"],
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "model": {"layers": args.layers, "experts": args.experts, "top_k": args.top_k, "hidden": args.hidden,
                  "intermediate": args.intermediate, "heads": args.heads, "kv_heads": args.kv_heads,
                  "vocab": len(tokenizer), "params": n_params,
                  "active_params_per_token": n_params - args.layers * (args.experts - args.top_k) * 3 * args.hidden * args.intermediate},
        "corpus": {"stdlib": str(root), "python": sys.version.split()[0], "sha256": corpus_sha,
                   "split_rule": "held out iff sha256(relative path).hexdigest()[0] == '0'",
                   "train": {"files": len(train_files), "bytes": train_bytes, "tokens": int(len(train_stream))},
                   "heldout": {"files": len(held_files), "bytes": held_bytes, "tokens": int(len(held_stream))},
                   "files": {"train": train_files, "heldout": held_files}},
        "training": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                     "warmup": args.warmup, "weight_decay": args.weight_decay, "clip": args.clip,
                     "aux_coef": args.aux_coef, "aux_loss": "switch, per layer, averaged", "seed": args.seed,
                     "threads": args.threads, "tokens_seen": args.steps * args.batch * args.seq_len,
                     "train_wall_s": train_wall, "train_loss_window": window,
                     "final_aux": float(np.mean([e["aux"] for e in log[-window:]]))},
        "eval": {"chunks": len(eval_chunks), "tokens": int(eval_chunks[:, 1:].numel()),
                 "heldout_tokens_per_byte": tok_per_byte,
                 "train_nats": train_nats, "train_bpb": train_nats * bits * len(train_stream) / train_bytes,
                 "heldout_nats": held_nats, "heldout_bits_per_token": held_nats * bits,
                 "heldout_bpb": held_nats * bits * tok_per_byte,
                 "unigram_nats": uni, "unigram_bpb": uni * bits * tok_per_byte,
                 "byte_unigram_bpb": byte_unigram_bits(train_texts, held_texts), "heldout_code": code},
        "routing": {"usage": usage.tolist(), "max_share": float(usage.max()), "min_share": float(usage.min()),
                    "max_share_per_layer": usage.max(1).tolist(), "mutual_information": mi},
        "check": check_sequences(model, held_chunks, args.check_chunks),
        "samples": generate_samples(model, tokenizer, args.seed),
        "log": log,
    }
    elapsed = time.time() - t_start
    # --analyze-only after a crashed card step: training time + this (analysis) run approximates the whole.
    card["wall_s"] = elapsed if not args.analyze_only else saved.get("wall_s") or train_wall + elapsed
    card["files"] = folder_sizes(args.out, skip={log_path.name})
    write_card(card, args.out)
    card["files"] = folder_sizes(args.out, skip={log_path.name})  # now including the card itself
    write_card(card, args.out)
    log_path.unlink(missing_ok=True)  # card.json holds the log from now on
    print(f"held-out {card['eval']['heldout_bpb']:.3f} bits/byte (unigram {card['eval']['unigram_bpb']:.3f}); "
          f"max expert share {100 * usage.max():.1f}%; {card['files']['total'] / 1e6:.1f} MB in {args.out}", flush=True)


if __name__ == "__main__":
    main()
