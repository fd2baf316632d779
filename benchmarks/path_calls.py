"""How much the prefetch path does per decode layer, counted rather than timed: Python function calls and native
(C) calls made inside the prefetcher's per-layer step (`Prefetcher.on_layer`), with the functions called most.

In a decode step that path runs with the CPU caches cold (the model's compute evicts it between layers), and what it
costs there is mostly how many different things it touches: each Python call costs about 1-2 µs in place against
0.1-0.2 µs warm (BENCHMARKS.md). Timed in place the path varies by 20 % between runs on a shared machine; the counts
do not, so they say whether a change to the path did less work where a timing cannot. `sys.setprofile` counts every
call (it slows the run; nothing here is timed). The built-in model (or `--model`) decodes held-out prompts offloaded
with m2r2, half of its experts cached, `predictive` eviction, on the native CPU copy engine with the link emulated at
each link ratio (one expert's transfer over one layer's compute as the reference runs measured it). The host clock,
not simulated time: a simulated link is Python code of its own that the real path does not run. What the path
decides (how many copies, whether it backs off) still follows the machine: the table gives the copies per layer
beside the counts. Prints a table and appends it to BENCHMARKS.md.

    python benchmarks/path_calls.py [--model builtin] [--adapters FILE] [--text FILES] [--link-ratios 0.5,2,8]
                                    [--prompts 2] [--new-tokens 64] [--top 6] [--no-record]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _simulated as simulated  # noqa: E402
from _report import markdown_table  # noqa: E402
from _simulated import setup  # noqa: E402
from m2r2_moe.cli_common import auto_lookahead  # noqa: E402
from m2r2_moe.models.base import expert_param_bytes  # noqa: E402
from m2r2_moe.profile.runs import offloaded_run  # noqa: E402
from m2r2_moe.runtime import prefetcher as prefetcher_module  # noqa: E402


class CallCounter:
    """While open, every prefetcher built counts the calls made inside its decode steps' `on_layer`."""

    def __init__(self):
        self.python, self.native = collections.Counter(), collections.Counter()
        self.layers = 0  # decode layer calls counted

    def _profile(self, frame, event, arg) -> None:
        if event == "call":
            code = frame.f_code
            self.python[f"{Path(code.co_filename).stem}.{code.co_name}"] += 1
        elif event == "c_call":
            self.native[getattr(arg, "__qualname__", None) or getattr(arg, "__name__", "?")] += 1

    def __enter__(self) -> "CallCounter":
        self._on_layer = on_layer = prefetcher_module.Prefetcher.on_layer
        counter = self

        def counted(prefetcher, layer, top_k_index, *args, **kwargs):
            if top_k_index.shape[0] != 1:  # a prompt's forward: not the decode path
                return on_layer(prefetcher, layer, top_k_index, *args, **kwargs)
            counter.layers += 1
            sys.setprofile(counter._profile)
            try:
                return on_layer(prefetcher, layer, top_k_index, *args, **kwargs)
            finally:
                sys.setprofile(None)

        prefetcher_module.Prefetcher.on_layer = counted
        return self

    def __exit__(self, *exc) -> None:
        prefetcher_module.Prefetcher.on_layer = self._on_layer

    def per_layer(self) -> tuple[float, float]:
        """(Python calls, native calls) per decode layer; the profiler's own `setprofile` call is not counted."""
        native = sum(n for name, n in self.native.items() if name != "setprofile")
        return sum(self.python.values()) / max(self.layers, 1), native / max(self.layers, 1)


def run(args) -> tuple[str, str]:
    env = setup(args)
    model, layers, total, refs, compute = env.model, env.layers, env.total, env.refs, env.compute
    depth = auto_lookahead(model, layers, args.adapters)
    rows, identical = [], True
    for ratio in args.link_ratios:
        gbps = expert_param_bytes(layers[0]) / (ratio * compute) / 1e9
        copies = 0
        with CallCounter() as counter:
            for ref in refs:
                out = offloaded_run(model, ref, args.new_tokens, "m2r2", total // 2, gbps, "predictive",
                                    args.adapters, depth)
                identical &= out["tokens_identical"]
                copies += out["prefetches"]
        python, native = counter.per_layer()
        top = ", ".join(f"{name} {n / max(counter.layers, 1):.2f}" for name, n in counter.python.most_common(args.top))
        rows.append([f"{ratio:g}", str(counter.layers), f"{python:.1f}", f"{native:.1f}",
                     f"{copies / max(counter.layers, 1):.2f}", top])
    headers = ["link ratio", "decode layers", "Python calls / layer", "native calls / layer", "copies / layer",
               "most called (per layer)"]
    extra = (f"\nmodel {args.model}: {len(layers)} MoE layers, {total} experts, {total // 2} slots, m2r2 lookahead "
             f"{depth}, `predictive`; calls inside `Prefetcher.on_layer` at decode, counted with `sys.setprofile`; "
             f"copies: prefetches issued (prompts' included) per decode layer. {args.prompts} prompt(s) x "
             f"{args.new_tokens} new tokens, host clock, {compute * 1e3:.2f} ms of compute per MoE layer measured. Tokens "
             f"identical to the un-offloaded model's in every run: {'yes' if identical else 'NO'}.")
    return markdown_table(headers, rows), extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin")
    p.add_argument("--adapters", default=None, help="adapters for a model not shipped with the package")
    p.add_argument("--text", default=None, help="text files to cut the prompts from (default: the model's own)")
    p.add_argument("--link-ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 2.0, 8.0])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=6, help="how many of the most called functions to name")
    p.add_argument("--no-record", dest="record", action="store_false", help="print only, do not append")
    p.set_defaults(rounds=1, compute_ms=None)  # one run per prompt; the link from the measured compute
    return simulated.main(p, argv, run, "Prefetch path calls per decode layer (benchmarks/path_calls.py)")


if __name__ == "__main__":
    sys.exit(main())
