"""Offloaded models produce bit-identical logits and tokens on CPU (same dtype, same kernels)."""

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral

pytestmark = pytest.mark.lossless  # CI repeats these at other thread counts


def _logits(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped_mm", "eager", "batched_mm"])
@pytest.mark.parametrize("cache_experts", [2, 3, 7, 32])
def test_prefill_logits_bit_identical(dtype, impl, cache_experts):
    """From top_k slots (prefill in waves) up to all experts, for every experts kernel of transformers."""
    model = tiny_mixtral(dtype, impl)
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    m2r2_moe.offload(model, device="cpu", cache_experts=cache_experts)
    try:
        out = _logits(model, ids)
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out, ref)
    assert stats.misses > 0
    if cache_experts < 8:
        assert stats.waves > stats.layer_calls  # some layer needed more experts than slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("link", [None, 2.0])
def test_greedy_generate_batch2_left_padding(dtype, link):
    model = tiny_mixtral(dtype)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[0, :4] = 0  # left padding on the first sequence
    mask[0, :4] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**kwargs, output_scores=True, return_dict_in_generate=True)
    m2r2_moe.offload(model, device="cpu", cache_experts=3, link_gbps=link)
    try:
        with torch.no_grad():
            out = model.generate(**kwargs, output_scores=True, return_dict_in_generate=True)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


@pytest.mark.parametrize("cache_experts", [2, 16])
def test_seeded_sampling_batch1(cache_experts):
    model = tiny_mixtral(torch.bfloat16)
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


def test_top4_routing_waves_bit_identical():
    """Top-k above 2: the pair-wise wave path keeps grouped_mm's fp32 sum over K exact."""
    model = tiny_mixtral(torch.bfloat16, "grouped_mm", experts=8, top_k=4)
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(4))
    ref = _logits(model, ids)
    m2r2_moe.offload(model, device="cpu", cache_experts=5)
    try:
        out = _logits(model, ids)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out, ref)
