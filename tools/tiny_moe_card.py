"""Figures and model card (MODEL_CARD.md + card.json) of the tiny MoE models trained by
tools/train_tiny_moe.py. The card text is written from card.json alone, so `--analyze-only` can redo it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

FULL_TABLE_MAX_EXPERTS = 16  # above this, the usage table shows per-layer min/max (all shares in card.json)


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
    """Markdown table of the [L, E] usage shares: every expert when there are few, else min/max per layer."""
    n_experts = usage.shape[1]
    if n_experts <= FULL_TABLE_MAX_EXPERTS:
        head = "| layer | " + " | ".join(f"e{e}" for e in range(n_experts)) + " | max |\n"
        head += "|---" * (n_experts + 2) + "|\n"
        rows = [
            f"| {l} | " + " | ".join(f"{100 * u:.1f}" for u in row) + f" | {100 * row.max():.1f} |"
            for l, row in enumerate(usage)
        ]
        return head + "\n".join(rows)
    uniform = 1 / n_experts
    head = "| layer | min % | max % | min / uniform | max / uniform | experts under uniform / 4 |\n|---|---|---|---|---|---|\n"
    rows = [
        f"| {l} | {100 * row.min():.2f} | {100 * row.max():.2f} | {row.min() / uniform:.2f} | "
        f"{row.max() / uniform:.2f} | {int((row < uniform / 4).sum())} |"
        for l, row in enumerate(usage)
    ]
    return head + "\n".join(rows)


def _corpus_section(card: dict) -> str:
    c = card["corpus"]
    rows = "\n".join(
        f"| {label} | {c[key]['files']} | {c[key]['bytes']:,} | {c[key]['tokens']:,} | "
        f"{c[key]['bytes'] / c[key]['tokens']:.2f} |"
        for key, label in (("train", "train"), ("heldout", "held-out"))
    )
    text = f"""## Corpus and split

Corpus `{c['name']}`: {c['description']}, under `{c['root']}` ({c['provider']} {c['version']}). A file is held out
when the first hex digit of sha256(relative path) is `0`. sha256 of the corpus (path + bytes, in path order):
`{c['sha256']}`. The file lists are in `card.json` (`corpus.files`).

| split | files | bytes | tokens | bytes/token |
|---|---|---|---|---|
{rows}
"""
    dup = c.get("near_duplication")
    if dup:
        lines = "\n".join(
            f"| {name} | {d['files']} | {d['bytes']:,} | {100 * d['shared_share']:.1f}% | "
            f"{100 * d['heldout_in_train_share']:.1f}% | {d['generated_files']} | {d['copied_from_markers']} |"
            for name, d in dup.items()
        )
        n = next(iter(dup.values()))["shingle_lines"]
        text += f"""
Why this corpus: a held-out split by file measures generalisation only if held-out files do not repeat train
files. For the candidates installed with the package (tests excluded, same split rule): the share of {n}-line
windows (stripped, non-empty lines) that also occur in another file, the share of held-out windows that occur
in a train file, files whose header says they are generated, and `# Copied from` comments:

| package | files | bytes | windows in another file | held-out windows in train | generated files | "Copied from" |
|---|---|---|---|---|---|---|
{lines}
"""
    return text


def _results_section(card: dict) -> str:
    ev, tr = card["eval"], card["training"]
    code = ev.get("heldout_code")
    code_rows, note = "", ""
    if code:
        code_rows = (
            f"| held-out without {', '.join(code['excluded'])} | {code['nats']:.3f} | "
            f"{code['nats'] / math.log(2):.3f} | {code['bpb']:.3f} |\n"
            f"| token unigram baseline (same files) | | | {code['unigram_bpb']:.3f} |\n"
        )
        share = 1 - code["bytes"] / card["corpus"]["heldout"]["bytes"]
        note = (f"\nBy the hash rule, {', '.join(f'`{f}`' for f in code['excluded'])} (documentation or data, not "
                f"code) fell into the held-out split: {100 * share:.0f}% of its bytes. The rows without it leave it out.\n")
    return f"""## Results (held-out split, on the saved bf16 weights loaded as float32)

Evaluated on {ev['chunks']} non-overlapping {tr['seq_len']}-token chunks of the held-out stream
({ev['tokens']:,} predicted tokens). Bits/byte = bits/token x held-out tokens/bytes.

| | nats/token | bits/token | bits/byte |
|---|---|---|---|
| train (last {tr['train_loss_window']} steps, mean) | {ev['train_nats']:.3f} | {ev['train_nats'] / math.log(2):.3f} | {ev['train_bpb']:.3f} |
| **held-out** | **{ev['heldout_nats']:.3f}** | **{ev['heldout_bits_per_token']:.3f}** | **{ev['heldout_bpb']:.3f}** |
| token unigram baseline (held-out) | {ev['unigram_nats']:.3f} | {ev['unigram_nats'] / math.log(2):.3f} | {ev['unigram_bpb']:.3f} |
| byte unigram baseline (held-out) | | | {ev['byte_unigram_bpb']:.3f} |
{code_rows}{note}"""


def _routing_section(card: dict) -> str:
    m, r = card["model"], card["routing"]
    mi = r["mutual_information"]
    mi_rows = "\n".join(
        f"| {l} | {t:.3f} | " + (f"{mi['next_layer_bits'][l]:.3f}" if l < len(mi["next_layer_bits"]) else "–") + " |"
        for l, t in enumerate(mi["consecutive_tokens_bits"])
    )
    return f"""## Routing

Share of held-out routing choices (token x top-{m['top_k']} slot) per expert, in %. Uniform is
{100 / m['experts']:.2f}%. Max share over layers: {100 * r['max_share']:.1f}%; min share:
{100 * r['min_share']:.2f}%.

{usage_table(np.asarray(r['usage']))}

Mutual information (bits) of the top-1 expert between consecutive tokens at the same layer, and between
a layer and the next one for the same token (upper bound log2({m['experts']}) = {math.log2(m['experts']):.0f}):

| layer | token t vs t+1 | layer l vs l+1 |
|---|---|---|
{mi_rows}

![routing](routing.png)
"""


def write_card(card: dict, out: Path) -> None:
    """card.json, and MODEL_CARD.md written from it."""
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    m, c, tr = card["model"], card["corpus"], card["training"]
    samples = "\n\n".join(f"Prompt `{s['prompt']!r}`:\n\n```python\n{s['text']}\n```" for s in card["samples"])
    cpu = f" ({tr['train_cpu_s'] / 60:.1f} min of CPU time)" if tr.get("train_cpu_s") else ""
    text = f"""# {card['name']}: a built-in reference MoE model of m2r2_moe

{card['intro']}

## Architecture

`{m['class']}`: {m['layers']} layers, {m['experts']} experts per layer, top-{m['top_k']} routing, hidden
{m['hidden']}, expert intermediate {m['intermediate']}, {m['heads']} attention heads / {m['kv_heads']} KV heads,
vocabulary {m['vocab']} (byte-level BPE trained with `tokenizers` on the train split), trained context
{tr['seq_len']} tokens. {m['params']:,} parameters ({m['active_params_per_token']:,} active per token).
Weights: bf16 safetensors, {card['files']['model.safetensors'] / 1e6:.2f} MB; whole folder
{card['files']['total'] / 1e6:.2f} MB.

{_corpus_section(card)}
## Training

{tr['steps']} steps of AdamW (lr {tr['lr']}, warmup {tr['warmup']}, cosine to 10%, weight decay
{tr['weight_decay']}), batch {tr['batch']} x {tr['seq_len']} tokens ({tr['tokens_seen']:,} tokens,
{tr['tokens_seen'] / c['train']['tokens']:.2f} epochs), seed {tr['seed']}, {tr['threads']} CPU thread(s). Loss = LM
cross-entropy + {tr['aux_coef']} x router balancing loss, computed **per layer** and averaged (not
transformers' `load_balancing_loss_func`, which balances the concatenation of all layers). Training
took {tr['train_wall_s'] / 60:.1f} min{cpu}; the whole script {card['wall_s'] / 60:.1f} min.

![loss curve](loss_curve.png)

{_results_section(card)}
{_routing_section(card)}
## Samples (temperature 0.8, top-k 40)

{samples}

## Reproduce

```
{card['command']}
```

Deterministic for a given corpus (check the corpus sha256), torch version and thread count
(torch {card['versions']['torch']}, transformers {card['versions']['transformers']}, tokenizers
{card['versions']['tokenizers']}). Another {c['provider']} version has different sources and gives a
different, similar model.
"""
    (out / "MODEL_CARD.md").write_text(text)
