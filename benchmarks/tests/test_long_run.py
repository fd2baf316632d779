"""A long run on a tiny model: memory, threads and the runtime's bookkeeping stay flat.

Over 2,000+ decoded tokens (5 sequences back to back, sampled decoding, `gate` prefetching with the
`predictive` policy over an emulated link, half of the experts cached), sampled every 40 tokens by the
monitor of benchmarks/long_run.py (which runs the full-size version on the built-in model). Invariants,
after the first sequence (warm-up: allocator pools, torch's thread pool):
- host RSS grows by less than 16 MB between the first and the last quarter (median of each): a leak of one
  expert copy per token would add ~25 MB;
- the Python thread count never changes, and the OS thread count of the last quarter does not exceed the
  first quarter's;
- every dict/list/set the runtime keeps (offloader, copy engine, slot manager, prefetcher, predictor,
  policy) is no larger in the last quarter than in the first, or than the number of (layer, expert) keys;
  prefetch handles held never exceed the slots;
- the run is lossless at its end: the counters add up.
"""

from __future__ import annotations

import pytest
import torch
from long_run import growth, quarters, run
from transformers import MixtralConfig, MixtralForCausalLM

from m2r2_moe.models import find_moe_layers
from m2r2_moe.models.tap import LayerTap

pytestmark = pytest.mark.slow

SEQUENCES, NEW_TOKENS, EVERY = 5, 410, 40


def test_long_run_memory_threads_and_bookkeeping_stay_flat(one_thread):
    config = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    prompts = [torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(SEQUENCES)]
    uses = []  # distinct experts of every layer call, as the routers asked for them
    with LayerTap(find_moe_layers(model)[1], residual=False) as tap:
        tap.on_routing = lambda layer: uses.append(len(torch.unique(tap.chosen[layer])))
        monitor, stats = run(model, prompts, NEW_TOKENS, EVERY, device="cpu", predictor="gate", policy="predictive",
                             link_gbps=1.0, prefetch_min_prob=0.05)  # near-uniform random routers: admit freely
    samples, keys, slots = monitor.samples, 4 * 8, 16
    assert monitor.tokens >= 2000
    first, last = quarters(samples, warmup_tokens=NEW_TOKENS)
    assert len(first) >= 8 and first[-1]["tokens"] < last[0]["tokens"]
    assert growth(samples, "rss_mb", warmup_tokens=NEW_TOKENS) < 16
    assert len({s["py_threads"] for s in samples}) == 1
    assert max(s["os_threads"] for s in last) <= max(s["os_threads"] for s in first)
    for name in samples[-1]["containers"]:
        early = max(s["containers"].get(name, 0) for s in first)
        late = max(s["containers"].get(name, 0) for s in last)
        assert late <= max(early, keys), f"{name} grew from {early} to {late}"
    assert max(s["prefetched"] for s in samples) <= slots
    assert stats.prefetches > 0 and stats.misses > 0
    assert stats.expert_uses == sum(uses)  # every use the routers asked for, counted once
