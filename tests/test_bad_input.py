"""Every bad input raises its documented error, names the fix, and leaves the model usable and unchanged."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import m2r2_moe
from conftest import same_weights, snapshot, tiny_mixtral


def _check_unchanged(model, snap, ids, ref):
    assert same_weights(model, snap)
    assert not m2r2_moe.is_offloaded(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.fixture
def model_and_ref():
    model = tiny_mixtral()
    ids = torch.randint(3, 96, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
    return model, snapshot(model), ids, ref


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(cache_experts=1), m2r2_moe.OffloadConfigError, "cache_experts >= 2"),
        (dict(cache_experts=0), m2r2_moe.OffloadConfigError, ">= 1"),
        (dict(cache_experts=2.5), m2r2_moe.OffloadConfigError, "whole number"),
        (dict(device="xpu:0"), m2r2_moe.OffloadConfigError, "not supported"),
        (dict(device="not-a-device"), m2r2_moe.OffloadConfigError, "not a device"),
        (dict(predictor="psychic"), m2r2_moe.OffloadConfigError, "predictor must be one of"),
        (dict(policy="fifo"), m2r2_moe.OffloadConfigError, "policy must be one of"),
        (dict(link_gbps=-1.0), m2r2_moe.OffloadConfigError, "positive"),
        (dict(lookahead=0), m2r2_moe.OffloadConfigError, "lookahead"),
        (dict(cache_slots=4), TypeError, "valid options"),
    ],
)
def test_bad_options(model_and_ref, kwargs, error, words):
    model, snap, ids, ref = model_and_ref
    with pytest.raises(error, match=words):
        m2r2_moe.offload(model, **kwargs)
    _check_unchanged(model, snap, ids, ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a missing GPU")
def test_unavailable_cuda(model_and_ref):
    model, snap, ids, ref = model_and_ref
    with pytest.raises(m2r2_moe.OffloadConfigError, match="CUDA is not available"):
        m2r2_moe.offload(model, device="cuda")
    _check_unchanged(model, snap, ids, ref)


def test_already_offloaded(model_and_ref):
    model, snap, ids, ref = model_and_ref
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    with pytest.raises(m2r2_moe.AlreadyOffloadedError, match="remove_offload"):
        m2r2_moe.offload(model, device="cpu", cache_experts=8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # the first offload still works
    m2r2_moe.remove_offload(model)
    _check_unchanged(model, snap, ids, ref)


def test_model_without_moe_blocks():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    snap = snapshot(model)
    with pytest.raises(m2r2_moe.UnsupportedModelError, match="no sparse MoE blocks"):
        m2r2_moe.offload(model, device="cpu")
    assert same_weights(model, snap)


def test_not_a_transformers_model():
    with pytest.raises(m2r2_moe.UnsupportedModelError, match="config"):
        m2r2_moe.offload(nn.Linear(4, 4))


class _ListExperts(nn.Module):
    """An old-style experts container (one module per expert): not a fused layout."""

    def __init__(self):
        super().__init__()
        self.num_experts = 2
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


def test_unsupported_experts_layout_names_the_class(model_and_ref):
    model, snap, ids, ref = model_and_ref
    original = model.model.layers[1].mlp.experts
    model.model.layers[1].mlp.experts = _ListExperts()
    with pytest.raises(m2r2_moe.UnsupportedModelError, match="_ListExperts"):
        m2r2_moe.offload(model, device="cpu")
    model.model.layers[1].mlp.experts = original
    _check_unchanged(model, snap, ids, ref)


def test_model_not_on_cpu(model_and_ref):
    model, snap, ids, ref = model_and_ref
    model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"))
    with pytest.raises(m2r2_moe.UnsupportedModelError, match="expects the model on CPU"):
        m2r2_moe.offload(model, device="cpu")
    assert not m2r2_moe.is_offloaded(model)
    assert model.model.layers[0].mlp.experts.gate_up_proj.numel() > 0  # nothing was moved


def test_functions_on_plain_model(model_and_ref):
    model = model_and_ref[0]
    for fn in (m2r2_moe.stats, m2r2_moe.remove_offload, m2r2_moe.reset_stats):
        with pytest.raises(m2r2_moe.NotOffloadedError, match="offload"):
            fn(model)


def test_failure_during_install_rolls_back(model_and_ref, monkeypatch):
    """An error halfway through moving the experts leaves the model exactly as it was."""
    from m2r2_moe.runtime.store import HostExpertStore

    model, snap, ids, ref = model_and_ref
    calls = {"n": 0}
    original = HostExpertStore.fill_layer

    def failing_fill(self, layer, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("injected: host store full")
        return original(self, layer, tensors)

    monkeypatch.setattr(HostExpertStore, "fill_layer", failing_fill)
    with pytest.raises(MemoryError, match="injected"):
        m2r2_moe.offload(model, device="cpu", cache_experts=4)
    monkeypatch.undo()
    _check_unchanged(model, snap, ids, ref)
