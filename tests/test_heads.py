"""The native prediction heads at batch 1 (csrc/heads.cpp) compute what the torch paths compute, within float32
rounding (they steer prefetching, never outputs) — the bfloat16 variant on the weights rounded to bfloat16 — and
refuse inputs of the wrong shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2r2_moe import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_PLANNER and not _ext.require_ext(), reason=f"{_ext.PLANNER_ERROR}")


@pytest.mark.parametrize("hidden, n, experts", [(128, 4, 8), (64, 1, 32), (96, 3, 128)])
def test_rms_linear_softmax_matches_torch(hidden, n, experts):
    g = torch.Generator().manual_seed(hidden + n)
    x, w = torch.randn(hidden, generator=g) * 3, torch.randn(hidden, n * experts, generator=g) * 0.2
    reference = torch.softmax(((x * torch.rsqrt(x.pow(2).mean() + 1e-6)) @ w).view(n, experts), -1)
    out = torch.from_numpy(_ext.planner.rms_linear_softmax(x.numpy(), 1e-6, w.numpy(), n))
    assert out.shape == (n, experts)
    assert torch.allclose(out, reference, atol=2e-6, rtol=1e-4)
    assert torch.allclose(out.sum(-1), torch.ones(n), atol=1e-5)


@pytest.mark.parametrize("hidden, n, width, experts", [(128, 4, 64, 8), (64, 2, 256, 32), (32, 1, 8, 4)])
def test_mlp_softmax_matches_torch(hidden, n, width, experts):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(hidden, generator=g)
    w1, b1 = torch.randn(hidden, n * width, generator=g) * 0.2, torch.randn(n * width, generator=g) * 0.2
    w2, b2 = torch.randn(n, width, experts, generator=g) * 0.2, torch.randn(n, experts, generator=g) * 0.2
    hidden_units = torch.relu(x @ w1 + b1).view(n, width)
    reference = torch.softmax(torch.einsum("nm,nme->ne", hidden_units, w2) + b2, -1)
    out = torch.from_numpy(_ext.planner.mlp_softmax(x.numpy(), w1.numpy(), b1.numpy(), w2.numpy(), b2.numpy()))
    assert torch.allclose(out, reference, atol=2e-6, rtol=1e-4)


def _bits(t: torch.Tensor):
    return t.to(torch.bfloat16).view(torch.int16).numpy().view("uint16")


def _into(x: torch.Tensor, w1, b1, w2, b2, bf16: bool) -> torch.Tensor:
    """The prefetcher's call (`mlp_softmax_into`, every operand by address) on numpy arrays; its output as a tensor."""
    n, width, experts = w2.shape
    out = np.full((n, experts), np.nan, dtype=np.float32)
    _ext.planner.mlp_softmax_into(x.data_ptr(), w1.ctypes.data, b1.ctypes.data, w2.ctypes.data, b2.ctypes.data,
                                  w1.shape[0], n, width, experts, bf16, out.ctypes.data)
    return torch.from_numpy(out)


@pytest.mark.parametrize("hidden, n, width, experts", [(128, 4, 64, 8), (64, 2, 256, 32), (32, 1, 8, 4)])
def test_mlp_softmax_in_bfloat16_matches_torch_on_the_rounded_weights(hidden, n, width, experts):
    """The prefetcher's heads read w1 and w2 as bfloat16 bits: what float32 computes on the weights rounded to
    bfloat16, and near what it computes on the weights themselves."""
    g = torch.Generator().manual_seed(width + 1)
    x = torch.randn(1, hidden, generator=g)
    w1, b1 = torch.randn(hidden, n * width, generator=g) * 0.2, torch.randn(n * width, generator=g) * 0.2
    w2, b2 = torch.randn(n, width, experts, generator=g) * 0.2, torch.randn(n, experts, generator=g) * 0.2
    out = _into(x, _bits(w1), b1.numpy(), _bits(w2), b2.numpy(), bf16=True)
    r1, r2 = w1.to(torch.bfloat16).float(), w2.to(torch.bfloat16).float()
    rounded = torch.softmax(torch.einsum("nm,nme->ne", torch.relu(x[0] @ r1 + b1).view(n, width), r2) + b2, -1)
    assert torch.allclose(out, rounded, atol=2e-6, rtol=1e-4)
    exact = torch.softmax(torch.einsum("nm,nme->ne", torch.relu(x[0] @ w1 + b1).view(n, width), w2) + b2, -1)
    assert torch.allclose(out, exact, atol=0.02) and not torch.equal(out, exact)


def test_heads_refuse_mismatched_shapes():
    x = torch.randn(16).numpy()
    with pytest.raises(ValueError, match="w must be"):
        _ext.planner.rms_linear_softmax(x, 1e-6, torch.randn(15, 8).numpy(), 2)
    with pytest.raises(ValueError, match="w1"):
        _ext.planner.mlp_softmax(x, torch.randn(16, 5).numpy(), torch.randn(8).numpy(), torch.randn(2, 4, 3).numpy(),
                                 torch.randn(2, 3).numpy())


def test_mlp_softmax_into_reads_x_in_place_and_writes_every_row():
    """The prefetcher's call: x read at a torch tensor's address gives what the numpy call gives, every row of the
    output written (it starts as NaN); a null address or an empty shape is refused."""
    torch.manual_seed(3)
    x = torch.randn(1, 24)
    w1, b1, w2, b2 = torch.randn(24, 2 * 5), torch.randn(2 * 5), torch.randn(2, 5, 7), torch.randn(2, 7)
    arrays = [t.numpy() for t in (w1, b1, w2, b2)]
    assert torch.equal(_into(x, *arrays, bf16=False), torch.from_numpy(_ext.planner.mlp_softmax(x[0].numpy(), *arrays)))
    out = np.zeros((2, 7), dtype=np.float32)
    addresses = [a.ctypes.data for a in arrays]
    with pytest.raises(ValueError, match="null"):
        _ext.planner.mlp_softmax_into(0, *addresses, 24, 2, 5, 7, False, out.ctypes.data)
    with pytest.raises(ValueError, match="null"):
        _ext.planner.mlp_softmax_into(x.data_ptr(), *addresses, 24, 2, 5, 7, False, 0)
    with pytest.raises(ValueError, match="empty"):
        _ext.planner.mlp_softmax_into(x.data_ptr(), *addresses, 24, 0, 5, 7, False, out.ctypes.data)
