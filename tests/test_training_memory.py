"""The accelerators' training within a host-memory budget: the heads' set filled in place (the same set as the
concatenated one), the budget's arithmetic (heads capped to whole sequences, a clear error before any work when
the fixed part cannot fit), and a training run that keeps fewer tokens for the heads when told to."""

import logging

import pytest
import torch

from conftest import tiny_mixtral
from m2r2_moe.errors import HostMemoryError
from m2r2_moe.models import find_moe_layers
from m2r2_moe.predict import train as train_module
from m2r2_moe.predict.collect import RoutingSet, RoutingSetBuilder, chunk_tokens, collect_normed
from m2r2_moe.predict.train import memory_plan, train_adapters

SEQ = 16


@pytest.fixture(scope="module")
def model_and_layers():
    model = tiny_mixtral(layers=4)
    adapter, layers = find_moe_layers(model)
    return model, adapter, layers


def _sets(model, adapter, layers, capacity):
    """(the batches' tensors concatenated, with each batch's router distributions: the reference; the builder's set)"""
    batches = [torch.randint(3, 96, (2, SEQ), generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7)]
    placed = RoutingSetBuilder(adapter, layers, torch.float32, capacity=capacity, keep_residuals=True)
    parts = []
    for residuals, normed, chosen in collect_normed(model, layers, batches):
        placed.add(residuals, normed, chosen, SEQ)
        probs = torch.stack([adapter.route(layer, normed[l])[0].float() for l, layer in enumerate(layers)])
        parts.append((normed, probs, chosen, residuals))
    normed, probs, chosen, residuals = (torch.cat(t, 1) for t in zip(*parts))
    rows = torch.arange(normed.shape[1])
    nxt = torch.where(rows % SEQ < SEQ - 1, rows + 1, -1)
    return RoutingSet(normed, probs, chosen, nxt, residuals), placed.build()


def test_a_set_filled_in_place_is_the_concatenated_one(model_and_layers):
    reference, placed = _sets(*model_and_layers, capacity=96)
    assert placed.tokens == reference.tokens == 96
    for field in ("normed", "probs", "chosen", "next", "residuals"):
        assert torch.equal(getattr(placed, field), getattr(reference, field)), field


def test_a_capacity_keeps_the_first_tokens_and_cuts_the_next_link_at_the_end(model_and_layers):
    reference, placed = _sets(*model_and_layers, capacity=40)  # mid-sequence: token 39's next (40) is not kept
    assert placed.tokens == 40
    for field in ("normed", "probs", "chosen", "residuals"):
        assert torch.equal(getattr(placed, field), getattr(reference, field)[:, :40]), field
    assert reference.next[39] == 40 and placed.next[39] == -1
    assert torch.equal(placed.next[:39], reference.next[:39])


def _plan(budget, train_tokens=4096, heads=True):
    return memory_plan(num_layers=8, hidden=128, experts=8, top_k=2, features=128, depth=4,
                       train_tokens=train_tokens, val_tokens=512, batch_tokens=256, seq_len=SEQ, kl_samples=1024,
                       heads=heads, budget=budget)


def test_the_budget_caps_the_heads_to_whole_sequences():
    free = _plan(None)
    assert free["heads_tokens"] == 4096 and free["fixed"] > 0
    # the per-token bytes: router inputs [L, H] and distributions [L, E] float32, choices [L, K] int64, next
    assert free["per_token"] == 8 * (128 * 4 + 8 * 4 + 2 * 8) + 8
    capped = _plan(free["fixed"] + free["per_token"] * 100)
    assert capped["heads_tokens"] == 96  # 100 tokens fit: six whole sequences of 16
    assert _plan(free["fixed"] + free["per_token"] * 10**6)["heads_tokens"] == 4096  # all fit
    assert _plan(free["fixed"], heads=False)["heads_tokens"] == 0  # linear only: the fixed part fits


@pytest.mark.parametrize("left", [-1, 20])  # the fixed part does not fit; fewer than two sequences would
def test_a_budget_that_cannot_hold_the_training_is_refused_with_what_it_needs(left):
    free = _plan(None)
    with pytest.raises(HostMemoryError, match="--host-memory.*nothing was trained"):
        _plan(free["fixed"] + left * free["per_token"])


def test_training_within_a_budget_keeps_fewer_tokens_for_the_heads(model_and_layers, caplog):
    model, adapter, layers = model_and_layers
    ids = torch.randint(3, 96, (2048,), generator=torch.Generator().manual_seed(0))
    batches = chunk_tokens(ids, 64, 4)  # 32 rows: 28 train (1792 tokens), 4 validate
    free = memory_plan(len(layers), 64, 8, 2, 64, 2, 1792, 256, 256, 64, 8192, True, None)
    budget = free["fixed"] + free["per_token"] * 700  # 640 tokens: 10 whole rows of 64
    with caplog.at_level(logging.WARNING, logger="m2r2_moe.predict.train"):
        adapters, report = train_adapters(model, adapter, layers, batches, depth=2, rank=4, width=16, epochs=1,
                                          progress=False, host_memory=budget)
    assert report["tokens"] == 1792 and report["heads_tokens"] == 640  # the linear fit still saw every token
    assert adapters.mlp is not None and "first 640 of 1792" in caplog.text
    _, full = train_adapters(model, adapter, layers, batches, depth=2, rank=4, width=16, epochs=1, progress=False,
                             host_memory=budget * 100)
    assert full["heads_tokens"] == full["tokens"] == 1792


def test_a_training_that_cannot_fit_fails_before_the_model_runs(model_and_layers, monkeypatch):
    model, adapter, layers = model_and_layers
    flags = [p.requires_grad for p in model.parameters()]

    def never(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(train_module, "collect_normed", never)
    ids = torch.randint(3, 96, (2048,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(HostMemoryError, match="linear statistics"):
        train_adapters(model, adapter, layers, chunk_tokens(ids, 64, 4), depth=2, rank=4, progress=False,
                       host_memory=1)
    assert [p.requires_grad for p in model.parameters()] == flags
