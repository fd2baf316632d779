"""Replaying one model's routing and predictions on another model.

The offload runtime's speed depends on expert *size* (bytes over the link) and on *which* experts each
token uses and how well they are predicted. A random model of Mixtral-8x7B geometry has the first but
meaningless routing; the built-in model has real routing but tiny experts. This module joins them:

- `record_routing`: greedy decoding of a model (the built-in one) with hooks; for every token position,
  the experts and weights each MoE layer chose, and for each predictor the scores it gave, at each layer,
  for every layer ahead (exactly what the prefetcher would have seen).
- `replay_routing` + `ReplayClock`: the routers of another model (e.g. Mixtral-8x7B experts with
  synthetic weights) return the recorded choice for the positions the clock names, so its expert uses
  equal the recorded model's.
- `ReplayPredictor`: a `Predictor` returning one predictor's recorded scores, so prefetching on the
  replay model is as good (or as bad) as on the recorded one.
- `GreedyDecoder`: greedy decoding with a KV cache, one forward per call, so callers can time steps.
- `RoutingTap`: the experts every MoE layer actually received (`m2r2_moe/models/tap.py`), to check a replay
  against its record.

Shape legend: N positions (prompt + decoded), L MoE layers, K top-k, E experts, D lookahead depth,
T tokens of one forward, H hidden size.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from m2r2_moe.models import find_moe_layers
from m2r2_moe.models.tap import LayerTap
from m2r2_moe.predict import make_predictor
from m2r2_moe.predict.base import Predictor
from m2r2_moe.profile.trace import ExpertChoices, check_format, read_safetensors, write_safetensors

logger = logging.getLogger(__name__)

FORMAT = "m2r2_moe.replay/1"
RECORDED = ("history", "gate", "m2r2", "oracle")


@dataclass
class RoutingRecord(ExpertChoices):
    """What a model did on one prompt, position by position.

    experts: [N, L, K] int64, the experts each MoE layer chose.
    weights: [N, L, K] float32, the router's weights of those experts.
    scores:  predictor name -> [N, L, D, E] float32: its scores at layer l for layer l + d (zeros where
             l + d is past the last layer).
    tokens:  [N + 1] the prompt and the greedy continuation (the last token was never fed back).
    """

    experts: torch.Tensor
    weights: torch.Tensor
    scores: dict[str, torch.Tensor]
    tokens: torch.Tensor
    prompt_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return self.experts.shape[0]

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def depth(self) -> int:
        return int(self.meta["depth"])

    def save(self, path: str | Path) -> None:
        tensors = {"experts": self.experts.to(torch.int32), "weights": self.weights.float(),
                   "tokens": self.tokens.long()}
        tensors.update({f"scores.{name}": s.float() for name, s in self.scores.items()})
        header = {"format": FORMAT, "prompt_tokens": str(self.prompt_tokens), "meta": json.dumps(self.meta)}
        write_safetensors(path, tensors, header)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingRecord":
        tensors, header = read_safetensors(path)
        check_format(header, FORMAT, path, "routing record")
        scores = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("scores.")}
        return cls(tensors["experts"].long(), tensors["weights"].float(), scores, tensors["tokens"].long(),
                   int(header["prompt_tokens"]), json.loads(header["meta"]))

    def forward_spans(self, decode_steps: int | None = None) -> list[tuple[int, int]]:
        """(start, stop) positions of each forward of a replay: the prompt, then one position per step."""
        steps = self.positions - self.prompt_tokens if decode_steps is None else decode_steps
        return [(0, self.prompt_tokens)] + [(p, p + 1) for p in range(self.prompt_tokens, self.prompt_tokens + steps)]

    def requests(self, first_layer: int, num_layers: int, decode_steps: int | None = None,
                 ) -> list[frozenset[int]]:
        """Per (forward, layer) of a replay of layers `first_layer..+num_layers`: the expert keys
        (`layer * E + expert`) it needs at once — the input of `profile.belady`."""
        out = []
        for start, stop in self.forward_spans(decode_steps):
            for i in range(num_layers):
                used = torch.unique(self.experts[start:stop, first_layer + i]).tolist()
                out.append(frozenset(i * self.num_experts + e for e in used))
        return out


class ReplayClock:
    """The position the next forward of a replay model starts at (set by `GreedyDecoder`)."""

    def __init__(self) -> None:
        self.position = 0


class GreedyDecoder:
    """Decoding with a KV cache, one forward per call: `prefill(ids)`, then `step()` per token — the
    greedy choice of the last forward, or a given token (teacher forcing).

    With a `clock`, sets `clock.position` before each forward (the replay routers and predictors read it).
    Works with transformers versions that name the cache argument `cache` or `past_key_values`."""

    def __init__(self, model: nn.Module, clock: ReplayClock | None = None):
        self.model, self.clock = model, clock
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache = None
        self.position = 0
        self.fed: list[torch.Tensor] = []  # [1, T] chunks fed so far
        self.last: torch.Tensor | None = None  # [1, 1] greedy choice of the last forward

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.clock is not None:
            self.clock.position = self.position
        kwargs = {self._cache_arg: self.cache} if self.cache is not None else {}
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        self.cache = getattr(out, self._cache_arg, None)  # the output field is named like the argument
        if self.cache is None:
            raise RuntimeError(f"{type(self.model).__name__} returned no {self._cache_arg}: cannot decode step by step")
        self.position += ids.shape[1]
        self.fed.append(ids)
        self.last = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1], stays on the device: no host sync
        return self.last

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache, self.position, self.fed = None, 0, []
        return self._forward(ids)

    def step(self, token: torch.Tensor | None = None) -> torch.Tensor:
        """One forward of `token [1, 1]`, by default the greedy choice of the previous forward."""
        return self._forward(self.last if token is None else token.reshape(1, 1).to(self.last.device))

    def all_tokens(self) -> torch.Tensor:
        """`[1, fed + 1]` on the CPU: every token fed, then the last greedy choice."""
        return torch.cat([t.cpu() for t in self.fed + [self.last]], dim=1)


@torch.no_grad()
def record_routing(model: nn.Module, prompt: torch.Tensor, decode_steps: int, predictors=RECORDED, depth: int = 4,
                   adapters=None, continuation: torch.Tensor | None = None) -> RoutingRecord:
    """Decode `decode_steps` forwards after the prefill of `prompt [1, P]` and record the routing and every
    predictor's scores (see `RoutingRecord`). Each step feeds the next token of `continuation [>= steps]`
    (teacher forcing: the routing of real text) or, without one, the greedy choice (a small model's
    greedy text soon repeats itself, and so does its routing). The predictors are driven as the
    prefetcher drives them: at each layer `predict(l, r_l, chosen_l)`, then `observe(l, chosen_l)`, and
    `advance` per forward."""
    if continuation is not None and len(continuation) < decode_steps:
        raise ValueError(f"continuation has {len(continuation)} tokens for {decode_steps} steps")
    adapter, layers = find_moe_layers(model)
    forwards = []  # per forward: (residuals [L][T, H], chosen [L][T, K], weights [L][T, K])
    decoder = GreedyDecoder(model)
    with LayerTap(layers) as tap:
        decoder.prefill(prompt)
        forwards.append((list(tap.residual), list(tap.chosen), list(tap.weights)))
        for i in range(decode_steps):
            decoder.step(None if continuation is None else continuation[i])
            forwards.append((list(tap.residual), list(tap.chosen), list(tap.weights)))
    experts = torch.cat([torch.stack([c.long().cpu() for c in ch], dim=1) for _, ch, _ in forwards])  # [N, L, K]
    route_weights = torch.cat([torch.stack([w.float().cpu() for w in ws], dim=1) for _, _, ws in forwards])
    num_experts = max(int(layer.experts.num_experts) for layer in layers)
    scores = {}
    for name in predictors:
        predictor = make_predictor(name, model, adapter, layers, depth, adapters=adapters, trace=experts)
        scores[name] = _replay_predictor(predictor, forwards, experts.shape[0], len(layers), depth, num_experts)
    meta = {"num_experts": num_experts, "depth": depth, "model_type": getattr(model.config, "model_type", ""),
            "hidden_size": getattr(model.config, "hidden_size", 0), "predictors": list(predictors),
            "fed": "greedy" if continuation is None else "text"}
    return RoutingRecord(experts, route_weights, scores, decoder.all_tokens()[0], prompt.shape[1], meta)


def _replay_predictor(predictor: Predictor, forwards, positions: int, num_layers: int, depth: int,
                      num_experts: int) -> torch.Tensor:
    """Drive `predictor` over the recorded forwards; its scores `[N, L, D, E]`."""
    out = torch.zeros(positions, num_layers, depth, num_experts)
    predictor.reset()
    start = 0
    for residuals, chosen, _ in forwards:
        tokens = chosen[0].shape[0]
        for layer in range(num_layers):
            for d, s in predictor.predict(layer, residuals[layer], chosen[layer]).items():
                out[start : start + tokens, layer, d - 1] = s.float().cpu()
            predictor.observe(layer, chosen[layer])
        predictor.advance(tokens)
        start += tokens
    return out


class RoutingReplay:
    """Routers of a model patched to return recorded routing; `remove()` gives them their forward back."""

    def __init__(self, model: nn.Module, record: RoutingRecord, clock: ReplayClock, first_layer: int = 0,
                 device: torch.device | str | None = None):
        _, self.layers = find_moe_layers(model)
        if first_layer + len(self.layers) > record.num_layers:
            raise ValueError(f"replaying layers {first_layer}..{first_layer + len(self.layers) - 1} of a record of "
                             f"{record.num_layers} layers")
        for layer in self.layers:
            if int(layer.experts.num_experts) != record.num_experts or layer.router is None:
                raise ValueError(f"replay needs MoE layers with a router and {record.num_experts} experts")
        self.clock = clock
        device = device or next(model.parameters()).device
        block = slice(first_layer, first_layer + len(self.layers))
        self.experts = record.experts[:, block].to(device)  # [N, L', K]
        self.weights = record.weights[:, block].to(device)  # [N, L', K]
        for i, layer in enumerate(self.layers):
            layer.router.forward = self._forward(i, getattr(layer.router, "weight", None))

    def _forward(self, i: int, weight: torch.Tensor | None):
        def forward(hidden_states: torch.Tensor):
            hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
            start = self.clock.position
            stop = start + hidden.shape[0]
            if stop > self.experts.shape[0]:
                raise IndexError(f"replay past the record: positions {start}..{stop - 1} of {self.experts.shape[0]}")
            # the real router's matmul, so the replay model computes what the model it stands for does
            logits = F.linear(hidden, weight) if weight is not None else None
            index = self.experts[start:stop, i].to(hidden.device)  # [T, K]
            return logits, self.weights[start:stop, i].to(hidden.device), index
        return forward

    def remove(self) -> None:
        for layer in self.layers:
            layer.router.__dict__.pop("forward", None)


def replay_routing(model: nn.Module, record: RoutingRecord, clock: ReplayClock, first_layer: int = 0,
                   device=None) -> RoutingReplay:
    """Make the routers of `model`'s MoE layers return `record`'s routing of layers `first_layer..`
    for the positions `clock` names (routers returning `(logits, weights, index)`, as transformers 5's)."""
    return RoutingReplay(model, record, clock, first_layer, device)


class ReplayPredictor(Predictor):
    """Returns one predictor's recorded scores (`[N, L, D, E]`, already cut to the replayed layers) for the
    positions the clock names. Scores live on `device`: put them where the real predictor computes."""

    needs_residual = False

    def __init__(self, name: str, scores: torch.Tensor, clock: ReplayClock, top_k: int, depth: int | None = None,
                 device: torch.device | str | None = None):
        num_layers, recorded_depth, num_experts = scores.shape[1:]
        depth = min(depth or recorded_depth, recorded_depth)
        super().__init__(num_layers, num_experts, top_k, depth)
        self.name = name
        self.scores = scores[:, :, :depth].to(device or "cpu")
        self.clock = clock

    def predict(self, layer: int, residual: torch.Tensor | None, chosen: torch.Tensor | None = None,
                ) -> dict[int, torch.Tensor]:
        tokens = chosen.shape[0] if chosen is not None else (1 if residual is None else residual.shape[0])
        start = self.clock.position
        rows = self.scores[start : start + tokens, layer]  # [T, D, E]
        if rows.shape[0] < tokens:
            raise IndexError(f"replay past the record: positions {start}..{start + tokens - 1}")
        return {d: rows[:, d - 1] for d in self.depths(layer)}


class RoutingTap:
    """Keeps the `top_k_index` every MoE layer's experts module receives (offloaded or not), to check that
    a replay model used exactly the recorded experts. `layers`: the model's `MoELayer`s."""

    def __init__(self, layers):
        self.seen = [[] for _ in layers]
        self.tap = LayerTap(layers, residual=False, on_routing=lambda i: self.seen[i].append(self.tap.chosen[i]))

    def matches(self, expected: torch.Tensor) -> bool:
        """`expected [N, L, K]`: every layer saw exactly the recorded experts at every position."""
        for i, calls in enumerate(self.seen):
            if not calls:
                return False
            got = torch.cat([c.reshape(-1, c.shape[-1]).cpu() for c in calls])
            if len(got) != len(expected) or not torch.equal(got, expected[:, i]):
                return False
        return True

    def remove(self):
        self.tap.remove()
