"""Layer calls computed pair by pair, in the model kernel's own row order: bit-identical on any CPU.

A MoE layer call routes T tokens to K experts each: T*K (token, expert) *pairs*, pair p = t*K + k. The
model's kernel gives each expert's GEMM the rows of that expert's pairs in an order of its own, and on some
CPUs (and thread counts) the math library rounds a row differently depending on its position in the
product — so the offloaded model must hand each expert exactly those rows, in exactly that order:

- `eager` loops over experts and takes an expert's rows with `torch.where` on a `[K, T]` mask: k-major order;
- `grouped_mm` sorts the flattened expert ids with `torch.sort` (not stable: ties come out in an order that
  depends on every key) and runs one GEMM per group of the sorted rows;
- `batched_mm` computes every pair on its own (`bmm`), so order does not matter.

When a call cannot hand its rows to the kernel as the original call does — more distinct experts than slots
(a long prefill with a small cache: computed `num_slots` experts at a time, in *waves*), eager with K > 2 (it
adds a token's contributions in expert order, which slots would change), or grouped_mm over several tokens
(its sort sees slot ids, not expert ids) — the layer is computed *pair by pair*: the kernel runs on pair rows
with top-k 1 and weight 1 (exact: x * 1), the rows of each wave arranged so that the kernel's own sort lays
them out in the original call's order, and the weighting and the sum over K are then redone as the kernel
does them. Shapes: T tokens, K = top-k, H hidden, P = T*K pairs, S pairs of one wave.
"""

from __future__ import annotations

import torch

KNOWN_KERNELS = ("eager", "grouped_mm", "batched_mm")


def direct_is_exact(kernel: str | None, tokens: int, top_k: int) -> bool:
    """Whether the kernel run straight on the slots (expert ids remapped to slot ids) reproduces the
    original call bit for bit, when every expert of the call holds a slot."""
    if kernel == "eager":
        return top_k <= 2  # a token's two contributions add the same in either order: 0 + a + b == 0 + b + a
    if kernel == "grouped_mm":
        return tokens == 1  # one token: no two rows of one expert, so the sort's tie order cannot matter
    return True  # batched_mm: pair by pair; another kernel: computed as it comes (README: the contract)


def canonical_order(kernel: str | None, top_k_index: torch.Tensor) -> torch.Tensor:
    """`[P]` pair ids in the order the original kernel feeds them to the experts' GEMMs (each expert's pairs
    appear in the order its GEMM reads them)."""
    num_tokens, top_k = top_k_index.shape
    if kernel == "grouped_mm":
        return torch.sort(top_k_index.reshape(-1))[1]  # the kernel's own call on the original expert ids
    pairs = torch.arange(num_tokens * top_k, device=top_k_index.device).view(num_tokens, top_k)
    return pairs.T.reshape(-1) if kernel == "eager" else pairs.reshape(-1)  # eager: k-major (torch.where)


def run_pairs(runtime, layer, needed, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The layer call computed pair by pair, `num_slots` experts at a time; `[T, H]`."""
    kernel = runtime.kernel_names[layer]
    rows = pair_rows(runtime, layer, needed, hidden_states, top_k_index, top_k_weights.dtype, kernel)  # [P, H]
    if kernel == "eager":
        return _sum_in_expert_order(rows, top_k_index, top_k_weights, hidden_states.dtype)
    # grouped_mm / batched_mm weight each pair row, sum a token's K rows in fp32 and round once
    num_tokens, top_k = top_k_index.shape
    weighted = rows * top_k_weights.reshape(-1, 1)  # [P, H], promoted like the kernel's weighted_out
    return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def pair_rows(runtime, layer, needed, hidden_states, top_k_index, weight_dtype, kernel) -> torch.Tensor:
    """`[P, H]`: each pair's expert output with weight 1. Each wave's pairs go to the kernel in the original
    call's order (`canonical_order`). No sentinel rows: GPT-OSS's eager kernel has none, and grouped_mm's
    `histc(min=0, max=S-1)` would count them when one slot is seen (min = max = 0 means the data's range)."""
    top_k = top_k_index.shape[1]
    experts = top_k_index.reshape(-1)  # [P] expert of each pair
    order = canonical_order(kernel, top_k_index)  # [P]
    rows = hidden_states.new_empty(experts.shape[0], hidden_states.shape[1])
    ones = torch.ones(1, 1, dtype=weight_dtype, device=hidden_states.device)  # x * 1 promotes as the kernel's x * w
    needed = resident_first(runtime.cache, layer, needed)
    for start in range(0, len(needed), runtime.num_slots):
        wave = needed[start : start + runtime.num_slots]
        if len(wave) == len(needed):
            sel = order  # one wave: every pair
        else:
            wanted = torch.tensor(wave, device=experts.device)
            # host sync: the wave's rows decide the kernel's shapes (multi-token forwards only)
            sel = order[torch.isin(experts[order], wanted)]  # [S] the wave's pairs, in canonical order

        def compute(view, slot_of, sel=sel):
            table = runtime.table(layer, view, slot_of)
            return _compute_wave(runtime, layer, view, table, kernel, hidden_states, top_k, experts, sel, ones)

        out, pairs = runtime.run_wave(layer, wave, compute, routing=top_k_index if start == 0 else None)
        rows[pairs] = out
    return rows


def resident_first(cache, layer: int, needed: list[int]) -> list[int]:
    """`needed` with the experts that hold a slot (resident or arriving) first, each group in id order."""
    holds = [cache.slots.lookup(key) >= 0 for key in cache.keys(layer, needed)]
    return [e for e, h in zip(needed, holds) if h] + [e for e, h in zip(needed, holds) if not h]


def _compute_wave(runtime, layer, view, table, kernel, hidden_states, top_k, experts, sel, ones):
    """The kernel on one wave's pair rows `sel [S]`: (outputs `[S, H]`, the pair of each output row `[S]`)."""
    keys = table[experts[sel]]  # [S] slot (view) index of each pair
    if kernel == "grouped_mm":
        # The kernel sorts the keys (unstable) and gives group g the rows in sorted order. Lay the keys out
        # sorted, work out where its sort will take each row from (the same call, so the same answer), and put
        # there the row the original call had at that place: its group's rows in canonical order.
        ranked = torch.sort(keys, stable=True)[1]  # groups in slot order, canonical order within each
        keys = keys[ranked]  # the desired sorted sequence of pairs: sel[ranked]
        taken = torch.sort(keys)[1]  # sorted position j reads input row taken[j]
        pairs = torch.empty_like(taken)
        pairs[taken] = sel[ranked]  # [S] the pair input row i holds (one gather of rows below, not three)
        out = runtime.kernels[layer](view, hidden_states[pairs // top_k], keys.view(-1, 1), ones.expand(len(keys), 1))
        return out, pairs
    pair_hidden = hidden_states[sel // top_k]  # [S, H]
    pad = kernel == "batched_mm" and len(sel) == 1 < len(experts)
    if pad:  # a bmm with a batch of one rounds differently from the same row in the model's larger batch
        keys, pair_hidden = keys.repeat(2), pair_hidden.repeat(2, 1)
    out = runtime.kernels[layer](view, pair_hidden, keys.view(-1, 1), ones.expand(len(keys), 1))
    return (out[:1] if pad else out), sel


def _sum_in_expert_order(rows, top_k_index, top_k_weights, dtype) -> torch.Tensor:
    """eager adds each expert's weighted rows into the output, in the output dtype, expert by expert in
    ascending id order: weight each pair row as the kernel rounds it and add a token's rows in that order."""
    num_tokens, top_k = top_k_index.shape
    weighted = (rows * top_k_weights.reshape(-1, 1)).to(dtype).view(num_tokens, top_k, -1)  # [T, K, H]
    order = top_k_index.argsort(dim=1)  # [T, K]: a token's experts in ascending id order
    out = torch.zeros(num_tokens, rows.shape[1], dtype=dtype, device=rows.device)  # [T, H]
    tokens = torch.arange(num_tokens, device=order.device)
    for j in range(top_k):
        out += weighted[tokens, order[:, j]]
    return out
