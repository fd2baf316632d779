"""The C++ planner makes exactly the Python twin's decisions (runtime/planner.py is the reference).

Random sequences of layer calls — decode and multi-token, with and without predictions, wrapping or not, every
link state, backlogs, free slots — and random answers from the cache to the copies asked for, fed to both;
and now and then a resynchronisation of the mirror (prefetching was off); after every call the decisions (copies
to queue, experts to expect, copies to withdraw), the learned state (calibrated probabilities, regret, benefit
balance, how often to predict) must be equal.
"""

from __future__ import annotations

import random

import pytest
import torch

from m2r2_moe import _ext
from m2r2_moe.runtime.planner import MISS, NOT_QUEUED, PlannerCore, make_planner

pytestmark = pytest.mark.skipif(not _ext.HAS_PLANNER and not _ext.require_ext(), reason=f"{_ext.PLANNER_ERROR}")


def _both(layers, experts, width, max_queued):
    stride = experts + 3
    return (PlannerCore(layers, experts, stride, width, max_queued),
            make_planner(layers, experts, stride, width, max_queued, native=True), stride)


def _call(rng: random.Random, layers: int, experts: int, stride: int, layer: int, now: int, depth: int):
    decode = rng.random() < 0.8
    used = rng.sample(range(experts), rng.randint(1, min(4, experts)))
    keys = [layer * stride + e for e in used]
    served = [rng.choice((0, 1, 2, MISS)) for _ in keys]
    evicted = [rng.randrange(layers) * stride + rng.randrange(experts) for _ in range(rng.randint(0, 2))]
    rows = min(depth, layers)
    probs = None
    if rng.random() < 0.85 and rows:
        probs = torch.softmax(torch.randn(rows, experts, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
                              * rng.choice((0.5, 3.0)), -1)
        if rng.random() < 0.2:  # ties and exact zeros, as the oracle's one-hot rows have
            probs = (probs > probs.median()).float() / 2
        probs = probs.numpy()
    return dict(layer=layer, decode=decode, now=now, keys=keys, served=served, evicted=evicted, probs=probs,
                wraps=rng.random() < 0.5, horizon=rng.choice((0, 1, 3, layers)), miss=rng.choice((1.0, 3e-4, 4e-3)),
                transfer=rng.choice((1.0, 2e-4, 5e-3)), compute=rng.choice((0.0, 1e-4, 1e-3)),
                free=rng.randint(-1, 3), backlog=[rng.randint(1, 4) for _ in range(rng.randint(0, 3))],
                min_prob=rng.choice((0.0, 0.0, 0.3)))


def _state(p, layers, experts):
    probs = [p.probability(s, d, x) for s in (0, 1) for d in range(layers + 1) for x in (0.0, 0.05, 0.31, 0.77, 1.0)]
    return (probs, p.regret(), p.saved, p.spent, p.decode_saved, p.decode_caused, p.every, p.late_saving, p.near,
            [p.active(layer) for layer in range(layers)])


@pytest.mark.parametrize("seed", range(12))
def test_native_planner_decides_as_the_python_twin(seed):
    rng = random.Random(seed)
    layers, experts = rng.choice((3, 8, 12)), rng.choice((4, 8, 32))
    width, max_queued = rng.choice((1, 2, 4)), rng.choice((2, 8))
    py, cc, stride = _both(layers, experts, width, max_queued)
    now = 0
    for call in range(300):
        layer = call % layers
        now += 1
        if layer == 0:  # a prompt's forward or a decode step; the decode steps' stall balance with or without a margin
            window, decode, margin = rng.choice((4, 64)), rng.random() < 0.8, rng.choice((0.0, 1e-3, 1.0))
            py.step(window, decode, margin), cc.step(window, decode=decode, margin=margin)
        if rng.random() < 0.1:  # the link's horizon changed: copies past it are early ones (admission.py, EARLY_Q)
            py.near = cc.near = rng.choice((0, 1, 2, layers))
        args = _call(rng, layers, experts, stride, layer, now, rng.randint(0, 4))
        out_py = py.layer(**args)
        out_cc = cc.layer(**args)
        assert [list(x) for x in out_py] == [[tuple(t) for t in x] for x in out_cc], (seed, call)
        for target, expert, _ in out_py[0]:  # the cache's answers: queued, queued with an eviction, refused
            answer = rng.choice((-1, NOT_QUEUED, rng.randrange(layers) * stride + rng.randrange(experts)))
            py.issued(target * stride + expert, answer, now), cc.issued(target * stride + expert, answer, now)
        for target, expert in out_py[2]:
            if rng.random() < 0.5:
                py.withdrawn(target * stride + expert), cc.withdrawn(target * stride + expert)
        spent = rng.random() * 1e-3
        py.add_spent(spent), cc.add_spent(spent)
        if rng.random() < 0.05:  # the prefetcher measured what a late prefetch hides (or forgot it)
            py.late_saving = cc.late_saving = rng.choice((None, 0.0, 2e-4, 5.0))
        if rng.random() < 0.04:  # prefetching was off for a while: the mirror from the cache, pending dropped
            resident = rng.sample(range(layers * stride), rng.randint(0, min(layers * stride, 3 * layers)))
            py.resync(resident), cc.resync(resident)
        assert _state(py, layers, experts) == _state(cc, layers, experts), (seed, call)
        assert set(py._wanted) <= set(range(layers)) and len(py._evicted_at) <= 4096 + layers * stride  # bounded


def test_the_comparison_can_fail():
    """A planner with another width decides otherwise on the same calls: the test above would see it."""
    rng = random.Random(0)
    a = PlannerCore(8, 8, 11, 2, 8)
    b = make_planner(8, 8, 11, 1, 8, native=True)
    differ = False
    for call in range(40):
        args = _call(rng, 8, 8, 11, call % 8, call, 4)
        differ |= [list(x) for x in a.layer(**args)] != [[tuple(t) for t in x] for x in b.layer(**args)]
    assert differ


def test_native_planner_refuses_bad_probabilities():
    planner = make_planner(4, 8, 8, 2, 8, native=True)
    args = dict(layer=0, decode=True, now=1, keys=[0], served=[MISS], evicted=[], wraps=False, horizon=0, miss=1.0,
                transfer=1.0, compute=0.0, free=1, backlog=[], min_prob=0.0)
    with pytest.raises(ValueError, match="float32"):
        planner.layer(probs=torch.ones(2, 8, dtype=torch.float64).numpy(), **args)
    with pytest.raises(ValueError, match="contiguous"):
        planner.layer(probs=torch.ones(8, 2).numpy().T, **args)
    with pytest.raises(ValueError, match="float32"):
        planner.layer(probs=torch.ones(2, 8), **args)  # a tensor, not its numpy array


def test_native_per_layer_calls_take_their_arguments_as_named_and_refuse_bad_ones():
    """The per-layer native calls (planner.layer, the heads, the victim search, the engine's submit) are bound
    through the C API, not pybind11 (csrc/planner_bindings.cpp): positional and keyword arguments as the names say;
    a missing, unknown, repeated or mistyped one is a TypeError, and nothing is decided."""
    from m2r2_moe import _ext

    planner = make_planner(4, 8, 8, 2, 8, native=True)
    args = dict(layer=0, decode=True, now=1, keys=[0], served=[MISS], evicted=[], probs=None, wraps=False, horizon=0,
                miss=1.0, transfer=1.0, compute=0.0, free=1, backlog=[], min_prob=0.0)
    positional = list(args.values())
    assert planner.layer(*positional) == ([], [], [])
    assert planner.layer(*positional[:5], **dict(list(args.items())[5:])) == ([], [], [])
    with pytest.raises(TypeError, match="missing argument 'min_prob'"):
        planner.layer(*positional[:-1])
    with pytest.raises(TypeError, match="unexpected keyword argument 'mins'"):
        planner.layer(*positional[:-1], mins=0.0)
    with pytest.raises(TypeError, match="repeated keyword argument 'layer'"):
        planner.layer(*positional, layer=0)
    with pytest.raises(TypeError, match="takes 15 arguments"):
        planner.layer(*positional, 0)
    with pytest.raises(TypeError):
        planner.layer(*positional[:3], "not keys", *positional[4:])
    with pytest.raises(TypeError):
        _ext.planner.policy_victim(1, 1, 1, 1, 1, 1, 0, [0], 0, 1, 0.0, 0.0)  # one short
    with pytest.raises(OverflowError):  # an address is never negative
        _ext.planner.mlp_softmax_into(-1, 1, 1, 1, 1, 1, 1, 1, 1, False, 1)


def test_keys_past_the_geometry_change_nothing_in_either_twin():
    """The C++ planner keeps its per-key state in flat arrays sized for the geometry (layers x key stride); a key
    past them (a cache answer it was not built for) grows them and decides as the twin's sets do."""
    py, cc, stride = _both(4, 8, 2, 8)
    far = 4 * stride + 7  # no layer of this geometry names it
    for p in (py, cc):
        p.issued(0 * stride + 1, far, 1)  # a copy whose eviction names it
        p.withdrawn(far + 100)
        p.resync([far, far + 3 * stride, 2])
    rng = random.Random(5)
    for call in range(40):
        args = _call(rng, 4, 8, stride, call % 4, call + 2, 3)
        assert [list(x) for x in py.layer(**args)] == [[tuple(t) for t in x] for x in cc.layer(**args)], call
        assert _state(py, 4, 8) == _state(cc, 4, 8), call
