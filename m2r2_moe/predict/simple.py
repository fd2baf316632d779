"""Predictors that need no training: `history` (frequency/recency) and `oracle` (replays a trace)."""

from __future__ import annotations

import numpy as np
import torch

from .base import Predictor


class HistoryPredictor(Predictor):
    """Per-layer exponentially decayed expert counts of the current sequence: what a layer used recently
    it will likely use again."""

    name = "history"

    def __init__(self, num_layers, num_experts, top_k, depth, decay: float = 0.9):
        super().__init__(num_layers, num_experts, top_k, depth)
        self.decay = decay
        self.device = torch.device("cpu")
        self.reset()

    def to(self, device: torch.device | str) -> "HistoryPredictor":
        """Keep the counts on `device`, where the routing they count arrives."""
        self.device = torch.device(device)
        self.counts = self.counts.to(self.device)
        return self

    def reset(self) -> None:
        # a tiny uniform prior so that an unseen layer still ranks experts deterministically (by index)
        self.counts = torch.zeros(self.num_layers, self.num_experts, device=self.device)  # [L, E]
        self.counts -= torch.arange(self.num_experts, device=self.device) * 1e-6

    def observe(self, layer: int, chosen: torch.Tensor) -> None:
        """Count `chosen [T, K]` where it is (no host read: an `index_add_` of ones, not a `bincount`, whose
        output size depends on the data)."""
        if chosen.device != self.counts.device:
            raise ValueError(f"the history predictor counts on {self.counts.device} but the routing is on "
                             f"{chosen.device}: call predictor.to({str(chosen.device)!r}) first")
        index = chosen.reshape(-1)  # [T*K]
        hits = torch.zeros(self.num_experts, device=index.device).index_add_(
            0, index, torch.ones(index.shape, device=index.device))  # [E]
        self.counts[layer] = self.counts[layer] * self.decay + hits

    def predict(self, layer: int, residual: torch.Tensor | None, chosen: torch.Tensor | None = None,
                ) -> dict[int, torch.Tensor]:
        tokens = 1 if residual is None else residual.shape[0]
        return {d: self.counts[layer + d].expand(tokens, -1) for d in self.depths(layer)}


class OraclePredictor(Predictor):
    """Replays recorded routing: the true experts of each future layer (an upper bound, never a default).

    `experts [N, L, K]`: the recorded choice for token position n (in the order the model sees tokens,
    batch 1) at MoE layer l. `wrap=True` (name `oracle-wrap`) also predicts across the token boundary: from
    layer l, the next forward's layers up to l + depth - L (decode, one position per forward) — the bound for
    a predictor that could see the next token's routing, which within-token predictors cannot."""

    name = "oracle"
    # its one-hot rows are each expert's probability of use: 1 for the chosen (normalised to shares they would
    # read 1 / top-k, and the prefetcher's admission would throttle a perfect prediction on a slow busy link)
    scores_are_probabilities = True

    def __init__(self, num_layers, num_experts, top_k, depth, experts: torch.Tensor, wrap: bool = False):
        super().__init__(num_layers, num_experts, top_k, depth)
        self.wraps = wrap
        if wrap:
            self.name = "oracle-wrap"
        self.device = torch.device("cpu")
        self.load_sequence(experts.permute(1, 0, 2))

    def to(self, device: torch.device | str) -> "OraclePredictor":
        """Keep the replayed choices on `device`: predictions are slices of them, made there."""
        self.device = torch.device(device)
        self.experts, self.one_hot = self.experts.to(self.device), self.one_hot.to(self.device)
        return self

    def reset(self) -> None:
        self.position = 0

    def load_sequence(self, chosen: torch.Tensor) -> None:
        """Replay `chosen [L, N, K]` from position 0 (copied to the predictor's device: once per sequence,
        a host→device copy that waits for the copy when `chosen` is on the host)."""
        experts = chosen.permute(1, 0, 2).long().to(self.device)  # [N, L, K]
        self.experts = experts
        self.one_hot = torch.zeros(*experts.shape[:2], self.num_experts, device=self.device).scatter_(
            -1, experts, 1.0)  # [N, L, E]
        self._ahead = None  # `predict_host`'s table, built on its first call
        self.position = 0

    def _ahead_rows(self) -> np.ndarray:
        """`[N + 1, 2L, E]` float32: for position n, the rows of layers 0..L-1 at n, then those of the next
        position's layers 0..L-1 (what a prediction across the token boundary reads); zeros past the trace."""
        if self._ahead is None:
            rows = self.one_hot.numpy()  # [N, L, E]
            count = len(rows)
            ahead = np.zeros((count + 1, 2 * self.num_layers, self.num_experts), dtype=np.float32)
            ahead[:count, : self.num_layers] = rows
            ahead[: count - 1, self.num_layers :] = rows[1:]
            ahead.flags.writeable = False  # `predict_host` hands out views of it
            self._ahead = ahead
        return self._ahead

    def advance(self, tokens: int) -> None:
        """Called after each forward: the next forward starts `tokens` positions later."""
        self.position += tokens

    def predict(self, layer: int, residual: torch.Tensor | None, chosen: torch.Tensor | None = None,
                ) -> dict[int, torch.Tensor]:
        tokens = 1 if residual is None else residual.shape[0]
        out = {}
        for d in self.depths(layer):
            target, start = layer + d, self.position
            if target >= self.num_layers:  # the next forward's layer: its positions start `tokens` later
                target, start = target - self.num_layers, start + tokens
            out[d] = self._rows(start, tokens)[:, target]
        return out

    def predict_host(self, layer, residual, chosen=None, normed=None, count=None):
        """Decode at batch 1 on the CPU: `predict`'s rows `[D, E]` for the nearest `count` depths (all by
        default), one slice of a table built once per sequence (`_ahead_rows`, a view: read, never written). A
        bound on prediction should cost next to nothing: a numpy gather (about ten small numpy calls) took 60-85
        µs per layer in a decode step, its code and data cold after the layer's kernels, against 16 µs in a loop."""
        if self.device.type != "cpu" or (residual is not None and residual.shape[0] != 1):
            return None
        depths = self.depths(layer)
        n = len(depths) if not count else min(count, len(depths))
        if n == 0:
            return None  # nothing ahead to predict (as `predict_stacked`'s empty depths)
        ahead = self._ahead_rows()
        return ahead[min(self.position, len(ahead) - 1), layer + 1 : layer + 1 + n]

    def _rows(self, start: int, tokens: int) -> torch.Tensor:
        """One-hot choices `[tokens, L, E]` from position `start` (zeros past the trace's end)."""
        rows = self.one_hot[start : start + tokens]
        if len(rows) < tokens:
            rows = torch.cat([rows, rows.new_zeros(tokens - len(rows), *rows.shape[1:])])
        return rows
