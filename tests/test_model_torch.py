"""A model job on a PyTorch CNN captured with ``dconv.capture``, against PyTorch (optional: skips without torch).

float64 throughout: every layer's dW and db against ``weight.grad`` and ``bias.grad``, the first layer's
dA_prev against the input's gradient, and the model's per-sample norms and figures against
``torch.func`` per-sample gradients over every parameter, to 1e-10 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import zarr

import dconv
from dconv.statistics import noise_figures

torch = pytest.importorskip("torch")

M, BATCH = 48, 20  # uneven batches: 20, 20, 8


class Net(torch.nn.Module):
    """Conv (stride 2, padding 1) -> conv (dilation 2, padding 2) -> linear over positions (m, T, in) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, dilation=2, padding=2)
        self.mix = torch.nn.Linear(6, 5)  # on (m, T, 6): the pixels as T positions
        self.head = torch.nn.Linear(5, 3, bias=False)

    def forward(self, x):
        y = torch.tanh(self.conv2(torch.relu(self.conv1(x))))   # (m, 6, 5, 5)
        tokens = y.flatten(2).transpose(1, 2)                      # (m, 25, 6)
        return self.head(torch.tanh(self.mix(tokens)).mean(dim=1))


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(M, 3, 10, 10, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(M) < 0.2).long()   # mostly class 0: the samples share a mean gradient (a defined noise scale)
    path = tmp_path_factory.mktemp("torch-model") / "model.zarr"
    with dconv.capture(net, str(path)):
        for start in range(0, M, BATCH):
            out = net(x[start : start + BATCH])
            torch.nn.functional.cross_entropy(out, y[start : start + BATCH], reduction="sum").backward()
    return net, x, y, str(path)


@pytest.fixture(scope="module")
def job(captured, tmp_path_factory, client):
    _, _, _, path = captured
    out = tmp_path_factory.mktemp("torch-out") / "out.zarr"
    return out, dconv.backward_job(path, out, batch_chunk=16, stats=True, client=client)


def rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-300))


def test_every_layer_matches_pytorch(captured, job):
    net, x, _, _ = captured
    out, result = job
    assert list(result.layers) == ["conv1", "conv2", "mix", "head"]
    for name in result.layers:
        module = getattr(net, name)
        dW = np.asarray(zarr.open_group(str(out / "layers" / name))["dW"][...])
        weight = module.weight.grad.numpy()
        expected = weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T.reshape(1, 1, *weight.T.shape)
        assert rel(dW, expected) < 1e-10, name
        if module.bias is not None:
            db = np.asarray(zarr.open_group(str(out / "layers" / name))["db"][...]).ravel()
            assert rel(db, module.bias.grad.numpy()) < 1e-10, name
    dA_prev = np.asarray(zarr.open_group(str(out / "layers" / "conv1"))["dA_prev"][...])
    assert rel(dA_prev, x.grad.numpy().transpose(0, 2, 3, 1)) < 1e-10


def test_the_model_statistics_match_torch_func(captured, job):
    from torch.func import functional_call, grad, vmap

    net, x, y, _ = captured
    out, result = job
    params = {name: p.detach() for name, p in net.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (xi[None],)), yi[None], reduction="sum")

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.detach(), y)
    norms = sum((g.reshape(M, -1) ** 2).sum(dim=1) for g in per_sample.values()).numpy()
    S2 = float(sum((g.sum(dim=0) ** 2).sum() for g in per_sample.values()))
    expected = noise_figures(S2, math.fsum(norms.tolist()), M)
    assert expected["noise_scale"] is not None

    assert rel(zarr.open_group(str(out))["stats/sample_grad_norm2"][...], norms) < 1e-10
    for key in ("sum_sample_norm2", "grad_sum_norm2", "grad_norm2", "trace_cov", "noise_scale"):
        assert result.stats[key] == pytest.approx(expected[key], rel=1e-10), key
    assert result.stats["top_samples"]["index"] == np.argsort(-norms, kind="stable")[:10].tolist()
