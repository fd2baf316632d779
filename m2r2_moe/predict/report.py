"""Tables and the plot of `train-adapters` and `eval-predictor` (text for the command line, no logic)."""

from __future__ import annotations

from .evaluate import by_source_layer


def depth_table(results: dict, depth: int, widths: list[int]) -> str:
    """Recall / precision / width of each predictor per depth: top-k, at equal widths and confidence-widened."""
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


def layer_table(results: dict) -> str:
    """Top-k recall per source layer l (mean over the depths it predicts within the token)."""
    per = {name: by_source_layer(r) for name, r in results.items()}
    sources = sorted({l for v in per.values() for l in v})
    head = "top-k recall by source layer " + "".join(f"{f'l={l}':>7}" for l in sources)
    lines = [head, "-" * len(head)]
    for name, v in per.items():
        lines.append(f"{name:<29}" + "".join(f"{v[l]:>7.3f}" if l in v else f"{'-':>7}" for l in sources))
    return "\n".join(lines)


def next_token_table(results: dict, num_layers: int) -> str:
    """Top-k recall of the next token's layers j: from each wrapping predictor's last layer (distance j + 1, the
    prediction the prefetcher acts on last) and the best of its sources, next to the previous token's experts."""
    previous = results.get("previous token", {})
    targets = sorted(int(k.split(":")[1]) for k in previous)
    head = "next token's layer j           " + "".join(f"{f'j={j}':>7}" for j in targets)
    lines = [head, "-" * len(head)]
    for name, pairs in results.items():
        if name == "previous token":
            continue
        last = [pairs.get(f"{num_layers - 1}->next:{j}") for j in targets]
        best = [max((v for k, v in pairs.items() if k.endswith(f"next:{j}")), default=None) for j in targets]
        lines.append(f"{name + ' from layer ' + str(num_layers - 1):<31}" + "".join(_cell(v) for v in last))
        lines.append(f"{name + ' best source':<31}" + "".join(_cell(v) for v in best))
    lines.append(f"{'previous token':<31}" + "".join(_cell(previous[f'next:{j}']) for j in targets))
    return "\n".join(lines)


def training_summary(report: dict, num_layers: int) -> str:
    """The validation figures of `train_adapters`: recall per depth of gate and both kinds, the next token's."""
    val = report["validation"]
    depth = report["depth"]
    head = "validation top-k recall" + "".join(f"{f'd={d}':>8}" for d in range(1, depth + 1))
    lines = [head, "-" * len(head)]
    for kind in ("gate", "linear", "mlp"):
        if kind not in val:
            continue
        means = _by_depth(val[kind], depth)
        marker = " (default)" if kind == report["kind"] else ""
        lines.append(f"{kind + marker:<23}" + "".join(_cell(means.get(d), 8) for d in range(1, depth + 1)))
    if val.get("previous_token"):
        targets = sorted(int(k.split(":")[1]) for k in val["previous_token"])
        lines.append("next token's layer j   " + "".join(f"{f'j={j}':>8}" for j in targets))
        lines.append(f"{'mlp from layer ' + str(num_layers - 1):<23}"
                     + "".join(_cell(val["mlp"].get(f"{num_layers - 1}->next:{j}"), 8) for j in targets))
        lines.append(f"{'previous token':<23}" + "".join(_cell(val["previous_token"][f"next:{j}"], 8) for j in targets))
    return "\n".join(lines)


def _by_depth(pairs: dict, depth: int) -> dict[int, float]:
    """`{"l->t": recall}` (within the token) → mean recall per depth t - l."""
    sums: dict[int, list[float]] = {}
    for key, value in pairs.items():
        source, target = key.split("->")
        if target.isdigit():
            sums.setdefault(int(target) - int(source), []).append(value)
    return {d: sum(v) / len(v) for d, v in sums.items() if d <= depth}


def _cell(value: float | None, width: int = 7) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def plot(results: dict, depth: int, path: str, model: str, tokens: int) -> None:
    """Recall against depth per predictor (top-k, and widened) as a PNG at `path`."""
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
