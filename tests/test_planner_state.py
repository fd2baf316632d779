"""What the planner learned online, exported and imported (a warm start's profile): both twins agree.

After a random sequence of layer calls both twins export the same state; a state imported into either twin gives
the exporter's calibrated probabilities and regret at once, and from there both twins decide alike; a state made
for another geometry, or with bad values, is refused with a ValueError and changes nothing.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from m2r2_moe import _ext
from m2r2_moe.runtime.planner import NOT_QUEUED, PlannerCore, make_planner

from test_planner_diff import _both, _call, _state

TWINS = ["python"] + (["native"] if _ext.HAS_PLANNER or _ext.require_ext() else [])


def _make(kind: str, layers: int, experts: int, stride: int, width: int = 2, max_queued: int = 8):
    return make_planner(layers, experts, stride, width, max_queued, native=kind == "native")


def _run(planners, rng: random.Random, layers: int, experts: int, stride: int, calls: int, now: int = 0) -> int:
    """Feed every planner the same random calls (as test_planner_diff does); returns the clock."""
    for call in range(calls):
        layer = call % layers
        now += 1
        if layer == 0:
            for p in planners:
                p.step(16)
        args = _call(rng, layers, experts, stride, layer, now, rng.randint(1, 4))
        outs = [p.layer(**args) for p in planners]
        assert all([[tuple(t) for t in x] for x in out] == [[tuple(t) for t in x] for x in outs[0]] for out in outs)
        for target, expert, _ in outs[0][0]:
            answer = rng.choice((-1, NOT_QUEUED, rng.randrange(layers) * stride + rng.randrange(experts)))
            for p in planners:
                p.issued(target * stride + expert, answer, now)
    return now


def _learned(p, layers: int):
    probs = [p.probability(s, d, x) for s in (0, 1) for d in range(layers + 1) for x in (0.0, 0.05, 0.31, 0.77, 1.0)]
    return probs, p.regret()


@pytest.mark.skipif("native" not in TWINS, reason=f"{_ext.PLANNER_ERROR}")
@pytest.mark.parametrize("seed", range(4))
def test_both_twins_export_the_same_state(seed):
    rng = random.Random(seed)
    layers, experts = rng.choice((3, 8)), rng.choice((4, 8, 32))
    py, cc, stride = _both(layers, experts, 2, 8)
    _run([py, cc], rng, layers, experts, stride, 200)
    exported = py.export_state()
    assert exported == cc.export_state()
    assert any(exported["counts"]) and any(map(any, exported["prior"])) and exported["regret"][1] > 0  # learned


@pytest.mark.parametrize("source", TWINS)
@pytest.mark.parametrize("target", TWINS)
def test_an_imported_state_is_the_exporters_learning(source, target):
    rng = random.Random(7)
    layers, experts, stride = 6, 8, 11
    teacher = _make(source, layers, experts, stride)
    now = _run([teacher], rng, layers, experts, stride, 240)
    state = json.loads(json.dumps(teacher.export_state()))  # as a profile file carries it
    student = _make(target, layers, experts, stride)
    assert _learned(student, layers) != _learned(teacher, layers)
    student.import_state(state)
    assert _learned(student, layers) == _learned(teacher, layers)
    assert student.export_state() == teacher.export_state()
    if "native" in TWINS:  # from the same imported state, both twins go on deciding alike
        py, cc = _make("python", layers, experts, stride), _make("native", layers, experts, stride)
        py.import_state(state), cc.import_state(state)
        _run([py, cc], rng, layers, experts, stride, 120, now)
        assert _state(py, layers, experts) == _state(cc, layers, experts)


@pytest.mark.parametrize("kind", TWINS)
def test_a_state_for_another_geometry_or_with_bad_values_is_refused(kind):
    rng = random.Random(3)
    donor = PlannerCore(4, 8, 8, 2, 8)
    _run([donor], rng, 4, 8, 8, 80)
    good = donor.export_state()
    planner = _make(kind, 4, 8, 8)
    _run([planner], random.Random(5), 4, 8, 8, 40)
    before = planner.export_state()
    bad = [
        _make("python", 5, 8, 8).export_state(),  # another number of layers
        _make("python", 4, 6, 8).export_state(),  # another number of experts
        {**good, "counts": good["counts"][:-1]},
        {**good, "prior": [row[:-1] for row in good["prior"]]},
        {**good, "regret": [1.0]},
        {**good, "counts": [-1.0] + good["counts"][1:]},
        {**good, "prior": [[math.nan] * 8] + good["prior"][1:]},
        {**good, "counts": ["many"] * len(good["counts"])},
        {k: v for k, v in good.items() if k != "prior"},
    ]
    for state in bad:
        with pytest.raises(ValueError):
            planner.import_state(state)
        assert planner.export_state() == before  # nothing changed
    planner.import_state(good)
    assert planner.export_state() == good
