"""Residuals and routing of calibration or held-out text, batch by batch, for training and evaluating predictors.

r_l is the residual entering layer l's MoE block (the input of the norm in front of it); the experts are the
`top_k_index` the experts module received, i.e. exactly what the block computed. Both come from
`models/tap.py`, so the model runs unmodified (offloaded or not).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..models.base import MoELayer
from ..models.tap import LayerTap


@torch.no_grad()
def collect(model: nn.Module, layers: list[MoELayer], batches: Iterable[torch.Tensor],
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each batch of token ids `[B, S]` (no padding): (`residuals [L, B*S, H]` float32,
    `chosen [L, B*S, K]` int64), token order = row-major over (batch, position)."""
    device = next(p.device for p in model.parameters() if p.numel())
    with LayerTap(layers) as tap:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
            yield (torch.stack([r.float().cpu() for r in tap.residual]),
                   torch.stack([c.long().cpu() for c in tap.chosen]))


def chunk_tokens(ids: torch.Tensor, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Split a 1-D token stream into `[B, seq_len]` batches (the tail that does not fill a row is dropped)."""
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
