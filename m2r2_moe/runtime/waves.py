"""A layer call that needs more distinct experts than there are slots (long prefill, or eager with
top-k > 2): the experts are computed `num_slots` at a time, and the per-token sums are redone the way the
model's kernel does them, so the result stays bit-identical. Shapes: T tokens, K = top-k, H hidden."""

from __future__ import annotations

import torch


def pair_rows(runtime, layer, needed, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """`[T*K, H]`: each (token, expert) pair's output with weight 1 (exact: x * 1), computed `num_slots`
    experts at a time on only the rows of the wave. No sentinel rows: GPT-OSS's eager kernel has no
    sentinel, and grouped_mm's `histc(min=0, max=S-1)` counts sentinel rows into the group when
    S = 1 (min = max = 0 means "use the data's range"), which changes the GEMM's rows and its rounding."""
    top_k = top_k_index.shape[1]
    pair_hidden = hidden_states.repeat_interleave(top_k, dim=0)  # [T*K, H]
    pair_index = top_k_index.reshape(-1, 1)  # [T*K, 1]
    ones = torch.ones_like(top_k_weights).reshape(-1, 1)  # [T*K, 1]
    rows = torch.empty_like(pair_hidden)
    batched = runtime.kernel_names[layer] == "batched_mm"
    for start in range(0, len(needed), runtime.num_slots):
        wave = needed[start : start + runtime.num_slots]
        rows_of_wave = torch.isin(pair_index[:, 0], torch.tensor(wave, device=pair_index.device))
        sel = rows_of_wave.nonzero().squeeze(1)  # [n]
        # batched_mm runs one bmm over the rows: with a batch of one it rounds differently from the same row
        # in the model's larger batch, so a lone row is computed twice and the first copy kept
        pad = batched and len(sel) == 1 < len(pair_index)
        take = sel.repeat(2) if pad else sel
        out = runtime.run_wave(layer, wave, pair_hidden[take], pair_index[take], ones[take])
        rows[sel] = out[:1] if pad else out
    return rows


def run_eager_in_expert_order(runtime, layer, needed, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """eager adds each expert's weighted rows into the output in the output dtype, expert by expert in
    ascending id order. On slots that order becomes slot order; once a token has more than two
    contributions (K > 2, or waves) the rounding would differ. So the pair rows are weighted as the
    kernel does and added to the output in ascending expert order. Shapes: T tokens, K = top-k, H hidden."""
    num_tokens, top_k = top_k_index.shape
    rows = pair_rows(runtime, layer, needed, hidden_states, top_k_index, top_k_weights)  # [T*K, H]
    weighted = (rows * top_k_weights.reshape(-1, 1)).to(hidden_states.dtype)  # as the kernel rounds each row
    weighted = weighted.view(num_tokens, top_k, -1)  # [T, K, H]
    order = top_k_index.argsort(dim=1)  # [T, K]: a token's experts in ascending id order
    out = torch.zeros_like(hidden_states)  # [T, H]
    for j in range(top_k):
        out += weighted[torch.arange(num_tokens, device=order.device), order[:, j]]
    return out


def run_in_waves(runtime, layer, needed, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """More distinct experts than slots (long prefill): compute them `num_slots` at a time.

    grouped_mm / batched_mm sum a token's K weighted expert outputs in fp32 and round once, so the
    pair rows of all waves are gathered and the weighting and the fp32 sum over K are done as the
    kernel does them. Shapes: T tokens, K = top-k, H hidden."""
    num_tokens, top_k = top_k_index.shape
    rows = pair_rows(runtime, layer, needed, hidden_states, top_k_index, top_k_weights)  # [T*K, H]
    weighted = rows * top_k_weights.reshape(-1, 1)  # [T*K, H], promoted like the kernel's weighted_out
    return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)
