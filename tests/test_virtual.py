"""Simulated time (runtime/virtual.py): the link's rules on the virtual clock, and an offloaded model run on it."""

import json
import sys
import time

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.runtime import clock as clock_module
from m2r2_moe.runtime.cpu_engine import HostClockEngine
from m2r2_moe.runtime.transfer import DEMAND, PREFETCH
from m2r2_moe.runtime.virtual import VirtualClock, VirtualLinkEngine, virtual_time

MB = 1_000_000


def _engine(gbps=1.0):
    """A 1 GB/s link: a 1 MB copy (250 000 floats) holds it 1 ms."""
    clock = VirtualClock()
    return clock, VirtualLinkEngine(clock, gbps)


def _copy(engine, key, priority=DEMAND, floats=MB // 4):
    dst, src = torch.zeros(floats), torch.full((floats,), float(key + 1))
    return engine.submit(key, key, dst, src, priority), dst


def test_copies_hold_the_link_one_after_the_other_and_a_wait_advances_the_clock_to_the_landing():
    clock, engine = _engine()
    (a, da), (b, db) = _copy(engine, 0, PREFETCH), _copy(engine, 1, PREFETCH)
    assert not a.ready() and not b.ready() and clock.now() == 0.0
    assert b.wait() == pytest.approx(2e-3)  # behind a
    assert clock.now() == pytest.approx(2e-3) and a.ready()
    assert (a.started_at, a.finished_at, b.started_at, b.finished_at) == pytest.approx((0, 1e-3, 1e-3, 2e-3))
    assert torch.equal(da, torch.full_like(da, 1.0)) and torch.equal(db, torch.full_like(db, 2.0))  # real bytes
    assert engine.busy_seconds == pytest.approx(2e-3) and engine.bytes_copied == 2 * MB
    assert a.wait() == 0.0  # landed already: no wait
    clock.advance(5e-3)
    c, _ = _copy(engine, 2)
    assert c.started_at == pytest.approx(7e-3) and c.wait() == pytest.approx(1e-3)  # an idle link starts at once


def test_a_demand_load_preempts_the_prefetch_on_the_link_which_resumes_with_what_it_has_left():
    clock, engine = _engine()
    p, _ = _copy(engine, 0, PREFETCH)
    clock.advance(0.4e-3)
    d, _ = _copy(engine, 1, DEMAND)
    assert d.wait() == pytest.approx(1e-3)  # from 0.4 ms to 1.4 ms: the prefetch stood aside
    assert not p.ready()
    assert p.wait() == pytest.approx(0.6e-3)  # its remaining 0.6 ms, from 1.4 ms
    assert p.finished_at == pytest.approx(2e-3) and p.busy == pytest.approx(1e-3) and d.busy == pytest.approx(1e-3)
    assert engine.busy_seconds == pytest.approx(2e-3)


def test_promotion_moves_a_queued_prefetch_ahead_of_the_others_and_cancel_withdraws_only_unstarted_copies():
    clock, engine = _engine()
    first, _ = _copy(engine, 0, PREFETCH)
    second, _ = _copy(engine, 1, PREFETCH)
    third, dst = _copy(engine, 2, PREFETCH)
    engine.promote(third)  # pre-empts `first` (0 ms held) and runs next
    assert third.wait() == pytest.approx(1e-3)
    assert engine.cancel(second) and second.ready() and second.cancelled
    assert not engine.cancel(first)  # it had the link: its bytes moved
    assert first.wait() == pytest.approx(1e-3)
    assert engine.bytes_copied == 2 * MB and torch.equal(dst, torch.full_like(dst, 3.0))


def test_a_copy_by_address_moves_its_bytes_when_it_gets_the_link_under_the_same_rules():
    """`submit_at`, the native CPU engine's call for a plain row (what the expert cache uses on the engine this one
    stands in for): the bytes move when the copy gets the link, not before, and it queues and yields like any copy."""
    clock, engine = _engine()
    floats = MB // 4
    pool, rows = torch.zeros(2, floats), torch.stack([torch.full((floats,), 7.0), torch.full((floats,), 9.0)])
    row_bytes = floats * 4

    def at(key, row, slot, priority):
        return engine.submit_at(key, slot, pool.data_ptr() + slot * row_bytes, rows.data_ptr() + row * row_bytes,
                                row_bytes, priority, (pool, rows))

    first, _ = _copy(engine, 5, PREFETCH)  # holds the link for 1 ms
    p = at(0, 1, 0, PREFETCH)
    assert not p.ready() and torch.equal(pool[0], torch.zeros(floats))  # queued behind: no byte moved yet
    clock.advance(1.5e-3)
    d = at(1, 0, 1, DEMAND)  # pre-empts the prefetch by address that got the link at 1 ms
    assert d.wait() == pytest.approx(1e-3) and torch.equal(pool[1], rows[0])
    assert p.wait() == pytest.approx(0.5e-3) and torch.equal(pool[0], rows[1])
    assert (p.finished_at, p.busy, engine.bytes_copied) == pytest.approx((3e-3, 1e-3, 3 * MB))
    assert p.dst is None and p.src is None  # the owners are let go once it has landed
    assert first.ready()


def test_a_failing_copy_reaches_its_waiter_and_close_lands_what_is_queued():
    clock, engine = _engine()

    def fault(key, slot, priority):
        if key == 1:
            raise OSError("simulated")

    engine.fault = fault
    good, _ = _copy(engine, 0, PREFETCH)
    bad, _ = _copy(engine, 1, PREFETCH)
    with pytest.raises(m2r2_moe.CopyError):
        bad.wait()
    later, _ = _copy(engine, 2, PREFETCH)
    engine.close()
    assert good.ready() and later.ready() and clock.now() == pytest.approx(1e-3)  # closing moves no clock
    with pytest.raises(RuntimeError, match="closed"):
        _copy(engine, 3)


def test_host_time_counts_only_between_host_and_pause():
    clock = VirtualClock()
    assert not clock.host()
    time.sleep(0.01)
    assert clock.pause()
    frozen = clock.now()
    assert frozen >= 0.009
    time.sleep(0.01)
    assert clock.now() == frozen
    clock.advance(1.0)
    assert clock.now() == frozen + 1.0


def _generate(model, ids, tokens=6):
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("predictor", ["none", "gate"])
def test_an_offloaded_model_on_virtual_time_is_lossless_and_waits_the_simulated_link(predictor):
    model = tiny_mixtral()
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(2))
    ref = _generate(model, ids)
    layer = 0.02  # 20 ms of compute per MoE layer: far above the host work of a tiny layer call
    m2r2_moe.offload(model, device="cpu", cache_experts=2, link_gbps=0.01, predictor=predictor)
    try:
        offloader = m2r2_moe.get_offloader(model)
        real = offloader.engine
        with virtual_time(offloader, layer, prefill_layer_seconds=0.05) as clock:
            assert isinstance(offloader.engine, VirtualLinkEngine) and offloader.cache.engine is offloader.engine
            calls = {"submit": 0, "submit_at": 0}
            for name in calls:  # plain rows on the host: every copy by address, as on the native CPU engine
                def counted(*args, _name=name, _call=getattr(offloader.engine, name), **kwargs):
                    calls[_name] += 1
                    return _call(*args, **kwargs)
                setattr(offloader.engine, name, counted)
            offloader.cache.engine = offloader.engine  # the cache looks its by-address call up when it gets an engine
            out = _generate(model, ids)
            assert calls["submit_at"] > 0 and calls["submit"] == 0
            stats = m2r2_moe.stats(model)
            elapsed = clock.now()
        assert torch.equal(out, ref)  # the real kernels ran on the real bytes
        calls = stats.layer_calls
        transfer = offloader.engine.link_seconds(offloader.expert_bytes[0])
        # compute as given: 4 prefill layer calls, the rest decode; plus the waits; plus little host work
        compute = 4 * 0.05 + (calls - 4) * layer
        assert compute + stats.stall_seconds <= elapsed < compute + stats.stall_seconds + 0.5
        if predictor == "none":  # two slots, top-2: every use a demand load waited out nearly whole
            assert stats.misses > 0 and stats.stall_seconds <= stats.misses * transfer
            assert stats.stall_seconds >= stats.misses * transfer - calls * 0.005
        # restored: a real engine, the host clock, the plain hot path
        assert isinstance(offloader.engine, HostClockEngine) and offloader.engine is not real
        assert clock_module.host_source() is time.perf_counter and "run_experts" not in vars(offloader)
        assert torch.equal(_generate(model, ids), ref)
    finally:
        m2r2_moe.remove_offload(model)


def test_a_free_prefetcher_is_not_charged_and_sees_no_time_of_its_own():
    """`free_prefetcher`: the prefetcher's per-layer work costs the virtual clock nothing, and its own timings (the
    planner's balance) see none of it; without it, that work is charged like any host work."""
    model = tiny_mixtral()
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(2))
    ref = _generate(model, ids)
    m2r2_moe.offload(model, device="cpu", cache_experts=2, link_gbps=0.01, predictor="gate")
    try:
        offloader = m2r2_moe.get_offloader(model)
        prefetcher = offloader.prefetcher
        real = prefetcher.on_layer
        seen = []

        def slow_on_layer(*args, **kwargs):  # 5 ms of host work per MoE layer call, timed as the prefetcher times
            start = clock_module.host_seconds()
            end = time.perf_counter() + 0.005
            while time.perf_counter() < end:
                pass
            seen.append(clock_module.host_seconds() - start)
            return real(*args, **kwargs)

        prefetcher.on_layer = slow_on_layer
        for free in (False, True):
            seen.clear()
            with virtual_time(offloader, 0.02, free_prefetcher=free):
                assert torch.equal(_generate(model, ids), ref)
            assert prefetcher.on_layer is slow_on_layer  # restored
            assert len(seen) >= 8 and (max(seen) == 0.0 if free else min(seen) >= 0.005)
        del prefetcher.on_layer
        with virtual_time(offloader, 0.02, free_prefetcher=True):
            assert "on_layer" in vars(prefetcher)
        assert "on_layer" not in vars(prefetcher)  # the class's method again
    finally:
        m2r2_moe.remove_offload(model)


def test_virtual_time_refuses_what_it_cannot_simulate_and_does_not_nest():
    model = tiny_mixtral()
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    try:
        offloader = m2r2_moe.get_offloader(model)
        engine = offloader.engine
        for bad in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="layer_seconds"):
                with virtual_time(offloader, bad):
                    pass
        assert offloader.engine is engine  # refused before anything changed
        with virtual_time(offloader, 1e-3):
            with pytest.raises(RuntimeError, match="already running"):
                with virtual_time(offloader, 1e-3):
                    pass
        with pytest.raises(KeyError):  # an error inside the block restores all the same
            with virtual_time(offloader, 1e-3):
                raise KeyError("x")
        assert clock_module.host_source() is time.perf_counter and "run_experts" not in vars(offloader)
    finally:
        m2r2_moe.remove_offload(model)


def test_profile_on_virtual_time(tmp_path, monkeypatch, capsys):
    from m2r2_moe.cli import main

    out = tmp_path / "p.json"
    monkeypatch.setattr(sys, "argv", ["m2r2-moe"])
    code = main(["profile", "--model", "random", "--predictors", "none,oracle", "--link-ratios", "2,8",
                 "--new-tokens", "4", "--prompt-tokens", "8", "--clock", "virtual", "--json", str(out)])
    assert code == 0
    assert "times are simulated" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert all(r["tokens_identical"] for r in runs) and len(runs) == 4
    none = {r["link_ratio"]: r for r in runs if r["predictor"] == "none"}
    assert none[8]["stall_s_per_token"] > 2.5 * none[2]["stall_s_per_token"] > 0  # 4x the link time per miss
    assert main(["profile", "--model", "random", "--clock", "virtual", "--prefill", "8"]) == 2  # refused
    assert "--clock virtual" in capsys.readouterr().err
    assert main(["profile", "--model", "random", "--layer-ms", "2"]) == 2  # a simulated compute on the host clock
    assert "--layer-ms" in capsys.readouterr().err
    code = main(["profile", "--model", "random", "--predictors", "none", "--link-ratios", "2", "--new-tokens", "4",
                 "--prompt-tokens", "8", "--clock", "virtual", "--layer-ms", "2.5", "--json", str(out)])
    assert code == 0 and "2.50 ms per MoE layer" in capsys.readouterr().out
    run = json.loads(out.read_text())["runs"][0]
    assert run["time_per_token_s"] >= 4 * 2.5e-3  # a tiny model's real compute is far less: the given one counts
