"""Capture a PyTorch model's convolution and linear layers into a model input group.

::

    with dconv.capture(model, "model.zarr") as cap:
        for index, images, labels in loader:
            cap.index(index)                      # optional: each sample's index in the dataset
            loss = F.cross_entropy(model(images), labels, reduction="sum")
            loss.backward()

Every ``nn.Conv2d`` and ``nn.Linear`` of the model (or those named in
``layers``) gets a forward hook, which keeps the layer's input (``A_prev``) and
puts a hook on its output tensor; that one gets the gradient of the loss with
respect to the output (``dZ``) during the backward pass. When the backward pass
has delivered every captured layer's ``dZ``, the batch is appended to every
layer at once, through a :class:`~dconv.store.model.ModelWriter`
(:mod:`dconv.store.model` describes the group). NCHW and OIHW become NHWC and
HWIO; a linear layer is a 1x1 convolution.

PyTorch is imported when :func:`capture` is called, never by ``import dconv``.
"""

from __future__ import annotations

import difflib
import functools
import os
import threading
import warnings
from typing import Any, Iterable, Mapping

import numpy as np

from dconv.errors import InputDtypeError, InputError

__all__ = ["Capture", "capture"]

TORCH_NEEDED = "dconv.capture needs PyTorch, which is not installed: pip install torch"


def _torch() -> Any:
    """The ``torch`` module; ImportError in one line saying how to install it."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(TORCH_NEEDED) from e
    return torch


def capture(
    model: Any,
    path: str | os.PathLike,
    layers: str | Iterable[str] | None = None,
    *,
    chunk: int | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Capture:
    """Capture the inputs and output gradients of a PyTorch model's layers, batch by batch, into ``path``.

    Use the result as a context manager and run forward and backward passes
    inside it. Each backward pass appends one batch (the rows of its samples)
    to every captured layer; a forward pass without gradients (under
    ``torch.no_grad()``, or whose graph is never backpropagated) appends
    nothing. Leaving the ``with`` block removes every hook, also on an
    exception (the batches appended before it are kept), and closes the group.

    The loss must be a **sum over the samples** (``reduction="sum"``): then
    row ``i`` of ``dZ`` is sample ``i``'s own gradient and dconv's per-sample
    figures are per-sample. A mean-reduced loss scales every batch's ``dZ`` by
    ``1 / m_k``; a loss that couples the samples of a batch (contrastive
    losses, in-batch negatives) and BatchNorm in training mode (whose batch
    statistics mix samples; a warning says so) give rows that are not
    per-sample gradients, although dconv's summed ``dW`` and ``db`` still equal
    PyTorch's ``weight.grad`` and ``bias.grad``.

    Parameters
    ----------
    model : torch.nn.Module
        The model. Call it (not its submodules) for each batch: a pass is one
        call of ``model``.
    path : str or path
        Local path or fsspec URL of the model input group.
    layers : str or iterable of str, optional
        Module names (``model.named_modules()``: ``"layer1.0.conv1"``) of the
        ``nn.Conv2d`` and ``nn.Linear`` layers to capture. Default: all of them.
    chunk, overwrite, storage_options
        As for :class:`~dconv.store.model.ModelWriter`.

    Returns
    -------
    Capture

    Raises
    ------
    ImportError
        PyTorch is not installed.
    InputError
        ``model`` is not a module, or has no layer to capture; a name in
        ``layers`` is not a module of the model (the message lists the
        candidates), or not an ``nn.Conv2d`` or ``nn.Linear`` (a transposed
        convolution, say); a convolution has ``groups != 1`` or a
        ``padding_mode`` other than ``"zeros"``; ``path`` exists (see ``overwrite``).
        Each message names the layer.
    InputDtypeError
        A layer's weight is not float32 or float64.

    Notes
    -----
    Also refused, when it happens (one line naming the layer): a captured
    layer called twice in one pass (shared weights: one row per sample and
    layer is all a group holds), a layer's weight changed after the first
    captured batch (an optimizer step inside the capture: the group holds one
    ``W``), a layer that runs outside a call of ``model``, a layer whose output
    needs no gradient while the others' do, a layer whose output gets no
    gradient from the loss. The weights are taken at the first captured batch.
    """
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module; got {type(model).__name__} instead.")
    modules = _captured_modules(torch, model, layers)
    params = {name: _check_module(torch, name, module) for name, module in modules.items()}
    from dconv.store.model import check_layer_names, check_model_target

    check_layer_names(modules)
    check_model_target(str(path), overwrite, storage_options)
    options = {"chunk": chunk, "overwrite": overwrite, "storage_options": storage_options}
    return Capture(model, str(path), modules, params, options)


class Capture:
    """A running capture (:func:`capture`): hooks on the model while the ``with`` block runs.

    Attributes
    ----------
    url : str
    layers : tuple of str
        The captured layers' module names, in model order.
    m : int
        Samples appended so far.
    """

    def __init__(
        self, model: Any, url: str, modules: dict[str, Any], params: dict[str, dict | None], options: dict[str, Any]
    ) -> None:
        self.url = url
        self.layers = tuple(modules)
        self._model, self._modules, self._params, self._options = model, modules, params, options
        self._writer: Any = None  # the ModelWriter, made at the first complete batch
        self._handles: list[Any] = []
        self._pass: _Pass | None = None  # the forward pass running now
        self._depth = 0  # calls of the model inside one another
        self._partial: list[_Pass] = []  # passes whose backward delivered some layers' dZ but not all
        self._next_index: np.ndarray | None = None
        self._weights: dict[str, tuple[Any, Any]] = {}  # each layer's (weight, bias) at the first captured batch
        self._warned = False
        self._state = "new"
        self._lock = threading.Lock()  # autograd may run tensor hooks on its device threads

    @property
    def m(self) -> int:
        """Samples appended so far."""
        return 0 if self._writer is None else self._writer.m

    def index(self, index: Any) -> None:
        """Give the sample index of the next captured batch: call it before the batch's forward pass.

        Parameters
        ----------
        index : array or tensor of int, shape (m_k,)
            Each sample's index (a dataset's). Give one before every batch, or
            never: then the rows are numbered as appended. Stored as
            ``sample_index`` (:meth:`dconv.store.ModelInputs.read_sample_index`).

        Raises
        ------
        InputError
            An index is already waiting for its forward pass. Its dtype and
            length are checked at that pass.
        """
        if self._next_index is not None:
            raise InputError(
                "index: the next batch's index is already given; call index() once before each forward pass."
            )
        if hasattr(index, "detach"):  # a tensor, maybe on a GPU
            index = index.detach().cpu().numpy()
        self._next_index = np.array(index)

    def __enter__(self) -> Capture:
        if self._state != "new":
            raise InputError(f"capture of {self.url!r} was already used; call dconv.capture again.")
        self._state = "running"
        try:
            self._handles.append(self._model.register_forward_pre_hook(self._model_starts))
            self._handles.append(self._model.register_forward_hook(self._model_ends, always_call=True))
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(functools.partial(self._layer_ran, name)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self._remove_hooks()
        self._state = "closed"
        if exc_type is not None:
            if self._writer is not None:
                self._writer.__exit__(exc_type, exc, traceback)  # keeps the batches appended before
            return
        problem = self._unfinished()
        if self._writer is not None:
            self._writer.close()
        if problem:
            raise InputError(problem)
        if self._writer is None:
            raise InputError(
                f"capture of {self.url!r} got no batch: run at least one forward and backward pass, with "
                "gradients, inside the with block. Nothing was written."
            )

    def __repr__(self) -> str:
        return f"Capture({self.url!r}, {len(self.layers)} layers, m={self.m}, {self._state})"

    # ----------------------------------------------------------------------- hooks

    def _model_starts(self, model: Any, args: Any) -> None:
        """Forward pre-hook of the model: a new pass, unless the model is calling itself."""
        self._depth += 1
        if self._depth > 1:
            return
        problem = self._unfinished()
        if problem:
            raise InputError(problem)
        self._pass = _Pass()

    def _model_ends(self, model: Any, args: Any, output: Any) -> None:
        """Forward hook of the model (also run when the forward raised, with ``output`` None)."""
        self._depth -= 1
        if self._depth > 0:
            return
        current, self._pass = self._pass, None
        if current is None or not current.inputs or output is None:
            return
        missing = [name for name in self.layers if name not in current.inputs]
        if missing:
            current.dropped = True
            without = [name for name in missing if name in current.called]
            reason = (
                f"ran without gradient (its output needs none) while {next(iter(current.inputs))!r} had one"
                if without else "was not called in this forward pass"
            )
            raise InputError(
                f"layer {(without or missing)[0]!r} {reason}; every captured layer must run, with gradient, "
                "in every pass: capture only those with layers=[...]."
            )

    def _layer_ran(self, name: str, module: Any, args: Any, output: Any) -> None:
        """Forward hook of a captured layer: keep its input, and hook its output for ``dZ``."""
        current = self._pass
        if current is None:
            raise InputError(
                f"layer {name!r} ran outside a call of the model given to dconv.capture; "
                "call the model itself for each batch."
            )
        if name in current.called:
            raise InputError(
                f"layer {name!r} was called more than once in one forward pass (shared weights); a model input "
                "group holds one row per sample and layer: leave it out of layers=[...]."
            )
        current.called.add(name)
        if not getattr(output, "requires_grad", False):  # under torch.no_grad(), or frozen up to here
            return
        A_prev = args[0] if args else None
        _check_input(name, self._params[name] is None, A_prev)
        if not current.inputs:
            self._batch_starts(current, A_prev.shape[0])
        elif A_prev.shape[0] != current.m:
            raise InputError(
                f"layer {name!r} got {A_prev.shape[0]} samples in a pass whose first captured layer got "
                f"{current.m}; every layer's rows must be the batch's samples (not, e.g., x.view(-1, features))."
            )
        self._check_weights(name, module)
        current.inputs[name] = (A_prev.detach(), A_prev._version)
        output.register_hook(functools.partial(self._gradient, current, name))

    def _gradient(self, current: _Pass, name: str, dZ: Any) -> None:
        """Tensor hook on a layer's output: its ``dZ``; the batch is appended when every layer's has come."""
        with self._lock:
            if current.dropped:
                return
            current.grads[name] = (dZ, dZ._version)  # dZ itself, not a view: autograd must not reuse its memory
            if len(current.grads) < len(current.inputs):
                if current not in self._partial:
                    self._partial.append(current)
                return
            if current in self._partial:
                self._partial.remove(current)
            grads, current.grads = current.grads, {}  # a graph backpropagated again appends its batch again
            self._append(current, grads)

    # ----------------------------------------------------------------------- batches

    def _batch_starts(self, current: _Pass, m: int) -> None:
        """The first captured layer of a pass with gradients ran: the batch's m, index, and a BatchNorm warning."""
        current.m = m
        if self._next_index is not None:
            from dconv.store.model import parse_index

            index, self._next_index = self._next_index, None
            current.index = parse_index(index, m)
        if not self._warned:
            self._warned = _warn_batch_norm(_torch(), self._model)

    def _check_weights(self, name: str, module: Any) -> None:
        """Keep the layer's weights at the first captured batch; refuse them changed once a batch is written."""
        torch = _torch()
        now = (module.weight.detach(), None if module.bias is None else module.bias.detach())
        kept = self._weights.get(name)
        same = kept is not None and all(
            (a is None and b is None) or (a is not None and b is not None and a.dtype == b.dtype and torch.equal(a, b))
            for a, b in zip(kept, now)
        )
        if same:
            return
        if kept is not None and self._writer is not None:
            raise InputError(
                f"layer {name!r}: its weights changed after the first captured batch (an optimizer step inside the "
                "capture?); a model input group holds one W per layer: step the optimizer outside the with block."
            )
        self._weights[name] = tuple(None if t is None else t.clone() for t in now)

    def _append(self, current: _Pass, grads: dict[str, tuple[Any, int]]) -> None:
        """Append the pass's batch: every layer's (A_prev, dZ) as NumPy, in its group's layout."""
        batch = {}
        for name in self.layers:
            (A_prev, a_version), (dZ, z_version) = current.inputs[name], grads[name]
            if A_prev._version != a_version or dZ._version != z_version:
                raise InputError(
                    f"layer {name!r}: its input or output gradient was modified in place before the batch was "
                    "appended; clone it before modifying it in place."
                )
            conv = self._params[name] is not None
            batch[name] = (_numpy(A_prev, conv), _numpy(dZ, conv))
        if self._writer is None:
            self._writer = self._make_writer()
        self._writer.append(batch, index=current.index)

    def _make_writer(self) -> Any:
        from dconv.store.model import LayerSpec, ModelWriter

        specs = {}
        for name in self.layers:
            weight, bias = (None if t is None else t.cpu().numpy() for t in self._weights[name])
            if self._params[name] is None:  # nn.Linear: weight (out, in)
                specs[name] = LayerSpec.linear(weight.T, bias)
            else:  # nn.Conv2d: weight OIHW
                specs[name] = LayerSpec.conv2d(weight.transpose(2, 3, 1, 0), bias, **self._params[name])
        return ModelWriter(self.url, specs, writer="capture", **self._options)

    def _unfinished(self) -> str | None:
        """What is wrong with a pass whose backward delivered some layers' ``dZ`` but not all, if any."""
        if not self._partial:
            return None
        current = self._partial[0]
        missing = [name for name in self.layers if name not in current.grads]
        self._partial = []
        return (
            f"layer {missing[0]!r} got no gradient in the backward pass of a batch whose other layers did (its "
            "output does not reach the loss); that batch was not written: capture only layers on the loss's path "
            "with layers=[...]."
        )

    def _remove_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._pass, self._depth = None, 0


class _Pass:
    """One forward pass of the model: the captured layers' inputs, then their output gradients."""

    __slots__ = ("called", "inputs", "grads", "m", "index", "dropped")

    def __init__(self) -> None:
        self.called: set[str] = set()
        self.inputs: dict[str, tuple[Any, int]] = {}  # name -> (A_prev, its version when the layer ran)
        self.grads: dict[str, tuple[Any, int]] = {}  # name -> (dZ, its version)
        self.m = 0
        self.index: np.ndarray | None = None
        self.dropped = False


# --------------------------------------------------------------------------- modules


def _captured_modules(torch: Any, model: Any, layers: str | Iterable[str] | None) -> dict[str, Any]:
    """The modules to capture, by name, in model order."""
    named = dict(model.named_modules())
    kinds = (torch.nn.Conv2d, torch.nn.Linear)
    candidates = [name for name, module in named.items() if isinstance(module, kinds)]
    if layers is None:
        if not candidates:
            raise InputError(
                f"model has no nn.Conv2d or nn.Linear module to capture; its modules are {_listed(named)}."
            )
        return {name: named[name] for name in candidates}
    wanted = [layers] if isinstance(layers, str) else list(layers)
    if not wanted:
        raise InputError(f"layers must name at least one module; got none. Candidates: {_listed(candidates)}.")
    for name in wanted:
        if name not in named:
            close = difflib.get_close_matches(str(name), candidates, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(
                f"layers: {name!r} is not a module of the model{hint}; its nn.Conv2d and nn.Linear modules are "
                f"{_listed(candidates)}."
            )
    return {name: module for name, module in named.items() if name in wanted}


def _check_module(torch: Any, name: str, module: Any) -> dict[str, Any] | None:
    """A captured module's conv keywords (None for a linear layer), after checking it is one dconv computes."""
    if isinstance(module, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
        raise InputError(
            f"layer {name!r} is a {type(module).__name__}: dconv computes ordinary convolutions; "
            "capture nn.Conv2d and nn.Linear layers."
        )
    if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
        raise InputError(f"layer {name!r} is a {type(module).__name__}; dconv.capture takes nn.Conv2d and nn.Linear.")
    if isinstance(module.weight, torch.nn.parameter.UninitializedParameter):
        raise InputError(f"layer {name!r} has uninitialized (lazy) parameters; run one forward pass first.")
    if module.weight.dtype not in (torch.float32, torch.float64):
        raise InputDtypeError(
            f"layer {name!r}: weight must have dtype float32 or float64; got {module.weight.dtype} instead."
        )
    if isinstance(module, torch.nn.Linear):
        return None
    from dconv.store.writer import torch_conv_params

    try:
        return torch_conv_params(
            module.stride, module.padding, module.dilation, groups=module.groups, padding_mode=module.padding_mode
        )
    except InputError as e:
        raise InputError(f"layer {name!r}: {e}") from e


def _check_input(name: str, linear: bool, A_prev: Any) -> None:
    """A captured layer's input: a batched tensor, (m, C, H, W) for a convolution, (m, ..., in) for a linear."""
    ndim = getattr(A_prev, "ndim", None)
    if ndim is None or (ndim < 2 if linear else ndim != 4):
        form = "(m, ..., in_features)" if linear else "(m, C, H, W)"
        shape = tuple(A_prev.shape) if ndim is not None else type(A_prev).__name__
        raise InputError(f"layer {name!r}: its input must be a batch {form}; got {shape} instead.")


def _numpy(tensor: Any, nchw: bool) -> np.ndarray:
    """A tensor as NumPy, (m, C, H, W) -> (m, H, W, C) if ``nchw``: a view if it is on the CPU (the writer copies)."""
    tensor = tensor.detach().cpu()
    return (tensor.permute(0, 2, 3, 1) if nchw else tensor).numpy()


def _warn_batch_norm(torch: Any, model: Any) -> bool:
    """Warn (once) if a BatchNorm module is in training mode; True if it warned."""
    base = getattr(torch.nn.modules.batchnorm, "_BatchNorm", None) or (
        torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm
    )
    for name, module in model.named_modules():
        if isinstance(module, base) and module.training:
            warnings.warn(
                f"dconv.capture: BatchNorm module {name!r} is in training mode; its batch statistics mix the samples "
                "of a batch, so the captured rows are not per-sample gradients (their sums still are PyTorch's): "
                "call model.eval() to capture per-sample gradients.",
                UserWarning,
                stacklevel=2,
            )
            return True
    return False


def _listed(names: Iterable[str], limit: int = 12) -> str:
    names = [repr(name) for name in names]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "") or "none"
