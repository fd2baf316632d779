"""The C++ slot manager (m2r2_moe._native) against its Python twin (m2r2_moe.runtime.cache.SlotManager).

Invariant: for any sequence of operations both return the same values, raise the same error types with
the same messages, and afterwards agree on the resident (key, slot) list in LRU order, on every pin
count and on the counters. The sequences are random (hypothesis) plus the named edge cases.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2r2_moe import _ext
from m2r2_moe.errors import CacheFullError, SlotStateError
from m2r2_moe.runtime.cache import SlotManager, make_slot_manager

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"C++ slot manager not loaded: {_ext.EXT_ERROR}")

OPS = ("acquire", "release", "prefetch", "evict", "lookup", "pins")


def apply(manager, op: str, key: int):
    """(result, None) or (None, (error type, message))."""
    try:
        if op == "reset_counters":
            return manager.reset_counters(), None
        return getattr(manager, op)(key), None
    except (CacheFullError, SlotStateError, ValueError) as e:
        return None, (type(e), str(e))


def state(manager, keys) -> tuple:
    resident = manager.resident()
    assert manager.occupied() == len(resident)
    return resident, manager.counters(), [manager.pins(k) for k in keys]


def run_both(num_slots: int, ops: list[tuple[str, int]], num_keys: int) -> None:
    py, cc = SlotManager(num_slots), _ext.native.SlotManager(num_slots)
    keys = range(num_keys)
    for step, (op, key) in enumerate(ops):
        got_py, got_cc = apply(py, op, key), apply(cc, op, key)
        assert got_cc == got_py, f"step {step}: {op}({key})"
        assert state(cc, keys) == state(py, keys), f"state after step {step}: {op}({key})"


op_lists = st.lists(
    st.tuples(st.sampled_from(OPS + ("reset_counters",)), st.integers(0, 11)), min_size=1, max_size=120
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_slots=st.integers(1, 8), ops=op_lists)
def test_random_sequences_agree(num_slots, ops):
    run_both(num_slots, ops, 12)


# Acquire-heavy sequences over few slots reach "all slots pinned" often; release-heavy ones reach the
# "release of a key not held" errors.
@settings(max_examples=200, deadline=None)
@given(
    num_slots=st.integers(1, 3),
    ops=st.lists(st.tuples(st.sampled_from(("acquire", "acquire", "prefetch", "release")), st.integers(0, 5)), max_size=60),
)
def test_pressure_sequences_agree(num_slots, ops):
    run_both(num_slots, ops, 6)


def test_one_slot():
    for sm in (SlotManager(1), _ext.native.SlotManager(1)):
        assert sm.acquire(3) == (0, False, -1)
        with pytest.raises(CacheFullError, match="all 1 slots are pinned"):
            sm.acquire(4)
        assert sm.prefetch(4) == (-1, -1)  # a prefetch never fails loudly
        sm.release(3)
        assert sm.acquire(4) == (0, False, 3)
        assert sm.counters() == {"hits": 0, "misses": 2, "prefetches": 0, "evictions": 1}


def test_all_slots_pinned_is_cache_full():
    for sm in (SlotManager(4), _ext.native.SlotManager(4)):
        for key in range(4):
            sm.acquire(key)
        with pytest.raises(CacheFullError) as err:
            sm.acquire(99)
        assert "raise cache_experts" in str(err.value)
        assert sm.counters()["misses"] == 4  # the failed acquire changed nothing
        assert [k for k, _ in sm.resident()] == [0, 1, 2, 3]


def test_release_of_key_not_held_is_slot_state_error():
    for sm in (SlotManager(2), _ext.native.SlotManager(2)):
        with pytest.raises(SlotStateError, match="not resident in any slot"):
            sm.release(7)
        sm.prefetch(7)  # resident, never pinned
        with pytest.raises(SlotStateError, match=r"\(slot 0\), which is not held"):
            sm.release(7)
        sm.acquire(8)
        sm.release(8)
        with pytest.raises(SlotStateError, match="which is not held"):
            sm.release(8)  # one release per acquire


def test_victim_order_lowest_free_then_lru():
    for sm in (SlotManager(4), _ext.native.SlotManager(4)):
        for key in range(4):
            sm.prefetch(key)
        assert sm.evict(3) and sm.evict(1)
        assert sm.prefetch(10) == (1, -1)  # lowest free slot first
        assert sm.prefetch(11) == (3, -1)
        sm.acquire(0)  # key 0 becomes most recently used and pinned
        assert sm.prefetch(12) == (2, 2)  # least recently used unpinned: key 2 in slot 2
        assert not sm.evict(0)  # pinned


def test_bad_num_slots():
    for cls in (SlotManager, _ext.native.SlotManager):
        with pytest.raises(ValueError, match="num_slots must be >= 1, got 0"):
            cls(0)


def test_counter_attributes_match():
    py, cc = SlotManager(2), _ext.native.SlotManager(2)
    for sm in (py, cc):
        sm.acquire(1)
        sm.release(1)
        sm.acquire(1)
        sm.prefetch(2)
        sm.prefetch(3)
    for name in ("hits", "misses", "prefetches", "evictions", "num_slots"):
        assert getattr(cc, name) == getattr(py, name), name
    py.reset_counters(), cc.reset_counters()
    assert cc.counters() == py.counters() == {"hits": 0, "misses": 0, "prefetches": 0, "evictions": 0}


def test_factory_picks_native():
    assert isinstance(make_slot_manager(3), _ext.native.SlotManager)
    assert isinstance(make_slot_manager(3, native=True), _ext.native.SlotManager)
    assert isinstance(make_slot_manager(3, native=False), SlotManager)
