"""Smoke test of benchmarks/policies.py: the replay counts what the runtime's policy would load, Belady's loads
bound every policy's, and on the built-in model's own text the default policy loads fewer experts than LRU
(deterministic: recorded requests replayed, no timing)."""

from __future__ import annotations

import policies
import pytest
import torch

from m2r2_moe.loading import load_model
from m2r2_moe.models import find_moe_layers
from m2r2_moe.profile.cli import prompt_text, references
from m2r2_moe.cli_common import text_files

pytestmark = pytest.mark.slow


def test_replay_rows_are_bounded_by_belady(one_thread):
    model, tokenizer = load_model("builtin", torch.float32)
    _, layers = find_moe_layers(model)
    total = sum(int(x.experts.num_experts) for x in layers)
    refs = references(model, tokenizer, layers, 1, 64, 48, 1, text_files(prompt_text("builtin", None), "builtin:heldout"))
    rows = policies.policy_rows("builtin", refs, len(layers), [total // 2])
    assert len(rows) == 1
    row = rows[0]  # model, cache, lru, recency, three half-lives, belady, default x lru, recency x lru
    assert len(row) == 10 and row[:2] == ["builtin", total // 2]
    loads = [float(x) for x in row[2:8]]
    assert all(x >= loads[-1] > 0 for x in loads)  # nothing beats Belady
    assert float(row[8]) < 1.0  # the default policy loads fewer than LRU here


def test_replay_places_every_request():
    """A cache as large as the experts loads each one once; a full pool evicts only unpinned experts."""
    requests = [frozenset({0, 1}), frozenset({8, 9}), frozenset({0, 2}), frozenset({8, 9}), frozenset({1, 2})]
    assert policies.replay(requests, 6, 0, 2, 32.0) == 5  # 0, 1, 8, 9, 2: each loaded once
    assert policies.replay(requests, 2, 0, 2, 32.0) == 10  # two slots, every request new to them
