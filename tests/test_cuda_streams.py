"""The CUDA engine's two copy streams, run on CPU against the fake `torch.cuda` of tests/test_cuda_logic.py.

What a reading of runtime/cuda_engine.py claims, checked on the streams' logs:
- demand loads go to their own stream, of higher priority, and never wait for prefetches into other slots;
- copies into one slot land in submission order: a copy waits for the latest earlier copy into the slot when
  that one went to the other stream (a demand load after a prefetch still queued, and the reverse), and for
  the compute that last read the slot (`after`), on whichever stream it goes to;
- an offloaded prompt on the torch engine computes the original logits, its streamed prefetches on the
  prefetch stream and its demand loads on the demand stream;
- the device-side stalls of prefill and of decode are counted apart (`OffloadStats.prefill` / `.decode`).
The same ordering is checked on a real GPU by tests/test_gpu_streams.py.
"""

from __future__ import annotations

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.runtime import cuda_engine
from m2r2_moe.runtime.transfer import DEMAND, PREFETCH
from test_cuda_logic import FakeEvent, fake_cuda  # noqa: F401 — the fixture is used by name


def _engine():
    return cuda_engine.CudaCopyEngine(torch.device("cuda:0"))


def _copy(engine, slot, priority, after=None):
    return engine.submit(slot, slot, torch.zeros(4), torch.ones(4), priority, after=after)


def _waits(stream) -> list:
    return [entry[1] for entry in stream.log if entry[0] == "wait_event"]


def test_demand_loads_have_their_own_stream_of_higher_priority(fake_cuda):
    engine = _engine()
    assert engine.demand_stream is not engine.stream
    assert engine.demand_stream.priority < engine.stream.priority  # lower number: scheduled first
    queued = [_copy(engine, slot, PREFETCH) for slot in range(5)]
    demand = _copy(engine, 7, DEMAND)
    assert all(t.event.stream is engine.stream for t in queued)
    assert demand.event.stream is engine.demand_stream
    assert _waits(engine.demand_stream) == []  # nothing ties it to the prefetches into other slots


def test_a_demand_load_into_a_slot_lands_after_the_prefetch_still_queued_there(fake_cuda):
    engine = _engine()
    prefetch = _copy(engine, 3, PREFETCH)  # its expert is evicted before it lands; the slot is reused
    demand = _copy(engine, 3, DEMAND)
    log = engine.demand_stream.log
    assert log.index(("wait_event", prefetch.event)) < log.index(("record", demand.event))
    again = _copy(engine, 3, DEMAND)  # same stream as the latest copy into slot 3: in order already
    assert _waits(engine.demand_stream) == [prefetch.event] and again.event.stream is engine.demand_stream


def test_a_prefetch_into_a_slot_lands_after_the_demand_load_before_it(fake_cuda):
    engine = _engine()
    demand = _copy(engine, 2, DEMAND)
    prefetch = _copy(engine, 2, PREFETCH)
    assert _waits(engine.stream) == [demand.event]
    log = engine.stream.log
    assert log.index(("wait_event", demand.event)) < log.index(("record", prefetch.event))


@pytest.mark.parametrize("priority", [DEMAND, PREFETCH])
def test_every_copy_waits_for_the_compute_that_last_read_its_slot(fake_cuda, priority):
    engine = _engine()
    done = engine.compute_done()
    transfer = _copy(engine, 1, priority, after=done)
    assert _waits(transfer.event.stream) == [done]


def _prompt_and_decode(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        step = model(input_ids=ids[:, -1:]).logits
    return logits, step


def test_a_prompt_on_the_torch_engine_streams_on_the_prefetch_stream(fake_cuda):
    model = tiny_mixtral(torch.bfloat16)
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(4))
    reference = _prompt_and_decode(model, ids)
    m2r2_moe.offload(model, device="cpu", cache_experts=16)  # two layers' experts
    offloader = m2r2_moe.get_offloader(model)
    offloader.replace_engine(engine := cuda_engine.CudaCopyEngine(torch.device("cuda:0")))
    try:
        logits, step = _prompt_and_decode(model, ids)
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(logits, reference[0]) and torch.equal(step, reference[1])
    prefetches = [entry for entry in engine.stream.log if entry[0] == "record"]
    demands = [entry for entry in engine.demand_stream.log if entry[0] == "record"]
    assert len(prefetches) == stats.prefetches > 0 and stats.decode.prefetches == 0
    assert len(demands) == stats.misses


def test_device_stalls_are_counted_in_the_phase_that_queued_them(fake_cuda):
    model = tiny_mixtral(torch.bfloat16)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    offloader = m2r2_moe.get_offloader(model)
    offloader.replace_engine(cuda_engine.CudaCopyEngine(torch.device("cuda:0")))
    compute = fake_cuda.compute[0]
    FakeEvent.complete_on_record = False  # the device lags: nothing is read back during the forwards
    try:
        with torch.no_grad():
            model(input_ids=ids)
            prefill_waits = len(_waits(compute))
            model(input_ids=ids[:, -1:])
        decode_waits = len(_waits(compute)) - prefill_waits
        for start, end, _ in offloader.engine.compute.stalls.pending:  # the device catches up: 1 ms per wait
            start.done = end.done = True
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert prefill_waits > 0 and decode_waits > 0
    assert stats.prefill.stall_seconds == pytest.approx(prefill_waits / 1e3)
    assert stats.decode.stall_seconds == pytest.approx(decode_waits / 1e3)
    assert stats.stall_seconds == pytest.approx((prefill_waits + decode_waits) / 1e3)
    assert (stats.prefill.forwards, stats.decode.forwards) == (1, 1)
