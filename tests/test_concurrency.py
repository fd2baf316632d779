"""Several offloaded models in one process, and threads.

Invariants:
- two offloaded models interleaved step by step (one decode step of each in turn) each produce the logits
  of their own un-offloaded reference (the runtimes share nothing);
- two offloaded models generating at once on two threads each produce their reference tokens and scores;
- one offloaded model called from a second thread while a forward of it runs raises `ConcurrentUseError`
  on the second thread, naming both threads, and the running forward is not disturbed (its output equals
  the reference); afterwards the second thread can use the model; `remove_offload` from a second thread
  during a forward is refused the same way;
- a forward nested in a forward of the same model on the same thread passes (re-entrant guard), and the
  model is free again afterwards;
- the guard costs a few microseconds per forward (it runs once per forward, not per layer).
"""

from __future__ import annotations

import inspect
import threading
import time

import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

import m2r2_moe
from conftest import same_weights, snapshot, tiny_mixtral
from m2r2_moe.errors import ConcurrentUseError

pytestmark = pytest.mark.lossless  # CI repeats these at other thread counts

GEN = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True,
           return_dict_in_generate=True)


def tiny_olmoe(seed: int = 0) -> OlmoeForCausalLM:
    config = OlmoeConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.1)  # random routing (a zero router would tie every expert)
    return model


def _prompt(seed: int, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 96, (1, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(input_ids=ids, **GEN)


def _same(out, ref) -> bool:
    return torch.equal(out.sequences, ref.sequences) and all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


def _cache_arg(model) -> str:
    """The KV-cache argument's name: `cache` from transformers 5.24 on (`past_key_values` is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_steps(models, prompts, steps: int) -> list[list[torch.Tensor]]:
    """Greedy decoding of every model, one step of each in turn; per model the logits of every step."""
    from transformers import DynamicCache

    caches = [DynamicCache(config=m.config) for m in models]
    names = [_cache_arg(m) for m in models]
    inputs = list(prompts)
    logits: list[list[torch.Tensor]] = [[] for _ in models]
    with torch.no_grad():
        for _ in range(steps):
            for i, model in enumerate(models):
                out = model(input_ids=inputs[i], use_cache=True, **{names[i]: caches[i]})
                logits[i].append(out.logits[:, -1])
                inputs[i] = out.logits[:, -1:].argmax(-1)
    return logits


def test_two_offloaded_models_interleaved_step_by_step():
    models = [tiny_mixtral(torch.bfloat16, seed=3), tiny_olmoe(seed=4)]
    prompts = [_prompt(1), _prompt(2)]
    refs = _decode_steps(models, prompts, steps=8)
    snaps = [snapshot(m) for m in models]
    m2r2_moe.offload(models[0], device="cpu", cache_experts=3, predictor="gate", link_gbps=1.0)
    m2r2_moe.offload(models[1], device="cpu", cache_experts=2, predictor="history", policy="predictive")
    try:
        outs = _decode_steps(models, prompts, steps=8)
        stats = [m2r2_moe.stats(m) for m in models]
    finally:
        for m in models:
            m2r2_moe.remove_offload(m)
    for out, ref in zip(outs, refs):
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert all(s.misses > 0 for s in stats)  # both really streamed experts
    assert all(same_weights(m, s) for m, s in zip(models, snaps))


def test_two_models_generate_on_two_threads_at_once():
    models = [tiny_mixtral(seed=5), tiny_olmoe(seed=6)]
    prompts = [_prompt(3), _prompt(4)]
    refs = [_generate(m, p) for m, p in zip(models, prompts)]
    for m in models:  # a slow emulated link: both generations are in flight at the same time
        m2r2_moe.offload(m, device="cpu", cache_experts=3, link_gbps=0.5, link_latency_us=200, predictor="gate")
    outs, errors, start = [None, None], [], threading.Barrier(2)
    spans = [[0.0, 0.0], [0.0, 0.0]]

    def work(i):
        try:
            start.wait()
            spans[i][0] = time.perf_counter()
            outs[i] = _generate(models[i], prompts[i])
            spans[i][1] = time.perf_counter()
        except BaseException as e:  # reported below, never lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        for m in models:
            m2r2_moe.remove_offload(m)
    assert not errors, errors
    assert all(_same(o, r) for o, r in zip(outs, refs))
    assert max(s[0] for s in spans) < min(s[1] for s in spans)  # the two generations overlapped in time


class _Parked:
    """Parks the first forward that reaches decoder layer 1 until `release` is set."""

    def __init__(self, model):
        self.inside, self.release, self.done = threading.Event(), threading.Event(), False
        self.handle = model.model.layers[1].register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if not self.done:
            self.done = True
            self.inside.set()
            assert self.release.wait(timeout=60)


def test_one_model_from_two_threads_is_refused_without_corruption():
    model = tiny_mixtral(torch.bfloat16, seed=7)
    ids = _prompt(5)
    ref = _generate(model, ids)
    snap = snapshot(model)
    m2r2_moe.offload(model, device="cpu", cache_experts=3, link_gbps=1.0, predictor="gate")
    parked = _Parked(model)
    result, errors = {}, []

    def run_a():
        try:
            result["a"] = _generate(model, ids)
        except BaseException as e:
            errors.append(e)

    a = threading.Thread(target=run_a, name="generator-A")
    try:
        a.start()
        assert parked.inside.wait(timeout=60)
        with pytest.raises(ConcurrentUseError, match="generator-A") as refused:
            with torch.no_grad():
                model(ids)
        assert threading.current_thread().name in str(refused.value)
        with pytest.raises(ConcurrentUseError, match="generator-A"):
            m2r2_moe.remove_offload(model)
        assert m2r2_moe.is_offloaded(model)
        parked.release.set()
        a.join(timeout=60)
        assert not a.is_alive() and not errors, errors
        assert _same(result["a"], ref)  # the refused call changed nothing in the running one
        assert _same(_generate(model, ids), ref)  # and the model is free again for this thread
    finally:
        parked.release.set()
        parked.handle.remove()
        m2r2_moe.remove_offload(model)
    assert same_weights(model, snap)


def test_nested_forward_on_the_same_thread_passes():
    model = tiny_mixtral(seed=8)
    ids, inner_ids = _prompt(6), _prompt(7, length=5)
    with torch.no_grad():
        ref, inner_ref = model(ids).logits, model(inner_ids).logits
    m2r2_moe.offload(model, device="cpu", cache_experts=2)
    inner = []

    def nested(module, args, output):
        if not inner:
            inner.append(None)
            inner[0] = model(inner_ids, use_cache=False).logits  # a forward inside a forward

    handle = model.model.layers[2].register_forward_hook(nested)
    try:
        with torch.no_grad():
            out = model(ids, use_cache=False).logits
        guard = model.__dict__["_m2r2_guard"]
        assert guard.owner is None  # released after the outer forward
        assert torch.equal(out, ref) and torch.equal(inner[0], inner_ref)
    finally:
        handle.remove()
        m2r2_moe.remove_offload(model)


def test_guard_hooks_are_removed_and_cheap(monkeypatch):
    """One pre-hook and one hook per model; the uncontended path never searches thread stacks (the only
    costly step, taken only when the model is found held by another thread)."""
    from m2r2_moe import guard as guard_module

    def no_search(*args):
        raise AssertionError("the uncontended path searched a thread's stack")

    model = tiny_mixtral()
    hooks_before = (len(model._forward_pre_hooks), len(model._forward_hooks))
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    monkeypatch.setattr(guard_module, "_forwards_on_stack", no_search)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (hooks_before[0] + 1, hooks_before[1] + 1)
    with torch.no_grad():
        model(torch.randint(3, 96, (1, 4)))
        model(torch.randint(3, 96, (1, 4)))
    m2r2_moe.remove_offload(model)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks_before
    assert "_m2r2_guard" not in model.__dict__
