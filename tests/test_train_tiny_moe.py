"""tools/train_tiny_moe.py, the training script of the built-in models (without training one).

Invariants:
- the default preset is tiny-mixtral with its original sizes (the shipped model stays reproducible);
  `--preset tiny-qwen3-moe` gives the fine-grained Qwen3-MoE on torch; flags override a preset;
- the balancing loss is per layer: layers that each collapse onto a different expert score the maximum
  (E), although their concatenation looks balanced (what transformers' loss would see);
- the router tap sees every layer's router logits, for both architectures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import train_tiny_moe as ttm  # noqa: E402
from tiny_moe_eval import RouterTap  # noqa: E402


def test_default_preset_is_the_original_tiny_mixtral():
    args = ttm.parse_args([])
    assert (args.name, args.arch, args.corpus) == ("tiny-mixtral", "mixtral", "stdlib")
    assert (args.layers, args.experts, args.top_k, args.hidden, args.intermediate) == (8, 8, 2, 128, 256)
    assert (args.steps, args.batch, args.seq_len, args.lr, args.warmup, args.vocab) == (1000, 4, 512, 3e-3, 60, 4096)
    assert args.out == ttm.BUILTIN_DIR / "tiny-mixtral"


def test_qwen3_preset_and_overrides():
    args = ttm.parse_args(["--preset", "tiny-qwen3-moe", "--steps", "7"])
    assert (args.name, args.arch, args.corpus) == ("tiny-qwen3-moe", "qwen3_moe", "torch")
    assert (args.layers, args.experts, args.top_k) == (12, 32, 4)
    assert args.steps == 7 and args.out == ttm.BUILTIN_DIR / "tiny-qwen3-moe"
    dry = ttm.parse_args(["--preset", "tiny-qwen3-moe", "--dry-run"])
    assert dry.out == Path("/tmp/tiny-qwen3-moe-dry") and dry.steps == 6


def test_balance_loss_is_per_layer():
    num_experts, n = 4, 64
    collapsed = [torch.full((n, num_experts), -10.0).index_fill_(1, torch.tensor([l]), 10.0)
                 for l in range(num_experts)]  # layer l sends every token to expert l
    per_layer = ttm.per_layer_balance_loss(collapsed, top_k=1)
    concatenated = ttm.per_layer_balance_loss([torch.cat(collapsed)], top_k=1)
    assert per_layer.item() == pytest.approx(num_experts, rel=1e-3)  # the maximum: collapse
    assert concatenated.item() == pytest.approx(1.0, rel=1e-3)  # looks perfectly balanced
    uniform = [torch.randn(4096, num_experts) * 1e-3 for _ in range(3)]
    assert ttm.per_layer_balance_loss(uniform, top_k=2).item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_build_model_and_router_tap(preset):
    from transformers import AutoTokenizer

    from m2r2_moe.builtin import builtin_model_path

    args = ttm.parse_args(["--preset", preset, "--layers", "2", "--hidden", "32", "--intermediate", "16"])
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path())
    model = ttm.build_model(args, tokenizer)
    assert type(model).__name__ == ttm.ARCH_CLASSES[args.arch]
    if args.arch == "qwen3_moe":
        assert model.config.norm_topk_prob
    tap = RouterTap(model)
    ids = torch.randint(0, len(tokenizer), (2, 5))
    loss = ttm.lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
    logits = tap.pop()
    tap.remove()
    assert [tuple(lg.shape) for lg in logits] == [(10, args.experts)] * 2
    assert torch.isfinite(loss)
