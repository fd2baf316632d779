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
    """Accumulates `collect_normed` batches into a `RoutingSet` (routers' distributions computed here).

    `capacity`: the most tokens kept. The set is then laid out once, at the first batch, and filled in place (the
    batches are not held and concatenated: the peak is the set itself, not twice it); tokens past the capacity are
    dropped (a kept token whose next one was dropped has none: `next` -1; a capacity of whole sequences drops
    whole sequences). `full` says when a further batch would add nothing."""

    def __init__(self, adapter: MoEAdapter, layers: list[MoELayer], dtype: torch.dtype, keep_residuals: bool = False,
                 capacity: int | None = None):
        self.adapter, self.layers, self.dtype, self.keep_residuals = adapter, layers, dtype, keep_residuals
        self.parts: list[tuple[torch.Tensor, ...]] = []
        self.offset = 0
        self.capacity = capacity
        self._set: RoutingSet | None = None  # with a capacity: the preallocated set, filled up to `offset`

    @property
    def full(self) -> bool:
        return self.capacity is not None and self.offset >= self.capacity

    @torch.no_grad()
    def add(self, residuals: torch.Tensor, normed: torch.Tensor, chosen: torch.Tensor, seq_len: int) -> None:
        """One batch of rows of `seq_len` tokens: `residuals`, `normed [L, N, H]`, `chosen [L, N, K]`."""
        n = normed.shape[1]
        if self.capacity is not None:
            n = min(n, self.capacity - self.offset)
            if n <= 0:
                return
            residuals, normed, chosen = residuals[:, :n], normed[:, :n], chosen[:, :n]
        # the router reads the norm's output in the model's dtype: normed was widened from it, losslessly
        probs = torch.stack([self.adapter.route(layer, normed[l].to(self.dtype))[0].float()
                             for l, layer in enumerate(self.layers)])  # [L, N, E]
        rows = torch.arange(n)
        nxt = torch.where(rows % seq_len < seq_len - 1, rows + 1 + self.offset, -1)  # [N]
        if self.capacity is None:
            self.offset += n
            self.parts.append((normed, probs, chosen, nxt, residuals if self.keep_residuals else None))
            return
        if self._set is None:
            self._set = self._allocate(normed, probs, chosen, residuals)
        nxt = torch.where(nxt >= self.capacity, -1, nxt)  # its next token was not kept
        span = slice(self.offset, self.offset + n)
        data = self._set
        data.normed[:, span], data.probs[:, span], data.chosen[:, span], data.next[span] = normed, probs, chosen, nxt
        if self.keep_residuals:
            data.residuals[:, span] = residuals
        self.offset += n

    def _allocate(self, normed, probs, chosen, residuals) -> RoutingSet:
        layers, cap = normed.shape[0], self.capacity

        def like(t):
            return torch.empty(layers, cap, *t.shape[2:], dtype=t.dtype)

        return RoutingSet(like(normed), like(probs), like(chosen), torch.empty(cap, dtype=torch.long),
                          like(residuals) if self.keep_residuals else None)

    def build(self) -> RoutingSet:
        if self.capacity is not None:
            if self._set is None:
                raise ValueError("no tokens collected")
            data, n = self._set, self.offset
            self._set = None
            return RoutingSet(data.normed[:, :n], data.probs[:, :n], data.chosen[:, :n], data.next[:n],
                              data.residuals[:, :n] if data.residuals is not None else None)
        if not self.parts:
            raise ValueError("no tokens collected")
        normed, probs, chosen, nxt, residuals = zip(*self.parts)
        return RoutingSet(torch.cat(normed, 1), torch.cat(probs, 1), torch.cat(chosen, 1), torch.cat(nxt),
                          torch.cat(residuals, 1) if self.keep_residuals else None)
