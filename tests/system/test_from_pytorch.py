"""Optional: docs/FROM_PYTORCH.md, run as written, against PyTorch's own gradients. Skipped without torch.

The Python blocks of the page are executed in order in one namespace, so the page and
this test cannot drift: the whole-model example's ``cnn`` and ``model.zarr``, the recipe
(``conv_writer``, ``capture``) and the example's ``conv``, ``result``, ``dW``, ``db`` and
``rel_err`` are the page's.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import dconv
from dconv.cli import build_parser
from dconv.store import open_inputs, store_exists

from _pipeline import rel_err

torch = pytest.importorskip("torch")

DOC = Path(__file__).resolve().parents[2] / "docs" / "FROM_PYTORCH.md"

# Relative error of the norms, dconv against torch's accumulated grads; the page states them.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def doc_blocks(language: str) -> list[str]:
    """The page's fenced code blocks in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def run_blocks(blocks: list[str]) -> dict:
    """Execute ``blocks`` in order in one fresh namespace and return it."""
    namespace: dict = {"__name__": "from_pytorch_doc"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} python block {index}", "exec"), namespace)
    return namespace


@pytest.fixture
def default_dtype(request):
    """torch's default dtype set to the parameter, then restored."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)


@pytest.fixture
def recipe():
    """The page's recipe block alone: ``to_nhwc``, ``conv_writer``, ``capture``."""
    (block,) = [block for block in doc_blocks("python") if "def capture(" in block]
    return run_blocks([block])


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.float32], indirect=True, ids=["float64", "float32"])
def test_page_runs_and_matches_torch(default_dtype, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = run_blocks(doc_blocks("python"))
    inputs = open_inputs("activations.zarr")
    assert inputs.A_prev.shape == (104, 16, 16, 8) and inputs.dZ.shape == (104, 8, 8, 16)
    assert inputs.W.shape == (3, 3, 8, 16) and inputs.b.shape == (1, 1, 1, 16)
    assert inputs.hparameters == {"stride": 2, "pad": 1, "dilation": 1}
    dtype = np.dtype(str(default_dtype).removeprefix("torch."))
    result, tol = page["result"], TOL[default_dtype]
    assert result.dW.dtype == result.db.dtype == inputs.A_prev.dtype == dtype
    assert page["rel_err"](result.dW, page["dW"]) <= tol
    assert page["rel_err"](result.db.ravel(), page["db"]) <= tol
    # the stored W is the layer's weight, HWIO
    np.testing.assert_array_equal(inputs.W[...], page["conv"].weight.detach().permute(2, 3, 1, 0).numpy())
    # the whole-model section: every layer of the page's `cnn`, its rows summing to torch's grads
    model = dconv.open_model_inputs("model.zarr")
    assert (model.names, model.m, model.sample_index) == (("0", "2", "6"), 100, "given")
    assert sorted(model.read_sample_index()) == list(range(100)) and page["convolutions"].names == ("0", "2")
    for name in model.names:
        group, module = model.open_layer(name), page["cnn"].get_submodule(name)
        hp = group.hparameters
        grads = dconv.conv2d_backward(
            group.dZ[...], group.A_prev[...], group.W[...], stride=hp["stride"], padding=hp["pad"],
            dilation=hp["dilation"],
        )
        weight = module.weight.grad
        dW = weight.permute(2, 3, 1, 0) if weight.ndim == 4 else weight.T.reshape(1, 1, *weight.T.shape)
        assert rel_err(grads.dW, dW) <= tol and rel_err(grads.db.ravel(), module.bias.grad) <= tol, name


def test_page_shell_commands_parse():
    """The page's ``dconv`` command lines are valid for the CLI (the job itself runs above, in Python)."""
    lines = [line for block in doc_blocks("bash") for line in block.splitlines() if line.startswith("dconv ")]
    assert lines
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert args.command == "backward"


LAYERS = {
    # kernel, stride, padding, dilation, bias, the loss's reduction
    "rect_stride_dilation_mean": dict(
        kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), reduction="mean"
    ),
    "same_even_kernel_no_bias": dict(kernel_size=4, padding="same", bias=False),
    "valid_dilated": dict(kernel_size=3, stride=2, padding="valid", dilation=2),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("default_dtype", [torch.float64], indirect=True, ids=["float64"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_recipe_layer_forms(layer, default_dtype, recipe, tmp_path):
    """Hyperparameter forms and a mean loss; dA_prev against the input's gradient checks W's layout too."""
    options = dict(LAYERS[layer])
    reduction = options.pop("reduction", "sum")
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 6, **options)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(inplace=True),
        conv, torch.nn.ReLU(inplace=True),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 5),
    )
    input_grads = []

    def keep_input_grad(module, args, output):
        args[0].register_hook(input_grads.append)

    path = tmp_path / "in.zarr"
    with recipe["conv_writer"](path, conv, chunk=8) as writer:
        handles = [recipe["capture"](conv, writer), conv.register_forward_hook(keep_input_grad)]
        for m in (9, 4, 13):
            images, labels = torch.randn(m, 3, 11, 10), torch.randint(0, 5, (m,))
            torch.nn.functional.cross_entropy(model(images), labels, reduction=reduction).backward()
        for handle in handles:
            handle.remove()
    result = dconv.backward_job(path, tmp_path / "out.zarr", batch_chunk=8, scheduler="threads")
    assert result.n_chunks == 4
    assert rel_err(result.dW, conv.weight.grad.permute(2, 3, 1, 0)) <= TOL[torch.float64]
    if conv.bias is not None:
        assert rel_err(result.db.ravel(), conv.bias.grad) <= TOL[torch.float64]
    dA_prev = dconv.open_result(str(tmp_path / "out.zarr"))["dA_prev"][...]
    want = torch.cat(input_grads).permute(0, 2, 3, 1)
    assert rel_err(dA_prev, want) <= TOL[torch.float64]


@pytest.mark.parametrize("default_dtype", [torch.float64], indirect=True, ids=["float64"])
def test_recipe_first_layer(default_dtype, recipe, tmp_path):
    """The hook fires on a layer whose input needs no gradient (images straight from the data)."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 2))
    conv, path = model[0], tmp_path / "in.zarr"
    with recipe["conv_writer"](path, conv) as writer:
        handle = recipe["capture"](conv, writer)
        for m in (5, 2):
            model(torch.randn(m, 3, 6, 6)).square().sum().backward()
        with torch.no_grad():
            model(torch.randn(3, 3, 6, 6))  # no backward pass: nothing appended
        handle.remove()
    assert writer.m == 7
    result = dconv.backward_job(path, tmp_path / "out.zarr", scheduler="threads")
    assert rel_err(result.dW, conv.weight.grad.permute(2, 3, 1, 0)) <= TOL[torch.float64]
    assert rel_err(result.db.ravel(), conv.bias.grad) <= TOL[torch.float64]


@pytest.mark.parametrize(
    "layer, word",
    [
        (dict(in_channels=4, out_channels=4, kernel_size=3, groups=2), "groups"),
        (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"), "padding_mode"),
    ],
)
def test_recipe_refuses_unsupported_layers(layer, word, recipe, tmp_path):
    path = tmp_path / "in.zarr"
    with pytest.raises(dconv.InputError, match=f"^{word} must be"):
        recipe["conv_writer"](path, torch.nn.Conv2d(**layer))
    assert not store_exists(str(path))
