"""Forwards of many tokens (a prompt): the coming layers' experts stream in while a layer computes.

A forward of T tokens routes T*K pairs per layer; for a prompt of a few hundred tokens nearly every expert of
every layer is used, so what the next layers need is known, with near certainty, before their routers run.
Loaded on demand, each layer waits for its own copies and the link idles while it computes: prefill time =
compute + transfer. `PrefillStream` overlaps the two:

- `route` (in place of the hot path's `torch.unique`, still one host read): the layer call's experts, and
  each one's selection rate per token at that layer, learned over the multi-token calls seen (prior: K/E).
- `acquired`, after a wave's slots are pinned and its demand loads queued: at the layer's last wave (the
  earlier waves' experts are done with by then), the experts the following layers will use with probability
  >= `min_use` — 1 - (1 - rate)^T over T tokens — nearest layer first, most likely first, go to
  `ExpertCache.stream`, which copies the absent ones in that order: the next layer's into slots whose expert
  is needed after them, a farther layer's only into slots whose expert this forward no longer needs (`victim`
  chooses). Any layer ahead, not only the next, so the link works while a layer whose experts are all resident
  computes; and past the last layer into the next forward's first layers (taken to be alike: a prompt's next
  chunk), so the next forward finds its first layers resident instead of waiting for them before it can compute.
- `copy_budget`: on a link of known speed, only what the link moves while this layer computes (`MARGIN`
  layer times) is queued; the rest of the next layer is demand-loaded right behind it, so the link stays
  busy, and no more slots than that are taken early from the experts the next forward (a prompt's next
  chunk) would find resident. Where the link's speed is not known (CUDA), the next layer's experts.

Decode at batch 1 (T == 1) is the prefetcher's: `route` is not called there and `acquired` returns at once.
"""

from __future__ import annotations

import math

import torch

PRIOR_TOKENS = 0.25  # weight of the uniform prior, in tokens per expert: the first prompt outweighs it
MARGIN = 1.5  # link time kept queued, in layer compute times (> 1: the link does not idle while a layer computes)
MAX_TOKENS = 1 << 16  # learned counts are halved past this many tokens: recent prompts weigh more


class PrefillStream:
    """Streams the coming layers' experts during multi-token layer calls of one offloaded model."""

    def __init__(self, cache, clock, num_experts: list[int], expert_bytes: list[int], top_k: int,
                 min_use: float = 0.5):
        self.cache, self.clock = cache, clock
        self.num_experts, self.expert_bytes = num_experts, expert_bytes
        self.min_use = min_use
        self.enabled = True  # False: layers of many tokens load on demand only (benchmarks compare the two)
        # per layer: pseudo-counts of tokens that chose each expert, and of tokens seen (a uniform prior)
        self._chosen = [[PRIOR_TOKENS * top_k] * e for e in num_experts]
        self._seen = [PRIOR_TOKENS * e for e in num_experts]
        # the multi-token layer call in progress: (forward, layer), experts not acquired yet, tokens
        self._call, self._left, self._tokens = (-1, -1), 0, 0
        self._likely: dict[int, tuple[int, list[int]]] = {}  # layer -> (tokens, `likely`), until it learns

    def route(self, layer: int, top_k_index: torch.Tensor) -> list[int]:
        """`top_k_index [T, K]` → the experts the layer call needs, ascending. A call of more than one token
        also teaches the selection rates and is streamed for (one token: the prefetcher's)."""
        values, counts = torch.unique(top_k_index, return_counts=True)  # [N], [N]
        # host sync on CUDA: the set of experts decides which copies to issue (one read per layer call)
        needed, uses = torch.stack((values.long(), counts)).tolist()
        tokens = top_k_index.shape[0]
        self._call, self._left, self._tokens = (self.clock.step, layer), len(needed) if tokens > 1 else 0, tokens
        if tokens > 1:
            chosen = self._chosen[layer]
            for expert, count in zip(needed, uses):
                chosen[expert] += count
            self._seen[layer] += tokens
            self._likely.pop(layer, None)
            if self._seen[layer] > MAX_TOKENS:
                self._chosen[layer] = [c / 2 for c in chosen]
                self._seen[layer] /= 2
        return needed

    def acquired(self, layer: int, keys: list[int]) -> None:
        """A wave of `layer` holds its slots (`keys` pinned, demand loads queued). At the layer's last wave
        of a multi-token call, stream the next layers' likely experts into the slots the wave leaves."""
        if self._left <= 0 or self._call != (self.clock.step, layer):
            return  # a single-token call (decode), or a layer already past its last wave
        self._left -= len(keys)
        if self._left > 0 or not self.enabled:
            return  # later waves of this layer still need the free slots
        limit = min(self.cache.num_slots - len(keys), self.copy_budget(layer, self._tokens))
        if limit > 0:
            wanted = self.plan(layer, self._tokens, limit)  # empty when every likely expert is resident
            if wanted:
                self.cache.stream(wanted, self.clock.now(layer), frozenset(keys), layer, limit, self.victim)

    def victim(self, key: int, now: int, distance: int, near: set, pinned: frozenset, done: list) -> int:
        """The expert a streamed copy of `key`, needed `distance` turns from `now`, displaces; -1 for none. Only one
        needed after it (Belady's rule: never one needed sooner). `predictive`: the policy's victim (a stale one
        first, else the one needed farthest ahead: one this forward is done with before one a later layer needs,
        which would then cost its copy again); `lru`: the least recently used of the experts the forward is done
        with (`done`; for the next forward's, of a layer after the copied one's)."""
        cache, layers = self.cache, self.clock.num_layers
        turn = now % layers  # the layer computing
        if distance == 1:  # the next layer's expert displaces any needed after it
            victim = cache.policy.victim(key, now, near, needed_at=now + 1)
        else:  # a farther one only what this forward no longer needs: displacing one a later layer of this
            # forward uses would cost its copy again (needed after this forward's last turn, and after `key`)
            victim = cache.policy.victim(key, now, pinned, needed_at=max(now + distance, now - turn + layers - 1))
        if victim is None:  # lru: a done expert (of layer j, needed next at the next forward's turn j, L + j - turn
            # turns from now) needed after `key`; the slot table's own order would not skip the kept keys
            victim = next((k for k in done if layers + k // cache.key_stride - turn > distance
                           and cache.slots.lookup(k) >= 0 and not cache.slots.pins(k)), -1)
        return victim

    def copy_budget(self, layer: int, tokens: int) -> int:
        """How many copies to add to the link's queue now: what it can move while this layer computes, with
        a margin (`MARGIN`), less the prefetches still queued. An expert brought in earlier than needed holds
        a slot that would otherwise keep an expert for the next forward (a chunked prompt's next chunk), so
        on a slow link only that much is streamed, and the rest of the next layer is demand-loaded right
        behind it. Where the link's speed or the layer's time is not known yet: the next layer's likely
        experts."""
        following = (layer + 1) % len(self.num_experts)
        transfer = self.cache.engine.link_seconds(self.expert_bytes[following])
        compute = self.clock.layer_seconds
        if transfer <= 0 or compute <= 0:
            return len(self.likely(following, tokens))
        return max(1, math.ceil(MARGIN * compute / transfer)) - len(self.cache.queued_prefetches())

    def plan(self, layer: int, tokens: int, count: int) -> list[tuple[int, int, int]]:
        """[(layer, expert, distance)]: the experts the layers after `layer` will likely use over `tokens`
        tokens — this forward's, then the next forward's up to `layer` (taken to be alike: a prompt's next
        chunk) — nearest first, most likely first within a layer, up to the `count`-th that holds no slot.
        The resident ones before it are listed too (the cache keeps them for their turn rather than displace
        them for a later one); the list ends at its last absent expert."""
        wanted, absent, end, layers = [], 0, 0, len(self.num_experts)
        for distance in range(1, layers):
            target = (layer + distance) % layers
            for expert in self.likely(target, tokens):
                wanted.append((target, expert, distance))
                if self.cache.slots.lookup(target * self.cache.key_stride + expert) < 0:
                    absent, end = absent + 1, len(wanted)
                    if absent == count:
                        return wanted
        return wanted[:end]

    def likely(self, layer: int, tokens: int) -> list[int]:
        """Experts of `layer` used by `tokens` tokens with probability >= `min_use`, most likely first."""
        known = self._likely.get(layer)
        if known is not None and known[0] == tokens:
            return known[1]
        seen = self._seen[layer]
        chances = [(1.0 - min(c / seen, 1.0)) ** tokens for c in self._chosen[layer]]  # P(unused) per expert
        order = sorted(range(len(chances)), key=chances.__getitem__)
        experts = [e for e in order if 1.0 - chances[e] >= self.min_use]
        self._likely[layer] = (tokens, experts)
        return experts
