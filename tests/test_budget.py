"""Memory budgets (m2r2_moe/budget.py): `gpu_memory` / `host_memory` resolve to slots, pinning and the expert tier;
an impossible budget is refused naming the smallest that works, before anything is allocated; unified memory (and
device="cpu") count each byte once. Probes and device properties are faked: no GPU here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import same_weights, snapshot, tiny_mixtral

import m2r2_moe
from m2r2_moe import budget
from m2r2_moe.budget import MemoryBudgetError, ModelBytes, resolve
from m2r2_moe.config import OffloadConfig, OffloadConfigError
from m2r2_moe.errors import DeviceMemoryError, HostMemoryError

GB = 10**9
CUDA = torch.device("cuda", 0)
# 64 experts of 100 MB (top-2), 1 GB of other weights, a 0.5 GB KV reserve; 6.4 GB of experts in all
NEED = ModelBytes(layer_bytes=(8 * 10**8,) * 8, expert_bytes=10**8, total_experts=64, top_k=2, dense_bytes=GB,
                  kv_bytes=GB // 2, context_length=4096)
DISK_OK = ModelBytes(**{**NEED.__dict__, "disk_tier": True})


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: `host` bytes of host memory available (of 64 GB), a GPU with `device` bytes free (of 80 GB)
    that is `integrated` or not; CUDA 'available' (pinning wanted by default)."""
    state = SimpleNamespace(host=32 * GB, device=24 * GB, integrated=False)
    monkeypatch.setattr(budget, "probe_host", lambda: (state.host, 64 * GB))
    monkeypatch.setattr(budget, "probe_device", lambda device: (state.device, 80 * GB, "fake") if device.type == "cuda"
                        else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(is_integrated=state.integrated))
    return state


def test_budgets_resolve_to_slots_and_pinning(machine):
    plan = resolve(CUDA, NEED, gpu_memory="4GB", host_memory="8GB")
    assert plan.num_slots == (4 * GB - GB - GB // 2) // 10**8 == 25
    assert plan.pin_memory and plan.expert_store == "ram" and not plan.unified
    assert resolve(CUDA, NEED, gpu_memory=30 * 10**8 + 10**8 - 1).num_slots == 15  # whole experts only
    assert resolve(CUDA, NEED, gpu_memory="20GB").num_slots == 64  # never more slots than experts
    free = resolve(CUDA, NEED, host_memory="8GB")  # the device budget: what is free, less its margin (5% of 80 GB)
    assert free.num_slots == 64 and free.device_budget == 24 * GB - 4 * GB
    machine.device = 8 * GB
    assert resolve(CUDA, NEED, host_memory="8GB").num_slots == 25  # 8 GB free less 4 GB of margin: as a 4 GB budget
    pageable = resolve(CUDA, NEED, gpu_memory="4GB", pin_memory=False)
    assert not pageable.pin_memory
    line = plan.summary()
    assert line.startswith("25 expert slots (2.5 GB) on cuda:0") and "4GB" in line and "pinned host memory" in line
    assert "KV reserve" in line and "\n" not in line


def test_a_budget_too_small_names_the_smallest_that_works(machine):
    smallest = GB + GB // 2 + 2 * 10**8  # weights + KV reserve + top-k slots
    with pytest.raises(MemoryBudgetError, match=r"smallest gpu_memory that works is '1622MiB'") as caught:
        resolve(CUDA, NEED, gpu_memory="1.6GB", host_memory="8GB")
    assert caught.value.option == "gpu_memory" and caught.value.smallest == smallest
    assert resolve(CUDA, NEED, gpu_memory="1622MiB", host_memory="8GB").num_slots == 2  # and that one works
    with pytest.raises(MemoryBudgetError, match="host_memory") as caught:
        resolve(CUDA, NEED, gpu_memory="4GB", host_memory="6GB")  # 6.4 GB of experts
    assert caught.value.smallest == 64 * 10**8 and "expert_store='disk'" in str(caught.value)
    with pytest.raises(DeviceMemoryError, match="more than the 24.0 GB free"):
        resolve(CUDA, NEED, gpu_memory="30GB")
    with pytest.raises(HostMemoryError, match="host_memory"):
        resolve(CUDA, NEED, gpu_memory="4GB", host_memory="40GB")
    machine.device = GB  # no budget given, and the free memory is too small: which memory, and how much is needed
    with pytest.raises(DeviceMemoryError, match="1.7 GB"):
        resolve(CUDA, NEED, host_memory="8GB")


def test_the_disk_tier_when_the_store_does_not_fit(machine):
    plan = resolve(CUDA, DISK_OK, gpu_memory="4GB", host_memory="1GB")
    assert plan.expert_store == "disk" and plan.pin_memory and plan.num_slots == 25
    assert "on disk" in plan.summary()
    assert resolve(CUDA, DISK_OK, gpu_memory="4GB", host_memory="8GB").expert_store == "ram"  # RAM when it fits
    with pytest.raises(MemoryBudgetError, match="host_memory"):
        resolve(CUDA, DISK_OK, gpu_memory="4GB", host_memory="1GB", expert_store="ram")


def test_unified_memory_counts_each_byte_once(machine):
    machine.device = machine.host = 10 * GB
    discrete = resolve(CUDA, NEED)
    machine.integrated = True
    unified = resolve(CUDA, NEED)
    assert discrete.num_slots == (10 * GB - 4 * GB - GB - GB // 2) // 10**8 and not discrete.unified  # margin: 5% of 80 GB
    # one pool: the 6.4 GB store comes out of the same 10 GB as the device tier
    room = 10 * GB - budget.host_margin(64 * GB) - unified.store_host_bytes
    assert unified.unified and unified.device_budget == room
    assert unified.num_slots == (room - GB - GB // 2) // 10**8 < 64
    assert "unified memory" in unified.summary()
    with pytest.raises(HostMemoryError, match="unified memory"):
        resolve(CUDA, NEED, gpu_memory="4GB", host_memory="7GB")  # 11 GB of one 10 GB pool
    assert resolve(CUDA, NEED, unified=False).num_slots == discrete.num_slots  # an explicit override wins
    machine.integrated = False
    assert resolve(CUDA, NEED, unified=True).num_slots == unified.num_slots


def test_cpu_is_one_pool_whose_dense_weights_are_already_there(machine):
    machine.host = 10 * GB
    held = ModelBytes(**{**NEED.__dict__, "held_host_bytes": GB})  # offload on CPU: the weights stay where they are
    plan = resolve(torch.device("cpu"), held, pin_memory=False)
    room = 10 * GB + GB - budget.host_margin(64 * GB) - 64 * 10**8
    assert plan.device_budget == room and plan.num_slots == (room - GB - GB // 2) // 10**8
    assert "emulated device" in plan.summary()


def test_config_checks_budgets():
    with pytest.raises(OffloadConfigError, match="not an amount of memory"):
        OffloadConfig(gpu_memory="4 potatoes")
    with pytest.raises(OffloadConfigError, match="more than 0"):
        OffloadConfig(host_memory=0)
    with pytest.raises(OffloadConfigError, match="give one of them"):
        OffloadConfig(cache_experts=8, gpu_memory="4GB")
    with pytest.raises(OffloadConfigError, match="unified_memory"):
        OffloadConfig(unified_memory="yes")
    assert OffloadConfig(gpu_memory=2**30, host_memory="1.5GiB").has_budget and not OffloadConfig().has_budget


def test_offload_derives_slots_from_a_budget():
    model = tiny_mixtral()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    _, layers = m2r2_moe.models.find_moe_layers(model)
    need = budget.offload_need(model, layers, 2, 256, torch.device("cpu"))
    gpu = need.dense_bytes + need.kv_bytes + 7 * need.expert_bytes + need.expert_bytes // 2
    m2r2_moe.offload(model, device="cpu", gpu_memory=gpu, context_length=256)
    try:
        assert m2r2_moe.get_offloader(model).num_slots == 7
        assert m2r2_moe.memory_plan(model).summary().startswith("7 expert slots")
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, reference)
    finally:
        m2r2_moe.remove_offload(model)
    m2r2_moe.offload(model, device="cpu", cache_experts=4)
    assert m2r2_moe.memory_plan(model) is None  # sized by a slot count
    m2r2_moe.remove_offload(model)


def test_an_impossible_budget_allocates_nothing(monkeypatch):
    from m2r2_moe.runtime import offloader

    model = tiny_mixtral()
    before = snapshot(model)
    calls = []
    monkeypatch.setattr(offloader, "HostExpertStore", lambda *a, **k: calls.append("store"))
    monkeypatch.setattr(offloader, "allocate_pool", lambda *a, **k: calls.append("pool"))
    with pytest.raises(MemoryBudgetError, match="smallest gpu_memory that works is") as caught:
        m2r2_moe.offload(model, device="cpu", gpu_memory="10kB", context_length=64)
    assert calls == [] and not m2r2_moe.is_offloaded(model) and same_weights(model, before)
    monkeypatch.undo()
    m2r2_moe.offload(model, device="cpu", gpu_memory=caught.value.smallest, context_length=64)  # the smallest works
    assert m2r2_moe.get_offloader(model).num_slots == 2
    m2r2_moe.remove_offload(model)
    assert same_weights(model, before)


def test_from_pretrained_keeps_experts_on_disk_when_host_memory_says_so(tmp_path):
    model = tiny_mixtral()
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    kw = dict(device="cpu", progress=False, context_length=64, gpu_memory="20MB")
    ram = m2r2_moe.from_pretrained(tmp_path, host_memory="1GB", **kw)
    disk = m2r2_moe.from_pretrained(tmp_path, host_memory="500kB", **kw)  # the store (2.4 MB) does not fit, its staging (0.3 MB) does
    try:
        assert type(m2r2_moe.get_offloader(ram).store).__name__ == "HostExpertStore"
        assert type(m2r2_moe.get_offloader(disk).store).__name__ == "DiskExpertStore"
        assert "on disk" in m2r2_moe.memory_plan(disk).summary()
        with torch.no_grad():
            assert torch.equal(ram(input_ids=ids).logits, reference)
            assert torch.equal(disk(input_ids=ids).logits, reference)
    finally:
        m2r2_moe.remove_offload(ram), m2r2_moe.remove_offload(disk)
    with pytest.raises(OffloadConfigError, match="not both"):
        m2r2_moe.from_pretrained(tmp_path, cache_experts=4, gpu_memory="20MB", device="cpu", progress=False)
    with pytest.raises(MemoryBudgetError, match="host_memory"):
        m2r2_moe.from_pretrained(tmp_path, host_memory="500kB", expert_store="ram", **kw)
