"""Smoke test of benchmarks/lookahead_ab.py: arms parsed (and refused when malformed), one short prompt of the
built-in model at one link ratio, a row per arm with `none` first, tokens identical (no timing is compared with a
target: that is the benchmark's job)."""

from __future__ import annotations

import argparse

import lookahead_ab
import pytest

pytestmark = pytest.mark.slow


def test_arms_are_parsed_and_bad_ones_refused():
    assert lookahead_ab.parse_arm("@4") == (None, 4, False)
    assert lookahead_ab.parse_arm("/x/a@b.safetensors@7!free") == ("/x/a@b.safetensors", 7, True)
    for bad in ("4", "a.safetensors", "@0", "@x", "@4!fast"):
        with pytest.raises(argparse.ArgumentTypeError, match="FILE"):
            lookahead_ab.parse_arm(bad)
    with pytest.raises(SystemExit):
        lookahead_ab.main(["--arms", "@4,@4", "--no-record"])


def test_one_ratio_has_a_row_per_arm(one_thread):
    args = argparse.Namespace(model="builtin", text=None, link_ratios=[2.0], prompts=1, new_tokens=8, rounds=1,
                              arms=["@1", "@2!free"])
    table, extra = lookahead_ab.run(args)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [r[1] for r in rows] == ["none", "@1", "@2!free"] and rows[0][3] == "1.000"
    assert all(float(r[2]) > 0 and int(r[6]) >= 0 for r in rows)
    assert "Tokens identical to the un-offloaded model's in every run: yes" in extra
