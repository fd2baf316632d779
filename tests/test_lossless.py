"""The losslessness matrix: an offloaded model computes exactly what the original computes.

Every family x experts kernel x dtype is run once, and across the matrix every cache size (top-k: the prefill
needs more experts than slots and is computed in waves; half of all experts; all) meets every predictor
(none, history, gate, m2r2 with random adapters) and both link settings (none; an emulated link, so copies land
while compute runs). Each case checks, with torch.equal:
- prefill logits of a batch of two prompts, the first left-padded (attention mask);
- greedy generation at batch two from them: tokens and every step's scores (batch decode);
- the weights given back by `remove_offload`.
Seeded sampling is checked once more at the end. CI runs this module at 1 thread, at the default, and at 3
threads on MKL's AVX2 path (`.ci/run`); tests/test_row_order.py checks the mechanism behind it directly.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import m2r2_moe
from conftest import same_weights, snapshot
from families import FAMILIES, random_adapters, tiny
from m2r2_moe.models import find_moe_layers

pytestmark = pytest.mark.lossless

KERNELS = ("eager", "grouped_mm", "batched_mm")
DTYPES = (torch.float32, torch.bfloat16)
CACHES = ("top-k", "half", "all")
PREDICTORS = ("none", "history", "gate", "m2r2")


def _cases():
    """family x kernel x dtype, with (cache, predictor, link) cycled so that every pair of them appears."""
    combos = list(itertools.product(CACHES, PREDICTORS))
    for i, (family, kernel, dtype) in enumerate(itertools.product(FAMILIES, KERNELS, DTYPES)):
        cache, predictor = combos[(i * 5) % len(combos)]  # 5 is coprime with 12: the cycle visits every pair
        yield pytest.param(family, kernel, dtype, cache, predictor, 2.0 if i % 2 else None,
                           id=f"{family}-{kernel}-{str(dtype)[6:]}-{cache}-{predictor}")


def _inputs():
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding on the first prompt
    return ids, mask


def _run(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    return logits, gen.sequences, gen.scores


@pytest.mark.parametrize("family, kernel, dtype, cache, predictor, link", list(_cases()))
def test_offloaded_equals_original(family, kernel, dtype, cache, predictor, link, admit_every_prediction):
    model = tiny(family, dtype, kernel)
    adapter, layers = find_moe_layers(model)
    top_k, total = adapter.top_k(model), sum(int(layer.experts.num_experts) for layer in layers)
    slots = {"top-k": top_k, "half": total // 2, "all": total}[cache]
    ids, mask = _inputs()
    ref_logits, ref_tokens, ref_scores = _run(model, ids, mask)
    snap = snapshot(model)
    extra = dict(adapters=random_adapters(model)) if predictor == "m2r2" else {}
    m2r2_moe.offload(model, device="cpu", cache_experts=slots, predictor=predictor, lookahead=2, link_gbps=link,
                     **extra)  # every prediction is prefetched (the fixture): the copies are the point
    try:
        logits, tokens, scores = _run(model, ids, mask)
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(logits, ref_logits), "prefill logits differ"
    assert torch.equal(tokens, ref_tokens), "generated tokens differ"
    assert all(torch.equal(a, b) for a, b in zip(scores, ref_scores)), "generation scores differ"
    assert same_weights(model, snap)
    assert stats.misses > 0
    if cache == "top-k":
        assert stats.waves > stats.layer_calls  # the prefill needed more experts than slots


@pytest.mark.parametrize("cache_experts", [2, 16])
def test_seeded_sampling(cache_experts):
    model = tiny("mixtral", torch.bfloat16)
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(3))
    kwargs = dict(input_ids=ids, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
    torch.manual_seed(123)
    with torch.no_grad():
        ref = model.generate(**kwargs)
    m2r2_moe.offload(model, device="cpu", cache_experts=cache_experts, link_gbps=5.0, link_latency_us=20)
    try:
        torch.manual_seed(123)
        with torch.no_grad():
            out = model.generate(**kwargs)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out, ref)
