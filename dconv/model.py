"""Whole-model jobs: every layer of a model input group in one job, on one cluster, in one graph.

A model input group (:mod:`dconv.store.model`) holds one input group per conv
or linear layer, with the same samples in the same order. :func:`plan_model`
plans each selected layer as a single-layer job would be planned
(:func:`dconv.plan.plan_job`, its output at ``OUT/layers/<name>``) and the model
output around them (:class:`dconv.store.model_output.ModelOutput`);
:func:`dconv.job.run_job` runs the layers' reduction trees together
(:func:`dconv.waves.compute_graphs_in_waves`), so each layer's output is
bitwise that of its own job, and with ``stats`` adds the layers' per-sample
norms and figures into the model's (:func:`dconv.store.model_output.model_figures`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Mapping

from dask.utils import format_bytes

from dconv.errors import InputError
from dconv.options import JobOptions
from dconv.plan import JobPlan, _absolute_paths, _versions, check_resumable, identity_differences, plan_job
from dconv.report import count
from dconv.simd import ENV_VAR as SIMD_ENV_VAR
from dconv.simd import parse_word
from dconv.sizing import WorkerMemory
from dconv.store import absolute_location, check_unheld, format_levels, public_location
from dconv.store.model import ModelInputs, ModelLayer, is_model_group, open_model_inputs
from dconv.store.model_output import ModelOutput

__all__ = ["ModelPlan", "ModelResult", "plan_model", "is_model_group"]


@dataclass(frozen=True)
class ModelPlan:
    """A validated model job: one :class:`~dconv.plan.JobPlan` per layer, nothing written yet.

    Attributes
    ----------
    options : JobOptions
        The job's options, ``layers`` being the layers selected (None: all); each
        layer's plan has the same options, but ``layers``.
    layers : tuple of ModelLayer
        The layers run, in model order.
    plans : tuple of JobPlan
        One per layer, in the same order; layer ``name``'s output is ``OUT/layers/<name>``.
    out : ModelOutput
        The model output.
    input_location : str
        The model input group, without credentials.
    m : int
        Samples, the same in every layer.
    sample_index : str
        ``"given"``: the input's ``sample_index`` array maps row ``i`` to the user's sample;
        ``"appended"``: row ``i`` is the ``i``-th sample appended.
    """

    options: JobOptions
    layers: tuple[ModelLayer, ...]
    plans: tuple[JobPlan, ...]
    out: ModelOutput
    input_location: str
    m: int
    sample_index: str = "appended"

    @property
    def simd(self) -> str:
        return self.options.simd

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def n_chunks(self) -> int:
        """Chunk tasks of every layer together."""
        return sum(plan.n_chunks for plan in self.plans)

    def done_chunks(self) -> int:
        """Chunks of every layer that are done (their leaf records, or a complete layer)."""
        return sum(plan.done_chunks() for plan in self.plans)

    def identity(self) -> dict[str, Any]:
        """What must match for ``resume`` to continue this model output (each layer checks its own too)."""
        return {
            "input": self.input_location,
            "m": self.m,
            "model_layers": [{"name": layer.name, "kind": layer.kind} for layer in self.layers],
            **self.options.identity(),
        }

    def resume_differences(self, stored: Mapping[str, Any]) -> list[str]:
        """How this job differs from the one that wrote the root provenance ``stored``."""
        return identity_differences(self.identity(), stored, ("input", "m", "model_layers"))

    def check_resumable(self, stored: Mapping[str, Any]) -> None:
        """Raises InputError naming what differs if another job made the model output to resume."""
        check_resumable(self.out.location, self.resume_differences(stored))

    def task_memory(self) -> int:
        """Bytes the largest task of any layer holds at its peak."""
        return max(plan.task_memory() for plan in self.plans)

    def worker_memory(self) -> WorkerMemory:
        """The memory limit a worker of one thread needs for every layer's tasks: the largest layer's."""
        return max((plan.worker_memory() for plan in self.plans), key=lambda memory: memory.limit)

    def open_output(self, cluster: Mapping[str, Any] | None = None) -> None:
        """Create the model output's root, or mark it running again to resume; the layers open their own.

        Raises
        ------
        InputError
            Another job wrote the output since this one was planned (checked again under the lease).
        """
        self.out.check_target(None, overwrite=self.options.overwrite, resume=self.options.resume)
        stored = self.out.provenance() if self.options.resume else None
        if stored is not None:
            self.check_resumable(stored)
        carried = {**self.options.to_dict("carried"), "cluster": dict(cluster or {})}
        provenance = {
            "layers_run": [{"name": layer.name, "kind": layer.kind, "path": f"layers/{layer.name}"}
                           for layer in self.layers],
            "sample_index": self.sample_index,
            "versions": _versions(),
            "simd": {"requested": self.simd},
            **carried,
        }
        self.out.open(self.identity(), provenance, resume=stored is not None,
                      resumed={**carried, "simd": {"requested": self.simd}})

    def mark_interrupted(self, signal: str) -> None:
        """The root and every layer still running: "interrupted" by ``signal``."""
        for plan in self._running():
            plan.out.mark_interrupted(signal)
        self.out.mark_interrupted(signal)

    def mark_failed(self, error: BaseException) -> None:
        """The root and every layer still running: "failed", with ``error``."""
        for plan in self._running():
            plan.out.mark_failed(error)
        self.out.mark_failed(error)

    def _running(self) -> list[JobPlan]:
        return [plan for plan in self.plans if (plan.out.provenance() or {}).get("status") == "running"]

    def describe(self) -> str:
        """What ``--dry-run`` prints: the model, then each layer's plan, indented."""
        lines = [
            f"model   {self.input_location}: {count(len(self.layers), 'layer')} of m = {self.m} samples "
            f"({', '.join(f'{layer.name} ({layer.kind})' for layer in self.layers)})",
            f"output  {self.out.location}" + (" (resume)" if self.options.resume else "")
            + "; each layer's at layers/<name>"
            + ("; the model's per-sample |g_i|^2 at stats/sample_grad_norm2" if self.options.stats else ""),
        ]
        for layer, plan in zip(self.layers, self.plans):
            lines.append(f"layer {layer.name} ({layer.kind}):")
            lines += ["  " + line for line in plan.describe().splitlines() if not line.startswith("simd")]
        lines.append(f"simd    {SIMD_ENV_VAR}={self.simd}, resolved on each worker")
        return "\n".join(lines)

    def announce(self, n_workers: int, threads_per_worker: int = 1) -> str:
        """The plan in one line, said before the job starts."""
        return (
            f"dconv: model of {count(len(self.layers), 'layer')}, {count(self.n_chunks, 'task')} in all "
            f"(m = {self.m}), at most {format_bytes(self.task_memory())} each; "
            f"{count(n_workers, 'worker')} x {count(threads_per_worker, 'thread')}"
        )

    def warnings(self, n_workers: int, threads_per_worker: int = 1, cores: int | None = None) -> list[str]:
        """Each layer's warnings, naming the layer; the cluster's once. Idle workers are not warned of
        per layer: the layers' tasks run together."""
        found: list[str] = []
        prefix = "dconv: warning: "
        for layer, plan in zip(self.layers, self.plans):
            for line in plan.warnings(n_workers, threads_per_worker, cores):
                if "will sit idle" in line:
                    continue
                text = line.removeprefix(prefix)
                shared = "compete for the cores" in text
                line = prefix + (text if shared else f"layer {layer.name}: {text}")
                if line not in found:
                    found.append(line)
        return found


@dataclass(frozen=True)
class ModelResult:
    """What a finished model job returns.

    Attributes
    ----------
    layers : dict
        Layer name -> its :class:`~dconv.job.JobResult`, in model order.
    out : str
        The model output (without credentials).
    stats : dict or None
        With ``stats``: the model's figures (:func:`dconv.store.model_output.model_figures`):
        the noise scale and its terms over every layer, the top samples, and
        ``layers``, the per-layer table.
    seconds : dict
        Wall time of the run (``total``, ``compute``) and the summed task time of the
        chunks' ``read``, ``kernel`` and ``write`` steps, over every layer.
    already_complete : bool
        Resumed on a model output that was already complete: nothing ran.
    """

    layers: dict
    out: str
    stats: dict | None = None
    seconds: dict = field(default_factory=dict)
    already_complete: bool = False

    @property
    def n_chunks(self) -> int:
        return sum(result.n_chunks for result in self.layers.values())

    @property
    def computed_chunks(self) -> int:
        return sum(result.computed_chunks for result in self.layers.values())

    @property
    def simd(self) -> dict[str, int]:
        levels: dict[str, int] = {}
        for result in self.layers.values():
            for level, n in result.simd.items():
                levels[level] = levels.get(level, 0) + n
        return levels

    def describe(self) -> str:
        """One line: what was written, how long it took, the model's noise scale, the SIMD levels."""
        noise = ""
        if self.stats is not None:
            value = self.stats.get("noise_scale")
            noise = f"; model noise scale {'undefined' if value is None else f'{value:.6g}'}"
        layers = count(len(self.layers), "layer")
        if self.already_complete:
            return (
                f"dconv: {self.out} is already complete, nothing to do ({layers}, {self.n_chunks} chunks)"
                f"{noise}; SIMD {format_levels(self.simd)}"
            )
        return (
            f"dconv: wrote {self.out}: {layers}, {self.computed_chunks} of {self.n_chunks} chunks computed in "
            f"{self.seconds['total']:.2f} s (kernel {self.seconds.get('kernel', 0.0):.2f} s summed over tasks)"
            f"{noise}; SIMD {format_levels(self.simd)}"
        )


def plan_model(
    inputs: str | PathLike | ModelInputs,
    out: str | PathLike,
    options: JobOptions | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    **values: Any,
) -> ModelPlan:
    """Validate a model job without writing anything.

    Parameters
    ----------
    inputs : str, path or ModelInputs
        A model input group (:func:`dconv.store.model.open_model_inputs`).
    out : str or path
        The model output group.
    options : JobOptions, optional
        ``values`` (any :class:`JobOptions` field) replace its fields; ``layers``
        selects layers by name. Every option applies to every layer.
    storage_options : dict, optional
        fsspec options for ``inputs`` and ``out`` (never recorded).

    Raises
    ------
    InputError
        Anything any layer's :func:`dconv.plan.plan_job` refuses (the message names the
        layer), an unknown layer name, or an ``out`` that may not be written.
    """
    given = set(values) | {
        spec.name for spec in JobOptions.recorded() if options is not None and getattr(options, spec.name) != spec.default
    }
    options = _absolute_paths(JobOptions.build(options, **values))
    storage_options = dict(storage_options or {})
    model = inputs if isinstance(inputs, ModelInputs) else open_model_inputs(str(inputs), storage_options)
    if options.layers is not None:  # in model order, as recorded
        unknown = [name for name in options.layers if name not in model.names]
        if unknown:
            raise InputError(
                f"layers must name layers of {model.location!r} ({', '.join(model.names)}); "
                f"got {', '.join(unknown)} instead."
            )
        options = JobOptions.build(options, layers=[layer.name for layer in model.select(options.layers).layers])
    model_out = ModelOutput(absolute_location(out), storage_options)
    stored = model_out.provenance() if options.resume else None
    if stored is not None:  # the output's own options, where none are given
        options = options.resuming(JobOptions.from_dict(stored), public_location(str(out)), given)
    options = JobOptions.build(options, simd=parse_word(options.simd or os.environ.get(SIMD_ENV_VAR)))
    model = model if options.layers is None else model.select(options.layers)
    check_unheld(model_out.url, storage_options)
    model_out.check_target(model.url, overwrite=options.overwrite, resume=options.resume)
    layer_options = dataclasses.replace(options, layers=None)
    position = {name: index for index, name in enumerate(open_model_inputs(model.url, storage_options).names)}
    plans = tuple(
        _plan_layer(layer, position[layer.name], model.layer_url(layer.name), model_out.layer_url(layer.name),
                    layer_options, storage_options)
        for layer in model.layers
    )
    plan = ModelPlan(
        options=options,
        layers=tuple(model.layers),
        plans=plans,
        out=model_out,
        input_location=model.location,
        m=model.m,
        sample_index=model.sample_index,
    )
    if stored is not None:
        plan.check_resumable(stored)
    return plan


def _plan_layer(
    layer: ModelLayer, index: int, inputs: str, out: str, options: JobOptions, storage_options: Mapping[str, Any]
) -> JobPlan:
    """:func:`plan_job` for layer ``index`` of the model; its refusal names the layer."""
    try:
        return plan_job(inputs, out, options, storage_options=storage_options, model_layer=(layer.name, index))
    except InputError as e:
        raise type(e)(f"layer {layer.name}: {e}") from e
