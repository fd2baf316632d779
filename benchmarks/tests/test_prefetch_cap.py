"""Smoke test of benchmarks/prefetch_cap.py: one short prompt of the built-in model at one link ratio, every arm
in the table, tokens identical, the share of cap computed from the two m2r2 columns (no timing is compared
against a target: that is the benchmark's job)."""

from __future__ import annotations

import prefetch_cap
import pytest

pytestmark = pytest.mark.slow


def test_one_ratio_has_every_arm(one_thread):
    args = prefetch_cap.argparse.Namespace(model="builtin", adapters=None, text=None, link_ratios=[2.0], prompts=1,
                                           new_tokens=8, rounds=1, lookahead=4, compute_ms=0.5)
    table, extra = prefetch_cap.run(args)
    assert "simulated time at 0.50 ms of compute per MoE layer" in extra  # --compute-ms, not the measured one
    lines = table.splitlines()
    assert len(lines) == 3 and "share of cap" in lines[0] and "oracle-wrap, free path x none" in lines[0]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "2" and float(cells[1]) > 0 and all(float(c) > 0 for c in cells[2:6])
    m2r2, free = float(cells[2]), float(cells[3])
    if cells[6]:  # the free path saved something: the share is what the real path kept of it
        assert free < 1.0005 and (free > 0.995 or abs(float(cells[6]) - (1 - m2r2) / (1 - free)) < 0.05)
    else:
        assert free > 0.9995
    assert "Tokens identical to the un-offloaded model's in every run: yes" in extra
