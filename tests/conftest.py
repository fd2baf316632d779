"""Shared fixtures: tiny random transformers MoE models built from their config classes."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM


def tiny_mixtral(dtype=torch.float32, experts_implementation: str | None = None, seed: int = 0, layers: int = 4,
                 experts: int = 8, top_k: int = 2) -> MixtralForCausalLM:
    """A 4-layer, 8-expert, top-2 Mixtral with random weights (fast on CPU)."""
    config = MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(dtype).eval()
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(
        now[k].dtype == snap[k].dtype and now[k].shape == snap[k].shape and torch.equal(now[k], snap[k]) for k in snap
    )


@pytest.fixture
def mixtral():
    return tiny_mixtral()


class ExpertUseCounter:
    """Counts the expert uses the model's routers actually asked for: the distinct experts of every call of
    every routed-experts module (what `OffloadStats.expert_uses` must equal, however each use was served)."""

    def __init__(self, model: torch.nn.Module):
        self.uses = 0
        experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]  # every family's name
        assert experts, f"no experts modules found in {type(model).__name__}"
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in experts]

    def _hook(self, module, args, kwargs):
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        self.uses += len(torch.unique(index))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> "ExpertUseCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@pytest.fixture
def admit_every_prediction(monkeypatch):
    """Prefetch every prediction the plan lists (within the copy budget), on every layer: for tests about the
    copies prefetching makes — on tiny random models, whose near-uniform routers the admission test rightly
    ignores, and whose layers compute so long against the emulated link that prefetching would back off."""
    from m2r2_moe.runtime import planner, prefetcher

    monkeypatch.setattr(prefetcher, "make_planner", lambda *args: planner.PlannerCore(*args))  # the twin, patched:
    monkeypatch.setattr(planner, "value", lambda *args: 1.0)
    # `every` stays 1: predicting at every layer, never backing off (the prefetcher reads it at each forward)
    monkeypatch.setattr(planner.PlannerCore, "step", lambda self, window, decode=False, margin=0.0: None)
    monkeypatch.setattr(prefetcher.OnOff, "step", lambda self, now, decode, vouched=False: True)  # never the off arm
