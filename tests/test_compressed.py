"""Compressed experts (expert_format int8 / int4): the codec's error bounds, the expansion twins and the
library's dequantization agreeing bit for bit, the runtime computing exactly the expanded model, the way back to
the original weights, the bytes on the link, and the refusals."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import m2r2_moe
from m2r2_moe import OffloadConfigError
from m2r2_moe.config import ExpertFormat, parse_expert_format
from m2r2_moe.models import find_moe_layers
from m2r2_moe.runtime.compressed import RowLayout, codec
from m2r2_moe.runtime.store import ExpertPacking

from conftest import same_weights, snapshot, tiny_mixtral
from families import FAMILIES, tiny

try:  # the compress extra: CI installs it with the test extra
    codec.quant_primitives()
except codec.MissingDependencyError:
    pytest.skip("torchao is not installed (pip install 'm2r2_moe[compress]')", allow_module_level=True)

FORMATS = ["int8", "int4", "int8-sym", "int4-sym", "int4-g32", "int4-g128", "int8-g256-sym"]
IDS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def _layout(spec: str, dtype=torch.float32, bias: bool = True) -> RowLayout:
    """A GPT-OSS-like expert: transposed gate_up [H, 2I] with its bias, down [I, H] with its bias."""
    names = ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"] if bias else ["gate_up_proj", "down_proj"]
    shapes = [(64, 96), (96,), (48, 64), (64,)] if bias else [(64, 96), (48, 64)]
    return RowLayout.build(ExpertPacking.from_shapes(names, shapes, dtype), parse_expert_format(spec))


def _expert(layout: RowLayout, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = layout.packing
    return {n: (torch.randn(s, generator=g) * 0.05 + 0.01).to(p.dtype) for n, s in zip(p.names, p.shapes)}


def _encoded(layout: RowLayout, tensors) -> torch.Tensor:
    row = torch.zeros(layout.nbytes, dtype=torch.uint8)
    codec.encode(tensors, layout, row)
    return row


@pytest.mark.parametrize("spec", FORMATS)
def test_round_trip_error_bounds(spec):
    """Every weight comes back within half a quantization step of its group, plus what the float16 rounding of
    the scale can move the top code (qmax x 2^-11 steps: the codes are clamped to the range), and the overall
    error is what the bit width allows; biases come back exactly."""
    layout = _layout(spec)
    tensors = _expert(layout)
    row = _encoded(layout, tensors)
    out = layout.packing.views(codec.expand_reference(layout, row).unsqueeze(0))
    fmt = layout.format
    for seg in layout.segments:
        w, back = tensors[seg.name].reshape(-1), out[seg.name][0].reshape(-1)
        if not seg.quantized:
            assert torch.equal(w, back)
            continue
        _, scales, _ = layout.sections(row, seg)
        step = scales.float().repeat_interleave(fmt.group_size)
        assert ((w - back).abs() <= step * (0.5 + fmt.qmax * 2**-11) + 1e-7).all(), seg.name
        relative = ((w - back).norm() / w.norm()).item()
        assert relative < (0.12 if fmt.bits == 4 else 0.008), (seg.name, relative)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", FORMATS)
def test_fast_expansion_equals_its_twin(spec, dtype):
    """The torch expansion the copy engine runs writes the reference twin's bits; the gaps stay untouched."""
    layout = _layout(spec, dtype)
    row = _encoded(layout, _expert(layout, seed=3))
    fast = torch.full((layout.numel,), 7.0, dtype=dtype)
    codec.expand_into(layout, row, fast)
    reference = codec.expand_reference(layout, row)
    covered = torch.zeros(layout.numel, dtype=torch.bool)
    for seg in layout.segments:
        covered[seg.dst : seg.dst + seg.numel] = True
    assert torch.equal(fast.view(torch.int16 if dtype.itemsize == 2 else torch.int32)[covered],
                       reference.view(torch.int16 if dtype.itemsize == 2 else torch.int32)[covered])
    assert (fast[~covered] == 7.0).all()


@pytest.mark.parametrize("spec", ["int8", "int4", "int8-sym", "int4-sym-g32"])
def test_expansion_is_torchaos_dequantization(spec):
    """Our expansion of our packing equals torchao's `dequantize_affine` of the same codes, scales and zero
    points (float32), rounded to the model's dtype: the bytes on the link carry the library's numbers."""
    qp = codec.quant_primitives()
    layout = _layout(spec, torch.bfloat16, bias=False)
    tensors = _expert(layout, seed=5)
    row = _encoded(layout, tensors)
    out = layout.packing.views(codec.expand_reference(layout, row).unsqueeze(0))
    fmt = layout.format
    for seg in layout.segments:
        codes, scales, zeros = codec.quantize(tensors[seg.name], layout)
        ours_scales = layout.sections(row, seg)[1]
        assert torch.equal(scales, ours_scales)
        library = qp.dequantize_affine(codes, (1, fmt.group_size), scales, zeros, torch.uint8, 0, fmt.qmax,
                                       output_dtype=torch.float32)
        assert torch.equal(library.reshape(-1).to(torch.bfloat16), out[seg.name][0].reshape(-1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_every_family_computes_the_expanded_model_and_restores(family, spec):
    """Offloaded with a compressed format (half the experts cached), a model computes bit for bit what the
    same model computes with its experts replaced by their expansions (the runtime adds no error of its
    own); `remove_offload` then gives back the original weights bit for bit (GPT-OSS: biases, transposed)."""
    model = tiny(family)
    snap = snapshot(model)
    expanded = copy.deepcopy(model)
    _, layers = find_moe_layers(model)
    total = sum(int(layer.experts.num_experts) for layer in layers)
    m2r2_moe.offload(model, device="cpu", cache_experts=total // 2, expert_format=spec)
    try:
        store = m2r2_moe.get_offloader(model).store
        _, copies = find_moe_layers(expanded)
        for i, layer in enumerate(copies):
            for name, value in store.compressed_layer(i).items():
                getattr(layer.experts, name).data = value
        with torch.no_grad():
            got, want = model(IDS).logits, expanded(IDS).logits
        assert torch.equal(got, want)
        assert m2r2_moe.stats(model).misses > 0
    finally:
        m2r2_moe.remove_offload(model)
    assert same_weights(model, snap)


def test_compressed_run_then_lossless_run_is_lossless():
    model = tiny_mixtral()
    with torch.no_grad():
        ref = model(IDS).logits
    for spec in ("int4", "model"):
        m2r2_moe.offload(model, device="cpu", cache_experts=4, expert_format=spec)
        with torch.no_grad():
            out = model(IDS).logits
        m2r2_moe.remove_offload(model)
        assert torch.equal(out, ref) == (spec == "model")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)


@pytest.mark.parametrize("spec,limit", [("int8", 0.53), ("int4", 0.28)])
def test_bytes_on_the_link_and_in_the_store(spec, limit):
    """bf16 experts of the built-in model's geometry (hidden 128, intermediate 256): a miss moves the compressed
    row only, scales and zero points included; the emulated link is held for those bytes plus the expansion."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    m2r2_moe.offload(model, device="cpu", cache_experts=4, expert_format=spec, link_gbps=0.5)
    try:
        offloader = m2r2_moe.get_offloader(model)
        with torch.no_grad():
            model(IDS[:, :1])
        stats = m2r2_moe.stats(model)
        row, full = offloader.expert_bytes[0], offloader.packings[0].nbytes
        assert row / full <= limit
        assert stats.bytes_to_device == stats.misses * row
        assert offloader.store.nbytes == 2 * 8 * row
        assert stats.expand_seconds > 0
        assert stats.stall_seconds >= stats.misses * offloader.engine.link_seconds(row) * 0.9
    finally:
        m2r2_moe.remove_offload(model)


@pytest.mark.parametrize("bad", ["int3", "fp8", "int4-g48", "int4-g8", "int4-g2048", "model-g64", "int4-sym-x",
                                 "", 4, None, ExpertFormat])
def test_bad_expert_format_refused_and_model_unchanged(bad):
    model = tiny_mixtral()
    snap = snapshot(model)
    with pytest.raises(OffloadConfigError, match="expert_format") as info:
        m2r2_moe.offload(model, device="cpu", expert_format=bad)
    assert "'int8' or 'int4'" in str(info.value)  # the message names what is accepted
    assert not m2r2_moe.is_offloaded(model) and same_weights(model, snap)


def test_format_grammar():
    assert parse_expert_format("model") is None
    assert parse_expert_format("INT4-g32-sym") == ExpertFormat(4, 32, True)
    assert parse_expert_format("int8").name == "int8-g64-asym"


def test_missing_torchao_is_named(monkeypatch):
    monkeypatch.setattr(codec, "_torchao", None)
    for name in ("torchao", "torchao.quantization", "torchao.quantization.quant_primitives"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    model = tiny_mixtral()
    snap = snapshot(model)
    with pytest.raises(ImportError, match=r"m2r2_moe\[compress\]"):
        m2r2_moe.offload(model, device="cpu", expert_format="int8")
    assert not m2r2_moe.is_offloaded(model) and same_weights(model, snap)


@pytest.mark.parametrize("predictor,policy", [("history", "lru"), ("gate", "predictive"), ("m2r2", "predictive")])
def test_prefetching_changes_nothing_in_a_compressed_run(predictor, policy):
    """Every predictor and policy over compressed experts, on an emulated link: greedy decoding gives the
    tokens and logits of on-demand loading, bit for bit (prefetched copies are expanded like demand loads)."""
    from families import random_adapters

    model = tiny_mixtral()
    gen = dict(input_ids=IDS[:1], max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
               return_dict_in_generate=True)

    def run(**options):
        m2r2_moe.offload(model, device="cpu", cache_experts=4, expert_format="int4", **options)
        try:
            with torch.no_grad():
                out = model.generate(**gen)
            return out, m2r2_moe.stats(model)
        finally:
            m2r2_moe.remove_offload(model)

    want, _ = run()
    adapters = random_adapters(model) if predictor == "m2r2" else None
    got, stats = run(predictor=predictor, policy=policy, lookahead=2, adapters=adapters, link_gbps=0.05)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    assert stats.prefetches > 0
