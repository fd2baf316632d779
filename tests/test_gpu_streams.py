"""GPU checks of the CUDA engine's two copy streams and of prefill streaming (skipped without CUDA; their
logic runs on CPU in tests/test_cuda_streams.py and tests/test_prefill.py).

Invariants:
- a demand load does not wait for the prefetches queued before it: it lands while the prefetch stream is
  still held up;
- a demand load into a slot whose prefetch is still queued lands after that prefetch (its bytes stay);
- an offloaded prompt streams its next layers' experts and decodes the tokens of the model kept whole on the
  GPU; prefill and decode are counted apart, device-side stalls included.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.runtime.cuda_engine import CudaCopyEngine
from m2r2_moe.runtime.transfer import DEMAND, PREFETCH

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _sleep(stream: torch.cuda.Stream, ms: float) -> None:
    cycles_per_ms = getattr(torch.cuda.get_device_properties(stream.device), "clock_rate", 2_000_000)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(ms * cycles_per_ms))


def _pinned(value: float, numel: int = 1 << 20) -> torch.Tensor:
    return torch.full((numel,), value).pin_memory()


def test_a_demand_load_overtakes_the_prefetches_queued_before_it():
    engine = CudaCopyEngine(torch.device("cuda"))
    pool = torch.zeros(4, 1 << 20, device="cuda")
    _sleep(engine.stream, 500)  # the prefetch stream is held up
    prefetches = [engine.submit(i, i, pool[i], _pinned(i), PREFETCH) for i in range(3)]
    demand = engine.submit(3, 3, pool[3], _pinned(3.0), DEMAND)
    start = time.perf_counter()
    demand.event.synchronize()  # test only
    assert time.perf_counter() - start < 0.25, "the demand load waited behind the prefetch stream"
    assert not any(t.ready() for t in prefetches)
    assert torch.equal(pool[3].cpu(), _pinned(3.0))
    engine.close()


def test_a_demand_load_into_the_slot_of_a_queued_prefetch_lands_after_it():
    engine = CudaCopyEngine(torch.device("cuda"))
    slot = torch.zeros(1 << 20, device="cuda")
    _sleep(engine.stream, 200)
    engine.submit(0, 0, slot, _pinned(1.0), PREFETCH)  # evicted before it lands: the slot is reused
    engine.submit(1, 0, slot, _pinned(2.0), DEMAND).wait()
    torch.cuda.synchronize()
    assert torch.equal(slot.cpu(), _pinned(2.0))  # the late prefetch did not overwrite it
    engine.close()


def test_an_offloaded_prompt_streams_and_decodes_the_original_tokens():
    model = tiny_mixtral(torch.bfloat16)
    ids = torch.randint(3, 96, (1, 48), generator=torch.Generator().manual_seed(7)).cuda()
    whole = copy.deepcopy(model).cuda()
    with torch.no_grad():
        reference = whole.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    del whole
    m2r2_moe.offload(model, device="cuda", cache_experts=16)
    try:
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(tokens, reference)
    assert stats.prefill.forwards == 1 and stats.decode.forwards == 7
    assert stats.prefill.prefetches > 0 and stats.decode.prefetches == 0
    assert stats.prefill.stall_seconds + stats.decode.stall_seconds == pytest.approx(stats.stall_seconds)
