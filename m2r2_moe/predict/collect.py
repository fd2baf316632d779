"""Residuals and routing of calibration or held-out text, batch by batch, for training and evaluating predictors.

r_l is the residual entering layer l's MoE block (the input of the norm in front of it); the experts are the
`top_k_index` the experts module received, i.e. exactly what the block computed. Both come from
`models/tap.py`, so the model runs unmodified (offloaded or not).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..models.base import MoEAdapter, MoELayer
from ..models.tap import LayerTap


@torch.no_grad()
def collect(model: nn.Module, layers: list[MoELayer], batches: Iterable[torch.Tensor],
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each batch of token ids `[B, S]` (no padding): (`residuals [L, B*S, H]` float32,
    `chosen [L, B*S, K]` int64), token order = row-major over (batch, position)."""
    for residuals, _, chosen in collect_normed(model, layers, batches):
        yield residuals, chosen


@torch.no_grad()
def collect_normed(model: nn.Module, layers: list[MoELayer], batches: Iterable[torch.Tensor],
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`collect`, with the router inputs: (`residuals [L, N, H]`, `normed [L, N, H]` float32 = norm_l(r_l) as
    the model computed it, `chosen [L, N, K]`) per batch, N = B*S."""
    device = next(p.device for p in model.parameters() if p.numel())
    with LayerTap(layers) as tap:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
            yield (torch.stack([r.float().cpu() for r in tap.residual]),
                   torch.stack([n.float().cpu() for n in tap.normed]),
                   torch.stack([c.long().cpu() for c in tap.chosen]))


def chunk_tokens(ids: torch.Tensor, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Split a 1-D token stream into `[B, seq_len]` batches (the tail that does not fill a row is dropped)."""
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


@dataclass
class RoutingSet:
    """What the accelerators learn from, for N tokens of text, every MoE layer (L):
    `normed [L, N, H]` router inputs, `probs [L, N, E]` the routers' distributions on them, `chosen [L, N, K]`
    the experts used, `next [N]` the row of the same sequence's next token (-1 at a sequence's end) and,
    when kept, `residuals [L, N, H]`."""

    normed: torch.Tensor
    probs: torch.Tensor
    chosen: torch.Tensor
    next: torch.Tensor
    residuals: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.normed.shape[1]


class RoutingSetBuilder:
    """Fills a `RoutingSet` of at most `capacity` tokens from `collect_normed` batches (the routers' distributions
    computed here). The set is laid out once, at the first batch, and filled in place: the batches are not held and
    concatenated, so the peak is the set itself, not twice it. Tokens past the capacity are dropped (a kept token
    whose next one was dropped has none: `next` -1; a capacity of whole sequences drops whole sequences)."""

    def __init__(self, adapter: MoEAdapter, layers: list[MoELayer], dtype: torch.dtype, *, capacity: int,
                 keep_residuals: bool = False):
        self.adapter, self.layers, self.dtype, self.keep_residuals = adapter, layers, dtype, keep_residuals
        self.capacity, self.offset = capacity, 0
        self._set: RoutingSet | None = None  # laid out at the first batch, filled up to `offset`

    @torch.no_grad()
    def add(self, residuals: torch.Tensor, normed: torch.Tensor, chosen: torch.Tensor, seq_len: int) -> None:
        """One batch of rows of `seq_len` tokens: `residuals`, `normed [L, N, H]`, `chosen [L, N, K]`; nothing
        once the set is full."""
        n = min(normed.shape[1], self.capacity - self.offset)
        if n <= 0:
            return
        residuals, normed, chosen = residuals[:, :n], normed[:, :n], chosen[:, :n]
        # the router reads the norm's output in the model's dtype: normed was widened from it, losslessly
        probs = torch.stack([self.adapter.route(layer, normed[l].to(self.dtype))[0].float()
                             for l, layer in enumerate(self.layers)])  # [L, N, E]
        rows = torch.arange(n)
        nxt = rows + 1 + self.offset
        nxt = torch.where((rows % seq_len < seq_len - 1) & (nxt < self.capacity), nxt, -1)  # [N]
        if self._set is None:
            self._set = self._allocate(normed, probs, chosen, residuals)
        span, data = slice(self.offset, self.offset + n), self._set
        data.normed[:, span], data.probs[:, span], data.chosen[:, span], data.next[span] = normed, probs, chosen, nxt
        if self.keep_residuals:
            data.residuals[:, span] = residuals
        self.offset += n

    def _allocate(self, normed, probs, chosen, residuals) -> RoutingSet:
        def like(t):
            return torch.empty(t.shape[0], self.capacity, *t.shape[2:], dtype=t.dtype)

        return RoutingSet(like(normed), like(probs), like(chosen), torch.empty(self.capacity, dtype=torch.long),
                          like(residuals) if self.keep_residuals else None)

    def build(self) -> RoutingSet:
        if self._set is None:
            raise ValueError("no tokens collected")
        data, n = self._set, self.offset
        self._set = None
        if n == self.capacity:
            return data
        return RoutingSet(data.normed[:, :n], data.probs[:, :n], data.chosen[:, :n], data.next[:n],
                          data.residuals[:, :n] if data.residuals is not None else None)
