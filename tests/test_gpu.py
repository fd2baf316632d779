"""GPU checks of the native CUDA copy engine against its torch twin (skipped without CUDA).

Invariants:
- a copy through the native engine leaves the slot bit-identical to `dst.copy_(src)`;
- the copy's event orders it before the compute that reads the slot (`wait`), and after the compute
  that last read the slot's previous tenant (`after`);
- submit / ready / wait never block the host;
- decoding an offloaded model adds no host synchronization for copies: a step with misses syncs as
  often as the same step with all hits (the offloader's own once-per-layer expert-set sync included);
- an offloaded model gives the same logits with either engine;
- predictors compute on the device without a host sync of their own (`set_sync_debug_mode("error")`);
  decoding with one adds at most the prefetcher's one read of the predicted scores per layer.

benchmarks/gpu_check.sh runs these with M2R2_MOE_REQUIRE_CUDA_EXT=1, which turns "native engine not
available" from a skip into a failure.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings

import pytest
import torch

import m2r2_moe
from m2r2_moe import _ext

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REQUIRE_CUDA_EXT = os.environ.get("M2R2_MOE_REQUIRE_CUDA_EXT") == "1"


def _native_reason() -> str:
    from m2r2_moe.runtime import cuda_native

    return cuda_native.available()


@pytest.fixture
def native_engine():
    from m2r2_moe.runtime.cuda_native import NativeCudaCopyEngine

    reason = _native_reason()
    if reason:
        if REQUIRE_CUDA_EXT:
            pytest.fail(f"M2R2_MOE_REQUIRE_CUDA_EXT=1 but the native copy engine cannot run: {reason}")
        pytest.skip(f"native CUDA copy engine not available: {reason}")
    engine = NativeCudaCopyEngine(torch.device("cuda"))
    yield engine
    engine.close()


def _sleep_stream(stream: torch.cuda.Stream, ms: float = 200.0) -> None:
    """Queue ~`ms` of busy-waiting on `stream` (torch.cuda._sleep spins for a number of GPU cycles)."""
    cycles_per_ms = getattr(torch.cuda.get_device_properties(0), "clock_rate", 2_000_000)  # kHz = cycles per ms
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(ms * cycles_per_ms))


def test_required_cuda_ext_is_present():
    if REQUIRE_CUDA_EXT:
        assert _ext.HAS_CUDA_EXT, _ext.CUDA_EXT_ERROR
        assert _native_reason() == ""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
def test_native_copy_equals_torch_copy(native_engine, dtype):
    sizes = [1, 7, 4096, 3 * 64 * 96, (1 << 20) + 3]  # odd sizes too: one expert = one raw byte copy
    pool_native = torch.zeros(len(sizes), max(sizes), dtype=dtype, device="cuda")
    pool_torch = torch.zeros_like(pool_native)
    srcs = [(torch.randn(n) * 100).to(dtype).pin_memory() for n in sizes]
    transfers = [native_engine.submit(i, i, pool_native[i, :n], src) for i, (n, src) in enumerate(zip(sizes, srcs))]
    for i, (n, src) in enumerate(zip(sizes, srcs)):
        pool_torch[i, :n].copy_(src)
    for t in transfers:
        t.wait()
    torch.cuda.synchronize()  # test only: read the result on the host
    assert torch.equal(pool_native, pool_torch)
    assert all(t.ready() for t in transfers)
    assert native_engine.bytes_copied == sum(n * srcs[0].element_size() for n in sizes)


def test_submit_many_equals_submit(native_engine):
    srcs = [torch.randn(1000 + i).to(torch.bfloat16).pin_memory() for i in range(4)]
    pool = torch.zeros(4, 1100, dtype=torch.bfloat16, device="cuda")
    dsts = [pool[i, : s.numel()] for i, s in enumerate(srcs)]
    transfers = native_engine.submit_many(list(range(4)), list(range(4)), dsts, srcs)
    for t in transfers:
        t.wait()
    torch.cuda.synchronize()
    for d, s in zip(dsts, srcs):
        assert torch.equal(d.cpu(), s)


def test_event_orders_copy_before_use_and_host_never_blocks(native_engine):
    src = torch.randn(1 << 22).pin_memory()
    dst = torch.zeros(1 << 22, device="cuda")
    _sleep_stream(native_engine.stream, ms=300)  # the copy stream is busy: the copy cannot start yet
    start = time.perf_counter()
    transfer = native_engine.submit(0, 0, dst, src)
    assert not transfer.ready()  # query, not wait
    assert transfer.wait() == 0.0  # the compute stream waits, the host does not
    used = dst * 1  # compute-stream read of the slot, ordered after the copy by the event
    host_seconds = time.perf_counter() - start
    assert host_seconds < 0.15, f"host blocked for {host_seconds:.3f}s during submit/ready/wait"
    torch.cuda.synchronize()
    assert torch.equal(used.cpu(), src)
    assert transfer.ready()


def test_after_event_orders_copy_after_previous_reader(native_engine):
    src = torch.full((1 << 20,), 7.0).pin_memory()
    slot = torch.zeros(1 << 20, device="cuda")
    compute = torch.cuda.current_stream()
    _sleep_stream(compute, ms=200)
    slot.fill_(-1.0)  # the previous tenant's last use, queued behind the sleep
    done = torch.cuda.Event()
    done.record(compute)
    transfer = native_engine.submit(0, 0, slot, src, after=done)  # must land after fill_
    transfer.wait()
    torch.cuda.synchronize()
    assert torch.equal(slot.cpu(), src)


def test_stall_is_measured_on_device(native_engine):
    src = torch.randn(1 << 20).pin_memory()
    dst = torch.zeros(1 << 20, device="cuda")
    _sleep_stream(native_engine.stream, ms=50)
    native_engine.submit(0, 0, dst, src).wait()
    torch.cuda.synchronize()
    assert native_engine.drain_stall_seconds() > 0.01
    assert not native_engine.compute.stalls.pending


def test_offloaded_logits_same_with_both_engines(monkeypatch):
    from conftest import tiny_mixtral
    from m2r2_moe.runtime import cuda_native

    reason = _native_reason()
    if reason:
        pytest.skip(f"native CUDA copy engine not available: {reason}")
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    logits = {}
    for engine in ("native", "torch"):
        if engine == "torch":
            monkeypatch.setattr(cuda_native, "available", lambda: "forced torch twin")
        model = tiny_mixtral(torch.bfloat16)
        m2r2_moe.offload(model, device="cuda", cache_experts=3)  # waves and evictions in prefill
        try:
            kind = type(m2r2_moe.get_offloader(model).engine).__name__
            assert kind == ("NativeCudaCopyEngine" if engine == "native" else "CudaCopyEngine")
            with torch.no_grad():
                logits[engine] = model(input_ids=ids.cuda()).logits.cpu()
            assert m2r2_moe.stats(model).misses > 0
        finally:
            m2r2_moe.remove_offload(model)
    assert torch.equal(logits["native"], logits["torch"])


def _count_syncs(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def _decode_syncs(cache_experts: int, steps: int = 6, predictor="none"):
    """Host syncs during `steps` decode steps of an offloaded tiny Mixtral, and its stats. The loop runs twice
    and the second pass is counted: first calls (lazy inits, allocations, a cold cache) are not the steady state."""
    from conftest import tiny_mixtral

    model = tiny_mixtral(torch.bfloat16)
    m2r2_moe.offload(model, device="cuda", cache_experts=cache_experts, predictor=predictor)
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(4)).cuda()
    try:
        with torch.no_grad():
            for _ in range(2):
                name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
                out = model(input_ids=ids, use_cache=True)
                state = [getattr(out, name), out.logits[:, -1:].argmax(-1)]  # next token stays on the GPU
                m2r2_moe.reset_stats(model)

                def decode():
                    for _ in range(steps):
                        step = model(input_ids=state[1], use_cache=True, **{name: state[0]})
                        state[:] = [getattr(step, name), step.logits[:, -1:].argmax(-1)]

                syncs = _count_syncs(decode)
            return syncs, m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)


def test_copies_add_no_host_sync_in_decode():
    """Two slots (top-k): nearly every expert use is a demand copy. 32 slots: every expert stays resident.
    Batch-1 decode needs top-k experts per layer, so both run one wave per layer and differ only in copies.
    The offloader's own once-per-layer sync (the expert set decides which copies to issue) is in both."""
    syncs_misses, stats_misses = _decode_syncs(cache_experts=2)
    syncs_hits, stats_hits = _decode_syncs(cache_experts=32)
    assert stats_misses.misses > 0 and stats_hits.misses == 0
    assert syncs_misses == syncs_hits, f"copies added host syncs: {syncs_misses} with misses vs {syncs_hits} all-hit"


@pytest.mark.parametrize("predictor", ["history", "gate"])
def test_a_predictor_adds_at_most_the_prefetchers_one_read_per_layer(predictor, admit_every_prediction):
    """Predictions stay on the device: a predictor adds no host sync of its own, only the prefetcher's one
    read of each layer's predicted scores (which copies to issue depends on them): at most L - 1 per step."""
    steps, layers = 6, 4
    syncs_none, _ = _decode_syncs(cache_experts=4, steps=steps)
    syncs, stats = _decode_syncs(cache_experts=4, steps=steps, predictor=predictor)
    assert stats.predictor_failures == 0 and stats.prefetches > 0
    assert syncs - syncs_none <= steps * (layers - 1), f"{predictor}: {syncs} syncs vs {syncs_none} without"


def _predictors_on_cuda():
    from conftest import tiny_mixtral
    from m2r2_moe.models import find_moe_layers
    from m2r2_moe.predict import AcceleratorAdapters, OraclePredictor, make_predictor

    model = tiny_mixtral(torch.bfloat16)
    adapter, layers = find_moe_layers(model)
    trace = torch.randint(0, 8, (32, len(layers), 2), generator=torch.Generator().manual_seed(2))
    built = {name: make_predictor(name, model, adapter, layers, 2,
                                  adapters=AcceleratorAdapters(len(layers), 64, 2, rank=4, route_features=8))
             for name in ("history", "gate", "m2r2")}
    built["oracle"] = OraclePredictor(len(layers), 8, 2, 2, trace, wrap=True)
    model.cuda()
    return model, layers, {name: p.to("cuda") for name, p in built.items()}


def test_per_token_predictor_calls_do_not_synchronize_on_cuda():
    """tests/test_host_syncs.py's check, by the device itself: any synchronizing call raises."""
    from test_device_placement import owned_tensors

    model, layers, predictors = _predictors_on_cuda()
    residual = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    chosen = torch.randint(0, 8, (1, 2), device="cuda")
    for name, predictor in predictors.items():
        assert all(t.is_cuda for _, t in owned_tensors(predictor)), name

        def step():
            for layer in range(len(layers)):
                predictor.predict_stacked(layer, residual, chosen, normed=layers[layer].norm(residual))
                predictor.observe(layer, chosen)

        with torch.no_grad():
            step()  # first calls: lazy inits, a router's one-time ranking check
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
