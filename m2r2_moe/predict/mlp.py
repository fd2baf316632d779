"""Nonlinear accelerators: one small MLP per (source layer l, depth d) that maps the router input of layer l
straight to the router logits of its target.

    z_{l,d} = W2_{l,d} · relu(W1_{l,d} · x_l + b1_{l,d}) + b2_{l,d}        x_l = norm_l(r_l) [H], z [E]

The target of (l, d) is layer l + d of the same token; with `wraps`, a target past the last layer (l + d >= L)
is layer l + d - L of the *next* token (cross-token heads: the prefetcher's horizon past the token). Predicted
probabilities are softmax(z), trained against the target router's distribution (KL), so they are read as
each expert's probability of use, like a router's own softmax.

All depths of a source layer are evaluated together: the D hidden layers side by side as one matmul
(`W1_l [H, D*M]`), then the D heads as one block-diagonal matmul — four ops per layer at decode
(`fused_probabilities`). ReLU, applied in place: at batch 1 the exact GELU cost more than the matmul before it
(a fixed per-call overhead), for 0.1-0.2 points of recall on the built-in model.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPHeads(nn.Module):
    """Per-(layer, depth) one-hidden-layer MLPs of width `width`, stored stacked:
    `w1 [L, H, D*M]`, `b1 [L, D*M]`, `w2 [L, D, M, E]`, `b2 [L, D, E]` (depth-major columns in `w1`)."""

    def __init__(self, num_layers: int, hidden: int, depth: int, width: int, num_experts: int, wraps: bool = False):
        super().__init__()
        self.num_layers, self.hidden, self.depth, self.width = num_layers, hidden, depth, width
        self.num_experts, self.wraps = num_experts, wraps
        self.w1 = nn.Parameter(torch.zeros(num_layers, hidden, depth * width))
        self.b1 = nn.Parameter(torch.zeros(num_layers, depth * width))
        self.w2 = nn.Parameter(torch.zeros(num_layers, depth, width, num_experts))
        self.b2 = nn.Parameter(torch.zeros(num_layers, depth, num_experts))

    def initialize(self, generator: torch.Generator) -> None:
        """Random starting weights for training (`generator`: the seed)."""
        with torch.no_grad():
            self.w1.copy_(torch.randn(self.w1.shape, generator=generator) / self.hidden ** 0.5)
            self.w2.copy_(torch.randn(self.w2.shape, generator=generator) * 0.1 / self.width ** 0.5)
            self.b1.zero_()
            self.b2.zero_()

    def pairs(self) -> list[tuple[int, int]]:
        """The (source layer, depth) pairs the heads predict: within the token, and past it with `wraps`."""
        return [(l, d) for l in range(self.num_layers) for d in range(1, self.depth + 1)
                if self.wraps or l + d < self.num_layers]

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Training path: `x [L, B, H]` (every source layer's router input for B tokens) → logits `[L, D, B, E]`."""
        num_layers, batch, _ = x.shape
        h = torch.relu(torch.baddbmm(self.b1.unsqueeze(1), x, self.w1))  # [L, B, D*M]
        h = h.view(num_layers, batch, self.depth, self.width).transpose(1, 2)  # [L, D, B, M]
        h = h.reshape(num_layers * self.depth, batch, self.width)  # [L*D, B, M]
        w2 = self.w2.view(num_layers * self.depth, self.width, self.num_experts)
        z = torch.baddbmm(self.b2.view(num_layers * self.depth, 1, -1), h, w2)  # [L*D, B, E]
        return z.view(num_layers, self.depth, batch, self.num_experts)

    def head_logits(self, layer: int, depth: int, x: torch.Tensor) -> torch.Tensor:
        """Reference for one pair: `x [T, H]` float32 → logits `[T, E]`."""
        cols = slice((depth - 1) * self.width, depth * self.width)
        h = torch.relu(x @ self.w1[layer, :, cols] + self.b1[layer, cols])  # [T, M]
        return h @ self.w2[layer, depth - 1] + self.b2[layer, depth - 1]

    @torch.no_grad()
    def fuse(self, layer: int, count: int) -> tuple[torch.Tensor, ...]:
        """The first n = `count` depths of `layer`, laid out for `fused_probabilities`: (w1 `[H, n*M]`, b1 `[n*M]`,
        the heads as one block-diagonal matrix `[n*M, n*E]` (one matmul for all of them: at decode sizes the
        zeros cost less than a batched matmul's dispatch), b2 `[n*E]`, n), contiguous, on the heads' device."""
        cols, width, experts = count * self.width, self.width, self.num_experts
        w2 = self.w1.new_zeros(cols, count * experts)
        for i in range(count):
            w2[i * width : (i + 1) * width, i * experts : (i + 1) * experts] = self.w2[layer, i]
        return (self.w1[layer, :, :cols].contiguous(), self.b1[layer, :cols].contiguous(), w2,
                self.b2[layer, :count].reshape(-1).contiguous(), count)

    def flops_per_token(self, count: int) -> int:
        """Multiply-adds x2 that `fused_probabilities` executes for `count` depths of one source layer (the
        block-diagonal head matrix included, zeros and all)."""
        return 2 * count * self.width * (self.hidden + count * self.num_experts)


def fused_probabilities(fused: tuple, x: torch.Tensor) -> torch.Tensor:
    """Decode path: `x [T, H]` float32 through `MLPHeads.fuse`'s tensors → probabilities `[n, T, E]` (a view).
    Four ops whatever the depth count: the hidden layers as one addmm, relu in place, the heads as one addmm,
    the softmax."""
    w1, b1, w2, b2, count = fused
    h = torch.addmm(b1, x, w1).relu_()  # [T, n*M]
    logits = torch.addmm(b2, h, w2).view(x.shape[0], count, -1)  # [T, n, E]
    return torch.softmax(logits, dim=-1).transpose(0, 1)
