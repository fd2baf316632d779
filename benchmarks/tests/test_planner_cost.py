"""Smoke test of benchmarks/planner_cost.py: every kind of call is timed, for each twin the build has."""

from __future__ import annotations

import planner_cost
import pytest

from m2r2_moe import _ext


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _ext.HAS_PLANNER, reason="the C++ planner is not built"))])
def test_each_call_kind_is_timed(native):
    m = planner_cost.measure(layers=4, experts=8, top_k=2, tokens=20, native=native, cold=False)
    assert set(m) == {"settle", "predict", "after"} and all(v > 0 for v in m.values())
