"""Smoke test of benchmarks/prefill.py's table: one short prompt of the built-in model at one link ratio, every
column filled, logits identical, the floor never above the limit (no timing is compared: that is the
benchmark's job)."""

from __future__ import annotations

import prefill
import pytest
import torch

from m2r2_moe.loading import load_model
from m2r2_moe.models import find_moe_layers

pytestmark = pytest.mark.slow


def test_one_row_has_every_column(one_thread):
    model, _ = load_model("builtin", torch.float32)
    _, layers = find_moe_layers(model)
    total = sum(int(x.experts.num_experts) for x in layers)
    prompt = torch.randint(3, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    rows = prefill.prefill_table(model, "builtin", {24: prompt}, [2.0], {2.0: 0.2}, total // 2, total, 1)
    assert len(rows) == 1
    row = rows[0]
    # model, tokens, ratio, original, all cached, streamed (ms, MB, limit, x limit, MB needed, x floor),
    # on demand (ms, MB, limit, x limit), speedup, identical
    assert len(row) == 17 and row[:3] == ["builtin", 24, "2"] and row[-1] == "yes"
    moved, limit_ratio, needed, floor_ratio = float(row[6]), float(row[8]), float(row[9]), float(row[10])
    assert 0 < needed <= moved and floor_ratio >= limit_ratio > 0
    assert all(float(cell) > 0 for cell in row[3:6] + row[11:16])
