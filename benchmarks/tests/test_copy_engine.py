"""Smoke test of benchmarks/copy_engine.py: every engine is measured and gives the figures the table prints; a
polling native worker's wait returns within a link time of the copy (no timing is compared: that is the
benchmark's job)."""

from __future__ import annotations

import copy_engine
import pytest

from m2r2_moe.runtime import cpu_native
from m2r2_moe.runtime.cpu_engine import ThreadCopyEngine

pytestmark = pytest.mark.slow


def test_every_engine_is_measured(one_thread):
    figures = copy_engine.measure(lambda gbps: ThreadCopyEngine(gbps), 30, 10_000)
    assert all(v >= 0 or k == "overshoot" for k, v in figures.items())
    assert set(figures) == {"submit", "overshoot", "detach", "detach_max"}
    if cpu_native.available():
        polling = copy_engine.measure(lambda gbps: cpu_native.NativeCopyEngine(gbps, spin=True), 30, 10_000)
        assert polling["overshoot"] < copy_engine.LINK_S  # it waited for the copy, and not a link time more
