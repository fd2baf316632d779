"""GPU checks of the runtime's device placement (skipped without CUDA; their logic runs on CPU in
tests/test_device_placement.py, test_cuda_logic.py and test_pinned_store.py).

Invariants:
- an offloaded model with a predictor prefetches on the device (no predictor failure) and decodes the
  tokens of the same model kept whole on the GPU;
- the slot pool's zero fill, queued on the compute stream, lands before the first copy into the pool;
- the pinned host store is page-locked (a copy from it does not block the host) and takes the bytes the
  plan computes;
- the stall log holds only the waits the device has not run yet;
- `device="cuda:1"` works while device 0 is current (with two devices).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.runtime.experts import allocate_pool
from m2r2_moe.runtime.store import ExpertPacking, HostExpertStore, pinned_bytes
from m2r2_moe.runtime.cuda_engine import CudaCopyEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

IDS = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(6))


def _sleep(stream: torch.cuda.Stream, ms: float) -> None:
    cycles_per_ms = getattr(torch.cuda.get_device_properties(stream.device), "clock_rate", 2_000_000)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(ms * cycles_per_ms))


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("predictor", ["history", "gate", "m2r2"])
def test_offloaded_decode_with_a_predictor_prefetches_on_the_device(predictor, admit_every_prediction):
    from m2r2_moe.models import find_moe_layers
    from m2r2_moe.predict import AcceleratorAdapters, make_predictor

    model = tiny_mixtral(torch.bfloat16)
    whole = copy.deepcopy(model).cuda()
    reference = _generate(whole, IDS.cuda())
    del whole
    adapter, layers = find_moe_layers(model)
    built = make_predictor(predictor, model, adapter, layers, 2,
                           adapters=AcceleratorAdapters(len(layers), 64, 2, rank=4, route_features=8))
    m2r2_moe.offload(model, device="cuda", cache_experts=4, predictor=built)
    try:
        tokens = _generate(model, IDS.cuda())
        stats = m2r2_moe.stats(model)
        assert stats.predictor_failures == 0 and stats.prefetches > 0
        assert torch.equal(tokens, reference)
    finally:
        m2r2_moe.remove_offload(model)


def test_the_pool_zero_fill_lands_before_the_first_copy():
    compute = torch.cuda.current_stream()
    _sleep(compute, 200)  # the zero fill below waits behind this on the compute stream
    pool = allocate_pool(2, 1 << 20, torch.float32, torch.device("cuda"))
    engine = CudaCopyEngine(torch.device("cuda"))
    src = torch.ones(1 << 20).pin_memory()
    engine.submit(0, 0, pool[0], src).wait()
    torch.cuda.synchronize()
    assert torch.equal(pool[0].cpu(), src)  # not overwritten by a zero fill that ran after the copy
    engine.close()


def test_the_pinned_store_is_page_locked_and_takes_what_the_plan_computes():
    rows, numel = 4, 3 * (1 << 21) + 5  # ~25 MB bf16 per layer: torch's pinned blocks would be 32 MB
    packing = ExpertPacking.from_shapes(("gate_up_proj",), [(numel,)], torch.bfloat16)
    store = HostExpertStore([packing, packing], [rows, rows], pin_memory=True)
    try:
        assert all(b.is_pinned() for b in store.buffers)
        assert store.pinned_bytes == pinned_bytes([rows * packing.nbytes] * 2)
        engine = CudaCopyEngine(torch.device("cuda"))
        slot = torch.zeros(packing.numel, dtype=torch.bfloat16, device="cuda")
        store.buffers[1][2].fill_(3.0)
        _sleep(engine.demand_stream, 300)  # the copy cannot start yet: a page-locked source returns at once
        start = time.perf_counter()
        engine.submit(0, 0, slot, store.expert(1, 2)).wait()
        assert time.perf_counter() - start < 0.15, "the host waited for the copy: the store is not page-locked"
        torch.cuda.synchronize()
        assert torch.equal(slot.cpu(), store.expert(1, 2))
        engine.close()
    finally:
        store.close()
    assert store.buffers == []


def test_the_stall_log_keeps_only_waits_the_device_has_not_run():
    engine = CudaCopyEngine(torch.device("cuda"))
    src = torch.ones(1 << 16).pin_memory()
    dst = torch.zeros(1 << 16, device="cuda")
    for _ in range(300):
        _sleep(engine.demand_stream, 0.2)  # each copy is still queued when the compute stream is made to wait
        engine.submit(0, 0, dst, src).wait()
    torch.cuda.synchronize()
    _sleep(engine.demand_stream, 0.2)
    engine.submit(0, 0, dst, src).wait()
    assert len(engine.compute.stalls.pending) <= 1  # the 300 completed waits were folded, not kept
    torch.cuda.synchronize()
    assert engine.drain_stall_seconds() > 0 and not engine.compute.stalls.pending
    engine.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_an_offload_to_the_second_device_while_the_first_is_current(admit_every_prediction):
    model = tiny_mixtral(torch.bfloat16)
    whole = copy.deepcopy(model).to("cuda:1")
    reference = _generate(whole, IDS.to("cuda:1"))
    del whole
    with torch.cuda.device(0):
        m2r2_moe.offload(model, device="cuda:1", cache_experts=3, predictor="gate")
        try:
            engine = m2r2_moe.get_offloader(model).engine
            assert engine.device == torch.device("cuda:1") and engine.stream.device == torch.device("cuda:1")
            assert torch.equal(_generate(model, IDS.to("cuda:1")), reference)
            assert m2r2_moe.stats(model).predictor_failures == 0
        finally:
            m2r2_moe.remove_offload(model)
