"""Device slot cache bookkeeping: which expert sits in which slot, LRU order, pins, counters.

This is the pure-Python reference twin of the C++ slot manager (csrc/slot_manager.cpp); the runtime
builds either through `make_slot_manager`. It moves no bytes: the runtime asks it for a slot and
learns whether the expert must be copied in. Keys are integers, `layer * num_experts + expert`, so
one pool serves every layer.

Invariants (tests/test_cache.py checks them after every operation):
- a key is in at most one slot and a slot holds at most one key;
- a pinned slot (held by the layer being computed) is never chosen as a victim;
- free slots are used before any resident expert is evicted, lowest slot index first;
- among unpinned resident slots the least recently acquired (or prefetched) is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import CacheFullError, SlotStateError


class SlotManager:
    """LRU slot table for a fixed pool of `num_slots` expert slots."""

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # key -> slot, least recently used first
        self._key_of = [-1] * num_slots
        self._pins = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # stack: pop() gives the lowest free slot
        self.hits = 0
        self.misses = 0
        self.prefetches = 0
        self.evictions = 0

    def lookup(self, key: int) -> int:
        """The slot holding `key`, or -1. Does not change LRU order."""
        return self._slot_of.get(key, -1)

    def acquire(self, key: int) -> tuple[int, bool, int]:
        """Pin `key` in a slot for the current layer. Returns (slot, hit, evicted_key or -1).

        On a miss the caller must fill the slot before use. Raises `CacheFullError` when every slot is
        pinned."""
        slot = self._slot_of.get(key, -1)
        if slot >= 0:
            self._slot_of.move_to_end(key)
            self._pins[slot] += 1
            self.hits += 1
            return slot, True, -1
        slot, evicted = self._place(key, "acquire")
        self._pins[slot] = 1
        self.misses += 1
        return slot, False, evicted

    def release(self, key: int) -> None:
        """Unpin `key` (once per `acquire`)."""
        slot = self._slot_of.get(key, -1)
        if slot < 0:
            raise SlotStateError(f"release of expert key {key}, which is not resident in any slot")
        if self._pins[slot] == 0:
            raise SlotStateError(f"release of expert key {key} (slot {slot}), which is not held")
        self._pins[slot] -= 1

    def prefetch(self, key: int) -> tuple[int, int]:
        """Reserve a slot for `key` without pinning it. Returns (slot, evicted_key or -1); slot is -1 when
        `key` is already resident or every slot is pinned (a prefetch never fails loudly)."""
        if key in self._slot_of or self._victim() < 0:
            return -1, -1
        slot, evicted = self._place(key, "prefetch")
        self.prefetches += 1
        return slot, evicted

    def evict(self, key: int) -> bool:
        """Drop `key` from its slot if it is resident and not pinned. Returns whether it was dropped."""
        slot = self._slot_of.get(key, -1)
        if slot < 0 or self._pins[slot] > 0:
            return False
        del self._slot_of[key]
        self._key_of[slot] = -1
        self._free.append(slot)
        self._free.sort(reverse=True)
        return True

    def pins(self, key: int) -> int:
        slot = self._slot_of.get(key, -1)
        return self._pins[slot] if slot >= 0 else 0

    def resident(self) -> list[tuple[int, int]]:
        """(key, slot) pairs, least recently used first."""
        return list(self._slot_of.items())

    def occupied(self) -> int:
        """How many slots hold a key (resident or being filled)."""
        return len(self._slot_of)

    def counters(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "prefetches": self.prefetches, "evictions": self.evictions}

    def reset_counters(self) -> None:
        self.hits = self.misses = self.prefetches = self.evictions = 0

    # -- internals -------------------------------------------------------------------------------
    def _victim(self) -> int:
        """The slot the next placement would use, or -1 when all are pinned."""
        if self._free:
            return self._free[-1]
        for slot in self._slot_of.values():
            if self._pins[slot] == 0:
                return slot
        return -1

    def _place(self, key: int, why: str) -> tuple[int, int]:
        slot = self._victim()
        if slot < 0:
            raise CacheFullError(
                f"{why} of expert key {key}: all {self.num_slots} slots are pinned by the layer being computed; "
                "raise cache_experts (it must cover the experts one layer uses at once)"
            )
        evicted = self._key_of[slot]
        if evicted >= 0:
            del self._slot_of[evicted]
            self.evictions += 1
        else:
            self._free.pop()
        self._key_of[slot] = key
        self._slot_of[key] = slot
        return slot, evicted


def make_slot_manager(num_slots: int, native: bool | None = None):
    """A slot manager for `num_slots` slots: the C++ one (`m2r2_moe._native.SlotManager`, same interface,
    same decisions) when it is built, else the Python `SlotManager`.

    `native=None` picks the C++ one when available; `True` requires it (RuntimeError naming why it is
    missing); `False` forces the Python twin."""
    from .. import _ext  # the only door to native code

    if native is False or (native is None and not _ext.HAS_EXT):
        return SlotManager(num_slots)
    if not _ext.HAS_EXT:
        raise RuntimeError(f"the C++ slot manager is not available: {_ext.EXT_ERROR}")
    return _ext.native.SlotManager(num_slots)
