"""The pinned host store takes what the plan says: ordinary host memory, page-aligned, page-locked in
whole pages with cudaHostRegister (torch's pinned allocator would round each layer up to a power of two),
unlocked before it is freed. Run on CPU with a fake `cudart` recording what would be locked."""

from __future__ import annotations

import gc

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.errors import HostMemoryError
from m2r2_moe.checkpoint.loader import plan_checkpoint
from m2r2_moe.checkpoint.plan import expert_store_host_bytes, pinned_block_bytes
from m2r2_moe.runtime.store import (PAGE, REGISTER_PORTABLE, ExpertPacking, HostExpertStore, page_locked_bytes,
                                    pinned_bytes)

MIXTRAL_8X7B_EXPERT = 3 * 4096 * 14336 * 2  # gate, up and down projections in bf16: 352 MB


class FakeCudart:
    """cudaHostRegister / cudaHostUnregister that record the ranges; `fail_at` fails that registration."""

    def __init__(self, fail_at: int | None = None):
        self.locked: dict[int, int] = {}  # address -> bytes
        self.calls, self.fail_at = [], fail_at

    def cudaHostRegister(self, address, size, flags):
        self.calls.append(("register", address, size, flags))
        if len([c for c in self.calls if c[0] == "register"]) - 1 == self.fail_at:
            return 2  # cudaErrorMemoryAllocation
        assert address not in self.locked
        self.locked[address] = size
        return 0

    def cudaHostUnregister(self, address):
        self.calls.append(("unregister", address))
        return 0 if self.locked.pop(address, None) is not None else 712  # cudaErrorHostMemoryNotRegistered


def test_size_arithmetic():
    assert [page_locked_bytes(n, 4096) for n in (0, 1, 4096, 4097)] == [0, 4096, 4096, 8192]
    assert pinned_bytes([1, 4096, 5000], page=4096) == 4096 + 4096 + 8192
    assert [pinned_block_bytes(n) for n in (0, 1, 3, 4096, 4097)] == [0, 1, 4, 4096, 8192]


def test_mixtral_8x7b_store_takes_its_size_not_the_next_power_of_two():
    """32 layers of 8 experts: ~90.2 GB page-locked, where power-of-two blocks would take 137.4 GB."""
    layer = 8 * MIXTRAL_8X7B_EXPERT
    planned = expert_store_host_bytes("ram", [layer] * 32, top_k=2, expert_bytes=MIXTRAL_8X7B_EXPERT, pin=True)
    assert planned == pinned_bytes([layer] * 32) and 0 <= planned - 32 * layer < 32 * PAGE
    assert 32 * pinned_block_bytes(layer) == 32 * 2**32 > 1.5 * planned
    # the disk tier's staging rows come from torch's pinned allocator: power-of-two blocks, and planned so
    staging = expert_store_host_bytes("disk", [layer] * 32, top_k=2, expert_bytes=MIXTRAL_8X7B_EXPERT, pin=True)
    assert staging == 4 * 2**29


def _packings():
    shapes = [(6, 5), (5, 3)]  # an odd number of bytes per row: page rounding matters
    return [ExpertPacking.from_shapes(("gate_up_proj", "down_proj"), shapes, torch.bfloat16)] * 2


def test_pinned_store_locks_page_aligned_whole_pages_and_keeps_its_api():
    packings, cudart = _packings(), FakeCudart()
    store = HostExpertStore(packings, [3, 5], pin_memory=True, cudart=cudart)
    sizes = [3 * packings[0].nbytes, 5 * packings[1].nbytes]
    assert store.nbytes == sum(sizes) and store.pinned_bytes == pinned_bytes(sizes)
    registered = [c for c in cudart.calls if c[0] == "register"]
    assert [(size, flags) for _, _, size, flags in registered] == [(page_locked_bytes(n), REGISTER_PORTABLE)
                                                                 for n in sizes]
    for (_, address, _, _), buffer in zip(registered, store.buffers):
        assert address % PAGE == 0 and buffer.data_ptr() == address and buffer.is_contiguous()
        assert buffer.untyped_storage().data_ptr() == address  # what is_pinned() asks the driver about
        assert not buffer.any()  # zeros, padding included
    tensors = {"gate_up_proj": torch.randn(5, 6, 5).to(torch.bfloat16),
               "down_proj": torch.randn(5, 5, 3).to(torch.bfloat16)}
    store.fill_layer(1, tensors)
    back = store.layer_tensors(1)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    row = store.expert(1, 2)
    assert row.is_contiguous() and row.shape == (packings[1].numel,)  # one expert = one contiguous copy
    store.close()
    assert store.buffers == [] and cudart.locked == {}


def test_a_store_dropped_without_close_is_unlocked_too():
    cudart = FakeCudart()
    store = HostExpertStore(_packings(), [2, 2], pin_memory=True, cudart=cudart)
    assert len(cudart.locked) == 2
    del store
    gc.collect()
    assert cudart.locked == {}


def test_a_failed_lock_unlocks_what_was_locked_and_names_the_fix():
    cudart = FakeCudart(fail_at=1)
    with pytest.raises(HostMemoryError, match="pin_memory=False"):
        HostExpertStore(_packings(), [2, 2], pin_memory=True, cudart=cudart)
    assert cudart.locked == {}


def test_pin_memory_without_cuda_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(m2r2_moe.OffloadConfigError, match="pin_memory=False"):
        HostExpertStore(_packings(), [2, 2], pin_memory=True)


@pytest.fixture
def fake_cudart(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    return cudart


def test_offload_with_a_pinned_store_gives_the_same_logits_and_remove_offload_unlocks(fake_cudart):
    model = tiny_mixtral(torch.bfloat16)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    m2r2_moe.offload(model, device="cpu", cache_experts=3, pin_memory=True)
    try:
        store = m2r2_moe.get_offloader(model).store
        locked = sum(fake_cudart.locked.values())
        assert store.pinned_bytes == locked == pinned_bytes([b.numel() * b.element_size() for b in store.buffers])
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, reference)
    finally:
        m2r2_moe.remove_offload(model)
    assert fake_cudart.locked == {}


def test_the_plan_reports_what_the_store_locks(fake_cudart, tmp_path):
    model = tiny_mixtral(torch.bfloat16)
    model.save_pretrained(tmp_path)
    plan = plan_checkpoint(tmp_path, device="cpu", cache_experts=3, pin_memory=True)
    model = m2r2_moe.from_pretrained(tmp_path, device="cpu", cache_experts=3, pin_memory=True, progress=False)
    try:
        assert plan.pinned_bytes == m2r2_moe.get_offloader(model).store.pinned_bytes == sum(fake_cudart.locked.values())
    finally:
        m2r2_moe.remove_offload(model)
    assert fake_cudart.locked == {}


def test_without_a_memory_probe_auto_slots_name_the_gpu_extra(monkeypatch):
    """No NVML module installed and torch's probe failing: the import is guarded, and the first use that
    needs the device's free memory says what to install or pass instead."""
    import sys

    from m2r2_moe.errors import DeviceMemoryError
    from m2r2_moe.checkpoint.plan import device_memory, resolve_slots

    def broken(index):
        raise RuntimeError("no driver")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    device = torch.device("cuda", 0)
    assert device_memory(device) is None
    with pytest.raises(DeviceMemoryError, match=r"m2r2_moe\[gpu\].*cache_experts='8GB'"):
        resolve_slots("auto", device=device, expert_store="ram", top_k=2, total_experts=16, expert_bytes=10**6,
                      store_bytes=16 * 10**6, dense_bytes=10**6, kv_bytes=0)
