"""The CPU copy engine: real copies, demand before prefetch, emulated serial link timing."""

import time

import torch

from m2r2_moe.runtime.transfer import DEMAND, PREFETCH, ThreadCopyEngine


def test_copies_land_in_the_slot():
    engine = ThreadCopyEngine()
    try:
        src, dst = torch.randn(1000), torch.zeros(1000)
        t = engine.submit(1, 0, dst, src)
        t.wait()
        assert t.ready() and torch.equal(dst, src)
        assert engine.bytes_copied == 4000
    finally:
        engine.close()


def test_emulated_link_is_serial_and_timed():
    engine = ThreadCopyEngine(link_gbps=0.001, link_latency_us=1000)  # 1 MB/s + 1 ms
    try:
        src = [torch.randn(2500) for _ in range(3)]  # 10 kB each: 10 ms + 1 ms
        start = time.perf_counter()
        transfers = [engine.submit(i, i, torch.zeros(2500), s) for i, s in enumerate(src)]
        for t in transfers:
            t.wait()
        elapsed = time.perf_counter() - start
        assert 3 * 0.011 * 0.9 <= elapsed <= 3 * 0.011 + 0.1
        assert abs(engine.link_seconds(10_000) - 0.011) < 1e-9
    finally:
        engine.close()


def test_demand_loads_jump_queued_prefetches():
    engine = ThreadCopyEngine(link_gbps=0.001)  # 1 MB/s: 10 ms per 10 kB copy
    try:
        blocker = engine.submit(0, 0, torch.zeros(2500), torch.randn(2500), PREFETCH)  # occupies the link
        time.sleep(0.002)
        prefetches = [engine.submit(10 + i, 1, torch.zeros(250), torch.randn(250), PREFETCH) for i in range(3)]
        demand = engine.submit(99, 2, torch.zeros(250), torch.randn(250), DEMAND)
        for t in [demand, *prefetches, blocker]:
            t.wait()
        # queued last, the demand load ran right after the copy already on the link
        assert blocker.finished_at <= demand.started_at < min(p.started_at for p in prefetches)
    finally:
        engine.close()


def test_failed_copy_reports_to_the_waiter():
    engine = ThreadCopyEngine()
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
