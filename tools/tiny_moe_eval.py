"""Evaluation of the tiny MoE models trained by tools/train_tiny_moe.py: losses, routing statistics,
baselines, samples and the corpus measurements their model cards report.

Everything here runs on the checkpoint as it ships (bf16 safetensors loaded as float32), except RouterTap,
lm_loss and eval_loss, which training uses too.
"""

from __future__ import annotations

import collections
import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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



def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats. logits [B, T, V], ids [B, T]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())



def chunk_stream(stream: np.ndarray, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, seq_len] chunks of a stream (the tail is dropped)."""
    n = len(stream) // seq_len
    if limit is not None:
        n = min(n, limit)
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).astype(np.int64))


@torch.no_grad()
def eval_loss(model, chunks: torch.Tensor, batch: int, after_batch=None) -> float:
    """Mean next-token loss (nats) over all predicted positions of the chunks; `after_batch(ids)` is called
    after each batch's forward."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch):
        ids = chunks[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits
        n = ids[:, 1:].numel()
        total += lm_loss(logits, ids).item() * n
        count += n
        if after_batch is not None:
            after_batch(ids)
    model.train()
    return total / count


def routing_on(model, chunks: torch.Tensor, batch: int) -> tuple[float, np.ndarray]:
    """Held-out loss (nats/token) and top-k expert choices [n_chunks, T, L, k] over the chunks."""
    tap, choices = RouterTap(model), []
    k = model.config.num_experts_per_tok

    def keep(ids: torch.Tensor) -> None:
        per_layer = [lg.float().topk(k, dim=-1).indices.view(*ids.shape, k) for lg in tap.pop()]  # L x [B, T, k]
        choices.append(torch.stack(per_layer, dim=2).numpy())  # [B, T, L, k]

    try:
        loss = eval_loss(model, chunks, batch, keep)
    finally:
        tap.remove()
    return loss, np.concatenate(choices)


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


def generate_samples(model, tokenizer, prompts: list[str], seed: int) -> list[dict]:
    """One sampled continuation (80 tokens, temperature 0.8, top-k 40) per prompt."""
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


def check_sequences(model, chunks: torch.Tensor, n: int) -> dict:
    """n held-out chunks spread over the split, with their loss: the tests recompute it."""
    idx = np.linspace(0, len(chunks) - 1, n).round().astype(int)
    picked = chunks[idx]
    losses = [eval_loss(model, picked[i : i + 1], 1) for i in range(n)]
    return {"chunk_index": idx.tolist(), "input_ids": picked.tolist(), "nats": losses, "mean_nats": float(np.mean(losses))}


def heldout_without(model, encode, train_stream, held_files, texts, excluded: set[str], vocab: int,
                    seq_len: int, batch: int, limit: int | None) -> dict:
    """Held-out loss and unigram baseline on the held-out files minus `excluded` (prose or data files).

    encode: list of texts -> token stream (np.ndarray)."""
    files = [r for r in held_files if r not in excluded]
    stream = encode([texts[r] for r in files])
    n_bytes = sum(len(texts[r].encode()) for r in files)
    nats, _ = routing_on(model, chunk_stream(stream, seq_len, limit), batch)
    uni = unigram_nats(train_stream, stream, vocab)
    per_byte = len(stream) / n_bytes / math.log(2)
    return {"excluded": sorted(excluded & set(held_files)), "files": len(files), "bytes": n_bytes,
            "tokens": int(len(stream)), "nats": nats, "bpb": nats * per_byte, "unigram_bpb": uni * per_byte}


def _shingles(text: str, lines: int) -> set[bytes]:
    """Hashes of the windows of `lines` consecutive stripped, non-empty lines of a text."""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return {hashlib.md5("\n".join(kept[i : i + lines]).encode()).digest() for i in range(max(0, len(kept) - lines + 1))}


def near_duplication(texts: dict[str, str], is_heldout, lines: int = 8) -> dict:
    """How much a corpus repeats itself, by `lines`-line windows (shingles) of its files (by relative path):
    the share of windows that also occur in another file; the share of held-out windows (by the split rule
    `is_heldout(rel)`) that occur in a train file; files that say they are generated or copy code."""
    shingles = {rel: _shingles(text, lines) for rel, text in texts.items()}
    owners: collections.Counter = collections.Counter(h for s in shingles.values() for h in s)
    train = set().union(*(s for rel, s in shingles.items() if not is_heldout(rel)))
    held = [h for rel, s in shingles.items() if is_heldout(rel) for h in s]
    total = sum(len(s) for s in shingles.values())
    return {"files": len(texts), "bytes": sum(len(t.encode()) for t in texts.values()), "shingle_lines": lines,
            "shared_share": sum(owners[h] > 1 for s in shingles.values() for h in s) / max(1, total),
            "heldout_in_train_share": sum(h in train for h in held) / max(1, len(held)),
            "generated_files": sum("automatically generated" in t[:2000].lower() for t in texts.values()),
            "copied_from_markers": sum(t.count("# Copied from ") for t in texts.values())}


def package_texts(root: Path, excluded_dirs: set[str]) -> dict[str, str]:
    """Texts of the *.py files under a package folder by relative path, minus folders named in `excluded_dirs`."""
    return {p.relative_to(root).as_posix(): p.read_text(errors="replace") for p in sorted(root.rglob("*.py"))
            if not any(d in excluded_dirs for d in p.relative_to(root).parts[:-1])}
