"""Profiler output: the table, a Chrome/Perfetto trace, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from .recorder import Recorder

COLUMNS = ["predictor", "link_ratio", "cache_experts", "policy", "ms/token", "x none", "limit ms", "stall ms/token",
           "hits", "pf hits", "late", "misses", "MB moved", "MB wasted", "share of gain", "ceiling", "gap closed",
           "stall removed", "identical"]
LEGEND = """columns:
  ms/token        decode time per generated token (the fastest of --repeats, mean over the prompts)
  x none          ms/token over that of `none` (on-demand loading) in the same regime, cache and policy: < 1 is faster
  limit ms        max(un-offloaded compute, bytes Belady's optimal eviction must move / link bandwidth) per token
  stall ms/token  time the compute side waited for expert copies
  hits / pf hits / late / misses   expert uses found resident / resident thanks to a prefetch / prefetched but still
                  in flight / loaded on demand
  MB moved / MB wasted   bytes copied to the device / of them, prefetched and evicted unused
  share of gain   (T_none - T) / (T_none - limit): the share of the way from on-demand loading to the limit
  ceiling         the share of gain a run with no stall and no prediction cost would reach (the runtime floor)
  gap closed      (T_none - T) / (T_none - max(floor, limit)): the share of the gap a predictor can close
  stall removed   the share of `none`'s stall this run removed
  identical       tokens equal to the un-offloaded model's"""


def table(runs: list[dict]) -> str:
    rows = [[r["predictor"], f"{r['link_ratio']:g}", r["cache_experts"], r["policy"],
             f"{r['time_per_token_s'] * 1e3:.1f}", _fixed(r.get("speedup_vs_none"), invert=True),
             f"{r['limit_per_token_s'] * 1e3:.1f}",
             f"{r['stall_s_per_token'] * 1e3:.1f}", r["hits"], r["prefetch_hits"], r["late_prefetches"], r["misses"],
             f"{r['bytes_to_device'] / 1e6:.1f}", f"{r['wasted_bytes'] / 1e6:.1f}",
             "" if r.get("share_of_gain") is None else f"{r['share_of_gain']:.2f}",
             "" if r.get("share_ceiling") is None else f"{r['share_ceiling']:.2f}", _fixed(r.get("gap_closed")),
             "" if r.get("stall_removed") is None else f"{r['stall_removed']:.2f}",
             "yes" if r["tokens_identical"] else "NO"] for r in runs]
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows)]
    fmt = lambda row: "  ".join(str(x).rjust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(COLUMNS), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _fixed(value, invert: bool = False) -> str:
    if value is None:
        return ""
    return f"{1 / value:.3f}" if invert else f"{value:.2f}"


def chrome_trace(recorder: Recorder, path: str | Path, label: str) -> None:
    """Compute lane (one slice per MoE layer call, stalls inside it) and copy lane (one slice per copy)."""
    events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": label}},
              {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "compute"}},
              {"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "copy (link)"}}]
    us = 1e6
    for e in recorder.layers:
        events.append({"name": f"step {e.step} L{e.layer}", "ph": "X", "pid": 1, "tid": 1, "ts": e.start * us,
                       "dur": (e.end - e.start) * us,
                       "args": {"hits": e.hits, "prefetch_hits": e.prefetch_hits, "late": e.late_prefetches,
                                "misses": e.misses, "stall_ms": e.stall * 1e3}})
    for c in recorder.copies:
        if not c.finished or c.cancelled:
            continue
        kind = "demand" if c.priority == 0 else f"prefetch d={c.priority}"
        events.append({"name": f"key {c.key} ({kind})", "ph": "X", "pid": 1, "tid": 2,
                       "ts": (c.started - recorder.t0) * us, "dur": (c.finished - c.started) * us,
                       "args": {"bytes": c.nbytes, "issued_by_layer": c.layer, "step": c.step}})
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(recorder: Recorder, path: str | Path, steps: tuple[int, int], title: str) -> None:
    """A few decode steps: MoE layer calls (stall in red) above, link copies (demand/prefetch) below."""
    plt = _plt()
    lo, hi = steps
    layers = [e for e in recorder.layers if lo <= e.step < hi]
    if not layers:
        return
    t0 = layers[0].start
    fig, ax = plt.subplots(figsize=(11, 3.2))
    for e in layers:
        ax.broken_barh([(1e3 * (e.start - t0), 1e3 * (e.end - e.start))], (2, 0.8), facecolors="#4c72b0",
                       edgecolor="white", linewidth=0.3)
        if e.stall > 0:
            ax.broken_barh([(1e3 * (e.start - t0), 1e3 * e.stall)], (2, 0.8), facecolors="#c44e52")
    end = layers[-1].end
    for c in recorder.copies:
        started, finished = c.started - recorder.t0, c.finished - recorder.t0  # relative, like the layers
        if not c.finished or c.cancelled or finished < t0 or started > end:
            continue
        color = "#dd8452" if c.priority == 0 else "#55a868"
        ax.broken_barh([(1e3 * (started - t0), 1e3 * (finished - started))], (0.6, 0.8),
                       facecolors=color, edgecolor="white", linewidth=0.3)
    ax.set_yticks([1.0, 2.4], ["link: demand (orange) / prefetch (green)", "compute: MoE layers (stall red)"])
    ax.set_xlabel("ms")
    ax.set_xlim(0, 1e3 * (end - t0))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stalls(series: dict[str, list[float]], path: str | Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, stalls in series.items():
        ax.plot(range(1, len(stalls) + 1), [s * 1e3 for s in stalls], label=name, linewidth=1.2)
    ax.set_xlabel("decode step")
    ax.set_ylabel("stall per token (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_hit_rate(measured: dict[str, dict[int, float]], offline: dict[int, tuple[float, float]], path: str | Path,
                  title: str) -> None:
    """Hit rate against cache size: measured runs (one line each) and offline LRU / Belady curves."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    sizes = sorted(offline)
    ax.plot(sizes, [offline[c][1] for c in sizes], "k-", linewidth=2, label="Belady (optimal, offline)")
    ax.plot(sizes, [offline[c][0] for c in sizes], "k:", label="LRU, no prefetch (offline)")
    for name, curve in measured.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[c] for c in xs], marker="o", label=name)
    ax.set_xlabel("cache size (expert slots)")
    ax.set_ylabel("hit rate (no wait)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
