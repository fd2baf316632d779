"""CPU smoke test of the GPU replay benchmark (benchmarks/gpu_replay.py) and of benchmarks/replay.py, at small
geometry with an emulated link: the code path benchmarks/gpu_check.sh runs on a GPU.

Invariants:
- a routing record is position-aligned: the tokens fed are the held-out text, and the oracle's recorded
  scores for layer l + d at position n are the one-hot of the experts recorded at (n, l + d);
- a replay predictor returns the recorded scores of the position its clock names;
- the replay model's MoE layers use exactly the recorded experts at every position, offloaded or not;
- every predictor's offloaded run generates the un-offloaded model's tokens, and every timed expert use
  is counted exactly once (hits + prefetch hits + late + misses = tokens x layers x top-k);
- the JSON carries the fields the readers of gpu_check.sh's output use.
"""

from __future__ import annotations

import json

import gpu_replay
import pytest
import torch
from replay import ReplayClock, ReplayPredictor, RoutingRecord, record_routing

import m2r2_moe
from m2r2_moe.corpus import resolve_text, token_stream

pytestmark = pytest.mark.slow

PROMPT, STEPS = 16, 10


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(record, its file, the held-out tokens fed), recorded once with one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = m2r2_moe.load_builtin(torch.float32)
        ids = token_stream(tokenizer, resolve_text(["builtin:heldout"]), max_tokens=PROMPT + STEPS)
        record = record_routing(model, ids[:PROMPT].unsqueeze(0), STEPS, continuation=ids[PROMPT:])
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("replay") / "record.safetensors"
    record.save(path)
    return record, path, ids


def test_record_is_position_aligned(recorded):
    record, path, ids = recorded
    assert record.positions == PROMPT + STEPS and record.num_layers == 8 and record.top_k == 2
    assert torch.equal(record.tokens[: PROMPT + STEPS], ids)
    oracle = record.scores["oracle"]  # [N, L, D, E]
    for layer in range(record.num_layers):
        for d in range(1, record.depth + 1):
            if layer + d < record.num_layers:
                hot = torch.zeros(record.positions, record.num_experts).scatter_(1, record.experts[:, layer + d], 1.0)
                assert torch.equal(oracle[:, layer, d - 1], hot), (layer, d)
    loaded = RoutingRecord.load(path)
    assert torch.equal(loaded.experts, record.experts) and loaded.scores.keys() == record.scores.keys()


def test_replay_predictor_reads_the_clock(recorded):
    record = recorded[0]
    clock = ReplayClock()
    block = slice(2, 6)
    predictor = ReplayPredictor("oracle", record.scores["oracle"][:, block], clock, top_k=2, depth=4)
    assert predictor.num_layers == 4 and list(predictor.depths(0)) == [1, 2, 3] and not predictor.depths(3)
    for position in (0, PROMPT, PROMPT + STEPS - 1):
        clock.position = position
        scores = predictor.predict(1, None, torch.zeros(1, 2, dtype=torch.long))
        for d, s in scores.items():
            assert set(s[0].topk(2).indices.tolist()) == set(record.experts[position, 2 + 1 + d].tolist())
    clock.position = PROMPT + STEPS
    with pytest.raises(IndexError):
        predictor.predict(0, None, torch.zeros(1, 2, dtype=torch.long))


def test_cpu_smoke_run(recorded, tmp_path):
    out = tmp_path / "replay.json"
    threads = torch.get_num_threads()
    try:
        rc = gpu_replay.main([
            "--device", "cpu", "--hidden", "128", "--intermediate", "256", "--layers", "3", "--vocab", "128",
            "--prompt-tokens", str(PROMPT), "--steps", str(STEPS), "--warmup", "2", "--link-ratio", "2",
            "--threads", "1", "--no-repeat", "--record", str(recorded[1]), "--json", str(out),
        ])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    runs = {r["predictor"]: r for r in result["runs"]}
    assert list(runs) == ["none", "history", "gate", "m2r2", "oracle"]
    assert result["reference_routing_replayed"] and result["first_layer"] == 2 and result["cache_experts"] == 12
    for name, r in runs.items():
        assert r["routing_replayed"], name
        assert r["tokens_identical"], name
        assert r["uses_accounted"] and r["hits"] + r["prefetch_hits"] + r["late_prefetches"] + r["misses"] == 8 * 3 * 2
        assert r["time_per_token_s"] > 0 and r["limit_per_token_s"] >= result["compute_per_token_s"]
        assert {"speedup_vs_none", "share_of_gain", "stall_s_per_token", "bytes_to_device"} <= r.keys()
    assert runs["none"]["prefetches"] == 0 and runs["oracle"]["prefetches"] > 0
    assert "| predictor |" in result["table"] and rc == 0
