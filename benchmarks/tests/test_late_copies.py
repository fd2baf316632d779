"""benchmarks/late_copies.py: the classes of a use from a synthetic decision log (each rule once), and a smoke run of
the built-in model in which every decode use that was not a plain hit is classed exactly once."""

from __future__ import annotations

import late_copies
import pytest

HIT, PREFETCH_HIT, LATE, MISS = 0, 1, 2, 3


def _call(now, candidates=(), queued=None, backlog=(), resident=(), inflight=(), uses=(), free=0, regret=0.1):
    return {"now": now, "decode": True, "uses": list(uses), "backlog": list(backlog), "compute": 1.0, "transfer": 2.0,
            "miss": 2.0, "regret": regret, "free": free, "resident": set(resident), "inflight": set(inflight),
            "candidates": list(candidates), "queued": dict(queued or {})}


def test_each_use_is_classed_by_the_farthest_layer_that_considered_its_expert():
    log = [  # compute 1.0 s per layer, transfer 2.0 s, a demand load's stall 2.0 s, regret 0.1, no free slot
        _call(10, candidates=[(2, 100, 0.8), (2, 101, 0.7), (1, 102, 0.9), (2, 104, 0.9)], queued={100: 2, 102: 1},
              backlog=[1], resident=[104]),
        _call(11, candidates=[(1, 101, 0.7), (1, 103, 0.6)], queued={101: 1}, inflight=[103], uses=[(11, MISS)]),
        _call(12, uses=[(100, PREFETCH_HIT), (101, LATE), (103, LATE), (104, MISS), (106, MISS), (107, HIT)]),
        _call(20, candidates=[(2, 200, 0.05)]),
        _call(22, uses=[(200, MISS)]),
        _call(30, candidates=[(3, 300, 0.15)], backlog=[1]),
        _call(33, uses=[(300, MISS)]),
        _call(40, candidates=[(2, 400, 0.9), (2, 401, 0.8)], queued={400: 2, 401: 2}),  # 401 goes after 400
        _call(42, uses=[(400, PREFETCH_HIT), (401, LATE)]),
    ]
    got = _counts(late_copies.classify(log, lookback=8))
    assert got == {
        ("miss", "never a candidate"): 2,  # 11 (no layer before turn 11 considered it) and 106; 107, a hit, not classed
        ("prefetch hit", "queued 2 ahead, behind queued copies"): 1,  # 100: one queued prefetch as near as it
        ("late", "no lead at 2, then queued 1 ahead"): 1,  # 101: 2 x 1.0 - 2.0 x (1 queued + 2 queued first) <= 0
        ("late", "in flight at 1"): 1,  # 103
        ("miss", "resident at 2, evicted before use"): 1,  # 104
        ("miss", "not worth its eviction at 2"): 1,  # 200: the whole transfer hidden, 0.05 x 2.0 < 0.1 x 2.0
        ("miss", "too little lead for its eviction at 3"): 1,  # 300: lead 3 - 2 = 1 s, 0.15 x 2.0 x 1/2 < 0.1 x 2.0
        ("prefetch hit", "queued 2 ahead, onto a free link"): 1,  # 400
        ("late", "queued 2 ahead, behind queued copies"): 1,  # 401: behind 400, queued first in the same call
    }
    near = _counts(late_copies.classify(log, lookback=1))  # only the layer just before each use is searched
    assert near[("late", "queued 1 ahead, onto a free link")] == 1 and ("miss", "never a candidate") in near


def _counts(classed):
    out = {}
    for served, c, _ in classed:
        out[(served, c)] = out.get((served, c), 0) + 1
    return out


@pytest.mark.slow
def test_a_short_run_classes_every_use_that_was_not_a_plain_hit(one_thread):
    args = late_copies.parser().parse_args(["--prompts", "1", "--new-tokens", "12", "--link-ratios", "2",
                                            "--compute-ms", "0.5", "--no-record"])
    table, legend = late_copies.run(args)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert rows and all(r[0] == "2" and r[1] in ("prefetch hit", "late", "miss") for r in rows)
    for served in {r[1] for r in rows}:
        shares = [float(r[4]) for r in rows if r[1] == served]
        assert sum(shares) == pytest.approx(1.0, abs=0.02)  # the classes of a kind add up to all its uses
    assert "Tokens identical to the un-offloaded model's in every run: yes" in legend


def test_a_key_the_mirror_believes_resident_but_the_cache_lacks_is_classed_apart():
    stale = _call(10, candidates=[(2, 500, 0.9), (2, 501, 0.9)], resident=[500, 501])
    stale["stale"] = {500}  # the cache did not hold 500 (an eviction the planner was not told of)
    log = [stale, _call(12, uses=[(500, MISS), (501, MISS)])]
    assert _counts(late_copies.classify(log, lookback=8)) == {
        ("miss", "believed resident at 2, not in the cache"): 1, ("miss", "resident at 2, evicted before use"): 1}
