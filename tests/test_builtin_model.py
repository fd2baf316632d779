"""The shipped built-in models (m2r2_moe/builtin/<name>/) against their own model cards.

Invariants, for every built-in model:
- stock transformers loads the folder like any checkpoint (Auto classes), weights bf16, <= 25 MB;
- the held-out loss recomputed here on the card's check sequences equals the card's numbers, and
  the card's held-out bits/byte beats the unigram baselines on the same split;
- routing is learned and balanced per layer: every expert used in every layer, no layer collapsed
  (each expert's share between 0.08x and 3.6x the uniform share);
- routing depends on the input: different texts give different expert sequences;
- offloaded with half of its experts in the slot cache, it gives bit-identical logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import m2r2_moe
from m2r2_moe import builtin
from m2r2_moe.models import find_moe_layers
from m2r2_moe.profile.trace import record_trace

# Architecture each built-in model must keep (the project checks its targets on both shapes of MoE).
EXPECTED = {
    "tiny-mixtral": {"class": "MixtralForCausalLM", "layers": 8, "experts": 8, "top_k": 2},
    "tiny-qwen3-moe": {"class": "Qwen3MoeForCausalLM", "layers": 12, "experts": 32, "top_k": 4},
}
MAX_SHARE_VS_UNIFORM = 3.6  # tiny-mixtral: 45% of the top-2 choices where uniform is 12.5%
MIN_SHARE_VS_UNIFORM = 0.08  # tiny-mixtral: 1%


def test_every_expected_model_is_shipped():
    assert builtin.builtin_names() == list(EXPECTED)  # the default first


@pytest.fixture(scope="module", params=list(EXPECTED))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def path(name) -> Path:
    return Path(builtin.builtin_model_path(name))


@pytest.fixture(scope="module")
def card(path) -> dict:
    return json.loads((path / "card.json").read_text())


@pytest.fixture(scope="module")
def loaded(name):
    return builtin.load_builtin(name=name)


def _num_experts(config) -> int:
    return config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts


def test_stock_transformers_loads_it(name, path, card):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    expected = EXPECTED[name]
    assert type(model).__name__ == expected["class"]
    cfg = model.config
    assert cfg.num_hidden_layers == expected["layers"] == card["model"]["layers"]
    assert _num_experts(cfg) == expected["experts"] == card["model"]["experts"]
    assert cfg.num_experts_per_tok == expected["top_k"] == card["model"]["top_k"]
    if cfg.model_type == "qwen3_moe":
        assert cfg.norm_topk_prob and cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1
    assert cfg.vocab_size == len(tokenizer) == card["model"]["vocab"]
    text = "def spam(eggs):\n    return eggs + 1\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # the package stays small: the model's own files, and the trained accelerators shipped beside them
    assert sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != "adapters.safetensors") <= 25 * 2**20
    assert (path / "adapters.safetensors").stat().st_size <= 6 * 2**20


def test_import_resolves_to_module_not_data_folder():
    assert Path(builtin.__file__).name == "builtin.py"
    assert callable(builtin.load_builtin)


def test_heldout_loss_matches_card(loaded, card):
    model, _ = loaded
    check = card["check"]
    ids = torch.tensor(check["input_ids"])  # [n, T] held-out chunks
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    nats = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    torch.testing.assert_close(nats, torch.tensor(check["nats"]), rtol=2e-3, atol=2e-3)
    ev = card["eval"]
    # A few chunks are a noisy sample of the whole split, but they must be of the same order.
    assert abs(nats.mean().item() - ev["heldout_nats"]) < 0.35 * ev["heldout_nats"]
    assert math.isclose(ev["heldout_bpb"], ev["heldout_nats"] / math.log(2) * ev["heldout_tokens_per_byte"])
    # Well under both unigram baselines on the same split (it learned more than token frequencies).
    assert ev["heldout_bpb"] < 0.75 * ev["unigram_bpb"]
    assert ev["heldout_bpb"] < 0.5 * ev["byte_unigram_bpb"]


def test_card_usage_not_degenerate(card):
    usage = torch.tensor(card["routing"]["usage"])  # [L, E]
    n_experts = card["model"]["experts"]
    assert usage.shape == (card["model"]["layers"], n_experts)
    torch.testing.assert_close(usage.sum(1), torch.ones(len(usage)), rtol=0, atol=1e-6)
    assert usage.min() >= MIN_SHARE_VS_UNIFORM / n_experts, usage.min(1)
    assert usage.max() <= MAX_SHARE_VS_UNIFORM / n_experts, usage.max(1)
    assert all(bits > 0 for bits in card["routing"]["mutual_information"]["consecutive_tokens_bits"])


def test_every_expert_used_in_every_layer_on_heldout(loaded, card):
    model, _ = loaded
    trace = record_trace(model, torch.tensor(card["check"]["input_ids"]))
    counts = torch.stack([torch.bincount(trace.experts[:, l].flatten(), minlength=trace.num_experts)
                          for l in range(trace.num_layers)])  # [L, E]
    share = counts / counts.sum(1, keepdim=True)
    assert (counts > 0).all(), counts
    assert share.max() <= MAX_SHARE_VS_UNIFORM / trace.num_experts, share.max(1)


def test_routing_depends_on_input(loaded):
    model, tokenizer = loaded
    code = "import os\n\n\ndef walk(top):\n    for name in os.listdir(top):\n        yield name\n"
    prose = "The quick brown fox jumps over the lazy dog, and then it runs far away into the hills."
    a = record_trace(model, tokenizer(code, return_tensors="pt")["input_ids"])
    b = record_trace(model, tokenizer(prose, return_tensors="pt")["input_ids"])
    n = min(len(a), len(b))
    assert not torch.equal(a.experts[:n], b.experts[:n])
    # Within one text, too, the chosen experts change from token to token in every layer.
    for l in range(a.num_layers):
        assert len({tuple(sorted(e)) for e in a.experts[:, l].tolist()}) > 2
    # The same text twice gives the same routing (it is a function of the input, not noise).
    assert torch.equal(a.experts, record_trace(model, a.token_ids).experts)


def test_load_builtin_dtype_and_generate(loaded):
    model, tokenizer = loaded
    assert not model.training and model.dtype == torch.float32
    ids = tokenizer("def ", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > ids.shape[1]


def test_offload_half_the_experts_bit_identical(name):
    model, tokenizer = builtin.load_builtin(name=name)
    ids = tokenizer("import torch\n\n\nclass Model(nn.Module):\n    def forward(self, x):\n",
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    _, layers = find_moe_layers(model)
    total = sum(int(layer.experts.num_experts) for layer in layers)
    m2r2_moe.offload(model, device="cpu", cache_experts=total // 2)
    try:
        with torch.no_grad():
            out = model(input_ids=ids).logits
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(out, ref)
    assert stats.evictions > 0  # the prompt needed more experts than the slots hold


def test_offload_finds_the_shipped_adapters(name):
    from m2r2_moe.predict import default_adapters_path

    model, _ = builtin.load_builtin(name=name)
    _, layers = find_moe_layers(model)
    assert default_adapters_path(model, layers) == builtin.builtin_adapters_path(name)
    m2r2_moe.offload(model, predictor="m2r2", device="cpu")  # raises when no shipped adapters match
    m2r2_moe.remove_offload(model)


def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "_ROOT", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json.*training script in tools"):
        builtin.builtin_model_path()
