"""The Python slot manager: LRU decisions, pins, errors, and its invariants after every operation."""

import random

import pytest

from m2r2_moe.errors import CacheFullError, SlotStateError
from m2r2_moe.runtime.cache import SlotManager


def check_invariants(m: SlotManager) -> None:
    resident = m.resident()
    keys = [k for k, _ in resident]
    slots = [s for _, s in resident]
    assert len(set(keys)) == len(keys) and len(set(slots)) == len(slots)  # one key per slot, one slot per key
    assert all(0 <= s < m.num_slots for s in slots)
    for k, s in resident:
        assert m.lookup(k) == s


def test_free_slots_first_lowest_index():
    m = SlotManager(3)
    assert [m.acquire(k)[0] for k in (10, 11, 12)] == [0, 1, 2]
    assert m.counters() == {"hits": 0, "misses": 3, "prefetches": 0, "evictions": 0}


def test_lru_victim_and_hit_refreshes_order():
    m = SlotManager(2)
    m.acquire(1), m.release(1)
    m.acquire(2), m.release(2)
    assert m.acquire(1) == (0, True, -1)  # hit: 1 is now most recent
    m.release(1)
    assert m.acquire(3) == (1, False, 2)  # evicts 2, the least recently used
    assert m.lookup(2) == -1


def test_pinned_slots_are_never_evicted():
    m = SlotManager(2)
    m.acquire(1)  # pinned (current layer)
    m.acquire(2), m.release(2)
    slot, hit, evicted = m.acquire(3)
    assert evicted == 2 and m.lookup(1) == 0


def test_all_pinned_is_a_clear_error():
    m = SlotManager(2)
    m.acquire(1), m.acquire(2)
    with pytest.raises(CacheFullError, match="all 2 slots are pinned"):
        m.acquire(3)
    assert m.prefetch(3) == (-1, -1)  # a prefetch never raises


def test_release_errors():
    m = SlotManager(2)
    with pytest.raises(SlotStateError, match="not resident"):
        m.release(7)
    m.acquire(7), m.release(7)
    with pytest.raises(SlotStateError, match="not held"):
        m.release(7)


def test_prefetch_and_evict():
    m = SlotManager(2)
    assert m.prefetch(5) == (0, -1)
    assert m.prefetch(5) == (-1, -1)  # already resident
    assert m.acquire(5) == (0, True, -1)
    assert not m.evict(5)  # pinned
    m.release(5)
    assert m.evict(5) and m.lookup(5) == -1
    assert m.acquire(6)[0] == 0  # the freed slot is reused first


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    m = SlotManager(4)
    held: list[int] = []
    for _ in range(3000):
        op = rng.choice(["acquire", "release", "prefetch", "evict"])
        key = rng.randrange(12)
        if op == "acquire":
            try:
                m.acquire(key)
                held.append(key)
            except CacheFullError:
                assert len({m.lookup(k) for k in held}) == m.num_slots
        elif op == "release" and held:
            m.release(held.pop(rng.randrange(len(held))))
        elif op == "prefetch":
            m.prefetch(key)
        elif op == "evict":
            assert m.evict(key) == (m.lookup(key) >= 0 and key not in held) or m.lookup(key) == -1
        check_invariants(m)
        for k in held:
            assert m.lookup(k) >= 0 and m.pins(k) >= 1
