"""Fault injection in the runtime: failed, slow and refused copies, a predictor that raises, a slot pool
that does not fit. Each fault either leaves outputs bit-identical (recovered, counted in the stats) or
raises a clear error naming the layer and expert — never a hang, never a half-changed model.

Faults come in through the copy engine's test-only hook (`engine.fault(key, slot, priority)`, run before
each copy), a predictor subclass, and the slot-pool allocator."""

import logging
import threading
import time

import pytest
import torch

import m2r2_moe
from conftest import same_weights, snapshot, tiny_mixtral
from m2r2_moe.errors import CopyError, CopyTimeoutError, DeviceMemoryError
from m2r2_moe.predict.simple import HistoryPredictor
from m2r2_moe.runtime import offloader as offloader_module
from m2r2_moe.runtime.transfer import DEMAND

IDS = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(7))
GEN = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


def _generate(model):
    with torch.no_grad():
        return model.generate(input_ids=IDS, **GEN)


def _setup(predictor="none", **options):
    model = tiny_mixtral(seed=3)
    ref, snap, params = _generate(model), snapshot(model), dict(model.named_parameters())
    m2r2_moe.offload(model, device="cpu", cache_experts=3, predictor=predictor, **options)
    return model, m2r2_moe.get_offloader(model), (ref, snap, params)


def _restores(model, off, before):
    ref, snap, params = before
    assert all(off.cache.slots.pins(key) == 0 for key, _ in off.cache.slots.resident())
    assert torch.equal(_generate(model), ref)  # usable again, and no slot holding garbage was trusted
    m2r2_moe.remove_offload(model)
    assert all(p is params[n] for n, p in model.named_parameters()) and same_weights(model, snap)


def _fail(when):
    """A fault hook raising for the copies `when(key, slot, priority, count)` picks (count: calls so far)."""
    calls = []

    def fault(key, slot, priority):
        calls.append(key)
        if when(key, slot, priority, len(calls)):
            raise OSError(f"injected copy fault (key {key})")

    return fault


def test_a_copy_that_fails_once_is_redone():
    model, off, before = _setup()
    off.engine.fault = _fail(lambda key, slot, priority, n: n == 1)
    assert torch.equal(_generate(model), before[0])
    assert m2r2_moe.stats(model).failed_copies == 1
    off.engine.fault = None
    _restores(model, off, before)


def test_failed_prefetches_fall_back_to_demand_loads(admit_every_prediction):
    model, off, before = _setup("history", lookahead=2)
    off.engine.fault = _fail(lambda key, slot, priority, n: priority != DEMAND)  # every prefetch fails
    assert torch.equal(_generate(model), before[0])
    stats = m2r2_moe.stats(model)
    assert stats.prefetches > 0 and stats.failed_copies > 0 and stats.prefetch_hits == 0
    off.engine.fault = None
    _restores(model, off, before)


def test_a_submission_that_raises_is_a_failed_copy_too(admit_every_prediction):
    """The CUDA engines raise from `submit` (where the CPU worker records the error on the transfer)."""
    model, off, before = _setup("history", lookahead=2)
    submit = off.engine.submit

    def refuse_prefetches(key, slot, dst, src, priority=DEMAND, after=None, expand=None):
        if priority != DEMAND:
            raise RuntimeError("injected: submit refused")
        return submit(key, slot, dst, src, priority, after, expand)

    submit_at = getattr(off.engine, "submit_at", None)  # the native CPU engine's by-address submission

    def refuse_prefetches_at(key, slot, dst, src, nbytes, priority, owners):
        if priority != DEMAND:
            raise RuntimeError("injected: submit refused")
        return submit_at(key, slot, dst, src, nbytes, priority, owners)

    off.engine.submit = refuse_prefetches
    if submit_at is not None:
        off.engine.submit_at = refuse_prefetches_at
    off.cache.engine = off.engine  # the cache looks the by-address call up when its engine is set
    assert torch.equal(_generate(model), before[0])
    assert m2r2_moe.stats(model).failed_copies > 0
    off.engine.submit = submit
    if submit_at is not None:
        del off.engine.submit_at
    off.cache.engine = off.engine
    _restores(model, off, before)


def test_a_copy_that_keeps_failing_raises_a_clear_error():
    model, off, before = _setup()
    off.engine.fault = _fail(lambda key, slot, priority, n: key == 1)  # layer 0, expert 1: always
    with pytest.raises(CopyError, match=r"layer 0 expert 1: the copy into slot \d+ failed twice"):
        _generate(model)
    off.engine.fault = None
    _restores(model, off, before)


def test_a_stuck_copy_times_out_naming_layer_and_expert():
    model, off, before = _setup(copy_timeout_s=0.5)
    release = threading.Event()
    off.engine.fault = lambda key, slot, priority: release.wait(20) if key == 1 else None
    start = time.perf_counter()
    # expert 1's copy is stuck; on a starved machine expert 0's wait (queued first) may be the one to give up
    with pytest.raises(CopyTimeoutError, match=r"layer 0 expert [01]: .* within copy_timeout_s=0.5"):
        _generate(model)
    assert time.perf_counter() - start < 5  # the wait gave up; it did not sit out the stuck copy
    off.engine.fault = None
    release.set()  # the stuck copy lands late, into a slot the runtime no longer trusts
    _restores(model, off, before)


class Broken(HistoryPredictor):
    def predict(self, layer, residual, chosen=None):
        if layer == 2:
            raise ZeroDivisionError("injected predictor bug")
        return super().predict(layer, residual, chosen)


def test_a_predictor_that_raises_is_switched_off_once(caplog):
    model, off, before = _setup(Broken(4, 8, 2, 2), lookahead=2)
    with caplog.at_level(logging.WARNING, logger="m2r2_moe"):
        assert torch.equal(_generate(model), before[0])
        assert torch.equal(_generate(model), before[0])
    warnings = [r for r in caplog.records if "predictor" in r.getMessage()]
    assert len(warnings) == 1 and "injected predictor bug" in warnings[0].getMessage()
    assert m2r2_moe.stats(model).predictor_failures == 1 and off.prefetcher is None
    _restores(model, off, before)


def test_a_slot_pool_that_does_not_fit_is_a_clear_error(monkeypatch):
    model = tiny_mixtral(seed=3)
    snap, params = snapshot(model), dict(model.named_parameters())

    allocate = offloader_module.allocate_pool  # the real allocator, asked for far more than any machine has
    monkeypatch.setattr(offloader_module, "allocate_pool",
                        lambda num_slots, numel, dtype, device: allocate(num_slots, numel * 10**12, dtype, device))
    with pytest.raises(DeviceMemoryError, match=r"could not allocate 5 expert slots .*GiB\) on cpu.* Lower cache_experts"):
        m2r2_moe.offload(model, device="cpu", cache_experts=5)
    monkeypatch.undo()
    assert not m2r2_moe.is_offloaded(model)
    assert all(p is params[n] for n, p in model.named_parameters()) and same_weights(model, snap)


def test_the_copy_worker_survives_anything_a_copy_raises():
    """An error in the worker's link emulation (here an absurd link: time.sleep overflows) is the copy's
    error, reported to its waiter at once; the worker lives on for the next copy."""
    from m2r2_moe.runtime.cpu_engine import ThreadCopyEngine

    engine = ThreadCopyEngine(link_gbps=1e-300)  # OffloadConfig refuses such a link; the engine must not die of it
    try:
        dst, src = torch.zeros(4), torch.ones(4)
        with pytest.raises(CopyError, match="OverflowError"):
            engine.submit(0, 0, dst, src).wait(timeout=10)
        assert engine._worker.is_alive()
        engine.bytes_per_s = None  # a sane link again
        engine.submit(1, 0, dst, src).wait(timeout=10)
        assert torch.equal(dst, src)
    finally:
        engine.close()
