"""`offload` and `from_pretrained` are all or nothing; `remove_offload` restores after faults.

Invariants:
- an error at any step of `offload` (filling the host store at the 2nd layer, building the runtime,
  attaching the predictor, installing the concurrency guard) propagates, and the model is as it was: the
  same Parameter objects, bit-identical, its own forwards, no hooks left, not offloaded; the host store's
  rows are freed at once (even while the traceback is alive), and after the traceback is dropped the store
  and the runtime are garbage (weak references dead after `gc.collect()`), with no copy thread left;
- an error halfway through `from_pretrained` (reading the non-expert weights, streaming the experts, after
  the store is filled, with the disk tier) leaves no store, no open checkpoint file, no copy thread;
- a copy that fails (on the compute thread, or in the copy engine's worker) surfaces as an error from the
  forward; no slot stays pinned; the next generate is bit-identical; `remove_offload` gives back the same
  Parameter objects with bit-identical weights.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch

import m2r2_moe
from conftest import same_weights, snapshot, tiny_mixtral
from m2r2_moe import attach
from m2r2_moe.checkpoint import reader as checkpoint
from m2r2_moe.runtime import disk_store, offloader, prefetcher, store

IDS = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(31))
GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


class _Injected(RuntimeError):
    pass


def _copy_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "m2r2-copy" and t.is_alive())


def _track(monkeypatch, cls) -> list[weakref.ref]:
    """Weak references to every instance of `cls` built from now on."""
    made, init = [], cls.__init__

    def tracked(self, *args, **kwargs):
        made.append(weakref.ref(self))
        init(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", tracked)
    return made


def _fail_on_call(n: int, fn):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise _Injected(f"injected at call {n}")
        return fn(*args, **kwargs)

    return failing


def _raises_injected(call) -> str:
    """Run `call`, expect _Injected; return its message without keeping the exception (nor its frames)."""
    try:
        call()
    except _Injected as e:
        return str(e)
    raise AssertionError("no error")


def _all_dead(refs: list[weakref.ref]) -> bool:
    gc.collect()
    return all(r() is None for r in refs)


def _assert_as_before(model, snap, params, ref):
    assert not m2r2_moe.is_offloaded(model) and "_m2r2_guard" not in model.__dict__
    assert all(p is params[n] for n, p in model.named_parameters())
    assert same_weights(model, snap)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)


def _fill_second_layer(monkeypatch):
    monkeypatch.setattr(store.HostExpertStore, "fill_layer", _fail_on_call(2, store.HostExpertStore.fill_layer))


def _prefetcher(monkeypatch):
    monkeypatch.setattr(prefetcher.Prefetcher, "__init__", _fail_on_call(1, prefetcher.Prefetcher.__init__))


def _guard(monkeypatch):
    monkeypatch.setattr(attach, "UseGuard", _fail_on_call(1, attach.UseGuard))


def _copy_engine(monkeypatch):  # inside Offloader(): the store exists already
    monkeypatch.setattr(offloader, "make_copy_engine", _fail_on_call(1, offloader.make_copy_engine))


@pytest.mark.parametrize("fault", [_fill_second_layer, _copy_engine, _prefetcher, _guard])
def test_failed_offload_leaves_the_model_as_it_was_and_frees_the_store(fault, monkeypatch):
    model = tiny_mixtral(torch.bfloat16)
    with torch.no_grad():
        ref = model(IDS).logits
    snap, params, threads = snapshot(model), dict(model.named_parameters()), _copy_threads()
    stores, runtimes = _track(monkeypatch, store.HostExpertStore), _track(monkeypatch, offloader.Offloader)
    fault(monkeypatch)
    try:
        m2r2_moe.offload(model, device="cpu", cache_experts=3, predictor="gate")
    except _Injected:
        # while the traceback still holds the runtime: the store's rows are already freed
        assert len(stores) == 1
        assert fault is _copy_engine or stores[0]().buffers == []
    else:
        raise AssertionError("offload did not fail")
    monkeypatch.undo()
    _assert_as_before(model, snap, params, ref)
    assert _all_dead(stores) and _all_dead(runtimes)
    assert _copy_threads() == threads
    m2r2_moe.offload(model, device="cpu", cache_experts=3)  # and it can be offloaded afterwards
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)
    m2r2_moe.remove_offload(model)
    _assert_as_before(model, snap, params, ref)


def _open_files_under(folder: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
        except OSError:  # closed meanwhile
            pass
    return count


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("atomic") / "mixtral"
    tiny_mixtral(seed=3).save_pretrained(path, max_shard_size="300KB")
    return path


def _dense_read(monkeypatch):  # before any store exists
    monkeypatch.setattr(checkpoint.Reader, "read", _fail_on_call(3, checkpoint.Reader.read))


def _expert_stream(monkeypatch):  # the store exists and is half filled
    monkeypatch.setattr(checkpoint.Reader, "read_into", _fail_on_call(40, checkpoint.Reader.read_into))


def _after_fill(monkeypatch):  # the store is filled, the runtime is being attached
    _guard(monkeypatch)


@pytest.mark.skipif(sys.platform != "linux", reason="counts open files in /proc/self/fd")
@pytest.mark.parametrize("fault, expert_store", [(_dense_read, "ram"), (_dense_read, "disk"), (_expert_stream, "ram"),
                                                 (_after_fill, "ram"), (_after_fill, "disk"), (_copy_engine, "disk")])
def test_failed_from_pretrained_frees_everything(ckpt, fault, expert_store, monkeypatch):
    """(the disk tier streams no expert at load time: no _expert_stream case for it)"""
    files = sorted((p.name, p.stat().st_size) for p in ckpt.iterdir())
    threads = _copy_threads()
    host, disk = _track(monkeypatch, store.HostExpertStore), _track(monkeypatch, disk_store.DiskExpertStore)
    runtimes = _track(monkeypatch, offloader.Offloader)
    fault(monkeypatch)
    _raises_injected(lambda: m2r2_moe.from_pretrained(ckpt, device="cpu", cache_experts=3, predictor="gate",
                                                      expert_store=expert_store, progress=False))
    monkeypatch.undo()
    stores = host + disk
    assert len(stores) == (0 if fault is _dense_read else 1)
    assert _open_files_under(ckpt) == 0  # closed at once, not when the garbage collector finds the store
    assert all(r().buffers == [] for r in host if r() is not None)
    assert _all_dead(stores) and _all_dead(runtimes)
    assert _copy_threads() == threads
    assert sorted((p.name, p.stat().st_size) for p in ckpt.iterdir()) == files


def _fail_once_on_compute_thread(off):
    off.cache._copy = _fail_on_call(1, off.cache._copy)  # raises out of acquire; an instance attribute: dropped by _release


def _fail_once_in_worker(off):
    calls = []

    def fault(key, slot, priority):  # run by the copy worker before the bytes move: the copy fails there
        calls.append(key)  # the first expert's copy and its retry (a failed copy is redone once) fail
        if calls.count(calls[0]) <= 2 and key == calls[0]:
            raise _Injected(f"injected: copy of key {key} failed in the worker")

    off.engine.fault = fault


@pytest.mark.parametrize("fault", [_fail_once_on_compute_thread, _fail_once_in_worker])
@pytest.mark.parametrize("predictor", ["none", "gate"])
def test_remove_offload_after_a_failed_copy_restores(fault, predictor):
    model = tiny_mixtral(torch.bfloat16, seed=5)
    with torch.no_grad():
        ref = model.generate(input_ids=IDS, **GEN)
    snap, params = snapshot(model), dict(model.named_parameters())
    m2r2_moe.offload(model, device="cpu", cache_experts=3, predictor=predictor, link_gbps=1.0)
    off = m2r2_moe.get_offloader(model)
    fault(off)
    with pytest.raises((_Injected, RuntimeError)) as failed:
        with torch.no_grad():
            model.generate(input_ids=IDS, **GEN)
    assert "injected" in str(failed.value) or "failed" in str(failed.value)
    del failed
    assert all(off.cache.slots.pins(key) == 0 for key, _ in off.cache.slots.resident())
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=IDS, **GEN), ref)  # the failed slot was not trusted
    m2r2_moe.remove_offload(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert same_weights(model, snap)
