"""Every bad input raises its documented error, names the fix, and leaves the model usable and unchanged."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import m2r2_moe
from conftest import same_weights, snapshot, tiny_mixtral
from m2r2_moe.predict import AdapterFileError


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
        (dict(prefetch_min_prob=0), m2r2_moe.OffloadConfigError, "prefetch_min_prob"),
        (dict(prefetch_min_prob=1.5), m2r2_moe.OffloadConfigError, "prefetch_min_prob"),
        (dict(prefetch_min_prob=True), m2r2_moe.OffloadConfigError, "prefetch_min_prob"),
        (dict(prefetch_min_prob="0.3"), m2r2_moe.OffloadConfigError, "prefetch_min_prob"),
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


# -- every public entry point: devices, options, adapters files, predictors, dtypes, paths, CLI ----
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(device=True), "device must be"),
        (dict(device=1.5), "device must be"),
        (dict(device=-1), "CUDA index"),
        (dict(device="tpu"), "not a device torch knows"),
        (dict(device="mps"), "not supported"),
        (dict(device="meta"), "not supported"),
        (dict(link_gbps=True), "link_gbps"),
        (dict(link_latency_us=float("nan")), "link_latency_us"),
        (dict(link_latency_us=float("inf")), "link_latency_us"),
        (dict(link_latency_us=5e6), r"\(1 s\)"),
        (dict(link_gbps=1e-9), "1 MB/s"),
        (dict(link_latency_us=True), "link_latency_us"),
        (dict(pin_memory=1), "pin_memory"),
        (dict(predictor=object()), "Predictor object"),
        (dict(predictor=None), "predictor must be"),
        (dict(cache_experts="auto"), "from_pretrained"),
        (dict(adapters="adapters.safetensors"), "only read by predictor='m2r2'"),
        (dict(adapters="adapters.safetensors", predictor="gate"), "only read by predictor='m2r2'"),
    ],
)
def test_more_bad_options(model_and_ref, kwargs, words):
    model, snap, ids, ref = model_and_ref
    with pytest.raises(m2r2_moe.OffloadConfigError, match=words):
        m2r2_moe.offload(model, **kwargs)
    _check_unchanged(model, snap, ids, ref)


@pytest.mark.parametrize("device", ["cuda:7", 7, torch.device("cuda", 7)])
def test_missing_cuda_device(model_and_ref, device):
    """No CUDA here: 'not available'; on a GPU machine with fewer than 8 devices: 'does not exist'."""
    model, snap, ids, ref = model_and_ref
    with pytest.raises(m2r2_moe.OffloadConfigError, match="not available|does not exist"):
        m2r2_moe.offload(model, device=device)
    _check_unchanged(model, snap, ids, ref)


@pytest.mark.parametrize("model", [None, 3, "mistralai/Mixtral-8x7B-v0.1"])
def test_offload_of_a_non_model(model):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        m2r2_moe.offload(model, device="cpu")


def _adapters_file(model, path, fingerprint=None):
    from m2r2_moe.models import find_moe_layers
    from m2r2_moe.predict import AcceleratorAdapters, model_fingerprint

    layers = find_moe_layers(model)[1]
    adapters = AcceleratorAdapters(len(layers), model.config.hidden_size, depth=2, rank=4)
    adapters.save(path, fingerprint or model_fingerprint(model, layers))
    return path


@pytest.mark.parametrize("case", ["directory", "missing", "empty", "garbage", "truncated", "not_adapters",
                                  "other_model"])
def test_bad_adapters_files(model_and_ref, tmp_path, case):
    from safetensors.torch import save_file

    from m2r2_moe.predict import AdapterFileError, AdapterMismatchError

    model, snap, ids, ref = model_and_ref
    good = _adapters_file(model, tmp_path / "good.safetensors")
    path = tmp_path / f"{case}.safetensors"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"\x00\xff" * 500)
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:-64])
    elif case == "not_adapters":
        save_file({"U": torch.zeros(2)}, str(path))
    elif case == "other_model":
        _adapters_file(tiny_mixtral(seed=9), path)
    error = AdapterMismatchError if case == "other_model" else AdapterFileError
    with pytest.raises(error, match=str(path.name)):
        m2r2_moe.offload(model, device="cpu", predictor="m2r2", adapters=path)
    _check_unchanged(model, snap, ids, ref)
    m2r2_moe.offload(model, device="cpu", predictor="m2r2", adapters=str(good))  # the good file is accepted
    m2r2_moe.remove_offload(model)
    _check_unchanged(model, snap, ids, ref)


def test_predictor_object_for_another_model(model_and_ref):
    from m2r2_moe.predict import HistoryPredictor

    model, snap, ids, ref = model_and_ref
    for geometry in [(3, 8), (4, 16)]:  # (MoE layers, experts): the tiny Mixtral has (4, 8)
        with pytest.raises(m2r2_moe.OffloadConfigError, match="built for"):
            m2r2_moe.offload(model, device="cpu", predictor=HistoryPredictor(*geometry, 2, 2))
        _check_unchanged(model, snap, ids, ref)


def test_experts_in_two_dtypes(model_and_ref):
    model, snap, ids, ref = model_and_ref
    model.model.layers[2].mlp.experts.to(torch.bfloat16)
    snap = snapshot(model)
    with torch.no_grad():
        ref = model(ids).logits
    with pytest.raises(TypeError, match="one dtype"):
        m2r2_moe.offload(model, device="cpu")
    _check_unchanged(model, snap, ids, ref)


def test_remove_and_stats_twice_or_on_other_objects(model_and_ref):
    model = model_and_ref[0]
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    m2r2_moe.remove_offload(model)
    for fn in (m2r2_moe.remove_offload, m2r2_moe.stats, m2r2_moe.reset_stats, m2r2_moe.get_offloader):
        for obj in (model, None, 3):
            with pytest.raises(m2r2_moe.NotOffloadedError):
                fn(obj)


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_input") / "mixtral"
    tiny_mixtral().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(path=None), TypeError, "checkpoint folder"),
        (dict(path=3), TypeError, "checkpoint folder"),
        (dict(dtype=torch.int8), m2r2_moe.OffloadConfigError, "floating-point"),
        (dict(dtype="int32"), m2r2_moe.OffloadConfigError, "floating-point"),
        (dict(dtype=torch.complex64), m2r2_moe.OffloadConfigError, "floating-point"),
        (dict(dtype="float99"), m2r2_moe.OffloadConfigError, "dtype must be"),
        (dict(dtype=3), m2r2_moe.OffloadConfigError, "dtype must be"),
        (dict(device="tpu"), m2r2_moe.OffloadConfigError, "not a device"),
        (dict(device=True), m2r2_moe.OffloadConfigError, "device must be"),
        (dict(context_length=True), m2r2_moe.OffloadConfigError, "context_length"),
        (dict(progress="no"), TypeError, "progress"),
        (dict(cache_experts=0), m2r2_moe.OffloadConfigError, "top-k"),
        (dict(cache_experts="lots"), m2r2_moe.OffloadConfigError, "amount of memory"),
        (dict(cache_experts=2.5), m2r2_moe.OffloadConfigError, "cache_experts"),
        (dict(expert_store="ssd"), m2r2_moe.OffloadConfigError, "expert_store"),
        (dict(predictor="m2r2", adapters="/no/such/adapters.safetensors"), AdapterFileError, "does not exist"),
        (dict(adapters="/no/such/adapters.safetensors"), m2r2_moe.OffloadConfigError, "only read by"),
        (dict(cache_slots=3), TypeError, "valid options"),
    ],
)
def test_from_pretrained_bad_arguments_allocate_nothing(ckpt_path, monkeypatch, kwargs, error, words):
    from m2r2_moe.runtime import disk_store, store

    made = []
    for cls in (store.HostExpertStore, disk_store.DiskExpertStore):
        init = cls.__init__
        monkeypatch.setattr(cls, "__init__",
                            lambda self, *a, _init=init, **k: (made.append(self), _init(self, *a, **k))[1])
    kwargs = {"path": ckpt_path, "device": "cpu", "progress": False, **kwargs}
    with pytest.raises(error, match=words):
        m2r2_moe.from_pretrained(kwargs.pop("path"), **kwargs)
    assert made == []  # refused before any expert store exists


def test_cli_bad_arguments(capsys):
    from m2r2_moe import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--predictor", "psychic"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert cli.main(["demo", "--model", "random", "--max-new-tokens", "1", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "m2r2-moe demo: error:" in err and "not a device" in err and "Traceback" not in err
