"""Smoke test of benchmarks/policy_cost.py: the synthetic traffic is what it says, and the replay evicts once
the pool is full and times every eviction and use."""

from __future__ import annotations

import policy_cost


def test_traffic_routes_top_k_distinct_experts_of_each_layer():
    calls = policy_cost.traffic(layers=3, experts=16, top_k=4, tokens=5)
    assert len(calls) == 15
    for i, keys in enumerate(calls):
        assert len(set(keys)) == 4 and all(k // 16 == i % 3 for k in keys)


def test_a_full_pool_evicts_and_every_decision_is_timed():
    m = policy_cost.measure(layers=4, experts=16, top_k=2, tokens=80)
    assert m["evictions"] > 0.5  # half the experts fit: Zipf-like routing still misses
    assert m["search_us"] > 0 and m["use_us"] > 0 and m["token_ms"] > 0
