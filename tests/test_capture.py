"""dconv.capture: a PyTorch model's layers into a model input group, checked against torch's own gradients."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

import dconv
from dconv import InputDtypeError, InputError
from dconv.store import open_model_inputs

from _pipeline import rel_err

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-10  # relative error of the norms, float64


@pytest.fixture(autouse=True)
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(before)


def cnn() -> torch.nn.Module:
    """Two convolutions (stride 2 and padding 1; dilation 2) and a linear head, on (m, 3, 8, 8)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(4, 5, kernel_size=3, dilation=2, padding=2, bias=False),
        torch.nn.ReLU(inplace=True),
        torch.nn.Flatten(),
        torch.nn.Linear(5 * 4 * 4, 3),
    )


def train_batches(model, sizes, cap=None, shape=(3, 8, 8), classes=3):
    """Forward and backward passes with a summed loss over batches of ``sizes``; returns the inputs."""
    inputs = []
    for m in sizes:
        x, y = torch.randn(m, *shape), torch.randint(0, classes, (m,))
        F.cross_entropy(model(x), y, reduction="sum").backward()
        inputs.append(x)
    return inputs


def group_grads(model_inputs, name):
    """dconv's dW and db of layer ``name``: the kernel on its group's rows, summed over them."""
    group = model_inputs.open_layer(name)
    hp = group.hparameters
    grads = dconv.conv2d_backward(
        group.dZ[...], group.A_prev[...], group.W[...], stride=hp["stride"], padding=hp["pad"], dilation=hp["dilation"]
    )
    return group, grads


def torch_grads(module):
    """``weight.grad`` and ``bias.grad`` in dconv's layouts: HWIO, (1, 1, in, out) for a linear layer."""
    weight = module.weight.grad
    dW = weight.permute(2, 3, 1, 0) if weight.ndim == 4 else weight.T.reshape(1, 1, *weight.T.shape)
    return dW.numpy(), None if module.bias is None else module.bias.grad.numpy()


def hook_counts(model) -> list[int]:
    return [
        len(hooks) for module in model.modules()
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
    ]


# --------------------------------------------------------------------------- against torch


def test_cnn_gradients_sum_to_torchs(tmp_path):
    model = cnn()
    model.zero_grad()
    path = tmp_path / "model.zarr"
    with dconv.capture(model, path, chunk=4) as cap:
        images = train_batches(model, (5, 3, 7, 2), cap)
        assert cap.layers == ("0", "2", "5") and cap.m == 17
    model_inputs = open_model_inputs(path)
    assert [(layer.name, layer.kind) for layer in model_inputs.layers] == [
        ("0", "conv2d"), ("2", "conv2d"), ("5", "linear")
    ]
    assert (model_inputs.m, model_inputs.sample_index) == (17, "appended")
    for name in model_inputs.names:
        group, grads = group_grads(model_inputs, name)
        dW, db = torch_grads(model.get_submodule(name))
        assert rel_err(grads.dW, dW) <= TOL, name
        np.testing.assert_array_equal(group.W[...], _weight_hwio(model.get_submodule(name)))
        if db is None:
            assert group.b is None
        else:
            assert rel_err(grads.db.ravel(), db) <= TOL, name
    first = model_inputs.open_layer("0")
    np.testing.assert_array_equal(first.A_prev[...], torch.cat(images).permute(0, 2, 3, 1).numpy())
    assert first.hparameters == {"stride": 2, "pad": 1, "dilation": 1}
    assert model_inputs.open_layer("2").hparameters == {"stride": 1, "pad": 2, "dilation": 2}
    assert model_inputs.open_layer("5").A_prev.shape == (17, 1, 1, 80)


def _weight_hwio(module):
    weight = module.weight.detach()
    return (weight.permute(2, 3, 1, 0) if weight.ndim == 4 else weight.T.reshape(1, 1, *weight.T.shape)).numpy()


class Tokens(torch.nn.Module):
    """Linear layers applied to (m, T, in) tokens, then a mean over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 6)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.embed(x)).mean(dim=1))


def test_linear_layer_on_token_inputs(tmp_path):
    model = Tokens()
    with dconv.capture(model, tmp_path / "m.zarr", layers=["embed", "head"]) as cap:
        for m in (3, 5):
            cap.index(torch.arange(m) + 10 * m)
            x, y = torch.randn(m, 7, 4), torch.randint(0, 2, (m,))
            F.cross_entropy(model(x), y, reduction="sum").backward()
    model_inputs = open_model_inputs(tmp_path / "m.zarr")
    assert model_inputs.sample_index == "given"
    np.testing.assert_array_equal(model_inputs.read_sample_index(), [30, 31, 32, 50, 51, 52, 53, 54])
    group, grads = group_grads(model_inputs, "embed")
    assert group.A_prev.shape == (8, 1, 7, 4) and group.dZ.shape == (8, 1, 7, 6)
    for name in ("embed", "head"):
        _, grads = group_grads(model_inputs, name)
        dW, db = torch_grads(model.get_submodule(name))
        assert rel_err(grads.dW, dW) <= TOL and rel_err(grads.db.ravel(), db) <= TOL


def test_passes_without_a_backward_write_nothing(tmp_path):
    model = cnn()
    with dconv.capture(model, tmp_path / "m.zarr", layers="2") as cap:
        train_batches(model, (4,))
        with torch.no_grad():
            model(torch.randn(6, 3, 8, 8))
        model(torch.randn(5, 3, 8, 8))  # a graph never backpropagated
        train_batches(model, (2,))
        assert cap.m == 6
    assert open_model_inputs(tmp_path / "m.zarr").m == 6


def test_two_forward_passes_then_one_backward_append_two_batches(tmp_path):
    model = cnn()
    model.zero_grad()
    with dconv.capture(model, tmp_path / "m.zarr") as cap:
        x1, x2 = torch.randn(3, 3, 8, 8), torch.randn(4, 3, 8, 8)
        (model(x1).square().sum() + model(x2).square().sum()).backward()
    assert cap.m == 7
    model_inputs = open_model_inputs(tmp_path / "m.zarr")
    for name in model_inputs.names:
        _, grads = group_grads(model_inputs, name)
        assert rel_err(grads.dW, torch_grads(model.get_submodule(name))[0]) <= TOL


def test_hooks_are_removed_also_after_an_exception(tmp_path):
    model = cnn()
    before = hook_counts(model)
    with pytest.raises(KeyError, match="the caller's"):
        with dconv.capture(model, tmp_path / "m.zarr") as cap:
            assert hook_counts(model) != before
            train_batches(model, (3,))
            raise KeyError("the caller's")
    assert hook_counts(model) == before
    assert open_model_inputs(tmp_path / "m.zarr").m == 3  # the batch before the error is kept
    with pytest.raises(InputError, match="was already used"):
        with cap:
            pass
    assert hook_counts(model) == before


# --------------------------------------------------------------------------- refused when made


class Zoo(torch.nn.Module):
    def __init__(self, **conv) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, **conv), torch.nn.ReLU())
        self.up = torch.nn.ConvTranspose2d(4, 4, 2)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.up(self.features(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "model, layers, error, message",
    [
        (Zoo, ["features.0", "fc", "features.O"], InputError,
         r"^layers: 'features.O' is not a module of the model \(did you mean 'features.0'\?\); its nn.Conv2d and "
         r"nn.Linear modules are 'features.0', 'fc'.$"),
        (Zoo, ["up"], InputError, "^layer 'up' is a ConvTranspose2d: dconv computes ordinary convolutions"),
        (Zoo, ["features.1"], InputError, "^layer 'features.1' is a ReLU; dconv.capture takes nn.Conv2d and nn.Linear"),
        (Zoo, [], InputError, "^layers must name at least one module; got none"),
        (lambda: Zoo(groups=1, padding_mode="reflect", padding=1), None, InputError,
         "^layer 'features.0': padding_mode must be 'zeros'"),
        (lambda: torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)), None, InputError,
         "^layer '0': groups must be 1"),
        (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2).half()), None, InputDtypeError,
         "^layer '0': weight must have dtype float32 or float64; got torch.float16 instead.$"),
        (lambda: torch.nn.Sequential(torch.nn.ReLU()), None, InputError, "^model has no nn.Conv2d or nn.Linear"),
        (lambda: "a model", None, InputError, "^model must be a torch.nn.Module; got str instead"),
    ],
    ids=["unknown", "transposed", "relu", "none", "padding_mode", "groups", "float16", "no_layers", "not_a_module"],
)
def test_refused_when_made(model, layers, error, message, tmp_path):
    model = model()
    before = hook_counts(model) if isinstance(model, torch.nn.Module) else None
    with pytest.raises(error, match=message) as raised:
        dconv.capture(model, tmp_path / "m.zarr", layers=layers)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "m.zarr").exists()
    assert before is None or hook_counts(model) == before


def test_an_existing_path_is_refused_when_made(tmp_path):
    (tmp_path / "m.zarr").mkdir()
    with pytest.raises(InputError, match="already exists; pass overwrite=True"):
        dconv.capture(cnn(), tmp_path / "m.zarr")
    with pytest.raises(InputError, match="is not a dconv model input group"):
        (tmp_path / "m.zarr" / "notes.txt").write_text("mine")
        dconv.capture(cnn(), tmp_path / "m.zarr", overwrite=True)


# --------------------------------------------------------------------------- refused while running


class Shared(torch.nn.Module):
    """One convolution called twice in a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.conv(torch.relu(self.conv(x))).mean(dim=(2, 3)))


class Aux(torch.nn.Module):
    """A head whose output the loss does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3)
        self.aux = torch.nn.Linear(3, 2)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        h = self.conv(x).mean(dim=(2, 3))
        self.aux(h)
        return self.fc(h)


class Flattened(torch.nn.Module):
    """A linear layer applied to x.view(-1, features): its rows are not the batch's samples."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.permute(0, 2, 3, 1).reshape(-1, 2))


def run_and_expect(model, path, message, step, error=InputError):
    """Capture ``model`` while ``step(model, cap)`` runs; ``step`` raises ``error`` matching ``message`` in one line."""
    before = hook_counts(model)
    with pytest.raises(error, match=message) as raised:
        with dconv.capture(model, path) as cap:
            step(model, cap)
    assert "\n" not in str(raised.value)
    assert hook_counts(model) == before
    return raised


def test_a_layer_called_twice_in_one_pass_is_refused(tmp_path):
    run_and_expect(
        Shared(), tmp_path / "m.zarr",
        "^layer 'conv' was called more than once in one forward pass .shared weights.",
        lambda model, cap: model(torch.randn(2, 3, 5, 5)),
    )


def test_weights_changed_between_batches_are_refused(tmp_path):
    def step(model, cap):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for m in (2, 3):
            optimizer.zero_grad()
            train_batches(model, (m,))
            optimizer.step()

    run_and_expect(cnn(), tmp_path / "m.zarr", "^layer '0': its weights changed after the first captured batch", step)
    assert open_model_inputs(tmp_path / "m.zarr").m == 2  # the batch before the step is kept


def test_weights_changed_through_data_are_refused(tmp_path):
    """A change that bypasses the version counter (``.data``) is caught too."""

    def step(model, cap):
        train_batches(model, (2,))
        model[5].bias.data += 1
        train_batches(model, (2,))

    run_and_expect(cnn(), tmp_path / "m.zarr", "^layer '5': its weights changed", step)


def test_a_layer_outside_the_loss_is_refused(tmp_path):
    def step(model, cap):
        train_batches(model, (2, 2), shape=(3, 4, 4), classes=2)

    run_and_expect(Aux(), tmp_path / "m.zarr", "^layer 'aux' got no gradient in the backward pass of a batch", step)
    # at the end of the block too
    run_and_expect(
        Aux(), tmp_path / "n.zarr", "^layer 'aux' got no gradient",
        lambda model, cap: train_batches(model, (2,), shape=(3, 4, 4), classes=2),
    )


def test_a_frozen_layer_among_trained_ones_is_refused(tmp_path):
    model = cnn()
    model[0].requires_grad_(False)
    run_and_expect(
        model, tmp_path / "m.zarr",
        "^layer '0' ran without gradient .its output needs none. while '2' had one",
        lambda model, cap: train_batches(model, (2,)),
    )
    # capturing only the trained layers is fine
    with dconv.capture(model, tmp_path / "n.zarr", layers=["2", "5"]):
        train_batches(model, (2,))


def test_a_layer_called_outside_the_model_is_refused(tmp_path):
    run_and_expect(
        cnn(), tmp_path / "m.zarr", "^layer '0' ran outside a call of the model",
        lambda model, cap: model[0](torch.randn(1, 3, 8, 8)),
    )


def test_rows_that_are_not_the_batchs_samples_are_refused(tmp_path):
    run_and_expect(
        Flattened(), tmp_path / "m.zarr", "^layer 'fc' got 18 samples in a pass whose first captured layer got 2",
        lambda model, cap: model(torch.randn(2, 3, 5, 5)).sum().backward(),
    )


def test_unbatched_input_is_refused(tmp_path):
    run_and_expect(
        cnn(), tmp_path / "m.zarr", r"^layer '0': its input must be a batch \(m, C, H, W\); got \(3, 8, 8\) instead",
        lambda model, cap: model(torch.randn(3, 8, 8)),
    )


def test_index_misuse_is_refused(tmp_path):
    def wrong_length(model, cap):
        cap.index(np.arange(4))
        train_batches(model, (3,))

    run_and_expect(cnn(), tmp_path / "a.zarr", r"^index must have shape \(3,\)", wrong_length)

    def twice(model, cap):
        cap.index(np.arange(3))
        cap.index(np.arange(3))

    run_and_expect(cnn(), tmp_path / "b.zarr", "^index: the next batch's index is already given", twice)

    def some_batches(model, cap):
        cap.index(np.arange(3))
        train_batches(model, (3, 2))

    run_and_expect(cnn(), tmp_path / "c.zarr", "^index must be given with every batch", some_batches)


def test_no_batch_is_refused_at_the_end(tmp_path):
    def evaluate(model, cap):
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8))

    run_and_expect(cnn(), tmp_path / "m.zarr", "got no batch: run at least one forward and backward pass", evaluate)
    assert not (tmp_path / "m.zarr").exists()


# --------------------------------------------------------------------------- what is not per-sample


def bn_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)
    )


def test_batch_norm_in_training_mode_warns_once(tmp_path):
    model = bn_model()
    with pytest.warns(UserWarning, match="^dconv.capture: BatchNorm module '1' is in training mode") as record:
        with dconv.capture(model, tmp_path / "m.zarr"):
            train_batches(model, (2, 3))
    assert len([w for w in record if "BatchNorm" in str(w.message)]) == 1
    assert "\n" not in str(record[0].message)


def test_batch_norm_in_eval_mode_does_not_warn(tmp_path):
    model = bn_model().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dconv.capture(model, tmp_path / "m.zarr"):
            train_batches(model, (2,))


# --------------------------------------------------------------------------- without torch


def test_import_dconv_never_imports_torch_and_capture_says_how_to_get_it():
    code = (
        "import sys\n"
        "import dconv\n"
        "assert 'torch' not in sys.modules, 'import dconv imported torch'\n"
        "sys.modules['torch'] = None  # as if it were not installed\n"
        "try:\n"
        "    dconv.capture(object(), 'never.zarr')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "dconv.capture needs PyTorch, which is not installed: pip install torch\n"
