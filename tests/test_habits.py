"""What transformers users do with a model, done to an offloaded one: right, or a clear error, never silent loss.

Walked on two families (tiny random Mixtral in float32, Qwen2-MoE in bfloat16 with a shared expert and a dense
layer), each habit against the same model un-offloaded:
- `state_dict()` holds the real expert tensors; `torch.save` of it restores a plain model exactly;
- `num_parameters()` counts the real experts; `parameters()` yields empty placeholders for them (documented);
- `load_state_dict` with expert tensors, a dtype/device conversion, backward through the experts, deepcopy /
  copy / pickle: `OffloadedOperationError`, the model unchanged and still producing the same logits;
- conversions that change nothing for the experts, and training weights past the last MoE block, work;
- greedy, sampling, beam search and assisted generation give the un-offloaded model's tokens;
- `remove_offload` takes every hook off; a failure while installing them leaves the model as it was.
`save_pretrained` is tested in tests/test_save_offloaded.py; pipeline and torch.compile at the end.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import m2r2_moe
from conftest import same_weights, snapshot, tiny_mixtral
from m2r2_moe import OffloadedOperationError, model_hooks
from m2r2_moe.models import find_moe_layers
from families import tiny

BUILDERS = {"mixtral": lambda **kw: tiny_mixtral(**kw), "qwen2_moe": lambda **kw: tiny("qwen2_moe", **kw)}
IDS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(7))
GEN = dict(max_new_tokens=5, min_new_tokens=5, pad_token_id=0)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _offloaded(family):
    """(offloaded model, its state before offload, its logits before offload)."""
    model = BUILDERS[family]()
    snap, ref = snapshot(model), _logits(model)
    model.expert_keys = _expert_keys(model)  # (find_moe_layers refuses an offloaded model)
    m2r2_moe.offload(model, device="cpu", cache_experts=3)  # top-2: slots are reused within a forward
    return model, snap, ref


def _expert_keys(model) -> set[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(l.experts)]}.{p}" for l in find_moe_layers(model)[1] for p in l.param_names}


def _layout(model):
    return {n: (p.dtype, p.device, p.shape) for n, p in model.named_parameters()}


def _hook_state(model):
    """Every module's instance attributes and hook counts: what offload may add and remove_offload must remove."""
    return {n: (sorted(m.__dict__), len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks),
                len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


@pytest.fixture(params=list(BUILDERS))
def family(request):
    return request.param


def test_state_dict_holds_the_real_experts_and_round_trips_through_torch_save(family):
    model, snap, ref = _offloaded(family)
    state = model.state_dict()
    assert state.keys() == snap.keys()
    assert all(state[k].dtype == snap[k].dtype and torch.equal(state[k], snap[k]) for k in snap)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert buffer.tell() >= sum(v.numel() * v.element_size() for v in snap.values())
    fresh = BUILDERS[family]()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    assert same_weights(fresh, snap) and torch.equal(_logits(fresh), ref)
    m2r2_moe.remove_offload(model)


def test_num_parameters_counts_the_experts_parameters_yields_placeholders(family):
    plain = BUILDERS[family]()
    plain.model.embed_tokens.weight.requires_grad_(False)  # frozen tensors, one of them offloaded:
    find_moe_layers(plain)[1][0].experts.down_proj.requires_grad_(False)  # only_trainable must leave both out
    options = ((), (("only_trainable", True),), (("exclude_embeddings", True),))
    expected = {kw: plain.num_parameters(**dict(kw)) for kw in options}
    keys = _expert_keys(plain)
    expert_numel = sum(v.numel() for k, v in plain.state_dict().items() if k in keys)
    m2r2_moe.offload(plain, device="cpu", cache_experts=3)
    assert {kw: plain.num_parameters(**dict(kw)) for kw in options} == expected
    assert len(set(expected.values())) == 3
    assert sum(p.numel() for p in plain.parameters()) == expected[()] - expert_numel
    assert all(p.numel() == 0 for n, p in plain.named_parameters() if n in keys)
    m2r2_moe.remove_offload(plain)
    assert sum(p.numel() for p in plain.parameters()) == expected[()]


def test_load_state_dict_of_experts_is_refused_before_anything_is_copied(family):
    model, snap, ref = _offloaded(family)
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in snap.items()}
    with pytest.raises(OffloadedOperationError, match="remove_offload"):
        model.load_state_dict(changed)
    layer = max(int(k.split(".")[2]) for k in model.expert_keys)
    prefix = f"model.layers.{layer}."
    with pytest.raises(OffloadedOperationError, match="gate_up_proj"):
        model.model.layers[layer].load_state_dict({k[len(prefix):]: v for k, v in changed.items()
                                                   if k.startswith(prefix)})
    assert same_weights(model, snap) and torch.equal(_logits(model), ref)
    result = model.load_state_dict({k: v for k, v in snap.items() if k not in model.expert_keys}, strict=False)
    assert set(result.missing_keys) == model.expert_keys  # the rest loads as usual
    assert torch.equal(_logits(model), ref)
    m2r2_moe.remove_offload(model)


def test_conversions_the_experts_cannot_follow_are_refused_others_run(family):
    model, snap, ref = _offloaded(family)
    other = torch.bfloat16 if model.dtype == torch.float32 else torch.float32
    layout = _layout(model)
    refused = [lambda m: m.to(other), lambda m: m.half(), lambda m: m.double(), lambda m: m.to("meta"),
               lambda m: m.to(torch.device("meta"), other), lambda m: m.model.layers[0].to(torch.float16),
               lambda m: m.model.to_empty(device="meta")]
    for convert in refused:
        with pytest.raises(OffloadedOperationError, match="mixed dtypes or devices"):
            convert(model)
        assert _layout(model) == layout  # nothing half-converted
    for convert in (lambda m: m.to(m.dtype), lambda m: m.to("cpu"), lambda m: m.cpu(),
                    lambda m: m.float() if m.dtype == torch.float32 else m.bfloat16()):
        assert convert(model) is model
    assert _layout(model) == layout and torch.equal(_logits(model), ref)
    m2r2_moe.remove_offload(model)
    assert same_weights(model, snap)
    model.to(other)  # a plain model again: converts as usual
    assert model.dtype == other


def test_backward_through_experts_is_refused_training_past_them_works(family):
    plain = BUILDERS[family]()
    for p in plain.parameters():
        p.requires_grad_(False)
    plain.lm_head.weight.requires_grad_(True)
    plain(input_ids=IDS, labels=IDS).loss.backward()
    model, snap, ref = _offloaded(family)
    with pytest.raises(OffloadedOperationError, match="backward through the offloaded experts.*remove_offload"):
        model(input_ids=IDS, labels=IDS).loss.backward()
    model.zero_grad(set_to_none=True)
    assert same_weights(model, snap) and torch.equal(_logits(model), ref)  # still usable, unchanged
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # no input of an experts module requires grad now
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert torch.equal(model.lm_head.weight.grad, plain.lm_head.weight.grad)
    m2r2_moe.remove_offload(model)


def test_copy_and_pickle_are_refused(family):
    model, snap, ref = _offloaded(family)
    for attempt in (copy.deepcopy, copy.copy, pickle.dumps, lambda m: torch.save(m, io.BytesIO()),
                    lambda m: copy.deepcopy(m.model.layers[0])):
        with pytest.raises(OffloadedOperationError, match="Copy the model before offloading"):
            attempt(model)
    head = copy.deepcopy(model.lm_head)  # nothing offloaded below it: copies as usual
    assert torch.equal(head.weight, model.lm_head.weight)
    assert torch.equal(_logits(model), ref)
    m2r2_moe.remove_offload(model)
    assert same_weights(copy.deepcopy(model), snap)


def test_remove_offload_takes_every_hook_off(family):
    model = BUILDERS[family]()
    before = _hook_state(model)
    m2r2_moe.offload(model, device="cpu", cache_experts=3)
    assert _hook_state(model) != before
    m2r2_moe.remove_offload(model)
    assert _hook_state(model) == before


def test_offload_is_all_or_nothing_when_installing_the_hooks_fails(family, monkeypatch):
    model = BUILDERS[family]()
    snap, before = snapshot(model), _hook_state(model)
    calls = []

    def failing(forward, layer):
        calls.append(layer)
        if layer == 1:
            raise RuntimeError("injected")
        return forward

    monkeypatch.setattr(model_hooks, "_no_backward", failing)
    with pytest.raises(RuntimeError, match="injected"):
        m2r2_moe.offload(model, device="cpu", cache_experts=3)
    assert calls == [0, 1] and not m2r2_moe.is_offloaded(model)
    assert _hook_state(model) == before and same_weights(model, snap)


def _generations(model, assistant):
    out = {"greedy": model.generate(input_ids=IDS[:1], do_sample=False, **GEN),
           "beam": model.generate(input_ids=IDS[:1], do_sample=False, num_beams=3, **GEN),
           "assisted": model.generate(input_ids=IDS[:1], do_sample=False, assistant_model=assistant, **GEN)}
    torch.manual_seed(11)
    out["sampling"] = model.generate(input_ids=IDS[:1], do_sample=True, top_k=20, **GEN)
    return out


def test_generate_greedy_sampling_beam_and_assisted_are_unchanged(family):
    model = BUILDERS[family]()
    assistant = BUILDERS[family](layers=1) if family == "mixtral" else BUILDERS[family](num_hidden_layers=1)
    with torch.no_grad():
        ref = _generations(model, assistant)
        m2r2_moe.offload(model, device="cpu", cache_experts=3)
        out = _generations(model, assistant)
        m2r2_moe.offload(assistant, device="cpu", cache_experts=2)  # both offloaded
        both = model.generate(input_ids=IDS[:1], do_sample=False, assistant_model=assistant, **GEN)
    assert all(torch.equal(out[k], ref[k]) for k in ref), [k for k in ref if not torch.equal(out[k], ref[k])]
    assert torch.equal(both, ref["assisted"])
    m2r2_moe.remove_offload(model)
    m2r2_moe.remove_offload(assistant)


def test_pipeline_on_the_builtin_model():
    from transformers import pipeline

    model, tokenizer = m2r2_moe.load_builtin()
    prompt = "def add(a, b):"
    kwargs = dict(max_new_tokens=8, do_sample=False)
    ref = pipeline("text-generation", model=model, tokenizer=tokenizer)(prompt, **kwargs)
    m2r2_moe.offload(model, device="cpu", cache_experts=16)
    out = pipeline("text-generation", model=model, tokenizer=tokenizer)(prompt, **kwargs)
    assert out == ref and len(ref[0]["generated_text"]) > len(prompt)
    assert m2r2_moe.stats(model).tokens > 0  # it ran offloaded
    m2r2_moe.remove_offload(model)


@pytest.mark.slow  # about 20 s: dynamo traces the model twice (no_grad, grad)
def test_torch_compile():
    """`torch.compile(model).generate` gives the same tokens; a forward traced by dynamo (the eager backend:
    graph capture without code generation, so logits stay bit-identical) runs through the hooks, and its
    backward is refused like the eager one's."""
    model = tiny_mixtral(layers=1)
    with torch.no_grad():
        ref_logits = model(input_ids=IDS).logits
        ref_tokens = model.generate(input_ids=IDS[:1], do_sample=False, **GEN)
    m2r2_moe.offload(model, device="cpu", cache_experts=3)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes on the graph breaks at the runtime's host-side calls
        with torch.no_grad():
            tokens = torch.compile(model).generate(input_ids=IDS[:1], do_sample=False, **GEN)
            logits = torch.compile(model, backend="eager")(input_ids=IDS).logits
        with_grad = torch.compile(model, backend="eager")(input_ids=IDS).logits
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits) and torch.equal(with_grad, ref_logits)
    with pytest.raises(OffloadedOperationError, match="backward through the offloaded experts"):
        with_grad.sum().backward()
    torch._dynamo.reset()
    m2r2_moe.remove_offload(model)
