"""`save_pretrained` of an offloaded model writes the checkpoint the un-offloaded model would write.

Invariants:
- every file is byte-identical to what plain transformers writes for the same model (config, shards, index:
  the family's on-disk names and conversion, the same shard split), for every supported family (and a tied
  one), one shard or many, with `variant` and `save_original_format=False` too; the folder loads with plain
  transformers into the original weights;
- the experts are read one MoE layer at a time (each layer once, none kept while the next is read);
- a failed save leaves nothing: no target folder, or a pre-existing one exactly as it was, and no temporary
  folder; a save into an existing folder keeps unrelated files and drops stale shards, as transformers does;
- the disk tier (`from_pretrained(expert_store="disk")`) saves the same files; `state_dict()` there reads the
  experts when host memory holds them, else `HostMemoryError`, as does a save whose shard would not fit.
"""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import m2r2_moe
from conftest import snapshot, tiny_mixtral
from m2r2_moe import HostMemoryError, OffloadedOperationError
from m2r2_moe.checkpoint import plan
from families import FAMILIES, tiny

BUILDERS = {"mixtral": tiny_mixtral, "qwen3_moe_tied": lambda: tiny("qwen3_moe", tie_word_embeddings=True),
            **{family: (lambda family=family: tiny(family)) for family in FAMILIES}}


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("shard", ["50GB", "40KB"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_save_pretrained_writes_what_plain_transformers_writes(tmp_path, family, shard):
    model = BUILDERS[family]()
    snap = snapshot(model)
    model.save_pretrained(tmp_path / "plain", max_shard_size=shard)
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    model.save_pretrained(tmp_path / "offloaded", max_shard_size=shard)
    m2r2_moe.remove_offload(model)
    plain, offloaded = _files(tmp_path / "plain"), _files(tmp_path / "offloaded")
    assert offloaded == plain
    assert (len(plain) > 3) == (shard == "40KB")  # sharded: several shards and an index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offloaded", "plain"]  # no temporary folder left
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded", dtype=model.dtype).state_dict()
    assert loaded.keys() == snap.keys()  # values as saved (DeepSeek-V2 loads its routers in float32)
    assert all(torch.equal(loaded[k].to(snap[k].dtype), snap[k]) for k in snap)


@pytest.mark.parametrize("options", [dict(save_original_format=False), dict(variant="v1", max_shard_size="40KB"),
                                     dict(save_original_format=False, max_shard_size="40KB")])
def test_save_options_write_what_plain_transformers_writes(tmp_path, options):
    model = tiny_mixtral()
    model.save_pretrained(tmp_path / "plain", **options)
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    model.save_pretrained(tmp_path / "offloaded", **options)
    m2r2_moe.remove_offload(model)
    assert _files(tmp_path / "offloaded") == _files(tmp_path / "plain")


def test_experts_are_read_one_layer_at_a_time(tmp_path, monkeypatch):
    model = tiny_mixtral()
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    store = m2r2_moe.get_offloader(model).store
    read, alive_at_read, refs = [], [], []
    layer_tensors = store.layer_tensors

    def reading(layer):
        alive_at_read.append(sum(r() is not None for r in refs))
        read.append(layer)
        tensors = layer_tensors(layer)
        refs.extend(weakref.ref(t) for t in tensors.values())
        return tensors

    monkeypatch.setattr(store, "layer_tensors", reading)
    for shard in ("40KB", "50GB"):
        read.clear()
        model.save_pretrained(tmp_path / shard, max_shard_size=shard)
        assert read == [0, 1, 2, 3]  # each layer once
    assert max(alive_at_read) == 0  # the previous layer is gone before the next is read
    m2r2_moe.remove_offload(model)


def _fail_at_layer(monkeypatch, model, failing: int) -> None:
    store = m2r2_moe.get_offloader(model).store
    layer_tensors = store.layer_tensors

    def reading(layer):
        if layer == failing:
            raise OSError("injected read failure")
        return layer_tensors(layer)

    monkeypatch.setattr(store, "layer_tensors", reading)


def test_a_failed_save_leaves_no_checkpoint_and_keeps_an_existing_folder(tmp_path, monkeypatch):
    model = tiny_mixtral()
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    _fail_at_layer(monkeypatch, model, 2)
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained(tmp_path / "new" / "ckpt", max_shard_size="40KB")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the parent made for it
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "tokenizer.json").write_text("{}")
    (existing / "model.safetensors").write_bytes(b"an older checkpoint")
    before = _files(existing)
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained(existing)
    assert _files(existing) == before and [p.name for p in tmp_path.iterdir()] == ["existing"]
    monkeypatch.undo()
    with pytest.raises(OffloadedOperationError, match="upload"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()
    m2r2_moe.remove_offload(model)


def test_save_into_an_existing_folder_keeps_other_files_and_drops_stale_shards(tmp_path):
    model = tiny_mixtral()
    model.save_pretrained(tmp_path / "plain")
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_size="40KB")  # an older, sharded save
    (folder / "tokenizer.json").write_text("{}")
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    model.save_pretrained(folder)
    m2r2_moe.remove_offload(model)
    files = _files(folder)
    assert not any("-of-" in name for name in files)  # stale shards removed
    assert files["tokenizer.json"] == hashlib.sha256(b"{}").hexdigest()
    plain = _files(tmp_path / "plain")
    assert all(files[name] == digest for name, digest in plain.items())


def test_the_state_dict_argument_is_written_as_given(tmp_path):
    model = tiny_mixtral()
    model.save_pretrained(tmp_path / "plain")
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())
    m2r2_moe.remove_offload(model)
    assert _files(tmp_path / "given") == _files(tmp_path / "plain")


def test_disk_tier_saves_the_same_files_and_state_dict_checks_memory(tmp_path, monkeypatch):
    tiny_mixtral().save_pretrained(tmp_path / "source", max_shard_size="200KB")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "source")
    plain.save_pretrained(tmp_path / "plain", max_shard_size="100KB")
    model = m2r2_moe.from_pretrained(tmp_path / "source", device="cpu", cache_experts=3, expert_store="disk",
                                     progress=False)
    model.save_pretrained(tmp_path / "disk", max_shard_size="100KB")
    assert _files(tmp_path / "disk") == _files(tmp_path / "plain")
    state, reference = model.state_dict(), plain.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    monkeypatch.setattr(plan, "host_memory", lambda: (100_000, 100_000))
    with pytest.raises(HostMemoryError, match="save_pretrained"):
        model.state_dict()
    with pytest.raises(HostMemoryError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "too_big")
    assert not (tmp_path / "too_big").exists()
    m2r2_moe.remove_offload(model)
