"""Predictors compute where the model computes: `offload` builds them on CPU (bad adapters change nothing),
then places them with `Predictor.to` once the model has moved, and `remove_offload` brings them back.

No GPU here: the model's compute device is played by `meta` (tensors without data: shapes, dtypes and
devices propagate, so a prediction runs and says where its tensors live) and by a dtype change (a
predictor built for an fp32 model, the model then cast to bf16: the copies a predictor made of the
model's weights must follow, exactly as device copies must follow a move to the GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.models import find_moe_layers
from m2r2_moe.predict import AcceleratorAdapters, OraclePredictor, make_predictor
from m2r2_moe.predict.base import Predictor

DEPTH = 2
IDS = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(3))


def _adapters(layers: int, route_features: int = 8) -> AcceleratorAdapters:
    adapters = AcceleratorAdapters(layers, 64, DEPTH, rank=4, route_features=route_features)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return adapters


def _predictor(name: str, model, adapter, layers):
    if name == "oracle":
        trace = torch.randint(0, 8, (16, len(layers), 2), generator=torch.Generator().manual_seed(2))
        return OraclePredictor(len(layers), 8, 2, DEPTH, trace, wrap=True)
    return make_predictor(name, model, adapter, layers, DEPTH, adapters=_adapters(len(layers)))


def owned_tensors(obj, path: str = "predictor", seen: set | None = None):
    """(path, tensor) for every tensor a predictor holds itself: its attributes, recursively through
    containers, modules and m2r2_moe objects — not the model's own layers and adapter it computes with."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, nn.Module):
        for name, t in list(obj.named_parameters()) + list(obj.named_buffers()):
            yield f"{path}.{name}", t
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from owned_tensors(value, f"{path}[{key!r}]", seen)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from owned_tensors(value, f"{path}[{i}]", seen)
    elif type(obj).__module__.startswith("m2r2_moe") and hasattr(obj, "__dict__"):
        for name, value in vars(obj).items():
            if name not in ("layers", "adapter"):
                yield from owned_tensors(value, f"{path}.{name}", seen)


@pytest.mark.parametrize("name", ["history", "gate", "m2r2", "oracle"])
def test_every_tensor_a_predictor_computes_with_moves_to_the_model_device(name):
    model = tiny_mixtral()
    adapter, layers = find_moe_layers(model)
    predictor = _predictor(name, model, adapter, layers)
    assert list(owned_tensors(predictor))  # the walk finds what it must check
    model.to("meta")
    assert predictor.to("meta") is predictor
    stray = [(path, t.device) for path, t in owned_tensors(predictor) if t.device.type != "meta"]
    assert stray == [], f"{name}: tensors left behind: {stray[:4]}"
    residual = torch.empty(1, 64, device="meta")
    chosen = torch.zeros(1, 2, dtype=torch.long, device="meta")
    for layer in range(len(layers)):
        predictor.observe(layer, chosen)
        depths, scores = predictor.predict_stacked(layer, residual, chosen, normed=residual)
        assert scores is None or (scores.device.type == "meta" and scores.shape == (len(depths), 1, 8))


def test_history_refuses_routing_on_another_device_and_names_the_fix():
    model = tiny_mixtral()
    adapter, layers = find_moe_layers(model)
    history = make_predictor("history", model, adapter, layers, DEPTH)
    with pytest.raises(ValueError, match=r"predictor.to\('meta'\)"):
        history.observe(0, torch.zeros(1, 2, dtype=torch.long, device="meta"))


def test_history_counts_without_bincount_are_the_same_numbers():
    """`index_add_` of ones (no data-dependent output size, no host read) counts as `bincount` did."""
    model = tiny_mixtral()
    adapter, layers = find_moe_layers(model)
    history = make_predictor("history", model, adapter, layers, DEPTH)
    expected = history.counts.clone()
    generator = torch.Generator().manual_seed(5)
    for step in range(30):
        layer = step % len(layers)
        chosen = torch.randint(0, 8, (int(torch.randint(1, 6, (1,), generator=generator)), 2), generator=generator)
        history.observe(layer, chosen)
        expected[layer] = expected[layer] * history.decay + torch.bincount(chosen.reshape(-1), minlength=8).float()
    assert torch.equal(history.counts, expected)


@pytest.mark.parametrize("name", ["gate", "m2r2"])
def test_a_predictor_built_before_the_model_changed_follows_it_through_offload(name, admit_every_prediction):
    """Built for the fp32 model; the model is then cast to bf16 and offloaded with that predictor object:
    once offloaded, it predicts exactly as one built for the bf16 model (its stacked router copies are
    remade from the model as it is), and prefetching runs without a predictor failure."""
    model = tiny_mixtral(torch.float32)
    adapter, layers = find_moe_layers(model)
    predictor = _predictor(name, model, adapter, layers)
    model.to(torch.bfloat16)
    with torch.no_grad():
        reference = model.generate(input_ids=IDS, max_new_tokens=8, do_sample=False, pad_token_id=0)
    fresh = _predictor(name, model, adapter, layers)
    m2r2_moe.offload(model, device="cpu", cache_experts=6, predictor=predictor)
    try:
        for stacked in predictor.stacked:
            assert stacked is None or stacked.norm_weight.dtype == stacked.router_weight_t.dtype == torch.bfloat16
        residual = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
        chosen = torch.tensor([[0, 1], [2, 3], [4, 5]])
        for layer in range(len(layers)):
            depths, scores = predictor.predict_stacked(layer, residual, chosen)
            fresh_depths, fresh_scores = fresh.predict_stacked(layer, residual, chosen)
            assert depths == fresh_depths
            assert (scores is None and fresh_scores is None) or torch.equal(scores, fresh_scores)
        with torch.no_grad():
            tokens = model.generate(input_ids=IDS, max_new_tokens=8, do_sample=False, pad_token_id=0)
        stats = m2r2_moe.stats(model)
        assert stats.predictor_failures == 0 and stats.prefetches > 0
        assert torch.equal(tokens, reference)
    finally:
        m2r2_moe.remove_offload(model)


class Spy(Predictor):
    """Records where the model's weights and experts stand each time the predictor is placed."""

    name = "spy"

    def __init__(self, layers):
        super().__init__(len(layers), 8, 2, DEPTH)
        self.layers, self.calls = layers, []

    def to(self, device):
        installed = "forward" in self.layers[0].experts.__dict__  # the offloaded forward is in place
        emptied = self.layers[0].experts.down_proj.numel() == 0  # the expert weights went to the store
        self.calls.append((torch.device(device), installed, emptied))
        return self


def test_offload_places_the_predictor_after_the_model_moved_and_remove_offload_brings_it_back():
    model = tiny_mixtral()
    _, layers = find_moe_layers(model)
    spy = Spy(layers)
    m2r2_moe.offload(model, device="cpu", cache_experts=4, predictor=spy)
    assert spy.calls == [(torch.device("cpu"), True, True)]  # once the model is in place, before it runs
    m2r2_moe.remove_offload(model)
    assert spy.calls[1:] == [(torch.device("cpu"), False, False)]  # with the model back as it was
