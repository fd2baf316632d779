"""The CPU copy engines (the C++ worker and its Python twin): real copies, demand before prefetch, emulated
serial link timing. Every test runs on both."""

import time

import pytest
import torch

from m2r2_moe.runtime import cpu_native
from m2r2_moe.runtime.cpu_engine import ThreadCopyEngine
from m2r2_moe.runtime.store import plain_layout
from m2r2_moe.runtime.transfer import DEMAND, PREFETCH

_native = pytest.mark.skipif(not cpu_native.available(), reason="native module not built")
ENGINES = [pytest.param(ThreadCopyEngine, id="python"),
           pytest.param(lambda *a, **k: cpu_native.NativeCopyEngine(*a, spin=False, **k), id="native", marks=_native),
           pytest.param(lambda *a, **k: cpu_native.NativeCopyEngine(*a, spin=True, **k), id="native-polling",
                        marks=_native)]


def _until_on_link(transfer) -> None:
    """Wait until the worker has started `transfer` (a fixed sleep is too short on a busy machine)."""
    while transfer.started_at == 0.0:
        time.sleep(0.0005)


@pytest.mark.parametrize("Engine", ENGINES)
def test_copies_land_in_the_slot(Engine):
    engine = Engine()
    try:
        src, dst = torch.randn(1000), torch.zeros(1000)
        t = engine.submit(1, 0, dst, src)
        t.wait()
        assert t.ready() and torch.equal(dst, src)
        assert engine.bytes_copied == 4000
    finally:
        engine.close()


@pytest.mark.parametrize("Engine", ENGINES)
def test_emulated_link_is_serial_and_timed(Engine):
    engine = Engine(link_gbps=0.001, link_latency_us=1000)  # 1 MB/s + 1 ms
    try:
        src = [torch.randn(2500) for _ in range(3)]  # 10 kB each: 10 ms + 1 ms
        start = time.perf_counter()
        transfers = [engine.submit(i, i, torch.zeros(2500), s) for i, s in enumerate(src)]
        for t in transfers:
            t.wait()
        elapsed = time.perf_counter() - start
        assert elapsed >= 3 * 0.011 * 0.99  # serial: the three hold the link one after the other (a busy machine
        # only adds time, so no upper bound is asserted)
        spans = sorted((t.started_at, t.finished_at) for t in transfers)
        assert all(a_end <= b_start + 1e-4 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        assert all(t.busy == pytest.approx(0.011, rel=1e-6) for t in transfers)  # link time held, from the clock
        assert abs(engine.link_seconds(10_000) - 0.011) < 1e-9
    finally:
        engine.close()


@pytest.mark.parametrize("Engine", ENGINES)
def test_demand_loads_jump_queued_prefetches_and_preempt_the_one_on_the_link(Engine):
    engine = Engine(link_gbps=0.001)  # 1 MB/s: 10 ms per 10 kB copy
    try:
        src = torch.randn(2500)
        blocker_dst = torch.zeros(2500)
        blocker = engine.submit(0, 0, blocker_dst, src, PREFETCH)  # occupies the link
        _until_on_link(blocker)
        prefetches = [engine.submit(10 + i, 1, torch.zeros(250), torch.randn(250), PREFETCH) for i in range(3)]
        demand = engine.submit(99, 2, torch.zeros(250), torch.randn(250), DEMAND)
        for t in [demand, *prefetches, blocker]:
            t.wait()
        # the demand load cut into the copy on the link at once, ahead of the queued prefetches
        assert blocker.started_at < demand.started_at < blocker.finished_at
        assert demand.finished_at <= min(p.started_at for p in prefetches)
        assert blocker.finished_at <= min(p.started_at for p in prefetches)  # the started prefetch finishes first
        assert torch.equal(blocker_dst, src)
        assert blocker.busy == pytest.approx(0.010, abs=0.005)  # the link time it used, not its wall span
        assert blocker.finished_at - blocker.started_at >= blocker.busy + 0.9 * demand.busy
    finally:
        engine.close()


@pytest.mark.parametrize("Engine", ENGINES)
def test_a_prefetch_never_preempts_another(Engine):
    """Only demand loads cut in: a nearer prefetch queued while a farther one holds the link goes next."""
    engine = Engine(link_gbps=0.001)
    try:
        far = engine.submit(0, 0, torch.zeros(2500), torch.randn(2500), priority=3)
        _until_on_link(far)
        near = engine.submit(1, 1, torch.zeros(250), torch.randn(250), priority=1)
        near.wait()
        assert far.ready() and far.finished_at <= near.started_at
    finally:
        engine.close()


@pytest.mark.parametrize("Engine", ENGINES)
def test_promoting_a_partly_copied_prefetch_runs_its_rest_first(Engine):
    engine = Engine(link_gbps=0.001)
    try:
        first = engine.submit(0, 0, torch.zeros(2500), torch.randn(2500), PREFETCH)
        other = engine.submit(1, 1, torch.zeros(250), torch.randn(250), PREFETCH)
        late = engine.submit(2, 2, torch.zeros(2500), torch.randn(2500), PREFETCH)
        _until_on_link(late)  # `first` and `other` done, `late` on the link
        engine.promote(late)
        demand = engine.submit(3, 3, torch.zeros(250), torch.randn(250), DEMAND)
        for t in (first, other, late, demand):
            t.wait()
        # promoted, its remaining pieces go before the demand load queued after the promotion
        assert late.priority == DEMAND and late.finished_at <= demand.started_at
        assert late.busy == pytest.approx(0.010, abs=0.005)
    finally:
        engine.close()


@pytest.mark.parametrize("Engine", ENGINES)
def test_failed_copy_reports_to_the_waiter(Engine):
    engine = Engine()
    try:
        t = engine.submit(3, 0, torch.zeros(4), torch.zeros(5))  # shape mismatch
        try:
            t.wait()
        except RuntimeError as e:
            assert "expert key 3" in str(e)
        else:
            raise AssertionError("a failed copy must raise in wait()")
    finally:
        engine.close()


@pytest.mark.parametrize("Engine", ENGINES)
def test_a_later_copy_into_the_same_slot_wins_over_a_preempted_one(Engine):
    """A demand load into a slot whose evicted prefetch is still on the link (it cannot be withdrawn any
    more) pre-empts it; the slot ends up with the demand load's bytes, never the older copy's."""
    engine = Engine(link_gbps=0.001)
    size = 25_000  # 100 kB: 100 ms on the link, so that a busy machine's pause before the demand load is queued
    # does not let the prefetch finish first
    try:
        slot = torch.zeros(size)
        old = engine.submit(0, 7, slot, torch.ones(size), PREFETCH)
        _until_on_link(old)
        assert not engine.cancel(old)  # started: it cannot be withdrawn
        new = engine.submit(1, 7, slot, torch.full((size,), 2.0), DEMAND)
        new.wait()
        assert torch.equal(slot, torch.full((size,), 2.0)) and not old.ready()
        old.wait()
        assert torch.equal(slot, torch.full((size,), 2.0))
    finally:
        engine.close()


@pytest.mark.skipif(not cpu_native.available(), reason="native module not built")
def test_the_native_worker_copies_while_python_holds_the_gil():
    """The point of the C++ worker: a plain copy lands, and its link time passes, while the compute thread
    keeps the GIL (here a pure-Python loop with a 10 s switch interval, so no other Python thread runs)."""
    import sys

    engine = cpu_native.NativeCopyEngine(link_gbps=0.001)  # 10 ms per 10 kB copy
    interval = sys.getswitchinterval()
    try:
        src, dst = torch.randn(2500), torch.zeros(2500)
        sys.setswitchinterval(10.0)
        t = engine.submit(0, 0, dst, src, PREFETCH)
        deadline = time.perf_counter() + 5.0
        while not t.ready() and time.perf_counter() < deadline:
            pass  # never releases the GIL
        landed = t.ready()
    finally:
        sys.setswitchinterval(interval)
        engine.close()
    assert landed and torch.equal(dst, src) and t.busy == pytest.approx(0.010, rel=1e-3)
    assert not engine._hooked  # a plain copy never called back into Python


def test_the_python_twin_needs_the_gil_to_copy():
    """The same loop starves the Python worker: the reason the native one exists (this fails if the Python
    worker ever stops needing the GIL, and then the native engine's reason to exist should be re-measured)."""
    import sys

    engine = ThreadCopyEngine(link_gbps=0.001)
    interval = sys.getswitchinterval()
    try:
        sys.setswitchinterval(10.0)
        t = engine.submit(0, 0, torch.zeros(2500), torch.randn(2500), PREFETCH)
        deadline = time.perf_counter() + 0.2
        while time.perf_counter() < deadline:
            pass
        starved = not t.ready()
    finally:
        sys.setswitchinterval(interval)
        t.wait(10)
        engine.close()
    assert starved


@pytest.mark.skipif(not cpu_native.available(), reason="native module not built")
@pytest.mark.parametrize("gbps", [0.0, -1.0, 1e-300, float("inf"), float("nan")])
def test_the_native_engine_refuses_an_impossible_link(gbps):
    with pytest.raises(ValueError, match="link_gbps"):
        cpu_native.NativeCopyEngine(link_gbps=gbps)


@pytest.mark.skipif(not cpu_native.available(), reason="native module not built")
def test_a_withdrawn_hooked_copy_is_forgotten():
    """A copy that would call back into Python (here: the fault hook is set), withdrawn before the worker
    reached it, leaves nothing behind for the hook."""
    engine = cpu_native.NativeCopyEngine(link_gbps=0.001, spin=False)
    try:
        first = engine.submit(0, 0, torch.zeros(2500), torch.randn(2500), PREFETCH)
        _until_on_link(first)
        engine.fault = lambda key, slot, priority: None
        queued = engine.submit(1, 1, torch.zeros(2500), torch.randn(2500), PREFETCH)
        assert engine._hooked and engine.cancel(queued)
        assert not engine._hooked and queued.ready() and queued.cancelled
    finally:
        engine.close()


@pytest.mark.skipif(not cpu_native.available(), reason="the native CPU engine is not built")
@pytest.mark.parametrize("rows", [True, False])
def test_copies_by_address_land_what_the_views_would(rows, monkeypatch):
    """The hot path submits a plain row by address on the native engine (`ExpertCache._copy`); a store without
    `rows` takes the per-copy views. Either way every resident slot holds its expert's row, bit for bit, and
    the offloaded model's tokens are the original's."""
    from conftest import tiny_mixtral

    import m2r2_moe
    from m2r2_moe.runtime.store import HostExpertStore

    if not rows:
        monkeypatch.delattr(HostExpertStore, "rows")
    model = tiny_mixtral(torch.float32, seed=4)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    m2r2_moe.offload(model, device="cpu", cache_experts=3, predictor="none", link_gbps=5.0)
    off = m2r2_moe.get_offloader(model)
    assert isinstance(off.engine, cpu_native.NativeCopyEngine)
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref)
        assert m2r2_moe.stats(model).misses > 0
        assert (plain_layout(off.store, off.pool, 0) is not None) == rows
        for key, slot in off.cache.slots.resident():
            row = off.store.expert(key // off.cache.key_stride, key % off.cache.key_stride)
            assert torch.equal(off.pool[slot, : row.numel()], row)
    finally:
        m2r2_moe.remove_offload(model)


@pytest.mark.skipif(not cpu_native.available(), reason="the native CPU engine is not built")
def test_a_copy_by_address_is_its_own_handle_and_keeps_the_protocol():
    """`submit_at` returns the C++ copy itself (no Python object per copy): it answers the `Transfer` protocol as
    the Python handle does (fields, `ready`, `wait` in seconds, `TimeoutError`), can be withdrawn and promoted, and
    the engine keeps the owners of its memory referenced until it closes."""
    import gc
    import weakref

    engine = cpu_native.NativeCopyEngine(link_gbps=0.001, spin=False)  # 10 ms per 10 kB
    rows, pool = torch.arange(4 * 2500, dtype=torch.float32).reshape(4, 2500), torch.zeros(4, 2500)
    nbytes = 2500 * 4

    def at(key, slot, row, priority):
        return engine.submit_at(key, slot, pool.data_ptr() + slot * nbytes, rows.data_ptr() + row * nbytes, nbytes,
                                priority, (pool, rows))

    try:
        first = at(7, 0, 2, PREFETCH)
        assert not isinstance(first, cpu_native.NativeTransfer)
        assert (first.key, first.slot, first.nbytes, first.priority, first.error) == (7, 0, nbytes, PREFETCH, None)
        _until_on_link(first)
        queued, later = at(8, 1, 3, PREFETCH), at(9, 2, 1, PREFETCH)
        assert engine.cancel(queued) and queued.ready() and queued.cancelled
        with pytest.raises(TimeoutError, match="key 9 into slot 2"):
            later.wait(0.001)  # behind the first copy's 10 ms
        engine.promote(later)
        assert later.priority == DEMAND
        waited = later.wait(5.0)  # a demand load now: it pre-empted the first copy on the link
        assert 0.0 < waited < 5.0 and later.ready() and not engine.cancel(first)
        first.wait(5.0)
        assert torch.equal(pool[0], rows[2]) and torch.equal(pool[2], rows[1]) and not pool[1].any()
        assert later.busy == pytest.approx(0.010, rel=1e-3) and later.finished_at >= later.started_at > 0
        gone = weakref.ref(rows)
        del rows
        gc.collect()
        assert gone() is not None  # the engine holds what its copies read
        engine.close()
        gc.collect()
        assert gone() is None
    finally:
        engine.close()
