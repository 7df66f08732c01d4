"""Draw the benchmark plots in docs/ from the JSON that the two benchmark scripts write.

    python benchmarks/plot_results.py benchmarks/results/kernel-avx2.json benchmarks/results/job.json

Writes docs/benchmark-kernel.png (dconv against PyTorch and the loops, per layer) and
docs/benchmark-job.png (job throughput and peak memory against batch size and workers).
Every number comes from the JSON; nothing is typed in by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def blas_label(kernel: dict) -> str:
    blas = next((b for b in kernel["blas"] if b.get("user_api") == "blas"), {})
    cpu = kernel.get("cpu", {})
    where = f"{cpu.get('model', 'CPU not recorded')}, dconv level {cpu.get('level', '?')}; " if cpu else ""
    return (f"{where}OpenBLAS {blas.get('version')} ({blas.get('architecture')}), {kernel['threads']} threads, "
            f"torch {kernel['torch']}")


def plot_kernel(kernel: dict, path: Path) -> None:
    rows = kernel["rows"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, dtype in zip(axes, ("float32", "float64")):
        by_layer = {r["layer"]: r for r in rows if r["dtype"] == dtype}
        ratios = [by_layer[name]["t_dconv"] / by_layer[name]["t_torch"] for name in layers]
        colors = ["tab:green" if r <= 1 else "tab:red" for r in ratios]
        ax.barh(layers, ratios, color=colors)
        ax.axvline(1.0, color="black", lw=1)
        geomean = kernel["summary"][dtype]["geomean_dconv_over_torch"]
        ax.set_title(f"{dtype}: dconv time / PyTorch time (geomean {geomean:.2f})")
        ax.set_xscale("log")
        ax.set_xticks([0.125, 0.25, 0.5, 1, 2, 4])
        ax.set_xticklabels(["1/8", "1/4", "1/2", "1", "2", "4"])
        ax.minorticks_off()
        ax.set_xlim(0.1, 6)
        for y, (ratio, name) in enumerate(zip(ratios, layers)):
            loops = by_layer[name]["t_loops"] / by_layer[name]["t_dconv"] if by_layer[name].get("t_loops") else None
            label = f"{ratio:.2f}" + (f"  ({loops:.0f}x faster than loops)" if loops else "")
            ax.text(ratio, y, " " + label, va="center", fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"conv2d backward, one process, {blas_label(kernel)}; below 1 = dconv faster", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_job(job: dict, path: Path) -> None:
    scaling = job["scaling"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for workers in sorted({r["workers"] for r in scaling}):
        rows = [r for r in scaling if r["workers"] == workers]
        ms = [r["m"] for r in rows]
        left.plot(ms, [r["m"] / r["compute"] for r in rows], "o-", label=f"{workers} worker(s)")
        right.plot(ms, [r["peak_rss"] / 2**20 for r in rows], "o-", label=f"{workers} worker(s)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size m")
        ax.legend()
    headline = job.get(f"job_m{job['m']}")
    if headline:  # the README table's figure, from the same run
        left.plot([job["m"]], [job["m"] / headline["seconds"]["compute"]], "k*", markersize=12,
                  label=f"headline: {job['workers']} workers, best of the speed rounds")
        left.legend()
    left.set_ylabel("samples / s (job compute)")
    right.set_ylabel("peak RSS, all job processes (MiB)")
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    fig.suptitle(
        f"dconv backward on Zarr, 32x32x16->32 3x3 {job['dtype']}, batch_chunk {job['batch_chunk']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    kernel_json, job_json = sys.argv[1:3]
    DOCS.mkdir(exist_ok=True)
    plot_kernel(json.loads(Path(kernel_json).read_text()), DOCS / "benchmark-kernel.png")
    print(f"wrote {DOCS / 'benchmark-kernel.png'}")
    job = json.loads(Path(job_json).read_text())
    if "scaling" in job:
        plot_job(job, DOCS / "benchmark-job.png")
        print(f"wrote {DOCS / 'benchmark-job.png'}")
    else:
        print(f"{job_json} has no scaling rows (bench_job.py --scaling): {DOCS / 'benchmark-job.png'} left as it is")


if __name__ == "__main__":
    main()
