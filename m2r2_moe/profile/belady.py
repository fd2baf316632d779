"""Offline cache simulation on a recorded request sequence: Belady's optimal policy and LRU.

A request is the set of expert keys one MoE layer call needs at once (all must be resident together, as
the runtime pins them). A request larger than the cache is served in waves: its keys all count as
loads if absent, and afterwards the cache keeps the keys it would keep anyway. Belady evicts the key
whose next use is farthest in the future, which minimizes the number of loads for a given cache size
(so `loads × expert bytes / bandwidth` bounds the transfer time of any policy from below).
"""

from __future__ import annotations

from collections import OrderedDict


def _next_uses(requests: list[frozenset[int]]) -> list[dict[int, int]]:
    """For each request index i, the next request index (> i) using each key of the future."""
    nxt: dict[int, int] = {}
    out: list[dict[int, int]] = [dict() for _ in requests]
    for i in range(len(requests) - 1, -1, -1):
        out[i] = dict(nxt)  # next uses strictly after i
        for key in requests[i]:
            nxt[key] = i
    return out


def belady_loads(requests: list[frozenset[int]], capacity: int, count_from: int = 0) -> int:
    """Loads Belady's policy needs; only requests with index ≥ `count_from` are counted."""
    future = _next_uses(requests)
    resident: set[int] = set()
    loads = 0
    never = len(requests) + 1
    for i, request in enumerate(requests):
        missing = request - resident
        if i >= count_from:
            loads += len(missing)
        resident |= request
        if len(resident) > capacity:
            # keep the keys used soonest; the current request's keys were just used (its waves are done)
            keep = sorted(resident, key=lambda k: future[i].get(k, never))[:capacity]
            resident = set(keep)
    return loads


def lru_loads(requests: list[frozenset[int]], capacity: int, count_from: int = 0) -> int:
    """Loads of plain LRU without prefetching, on the same sequence."""
    order: OrderedDict[int, None] = OrderedDict()
    loads = 0
    for i, request in enumerate(requests):
        for key in sorted(request):
            if key in order:
                order.move_to_end(key)
            else:
                if i >= count_from:
                    loads += 1
                order[key] = None
        while len(order) > capacity:
            order.popitem(last=False)
    return loads
