"""Smoke test of benchmarks/path_calls.py: the counter counts only inside the decode steps' `on_layer`, is undone on
exit, and a short run gives a row per link ratio with tokens identical (the counts themselves are the benchmark's)."""

from __future__ import annotations

import argparse

import path_calls
import pytest
from m2r2_moe.runtime import prefetcher

pytestmark = pytest.mark.slow


def test_one_ratio_counts_calls_inside_the_step_and_restores_it(one_thread):
    step = prefetcher.Prefetcher.on_layer
    args = argparse.Namespace(model="builtin", adapters=None, text=None, link_ratios=[2.0], prompts=1, new_tokens=8,
                              compute_ms=None, top=3)
    table, extra = path_calls.run(args)
    assert prefetcher.Prefetcher.on_layer is step
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert len(rows) == 1 and rows[0][0] == "2"
    layers, python, native = int(rows[0][1]), float(rows[0][2]), float(rows[0][3])
    assert 0 < layers <= 7 * 8  # decode steps' layers only (8 tokens: 7 decode steps of 8 MoE layers)
    assert python >= 1.0 and native > 0  # on_layer itself, and at least the clock and the planner below it
    assert "prefetcher.on_layer 1.00" in rows[0][5]
    assert "Tokens identical to the un-offloaded model's in every run: yes" in extra


def test_the_counter_ignores_calls_outside_the_step():
    with path_calls.CallCounter() as counter:
        sorted([3, 1, 2])
    assert counter.layers == 0 and not counter.python and not counter.native
