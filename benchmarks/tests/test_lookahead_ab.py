"""Smoke test of benchmarks/lookahead_ab.py: arms parsed (and refused when malformed), one short prompt of the
built-in model at one link ratio, a row per arm with `none` first, tokens identical (no timing is compared with a
target: that is the benchmark's job)."""

from __future__ import annotations

import argparse

import lookahead_ab
import pytest

pytestmark = pytest.mark.slow


def test_arms_are_parsed_and_bad_ones_refused():
    assert lookahead_ab.parse_arm("@4") == (None, 4, False, 0)
    assert lookahead_ab.parse_arm("/x/a@b.safetensors@7!free") == ("/x/a@b.safetensors", 7, True, 0)
    assert lookahead_ab.parse_arm("@4/k2!free") == (None, 4, True, 2)
    for bad in ("4", "a.safetensors", "@0", "@x", "@4!fast", "@4/k0", "@4/k", "@4/2"):
        with pytest.raises(argparse.ArgumentTypeError, match="FILE"):
            lookahead_ab.parse_arm(bad)
    with pytest.raises(SystemExit):
        lookahead_ab.main(["--arms", "@4,@4", "--no-record"])


def test_one_ratio_has_a_row_per_arm(one_thread):
    args = argparse.Namespace(model="builtin", text=None, link_ratios=[2.0], prompts=1, new_tokens=8, rounds=1,
                              arms=["@1", "@2!free", "@1/k2"])
    table, extra = lookahead_ab.run(args)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [r[1] for r in rows] == ["none", "@1", "@2!free", "@1/k2"] and rows[0][3] == "1.000"
    assert all(float(r[2]) > 0 and int(r[6]) >= 0 for r in rows)
    assert "Tokens identical to the un-offloaded model's in every run: yes" in extra


def test_pinned_every_holds_while_open_and_is_undone(one_thread):
    import m2r2_moe
    import torch
    from m2r2_moe.loading import load_model
    from m2r2_moe.runtime import prefetcher

    model, _ = load_model("builtin", torch.float32)
    make = prefetcher.make_planner
    with lookahead_ab.pinned_every(3):
        m2r2_moe.offload(model, cache_experts=32, predictor="m2r2", link_gbps=1.0)
    try:
        planner = m2r2_moe.get_offloader(model).prefetcher.planner
        with torch.no_grad():
            model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           pad_token_id=0)
        assert planner.every == 3 and planner._planner.every != 3  # pinned; the planner's own says otherwise
    finally:
        m2r2_moe.remove_offload(model)
    assert prefetcher.make_planner is make
