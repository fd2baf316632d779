"""Warm starts (m2r2_moe/warm.py, runtime/warm_fill.py): the profile file round trip, another model's file refused
before anything moves, and a first forward after a warm start that misses less than a cold one (counted, no link
emulation: deterministic), with the same logits; the background feeder a CUDA copy stream gets, run on CPU."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from conftest import same_weights, snapshot, tiny_mixtral

import m2r2_moe
from m2r2_moe.attach import warm_of
from m2r2_moe.errors import NotOffloadedError
from m2r2_moe.runtime.warm_fill import WarmFill
from m2r2_moe.warm import VERSION, Profile, ProfileError, UsageCounter

PROMPTS = ["import os\n\ndef list_files(path):\n", "class Stack:\n    def push(self, item):\n",
           "for i in range(10):\n    print(i)\n"]


@pytest.fixture(scope="module")
def builtin():
    model, tokenizer = m2r2_moe.load_builtin()
    return model, [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]


def _profile_of(model, prompts, path, **options):
    m2r2_moe.offload(model, device="cpu", **options)
    try:
        with torch.no_grad():
            for ids in prompts:
                model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        return m2r2_moe.save_profile(model, path)
    finally:
        m2r2_moe.remove_offload(model)


def _first_forward(model, ids, **options):
    """(misses, prefetch hits, logits) of the first forward after offloading."""
    m2r2_moe.offload(model, device="cpu", **options)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        stats = m2r2_moe.stats(model)
        return stats.misses, stats.prefetch_hits + stats.late_prefetches, logits
    finally:
        m2r2_moe.remove_offload(model)


def test_profile_round_trip(builtin, tmp_path):
    model, prompts = builtin
    saved = _profile_of(model, prompts[:2], tmp_path / "p.json", cache_experts=16)
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["version"] == VERSION and data["fingerprint"] == saved.fingerprint and data["model_type"] == "mixtral"
    loaded = Profile.load(tmp_path / "p.json")
    assert loaded == saved and saved.planner is None  # no predictor ran: nothing learned to keep
    tokens = sum(ids.shape[1] + 5 for ids in prompts[:2])  # prefill + 5 decode forwards each
    assert saved.tokens == tokens
    assert all(sum(row) == tokens * 2 for row in saved.usage)  # top-2: two uses per token per layer
    order = saved.likeliest(10)
    assert len(order) == 10 and order == sorted(order, key=lambda p: (p[0], -saved.usage[p[0]][p[1]], p[1]))


def test_usage_counted_on_the_host_equals_the_devices_count():
    """A decode step's routing is counted on the host (the hot path has read it), a prompt's on the device: the same
    routing gives the same counts either way, and a warm start's figures are counted on from."""
    from types import SimpleNamespace

    layers = [SimpleNamespace(experts=SimpleNamespace(num_experts=n)) for n in (6, 4)]
    routing = [(0, [[1, 5], [1, 2], [3, 5]]), (1, [[0, 3], [2, 3], [3, 1]])]
    host, device = UsageCounter(layers, torch.device("cpu")), UsageCounter(layers, torch.device("cpu"))
    for layer, rows in routing:
        device.count(layer, torch.tensor(rows))
        for row in rows:
            host.count_host(layer, row)
    assert torch.equal(host.counts, device.counts) and host.tokens == device.tokens == 3
    assert host.usage([6, 4]) == [[0, 2, 1, 1, 0, 2], [1, 1, 1, 3]]
    start = SimpleNamespace(usage=[[1, 0, 0, 0, 0, 0], [0, 0, 0, 2]], tokens=5)
    resumed = UsageCounter(layers, torch.device("cpu"), start)
    resumed.count_host(0, [1, 5])
    resumed.count(1, torch.tensor([[0, 3]]))
    assert resumed.usage([6, 4]) == [[1, 1, 0, 0, 0, 1], [1, 0, 0, 3]] and resumed.tokens == 6


def test_warm_first_forward_misses_less(builtin, tmp_path):
    model, prompts = builtin
    _profile_of(model, prompts[:2], tmp_path / "p.json", cache_experts=32)
    cold_misses, cold_prefetched, cold = _first_forward(model, prompts[2], cache_experts=32)
    warm_misses, warm_prefetched, warm = _first_forward(model, prompts[2], cache_experts=32,
                                                        warm_start=tmp_path / "p.json")
    assert torch.equal(cold, warm)
    assert warm_prefetched > 0  # the warm start's copies served the first forward (cold, only prefill streaming does)
    assert warm_misses < cold_misses, (warm_misses, cold_misses)


def test_a_warm_start_resumes_counting_and_learning(builtin, tmp_path):
    model, prompts = builtin
    saved = _profile_of(model, prompts[:1], tmp_path / "p.json", cache_experts=16, predictor="m2r2")
    assert saved.planner is not None and any(saved.planner["counts"])
    m2r2_moe.offload(model, device="cpu", cache_experts=16, predictor="m2r2", warm_start=tmp_path / "p.json")
    try:
        assert m2r2_moe.get_offloader(model).prefetcher.planner.export_state() == saved.planner
        info = warm_of(model).info()
        assert info["planned"] == 16 and info["queued"] == 16 and not info["filling"]
        with torch.no_grad():
            model(input_ids=prompts[1])
        again = m2r2_moe.save_profile(model, tmp_path / "q.json")
        assert again.tokens == saved.tokens + prompts[1].shape[1]
    finally:
        m2r2_moe.remove_offload(model)


def test_another_models_profile_is_refused_before_anything_moves(tmp_path):
    _profile_of(tiny_mixtral(seed=0), [torch.tensor([[3, 4, 5]])], tmp_path / "p.json", cache_experts=4)
    other = tiny_mixtral(seed=1)
    before = snapshot(other)
    with pytest.raises(ProfileError, match="saved for another model"):
        m2r2_moe.offload(other, device="cpu", cache_experts=4, warm_start=tmp_path / "p.json")
    assert not m2r2_moe.is_offloaded(other) and same_weights(other, before)
    data = json.loads((tmp_path / "p.json").read_text())
    bad = {"version.json": {**data, "version": VERSION + 1}, "format.json": {**data, "format": "other"},
           "usage.json": {**data, "usage": data["usage"][:-1]}, "planner.json": {**data, "planner": {"counts": []}}}
    for name, content in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
    (tmp_path / "text.json").write_text("not json")
    model = tiny_mixtral(seed=0)
    for name, match in [("version.json", "version"), ("format.json", "not a m2r2_moe profile"),
                        ("usage.json", "damaged"), ("text.json", "not JSON"), ("missing.json", "cannot read"),
                        ("planner.json", "planner state")]:
        with pytest.raises(ProfileError, match=match):
            m2r2_moe.offload(model, device="cpu", cache_experts=4, warm_start=tmp_path / name)
        assert not m2r2_moe.is_offloaded(model)
    with pytest.raises(NotOffloadedError):
        m2r2_moe.save_profile(model, tmp_path / "x.json")


def test_the_background_feeder_fills_between_forwards(builtin, tmp_path):
    """The CUDA path's feeder (one chunk at a time, only while no forward runs), exercised on CPU."""
    model, prompts = builtin
    profile = _profile_of(model, prompts[:2], tmp_path / "p.json", cache_experts=24)
    m2r2_moe.offload(model, device="cpu", cache_experts=24)
    offloader = m2r2_moe.get_offloader(model)
    fill = WarmFill(offloader, model, profile.likeliest(24), background=True)
    try:
        deadline = time.monotonic() + 20
        while not fill.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fill.done and fill.queued == 24 and offloader.cache.free_slots() == 0
        with torch.no_grad():
            model(input_ids=prompts[2])
        assert m2r2_moe.stats(model).prefetch_hits > 0
    finally:
        fill.close()
        m2r2_moe.remove_offload(model)
    assert not any(t.name == "m2r2-warm-fill" for t in threading.enumerate())


def test_forwards_while_the_feeder_runs_give_the_same_logits(builtin, tmp_path):
    model, prompts = builtin
    profile = _profile_of(model, prompts[:2], tmp_path / "p.json", cache_experts=24)
    with torch.no_grad():
        reference = [model(input_ids=ids).logits for ids in prompts]
    m2r2_moe.offload(model, device="cpu", cache_experts=24, link_gbps=0.05)  # slow copies: the fill overlaps them
    fill = WarmFill(m2r2_moe.get_offloader(model), model, profile.likeliest(24), background=True)
    try:
        with torch.no_grad():
            for ids, expected in zip(prompts, reference):
                assert torch.equal(model(input_ids=ids).logits, expected)
    finally:
        fill.close()
        m2r2_moe.remove_offload(model)
