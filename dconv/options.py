"""Frozen, validated option objects, each field declared once.

:class:`JobOptions` says how a backward job computes, :class:`InputRecipe` what
``make-inputs`` writes (and :class:`dconv.cluster.ClusterOptions` where a job
runs). The Python API, the ``dconv`` command line and pipeline specs all build
these objects, and all three read each field's declaration here:

- its default, once;
- its validation (a ``parse`` function that normalises the value or raises
  :class:`~dconv.errors.InputError` naming the field);
- its spec table and the TOML types it accepts;
- its command-line flag and help;
- whether an output records it (``record``): part of the identity a resumed job
  must match, or carried over to a resumed job that does not give it.

What an output records is generated from these declarations (:meth:`Options.to_dict`,
:meth:`Options.from_dict`), and a resume takes from it every option it is not given
(:meth:`JobOptions.resuming`), so the resume command names none of them; its cluster
flags are generated from :class:`~dconv.cluster.ClusterOptions`' declarations
(:meth:`Options.flags`). Adding an option means adding one field here (and, if
tasks need it, passing it to the chunk function). The declaring machinery,
:func:`option` and :class:`Options`, and the parsers are :mod:`dconv.option_fields`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from dconv.errors import InputError
from dconv.option_fields import (
    Options,
    any_string,
    choice,
    flag,
    int_list,
    non_negative,
    option,
    optional,
    padding_text,
    plain_value,
    positive_int,
    positive_number,
    size_in_bytes,
    whole_number,
)
from dconv.params import padding_from_flat, parse_float_dtype, parse_padding, parse_pair
from dconv.simd import ENV_VAR as SIMD_ENV_VAR
from dconv.simd import parse_word

__all__ = ["JobOptions", "InputRecipe", "Options", "option", "SKETCH_KINDS"]

SKETCH_KINDS = ("gaussian", "orthogonal")
"""The projections of ``sketch_kind`` (:mod:`dconv.kernel.sketch`)."""


# --------------------------------------------------------------------------- the job


def sketch_size(value: Any) -> tuple[int, int]:
    """``(k_in, k_out)`` from a pair of whole numbers >= 1, or one for both."""
    pair = value if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in pair):
        raise InputError(f"sketch must be K_IN,K_OUT, two whole numbers >= 1; got {value!r} instead.")
    return int(pair[0]), int(pair[1])


def layer_names(value: Any) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b"]`` as ``("a", "b")``: at least one name, each once."""
    names = value.split(",") if isinstance(value, str) else value
    if (
        not isinstance(names, (list, tuple))
        or not names
        or not all(isinstance(name, str) and name.strip() for name in names)
    ):
        raise InputError(f"layers must be one or more layer names (a,b or a list of strings); got {value!r} instead.")
    names = tuple(name.strip() for name in names)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"layers must name each layer once; got {', '.join(repeated)} more than once instead.")
    return names



@dataclass(frozen=True)
class JobOptions(Options):
    """How a backward job computes. Every field has a default; see :func:`dconv.backward_job`.

    Build one with ``JobOptions(batch_chunk=256)`` or :meth:`build`; values are
    validated and normalised (``max_memory="512MiB"`` becomes bytes, ``stride=2``
    becomes ``(2, 2)``).
    """

    stride: Any = option(
        None,
        help="S or SH,SW (default: the input's hparameters, else 1)",
        parse=optional(lambda v: parse_pair("stride", v, minimum=1)),
        table="conv",
        toml=(int, list),
        cli=int_list,
        record="identity",
        path=("params", "stride"),
    )
    padding: Any = option(
        None,
        help="P, PH,PW, TOP,BOTTOM,LEFT,RIGHT, same or valid (default: the input's hparameters, else 0)",
        parse=optional(lambda v: parse_padding(padding_from_flat(v))),
        table="conv",
        toml=(int, str, list),
        cli=padding_text,
        record="identity",
        path=("params", "padding"),
    )
    dilation: Any = option(
        None,
        help="D or DH,DW (default: the input's hparameters, else 1)",
        parse=optional(lambda v: parse_pair("dilation", v, minimum=1)),
        table="conv",
        toml=(int, list),
        cli=int_list,
        record="identity",
        path=("params", "dilation"),
    )
    layers: tuple[str, ...] | None = option(
        None,
        help="for a model input group: the layers to run, by name, comma-separated (default: every layer)",
        parse=optional(layer_names),
        table="job",
        toml=(list,),
        cli=str,
        metavar="NAME,...",
        record="identity",
    )
    batch_chunk: int | None = option(
        None,
        help="samples per task, used as given; dA_prev is chunked the same way (default: 256, or the most "
        "--max-memory allows; either rounded down to whole input chunks where one fits)",
        parse=optional(whole_number("batch_chunk", 1)),
        table="job",
        toml=(int,),
        cli=int,
        metavar="N",
        record="identity",
    )
    max_memory: int | None = option(
        None,
        help="memory one task may use, e.g. 512MiB or 2GB: picks the largest batch chunk that fits, "
        "or refuses a given one that does not",
        parse=optional(size_in_bytes("max_memory")),
        table="job",
        toml=(int, str),
        cli=str,
        metavar="SIZE",
    )
    split_every: int = option(
        8,
        help="fan-in of the dW/db tree reduction",
        parse=whole_number("split_every", 2),
        table="job",
        toml=(int,),
        cli=int,
        metavar="K",
        record="identity",
    )
    check_finite: bool = option(
        False,
        help="fail on NaN or Inf in the inputs (without it, a job whose dW or db is not finite ends with a warning)",
        parse=flag("check_finite"),
        table="job",
        toml=(bool,),
        record="carried",
    )
    simd: str | None = option(
        None,
        help=f"SIMD level of the compiled loops on every worker: auto, avx512, avx2, neon, baseline or numpy "
        f"(default: {SIMD_ENV_VAR}, else auto)",
        parse=optional(lambda v: parse_word(v, "simd")),
        table="job",
        toml=(str,),
        cli=str,
        metavar="LEVEL",
        record="carried",
        path=("simd", "requested"),
    )
    overwrite: bool = option(
        False,
        help="replace OUT if it is a dconv output (else refused)",
        parse=flag("overwrite"),
        table="output",
        toml=(bool,),
        excludes="resume",
    )
    resume: bool = option(
        False,
        help="continue an interrupted job in OUT",
        parse=flag("resume"),
        table="output",
        toml=(bool,),
        excludes="overwrite",
    )
    dA_prev: bool = option(
        True,
        help="skip the input gradient: write only dW and db (and the statistics with --stats); "
        "the job still reads A_prev and dZ, but skips half the kernel and the dA_prev writes",
        parse=flag("dA_prev"),
        table="job",
        toml=(bool,),
        record="identity",
    )
    stats: bool = option(
        False,
        help="also compute the per-sample gradient statistics: OUT/stats/ holds each sample's |g_i|^2, "
        "sum_i dW_i^2 and sum_i db_i^2, the provenance the gradient noise scale and the top samples",
        parse=flag("stats"),
        table="job",
        toml=(bool,),
        record="identity",
        path=("per_sample_stats",),  # the provenance's "stats" holds the figures
    )
    dot: str | None = option(
        None,
        help="a query group (dconv queries) of n_q gradients of the layer, or of every layer of a model: also "
        "write dots/sample_dot (m, n_q), each sample's exact inner product <g_i, q_j> (float64)",
        parse=optional(any_string("dot")),
        table="job",
        toml=(str,),
        cli=str,
        metavar="QUERIES",
        record="identity",
        path=("dots", "queries"),
    )
    sketch: Any = option(
        None,
        help="also write each sample's sketch P_in G_i P_out^T (m, K_IN, K_OUT) to sketch/values, the "
        "projections to sketch/P_in and sketch/P_out (G_i = [dW_i as (fh*fw*C_prev, C); db_i])",
        parse=optional(sketch_size),
        table="job",
        toml=(int, list),
        cli=int_list,
        metavar="K_IN,K_OUT",
        record="identity",
        path=("sketch", "size"),
    )
    sketch_kind: str | None = option(
        None,
        help="gaussian (entries N(0, 1/k)) or orthogonal (rows of a random orthogonal matrix; at full size "
        "the sketches' inner products are exact) (default gaussian)",
        parse=optional(choice("sketch_kind", SKETCH_KINDS)),
        table="job",
        toml=(str,),
        cli=str,
        metavar="KIND",
        record="identity",
        path=("sketch", "kind"),
    )
    sketch_seed: int | None = option(
        None,
        help="seed of the projections: layer l of a model draws from the stream (seed, l) (default 0)",
        parse=optional(whole_number("sketch_seed", 0)),
        table="job",
        toml=(int,),
        cli=int,
        metavar="SEED",
        record="identity",
        path=("sketch", "seed"),
    )
    sketch_like: str | None = option(
        None,
        help="take the projections (and the sketch size) from this dconv output, so that sketches compare",
        parse=optional(any_string("sketch_like")),
        table="job",
        toml=(str,),
        cli=str,
        metavar="OUT",
        record="identity",
        path=("sketch", "like"),
    )
    sketch_dtype: str | None = option(
        None,
        help="float32, float16 or float64: the dtype of sketch/values (default float32)",
        parse=optional(choice("sketch_dtype", ("float32", "float16", "float64"))),
        table="job",
        toml=(str,),
        cli=str,
        metavar="DTYPE",
        record="identity",
        path=("sketch", "dtype"),
    )
    lease_timeout: float = option(
        60.0,
        help="seconds without a heartbeat after which another job takes over OUT's lease (the job that "
        "writes OUT renews it every quarter of this)",
        parse=positive_number("lease_timeout"),
        table="output",
        toml=(int, float),
        cli=float,
        metavar="SECONDS",
    )
    keep_partials: bool = option(
        False,
        help="keep every chunk's dW/db partial in OUT/_progress/tree after the job (for auditing; "
        "by default a complete output keeps only the sums)",
        parse=flag("keep_partials"),
        table="output",
        toml=(bool,),
        record="carried",
    )

    def check(self) -> None:
        if self.overwrite and self.resume:
            raise InputError("give overwrite=True or resume=True, not both.")
        alone = [name for name in ("sketch_kind", "sketch_seed", "sketch_dtype")
                 if getattr(self, name) is not None and self.sketch is None and self.sketch_like is None]
        if alone:
            raise InputError(f"{alone[0]} shapes the sketches: give sketch (K_IN,K_OUT) or sketch_like too.")
        if self.sketch_like is not None and (self.sketch_kind is not None or self.sketch_seed is not None):
            raise InputError("sketch_like takes the projections of another output: give no sketch_kind or sketch_seed.")

    @property
    def sketching(self) -> bool:
        """The job writes sketches (``sketch`` or ``sketch_like``)."""
        return self.sketch is not None or self.sketch_like is not None

    def identity(self) -> dict[str, Any]:
        """The fields a resumed job must match, as its output records them (:meth:`to_dict`)."""
        return self.to_dict("identity")

    def resuming(self, stored: JobOptions, out: str, given: Iterable[str] | None = None) -> JobOptions:
        """These options, for a resume of the output ``out`` whose recorded options are ``stored``.

        Every recorded field not ``given`` takes the output's value, so
        ``resume=True`` alone continues the job as it was started.

        Parameters
        ----------
        stored : JobOptions
            The output's (:meth:`from_dict` of its provenance).
        out : str
            The output, for the message.
        given : iterable of str, optional
            The fields the caller gave, even at their defaults; default: those
            that differ from their defaults.

        Raises
        ------
        InputError
            A field of the identity is given with another value than the
            output's; the message names each, and never advises starting again.
        """
        if given is None:
            given = [spec.name for spec in self.recorded() if getattr(self, spec.name) != spec.default]
        values, conflicts = {}, []
        for spec in self.recorded():
            mine, recorded = getattr(self, spec.name), getattr(stored, spec.name)
            if spec.name not in given:
                values[spec.name] = recorded
            elif spec.metadata["record"] == "identity" and mine != recorded:
                conflicts.append(f"{spec.name}: {plain_value(mine)!r} here, {plain_value(recorded)!r} in out")
        if conflicts:
            raise InputError(
                f"cannot resume {out!r} with other options than it was made with ({'; '.join(conflicts)}); "
                "leave them out to resume with the output's own, or write to another out."
            )
        return dataclasses.replace(self, **values)


# --------------------------------------------------------------------------- synthetic inputs


@dataclass(frozen=True)
class InputRecipe(Options):
    """What :func:`dconv.make_inputs` writes: a seeded, synthetic input group.

    ``A_prev`` (m, height, width, in_channels), ``dZ`` of the matching output
    shape, ``W`` (kernel..., in_channels, out_channels), ``b``, and the
    ``hparameters`` attribute with stride, padding and dilation.
    """

    m: int = option(
        None, help="batch size", parse=whole_number("m", 1), table="input.make", toml=(int,), cli=positive_int,
        required=True,
    )
    height: int = option(32, help="H", parse=whole_number("height", 1), table="input.make", toml=(int,), cli=positive_int)
    width: int = option(32, help="W", parse=whole_number("width", 1), table="input.make", toml=(int,), cli=positive_int)
    in_channels: int = option(
        16, help="C_prev", parse=whole_number("in_channels", 1), table="input.make", toml=(int,), cli=positive_int
    )
    out_channels: int = option(
        32, help="C", parse=whole_number("out_channels", 1), table="input.make", toml=(int,), cli=positive_int
    )
    kernel: Any = option(
        3,
        help="F or FH,FW",
        parse=lambda v: parse_pair("kernel", v, minimum=1),
        table="input.make",
        toml=(int, list),
        cli=int_list,
    )
    stride: Any = option(
        1, help="S or SH,SW", parse=lambda v: parse_pair("stride", v, minimum=1), table="input.make",
        toml=(int, list), cli=int_list,
    )
    padding: Any = option(
        1,
        help="P, PH,PW, TOP,BOTTOM,LEFT,RIGHT, same or valid",
        parse=lambda v: parse_padding(padding_from_flat(v)),
        table="input.make",
        toml=(int, str, list),
        cli=padding_text,
    )
    dilation: Any = option(
        1, help="D or DH,DW", parse=lambda v: parse_pair("dilation", v, minimum=1), table="input.make",
        toml=(int, list), cli=int_list,
    )
    dtype: str = option(
        "float32",
        help="float32 or float64",
        parse=parse_float_dtype,
        table="input.make",
        toml=(str,),
        cli=str,
    )
    chunk: int = option(
        256, help="Zarr chunk along m", parse=whole_number("chunk", 1), table="input.make", toml=(int,), cli=positive_int
    )
    seed: int = option(0, help="random seed", parse=whole_number("seed", 0), table="input.make", toml=(int,), cli=int)
    shared: float = option(
        0.0,
        help="weight of a pattern every sample shares, added to its noise (0: independent samples, "
        "whose mean gradient is 0)",
        parse=non_negative("shared"),
        table="input.make",
        toml=(int, float),
        cli=float,
    )

    def describe(self) -> str:
        """``m=512, 32x32x16 -> 32, kernel 3, float32, chunks of 256, seed 0``."""
        kernel = self.kernel[0] if self.kernel[0] == self.kernel[1] else f"{self.kernel[0]}x{self.kernel[1]}"
        return (
            f"m={self.m}, {self.height}x{self.width}x{self.in_channels} -> {self.out_channels}, kernel {kernel}, "
            f"{self.dtype}, chunks of {self.chunk}, seed {self.seed}"
            + (f", shared {self.shared:g}" if self.shared else "")
        )
