"""What predictors do per layer per token calls nothing that makes the host wait for a GPU.

On CPU nothing synchronizes, so the calls themselves are watched (a `TorchFunctionMode` sees every torch
function and tensor method): reading device data on the host (`item`, `tolist`, `cpu`, `numpy`, Python
`bool`/`float`/`int` of a tensor), ops whose output size depends on the data (`nonzero`, `unique`,
`bincount`, `masked_select`, indexing with a boolean mask), comparisons answered on the host
(`allclose`, `equal`) and host lists turned into tensors (`torch.tensor`, a host→device copy on CUDA).
tests/test_gpu.py checks the same on a GPU with `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import tiny_mixtral
from m2r2_moe.models import find_moe_layers
from m2r2_moe.predict import AcceleratorAdapters, OraclePredictor, make_predictor

SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero",
           "argwhere", "unique", "unique_consecutive", "bincount", "masked_select", "allclose", "equal", "tensor",
           "as_tensor"}


class SyncWatch(TorchFunctionMode):
    """Records the calls that would synchronize on CUDA."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        boolean_index = name in ("__getitem__", "__setitem__") and _has_bool_tensor(args[1:2])
        if name in SYNCING or boolean_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _has_bool_tensor(items) -> bool:
    for item in items:
        if isinstance(item, torch.Tensor) and item.dtype == torch.bool:
            return True
        if isinstance(item, tuple) and _has_bool_tensor(item):
            return True
    return False


def test_the_watch_sees_the_syncs_it_names():
    x = torch.arange(4)
    with SyncWatch() as watch:
        x.tolist()
        torch.bincount(x)
        bool(x[0] > 1)
        x[x > 1]
    assert watch.calls == ["tolist", "bincount", "__bool__", "__getitem__"]


def _predictor(name, model, adapter, layers):
    if name.startswith("oracle"):
        trace = torch.randint(0, 8, (32, len(layers), 2), generator=torch.Generator().manual_seed(2))
        return OraclePredictor(len(layers), 8, 2, 2, trace, wrap=name == "oracle-wrap")
    adapters = AcceleratorAdapters(len(layers), 64, 2, rank=4, route_features=8)
    return make_predictor(name, model, adapter, layers, 2, adapters=adapters)


@pytest.mark.parametrize("name", ["history", "gate", "gate-reference", "m2r2", "m2r2-reference", "oracle",
                                  "oracle-wrap"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_per_token_predictor_calls_do_not_synchronize(name, tokens):
    model = tiny_mixtral()
    adapter, layers = find_moe_layers(model)
    predictor = _predictor(name.removesuffix("-reference"), model, adapter, layers).to("cpu")
    if name.endswith("-reference"):  # the per-target path, for routers the stacked path does not fit
        predictor.stacked = [None] * len(layers)
    generator = torch.Generator().manual_seed(0)
    residual = torch.randn(tokens, 64, generator=generator)
    chosen = torch.randint(0, 8, (tokens, 2), generator=generator)

    def step():
        for layer in range(len(layers)):
            predictor.predict_stacked(layer, residual, chosen, normed=layers[layer].norm(residual))
            predictor.predict(layer, residual, chosen)
            predictor.observe(layer, chosen)
        if hasattr(predictor, "advance"):
            predictor.advance(tokens)

    with torch.no_grad():
        step()  # first calls: one-time checks (a router's ranking rule) are not per token
        with SyncWatch() as watch:
            step()
    assert watch.calls == [], f"{name}: {watch.calls}"
