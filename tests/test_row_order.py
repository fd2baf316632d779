"""Every expert GEMM of an offloaded forward reads exactly the rows, in exactly the order, that the original
forward's GEMM for that expert reads.

This is what makes offloaded logits bit-identical on every CPU and thread count: some math libraries round a
row differently depending on its place in the product (MKL's AVX2 kernels do; its AVX-512 ones here do not),
so equal logits on this machine alone would not prove it. The GEMMs are recorded by wrapping the functions
the kernels call (`F.linear` for eager, `F.grouped_mm` for grouped_mm) and matched by their weight matrix.
Cases: prefill in waves (fewer slots than experts), prefill with all experts fitting after decode steps have
scrambled the slot table (slot order no longer follows expert order), top-4 routing, and batch decode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import m2r2_moe
from conftest import tiny_mixtral

pytestmark = pytest.mark.lossless  # CI repeats these at other thread counts


class GemmLog:
    """Records (weight bytes, input rows) of every expert GEMM while active."""

    def __init__(self, monkeypatch, kernel: str):
        self.calls: list[tuple[bytes, torch.Tensor]] = []
        if kernel == "eager":
            linear = F.linear

            def spy_linear(x, w, b=None):
                if x.dim() == 2 and w.dim() == 2:
                    self.calls.append((w.contiguous().numpy().tobytes(), x.clone()))
                return linear(x, w, b)

            monkeypatch.setattr(F, "linear", spy_linear)
        else:
            grouped = F.grouped_mm

            def spy_grouped(x, w, offs=None, **kw):
                start = 0
                for g, end in enumerate(offs.tolist()):
                    if end > start:
                        self.calls.append((w[g].contiguous().numpy().tobytes(), x[start:end].clone()))
                    start = end
                return grouped(x, w, offs=offs, **kw)

            monkeypatch.setattr(F, "grouped_mm", spy_grouped)

    def take(self) -> list[tuple[bytes, torch.Tensor]]:
        calls, self.calls = self.calls, []
        return calls


def _assert_same_gemms(reference, offloaded):
    """Each reference GEMM appears in the offloaded run with the identical input (rows and order)."""
    expert_calls = [(w, x) for w, x in reference if x.shape[0] >= 1]
    remaining = list(offloaded)
    for weight, rows in expert_calls:
        match = next((i for i, (w, x) in enumerate(remaining) if w == weight and torch.equal(x, rows)), None)
        if match is None:
            same_weight = [x for w, x in remaining if w == weight]
            detail = ("no GEMM with this weight" if not same_weight else
                      f"same weight, inputs {[tuple(x.shape) for x in same_weight]}; rows as a set equal: "
                      f"{any(x.shape == rows.shape and torch.equal(x.sort(0)[0], rows.sort(0)[0]) for x in same_weight)}")
            raise AssertionError(f"an expert GEMM of {tuple(rows.shape)} rows is not reproduced: {detail}")
        remaining.pop(match)


@pytest.mark.parametrize("kernel", ["eager", "grouped_mm"])
@pytest.mark.parametrize("case", ["waves", "scrambled", "top4", "batch_decode"])
def test_expert_gemms_read_the_original_rows_in_order(monkeypatch, kernel, case):
    top_k = 4 if case == "top4" else 2
    model = tiny_mixtral(torch.float32, kernel, top_k=top_k)
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    if case == "batch_decode":  # eight sequences of one token: a decode step at batch 8
        ids = torch.randint(3, 96, (8, 1), generator=torch.Generator().manual_seed(1))
    log = GemmLog(monkeypatch, kernel)
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    reference = log.take()
    cache = 3 if case == "waves" else 20
    m2r2_moe.offload(model, device="cpu", cache_experts=cache)
    try:
        with torch.no_grad():
            for seed in range(5):  # decode-like steps first: the slot table no longer follows expert order
                model(input_ids=torch.randint(3, 96, (1, 3), generator=torch.Generator().manual_seed(10 + seed)))
            log.take()
            logits = model(input_ids=ids).logits
        offloaded = log.take()
        stats = m2r2_moe.stats(model)
    finally:
        m2r2_moe.remove_offload(model)
    assert torch.equal(logits, ref_logits)
    _assert_same_gemms(reference, offloaded)
    if case == "waves":
        assert stats.waves > stats.layer_calls


def test_a_reordered_gemm_is_caught(monkeypatch):
    """The check itself can fail: swapping two rows of one GEMM input is reported."""
    x = torch.randn(4, 8)
    w = torch.randn(6, 8).numpy().tobytes()
    with pytest.raises(AssertionError, match="not reproduced"):
        _assert_same_gemms([(w, x)], [(w, x[[1, 0, 2, 3]])])
