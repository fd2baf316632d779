"""Shared by the benchmarks that set arms side by side on simulated time (prefetch_cap.py, lookahead_ab.py): their
common options, and the model, its held-out prompts and its measured compute per MoE layer."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch

from _report import publish
from m2r2_moe.cli_common import text_files
from m2r2_moe.loading import load_model
from m2r2_moe.models import find_moe_layers
from m2r2_moe.profile.cli import prompt_text, references

PROMPT_TOKENS = 64


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin")
    p.add_argument("--text", default=None, help="text files to cut the prompts from (default: the model's own)")
    p.add_argument("--link-ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 2.0, 8.0])
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compute-ms", type=float, default=None,
                   help="simulate this compute per MoE layer (ms) instead of the one measured at the start: runs on "
                        "another day, or of another build, then compare at the same compute (the host's prefetch path "
                        "does not speed up in proportion when the machine does)")
    p.add_argument("--no-record", dest="record", action="store_false", help="print only, do not append")


def check_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.prompts < 1 or args.new_tokens < 2 or args.rounds < 1 or any(r <= 0 for r in args.link_ratios):
        p.error("--prompts and --rounds must be >= 1, --new-tokens >= 2, link ratios > 0")
    if args.compute_ms is not None and not 0 < args.compute_ms < float("inf"):
        p.error(f"--compute-ms must be a positive time, not {args.compute_ms}")


def main(p: argparse.ArgumentParser, argv, run, title: str) -> int:
    """Parse `argv` with `p` (its own checks refuse bad values with `p.error`), run `run(args)` -> (table, legend)
    and print it, appended to BENCHMARKS.md under `title` unless `--no-record`."""
    args = p.parse_args(argv)
    check_options(p, args)
    table, extra = run(args)
    publish(title, table, extra, args.record)
    return 0


@dataclass
class Setup:
    model: torch.nn.Module
    layers: list
    total: int  # experts over all MoE layers
    refs: list  # the un-offloaded model's reference runs, one per prompt
    compute: float  # seconds of un-offloaded compute per MoE layer at decode


def setup(args: argparse.Namespace) -> Setup:
    """The model of `--model` (one torch thread, as every benchmark runs), the reference runs of `--prompts` held-out
    prompts of `--new-tokens`, and the compute per MoE layer they measured (or `--compute-ms`)."""
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model, torch.float32)
    _, layers = find_moe_layers(model)
    files = text_files(prompt_text(args.model, args.text), "builtin:heldout")
    refs = references(model, tokenizer, layers, args.prompts, PROMPT_TOKENS, args.new_tokens, 1, files)
    compute = statistics.mean(r.decode_seconds_per_token for r in refs) / len(layers)
    if getattr(args, "compute_ms", None) is not None:
        compute = args.compute_ms * 1e-3
    return Setup(model, layers, sum(int(layer.experts.num_experts) for layer in layers), refs, compute)


def footer(args: argparse.Namespace, compute: float, identical: bool, note: str = "") -> str:
    """The closing sentences of a table's legend: prompts, rounds (`note` after them), the simulated compute, and
    whether every run's tokens were the un-offloaded model's."""
    return (f"{args.prompts} prompt(s) x {args.new_tokens} new tokens, fastest of {args.rounds} per prompt{note}; "
            f"simulated time at {compute * 1e3:.2f} ms of compute per MoE layer. Tokens identical to the un-offloaded "
            f"model's in every run: {'yes' if identical else 'NO'}.")
