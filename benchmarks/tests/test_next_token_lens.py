"""Smoke test of benchmarks/next_token_lens.py: a short run on the built-in model gives both rows, every recall a
share, the shipped heads' column filled (they wrap), the lens's cost stated (no figure is compared against a
target: that is the benchmark's job)."""

from __future__ import annotations

import re

import next_token_lens
import pytest
import torch

pytestmark = pytest.mark.slow


def test_a_short_run_fills_both_rows(one_thread):
    args = next_token_lens.argparse.Namespace(model="builtin", adapters=None, text=None, prompts=2, prompt_tokens=16,
                                              new_tokens=8)
    table, extra = next_token_lens.run(args)
    lines = table.splitlines()
    assert len(lines) == 4 and "lens @ 7" in lines[0] and "true next token" in lines[0]
    for line, text in zip(lines[2:], ("greedy continuation", "held-out text")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == text and cells[1] == "16"  # 2 prompts x 8 measured positions
        shares = [float(cells[2]), *(float(c.split()[0]) for c in cells[3:5]), float(cells[5]), float(cells[6])]
        assert all(0.0 <= s <= 1.0 for s in shares)
    assert re.search(r"The lens at batch 1: \d+ µs per token", extra)


def test_recall_counts_the_used_experts_found():
    used = torch.tensor([[0, 1], [2, 3]])
    assert next_token_lens.recall(torch.tensor([[1, 5], [2, 3]]), used) == pytest.approx(0.75)
