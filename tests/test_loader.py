"""`m2r2_moe.from_pretrained`: loading a checkpoint straight into the offloaded layout.

Invariants: (1) logits equal `offload(AutoModelForCausalLM.from_pretrained(path))` bit for bit, for every
on-disk expert layout (Mixtral w1/w2/w3, Qwen-style gate/up/down per expert, fused) and both store tiers;
(2) `remove_offload` gives back exactly the model transformers would have loaded (on CPU); (3) a bad
checkpoint raises its own error before any store is allocated; (4) peak RSS stays near 1x the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, DeepseekV3Config, GptOssConfig, LlamaConfig, LlamaForCausalLM,
                          MixtralConfig, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe import errors
from m2r2_moe.checkpoint import plan
from m2r2_moe.config import OffloadConfigError
from m2r2_moe.runtime import disk_store, store

SMALL = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(**SMALL, moe_intermediate_size=32, num_experts=8,
                                                            num_experts_per_tok=2, shared_expert_intermediate_size=48)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, moe_intermediate_size=32, num_experts=8,
                                                            num_experts_per_tok=2, head_dim=16,
                                                            tie_word_embeddings=True)),
    "olmoe": lambda: OlmoeForCausalLM(OlmoeConfig(**SMALL, intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
    # Qwen-style names, a dense first layer, shared experts, latent attention
    "deepseek_v3": lambda: AutoModelForCausalLM.from_config(DeepseekV3Config(
        **SMALL, moe_intermediate_size=32, intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, head_dim=8)),
    # fused on disk, with biases
    "gpt_oss": lambda: AutoModelForCausalLM.from_config(GptOssConfig(
        **SMALL, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"])),
}
IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _save(model, path: Path, shard: str = "200KB") -> Path:
    model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="module")
def mixtral_path(tmp_path_factory):
    return _save(tiny_mixtral(), tmp_path_factory.mktemp("ckpt") / "mixtral")


@pytest.fixture(scope="module")
def fused_path(tmp_path_factory):
    """A checkpoint whose experts are stored fused, as the 5.x modules hold them (`experts.gate_up_proj`)."""
    model = tiny_mixtral(seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "fused"
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _reference(path, **kw):
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return _logits(m2r2_moe.offload(model, device="cpu", cache_experts=3))


@pytest.mark.parametrize("expert_store", ["ram", "disk"])
def test_mixtral_sharded_identical_and_restores(mixtral_path, expert_store):
    assert len(list(mixtral_path.glob("*.safetensors"))) > 3
    ref = _reference(mixtral_path)
    model = m2r2_moe.from_pretrained(mixtral_path, device="cpu", cache_experts=3, expert_store=expert_store,
                                     progress=False)
    assert torch.equal(_logits(model), ref)
    assert m2r2_moe.stats(model).misses > 0
    m2r2_moe.remove_offload(model)
    plain = AutoModelForCausalLM.from_pretrained(mixtral_path).state_dict()
    back = model.state_dict()
    assert back.keys() == plain.keys() and all(torch.equal(back[k], plain[k]) for k in plain)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("expert_store", ["ram", "disk"])
def test_other_families_identical(tmp_path, family, expert_store):
    torch.manual_seed(0)
    path = _save(FAMILIES[family]().eval(), tmp_path / family)
    model = m2r2_moe.from_pretrained(path, device="cpu", cache_experts=3, expert_store=expert_store, progress=False)
    assert torch.equal(_logits(model), _reference(path))
    layouts = m2r2_moe.checkpoint.loader.plan_checkpoint(path, device="cpu").layouts
    assert set(layouts) == {"fused" if family == "gpt_oss" else "qwen"}


@pytest.mark.parametrize("expert_store", ["ram", "disk"])
def test_fused_layout_and_dtype_cast(fused_path, expert_store):
    """fp32 on disk, bf16 asked: cast per tensor exactly as transformers casts."""
    model = m2r2_moe.from_pretrained(fused_path, device="cpu", cache_experts=3, dtype=torch.bfloat16,
                                     expert_store=expert_store, progress=False)
    assert torch.equal(_logits(model), _reference(fused_path, dtype=torch.bfloat16))


def test_generate_identical_with_checkpoint_generation_config(mixtral_path, tmp_path):
    """generation_config.json is honoured as transformers honours it (here: sampling, top-k, an extra eos)."""
    path = _copy(mixtral_path, tmp_path / "m")
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "top_k": 5,
                                                              "eos_token_id": [2, 7]}))
    ref = m2r2_moe.offload(AutoModelForCausalLM.from_pretrained(path), device="cpu", cache_experts=2)
    model = m2r2_moe.from_pretrained(path, device="cpu", cache_experts=2, progress=False)
    assert model.generation_config.to_dict() == ref.generation_config.to_dict()
    outs = []
    for m in (ref, model):
        torch.manual_seed(5)
        with torch.no_grad():
            outs.append(m.generate(input_ids=IDS[:1], max_new_tokens=8))
    assert torch.equal(*outs)


def test_budgets(mixtral_path):
    kw = dict(device="cpu", progress=False)
    expert = m2r2_moe.get_offloader(m2r2_moe.from_pretrained(mixtral_path, cache_experts=2, **kw)).expert_bytes[0]
    assert m2r2_moe.get_offloader(m2r2_moe.from_pretrained(mixtral_path, **kw)).num_slots == 32  # auto: all fit
    by_bytes = m2r2_moe.from_pretrained(mixtral_path, cache_experts=f"{5 * expert + 7}B", **kw)
    assert m2r2_moe.get_offloader(by_bytes).num_slots == 5
    with pytest.raises(OffloadConfigError, match="top-k=2"):
        m2r2_moe.from_pretrained(mixtral_path, cache_experts=f"{expert}B", **kw)
    text = str(m2r2_moe.checkpoint.loader.plan_checkpoint(mixtral_path, cache_experts=4, device="cpu"))
    assert "4 expert slots" in text and "mixtral" in text and "KV reserve" in text


def test_auto_budget_math(monkeypatch):
    """The 'auto' arithmetic on CUDA and CPU, with the memory probes faked (no GPU here)."""
    monkeypatch.setattr(plan, "device_memory", lambda device: (10 * 2**30, 20 * 2**30, "fake"))
    kw = dict(device=torch.device("cuda"), expert_store="ram", top_k=2, total_experts=1000, expert_bytes=2**28,
              store_bytes=0, dense_bytes=2 * 2**30, kv_bytes=2**30)
    slots, how, _ = plan.resolve_slots("auto", **kw)
    assert slots == (10 - 2 - 1 - 1) * 4 and "auto" in how  # margin: 5% of 20 GiB = 1 GiB
    monkeypatch.setattr(plan, "device_memory", lambda device: (3 * 2**30, 20 * 2**30, "fake"))
    with pytest.raises(errors.DeviceMemoryError, match="below top-k"):
        plan.resolve_slots("auto", **kw)
    gib = 2**30
    monkeypatch.setattr(plan, "host_memory", lambda: (20 * gib, 50 * gib))  # on CPU: half of what the store leaves
    cpu = {**kw, "device": torch.device("cpu"), "store_bytes": 8 * gib}
    slots, _, _ = plan.resolve_slots("auto", **cpu)
    assert slots == int((20 - 8 - 2 - 1) * gib - plan.host_margin(50 * gib)) // 2 // 2**28
    assert plan.parse_bytes("8GB") == 8 * 10**9 and plan.parse_bytes("1.5 GiB") == 3 * 2**29
    with pytest.raises(OffloadConfigError):
        plan.parse_bytes("lots")


def test_host_memory_check_suggests_disk(mixtral_path, monkeypatch):
    monkeypatch.setattr(plan, "host_memory", lambda: (2_000_000 + plan.host_margin(4_000_000), 4_000_000))
    kw = dict(device="cpu", cache_experts=2, context_length=16, progress=False)  # needs 2.9 MB with RAM experts
    with pytest.raises(errors.HostMemoryError, match="expert_store='disk'"):
        m2r2_moe.from_pretrained(mixtral_path, **kw)
    model = m2r2_moe.from_pretrained(mixtral_path, expert_store="disk", **kw)
    assert isinstance(m2r2_moe.get_offloader(model).store, disk_store.DiskExpertStore)


# -- bad input: each raises its error, and no expert store is ever allocated ---------------------------------
@pytest.fixture
def no_store(monkeypatch):
    made = []
    for cls in (store.HostExpertStore, disk_store.DiskExpertStore):
        init = cls.__init__
        monkeypatch.setattr(cls, "__init__",
                            lambda self, *a, _init=init, **k: (made.append(self), _init(self, *a, **k))[1])
    yield
    assert made == []


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


def test_missing_shard(mixtral_path, tmp_path, no_store):
    path = _copy(mixtral_path, tmp_path / "m")
    _shards(path)[2].unlink()
    with pytest.raises(errors.MissingShardError, match="missing"):
        m2r2_moe.from_pretrained(path, device="cpu", progress=False)


def test_truncated_shard(mixtral_path, tmp_path, no_store):
    path = _copy(mixtral_path, tmp_path / "m")
    last = _shards(path)[-1]
    os.truncate(last, last.stat().st_size - 100)
    with pytest.raises(errors.CorruptCheckpointError, match="truncated"):
        m2r2_moe.from_pretrained(path, device="cpu", progress=False)


@pytest.mark.parametrize("change", [{"intermediate_size": 80}, {"num_local_experts": 12}, {"vocab_size": 100}])
def test_config_weights_mismatch(mixtral_path, tmp_path, no_store, change):
    path = _copy(mixtral_path, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(errors.WeightsMismatchError, match="shape"):
        m2r2_moe.from_pretrained(path, device="cpu", progress=False)


@pytest.mark.parametrize("drop, match", [("model.layers.1.block_sparse_moe.experts.3.w2.weight", "expert tensors"),
                                         ("model.norm.weight", "not in the checkpoint")])
def test_missing_tensor(mixtral_path, tmp_path, no_store, drop, match):
    path = _copy(mixtral_path, tmp_path / "m")
    tensors = {}
    for shard in _shards(path):
        tensors.update(load_file(shard))
        shard.unlink()
    (path / "model.safetensors.index.json").unlink()
    del tensors[drop]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(errors.WeightsMismatchError, match=match):
        m2r2_moe.from_pretrained(path, device="cpu", progress=False)


def test_unsupported_family(tmp_path, no_store):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    path = _save(LlamaForCausalLM(config), tmp_path / "dense")
    with pytest.raises(errors.UnsupportedModelError, match="nothing to offload"):
        m2r2_moe.from_pretrained(path, device="cpu", progress=False)
    (path / "config.json").write_text(json.dumps({"model_type": "no_such_family"}))
    with pytest.raises(errors.UnsupportedModelError):
        m2r2_moe.from_pretrained(path, device="cpu", progress=False)


def test_not_a_checkpoint(mixtral_path, tmp_path, no_store):
    for path in (tmp_path / "nope", mixtral_path / "config.json", tmp_path):
        with pytest.raises(errors.NotACheckpointError):
            m2r2_moe.from_pretrained(path, device="cpu", progress=False)
    path = _copy(mixtral_path, tmp_path / "m")
    for shard in path.glob("*.safetensors*"):
        shard.unlink()
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(errors.NotACheckpointError, match="only safetensors"):
        m2r2_moe.from_pretrained(path, device="cpu", progress=False)


def test_read_error_mid_stream_frees_the_store(mixtral_path, monkeypatch):
    """An I/O error while streaming (after the store exists) frees the store rows at once and propagates."""
    from m2r2_moe.checkpoint import reader as checkpoint

    made, calls = [], []
    init = store.HostExpertStore.__init__
    monkeypatch.setattr(store.HostExpertStore, "__init__",
                        lambda self, *a, **k: (made.append(self), init(self, *a, **k))[1])
    read_into = checkpoint.Reader.read_into

    def failing(self, *a):
        calls.append(1)
        if len(calls) > 40:
            raise OSError("disk went away")
        read_into(self, *a)

    monkeypatch.setattr(checkpoint.Reader, "read_into", failing)
    with pytest.raises(OSError, match="disk went away"):
        m2r2_moe.from_pretrained(mixtral_path, device="cpu", cache_experts=2, progress=False)
    assert len(made) == 1 and made[0].buffers == []


# -- peak host memory ------------------------------------------------------------------------------------------
RSS_PROBE = textwrap.dedent("""
    import sys, psutil, m2r2_moe
    m2r2_moe.checkpoint.loader.plan_checkpoint(sys.argv[1], device="cpu", cache_experts=2)  # warm: imports of modeling code
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (ru_maxrss would carry the forking parent's peak across exec)
    before = psutil.Process().memory_info().rss
    model = m2r2_moe.from_pretrained(sys.argv[1], device="cpu", cache_experts=2, progress=False)
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(int(hwm.split()[1]) * 1024 - before)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_peak_rss_near_checkpoint_size(tmp_path):
    config = MixtralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    path = _save(AutoModelForCausalLM.from_config(config), tmp_path / "big", shard="8MB")
    ckpt = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = int(out.stdout.split()[-1])
    assert growth < 1.15 * ckpt + 16e6, f"peak RSS grew {growth / 1e6:.1f} MB for a {ckpt / 1e6:.1f} MB checkpoint"
