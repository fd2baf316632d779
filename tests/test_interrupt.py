"""A KeyboardInterrupt in the middle of `generate` leaves the offloaded model usable and lossless.

The interrupt is raised at four places: between decoder layers (a forward pre-hook), between decode steps
(a stopping criterion), inside the experts kernel while the wave's slots are pinned, and inside a demand
load while the wave is being acquired. After it, on the same model:
- no slot stays pinned (the slot manager's `pins` is 0 for every resident expert);
- generating again gives the reference tokens and scores bit for bit, and the counters add up;
- another thread can use the model (torch runs `always_call` forward hooks on `Exception` only, so the
  concurrency guard's ownership is left behind by the interrupt and must be recognised as stale);
- `remove_offload` gives back bit-identical weights, also straight after the interrupt with copies of the
  slow emulated link still in flight.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import m2r2_moe
from conftest import ExpertUseCounter, same_weights, snapshot, tiny_mixtral

pytestmark = pytest.mark.lossless  # CI repeats these at other thread counts

NEW = 8
GEN = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, output_scores=True,
           return_dict_in_generate=True)
PROMPT = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(21))


class _Interrupt:
    """A callable that raises KeyboardInterrupt on its `at`-th call (1-based), else passes through."""

    def __init__(self, at: int, passthrough=None):
        self.at, self.calls, self.passthrough, self.fired = at, 0, passthrough, False

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.fired = True
            raise KeyboardInterrupt("injected")
        return self.passthrough(*args, **kwargs) if self.passthrough else None


class _StopOnInterrupt(StoppingCriteria):
    def __init__(self, interrupt: _Interrupt):
        self.interrupt = interrupt

    def __call__(self, input_ids, scores, **kwargs):
        self.interrupt()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _inject(model, where: str, monkeypatch):
    """Arm an interrupt at `where`; returns (the _Interrupt, extra generate kwargs, an undo or None)."""
    offloader = m2r2_moe.get_offloader(model)
    if where == "decoder_layer":  # 4th call of layer 1: the 3rd decode step, after layer 0's experts ran
        interrupt = _Interrupt(4)
        handle = model.model.layers[1].register_forward_pre_hook(lambda m, a: interrupt())
        return interrupt, {}, handle.remove
    if where == "stopping_criterion":
        interrupt = _Interrupt(3)
        return interrupt, dict(stopping_criteria=StoppingCriteriaList([_StopOnInterrupt(interrupt)])), None
    if where == "experts_kernel":  # slots of the wave pinned, kernel running
        kernel = offloader.kernels[2]
        interrupt = offloader.kernels[2] = _Interrupt(6, kernel)
        return interrupt, {}, lambda: offloader.kernels.__setitem__(2, kernel)
    if where == "demand_load":  # inside the acquisition of a wave, some of its slots already pinned
        interrupt = _Interrupt(9, offloader.cache._copy)  # the copy's submission, after its slot was pinned
        monkeypatch.setattr(offloader.cache, "_copy", interrupt)
        return interrupt, {}, None
    raise AssertionError(where)


def _no_pins(offloader) -> bool:
    return all(offloader.cache.slots.pins(key) == 0 for key, _ in offloader.cache.slots.resident())


def _same(out, ref) -> bool:
    return torch.equal(out.sequences, ref.sequences) and all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


def _generate(model, **extra):
    with torch.no_grad():
        return model.generate(input_ids=PROMPT, **GEN, **extra)


def _interrupted(model, where, monkeypatch):
    interrupt, extra, undo = _inject(model, where, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _generate(model, **extra)
    assert interrupt.fired
    if undo is not None:
        undo()
    monkeypatch.undo()


@pytest.mark.parametrize("predictor", ["none", "gate"])
@pytest.mark.parametrize("where", ["decoder_layer", "stopping_criterion", "experts_kernel", "demand_load"])
def test_generate_after_interrupt_is_lossless(where, predictor, monkeypatch):
    model = tiny_mixtral(torch.bfloat16, seed=2)
    ref = _generate(model)
    snap = snapshot(model)
    m2r2_moe.offload(model, device="cpu", cache_experts=3, predictor=predictor, link_gbps=0.5, link_latency_us=50)
    offloader = m2r2_moe.get_offloader(model)
    try:
        _interrupted(model, where, monkeypatch)
        assert _no_pins(offloader)
        m2r2_moe.reset_stats(model)
        with ExpertUseCounter(model) as counted:
            out = _generate(model)
        s = m2r2_moe.stats(model)
        assert _no_pins(offloader)
    finally:
        m2r2_moe.remove_offload(model)
    assert _same(out, ref)
    assert s.tokens == PROMPT.shape[1] + NEW - 1  # prefill positions + decode steps that ran the model
    assert s.expert_uses == counted.uses > 0  # every use the routers asked for, counted once
    assert min(s.hits, s.prefetch_hits, s.late_prefetches, s.misses, s.bytes_to_device, s.evictions) >= 0
    assert s.stall_seconds >= 0 and s.misses > 0
    if predictor == "none":  # demand loads, and the prompt's streamed copies (runtime/prefill.py) less those
        # withdrawn before they started (their slot was needed first)
        copies = s.misses + s.prefetches - s.cancelled_prefetches
        assert s.bytes_to_device == copies * offloader.expert_bytes[0]
    assert same_weights(model, snap)


def test_another_thread_can_use_the_model_after_an_interrupt(monkeypatch):
    model = tiny_mixtral(seed=4)
    ref = _generate(model)
    m2r2_moe.offload(model, device="cpu", cache_experts=4, predictor="history")
    try:
        _interrupted(model, "decoder_layer", monkeypatch)
        guard = model.__dict__["_m2r2_guard"]
        assert guard.owner == threading.get_ident()  # left behind: torch skipped the always_call hook
        result, errors = {}, []

        def other():
            try:
                result["out"] = _generate(model)
            except BaseException as e:  # reported below
                errors.append(e)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=120)
        assert not errors, errors
        assert _same(result["out"], ref)
        assert guard.owner is None
        assert _same(_generate(model), ref)  # and back on this thread
    finally:
        m2r2_moe.remove_offload(model)


def test_remove_offload_right_after_an_interrupt_restores_weights(monkeypatch):
    model = tiny_mixtral(torch.bfloat16, seed=6)
    with torch.no_grad():
        ref = model(PROMPT).logits
    snap = snapshot(model)
    params = dict(model.named_parameters())
    m2r2_moe.offload(model, device="cpu", cache_experts=2, predictor="gate", link_gbps=0.05)  # copies in flight
    _interrupted(model, "decoder_layer", monkeypatch)
    m2r2_moe.remove_offload(model)
    assert same_weights(model, snap)
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref)
