"""A whole model in one job against its layers as separate jobs; the model's figures against torch.func.

Run from the repository root, with the machine's OpenBLAS overrides unset for this command only::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_model.py

1. A small residual CNN (8 conv layers: a stem, three residual blocks, one with a stride-2
   1x1 shortcut; a linear head; no BatchNorm), float64, on ``--m`` synthetic 3x16x16
   images with random labels, is captured with ``dconv.capture`` (summed cross-entropy,
   batches of 256) into a model input group.
2. ``torch.func``: every sample's gradient over all parameters (``vmap(grad)``), from which
   the model's sum_i |g_i|^2, |S|^2, noise scale and every sample's |g_i|^2; dconv's model
   job must match them to 1e-10 relative.
3. Whole commands, interleaved in each of ``--rounds`` rounds (order alternating):
   ``dconv backward MODEL OUT --stats --no-dA-prev`` against one such command per layer,
   run one after the other. Medians; the ratio model / separate.
4. The task stream of the model job, twice, on one 2-worker LocalCluster (in this process):
   each worker's idle time between its first and last task (chunks, combines, the shared
   context), and the longest gap.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dconv
from bench_job import blas_info
from bench_kernel import cpu_description

ROOT = Path(__file__).resolve().parents[1]


def residual_cnn(torch, classes: int = 10):
    """8 conv layers and a linear head, no BatchNorm: stem 3->16; blocks 16->16, 16->32 (stride 2, 1x1
    shortcut), 32->32; global average pool; linear 32->classes."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else None

        def forward(self, x):
            y = self.conv2(torch.relu(self.conv1(x)))
            return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.block1 = Block(16, 16, 1)
            self.block2 = Block(16, 32, 2)
            self.block3 = Block(32, 32, 1)
            self.head = nn.Linear(32, classes)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = self.block3(self.block2(self.block1(x)))
            return self.head(x.mean(dim=(2, 3)))

    return Net()


def capture(torch, net, images, labels, path: Path, batch: int = 256) -> float:
    """Capture every sample's activations and output gradients with dconv.capture; the seconds it took."""
    t0 = time.perf_counter()
    with dconv.capture(net, str(path), overwrite=True):
        for start in range(0, images.shape[0], batch):
            x, y = images[start : start + batch], labels[start : start + batch]
            loss = torch.nn.functional.cross_entropy(net(x), y, reduction="sum")
            loss.backward()
    return time.perf_counter() - t0


def torch_figures(torch, net, images, labels, batch: int = 256) -> dict:
    """The model's per-sample |g_i|^2, |S|^2 and sum_i |g_i|^2 from torch.func over every parameter."""
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in net.named_parameters()}

    def loss(p, x, y):
        out = functional_call(net, p, (x[None],))
        return torch.nn.functional.cross_entropy(out, y[None], reduction="sum")

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    norms, S = [], {name: torch.zeros_like(p) for name, p in params.items()}
    for start in range(0, images.shape[0], batch):
        g = per_sample(params, images[start : start + batch], labels[start : start + batch])
        norms.append(sum((v.reshape(v.shape[0], -1) ** 2).sum(dim=1) for v in g.values()))
        for name, v in g.items():
            S[name] += v.sum(dim=0)
    norms = torch.cat(norms).numpy()
    S2 = float(sum((v**2).sum() for v in S.values()))
    return {"norms": norms, "S2": S2, "sum": math.fsum(norms.tolist())}


def run(args: list) -> float:
    """Wall time of ``dconv ARGS`` as a whole command."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dconv", *map(str, args)], check=True, capture_output=True)
    return time.perf_counter() - t0


def idle_report(model: str, work: Path, runs: int = 2) -> list[dict]:
    """Per run of the model job on one 2-worker LocalCluster (the first on fresh workers): each worker's
    idle seconds between its first and last task, and the longest gap."""
    import distributed

    reports = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        for _ in range(runs):
            with distributed.get_task_stream(client) as stream:
                dconv.backward_job(model, work / "stream.zarr", stats=True, dA_prev=False, client=client,
                                   overwrite=True)
            busy: dict = {}
            for task in stream.data:
                span = [s for s in task["startstops"] if s["action"] == "compute"]
                busy.setdefault(task["worker"], []).extend((s["start"], s["stop"]) for s in span)
            report = {}
            for worker, spans in busy.items():
                spans.sort()
                gaps = [max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:])]
                report[worker] = {"tasks": len(spans), "span_s": spans[-1][1] - spans[0][0], "idle_s": sum(gaps),
                                  "longest_gap_s": max(gaps, default=0.0)}
            reports.append(report)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    print(f"CPU: {cpu_description()}; {blas_info()}; dconv SIMD {dconv.simd_levels()}")
    net = residual_cnn(torch)
    images = torch.randn(args.m, 3, 16, 16)
    labels = torch.randint(0, 10, (args.m,))
    work = Path(tempfile.mkdtemp(prefix="bench-model-"))
    try:
        model = work / "model.zarr"
        seconds = capture(torch, net, images, labels, model)
        layers = [layer.name for layer in dconv.open_model_inputs(str(model)).layers]
        print(f"captured m = {args.m} samples of {len(layers)} layers ({', '.join(layers)}) in {seconds:.1f} s")

        out = work / "out.zarr"
        result = dconv.backward_job(str(model), out, stats=True, dA_prev=False, overwrite=True)
        want = torch_figures(torch, net, images, labels)
        norms = np.asarray(__import__("zarr").open_group(str(out))["stats/sample_grad_norm2"][...])
        from dconv.statistics import noise_figures

        expected = noise_figures(want["S2"], want["sum"], args.m)
        errors = {
            "sample_grad_norm2 (max rel)": float(np.max(np.abs(norms - want["norms"]) / want["norms"])),
            **{key: abs(result.stats[key] - expected[key]) / abs(expected[key])
               for key in ("sum_sample_norm2", "grad_sum_norm2", "noise_scale")},
        }
        print("dconv against torch.func (relative errors): "
              + ", ".join(f"{key} {value:.2e}" for key, value in errors.items()))
        print(f"model noise scale {result.stats['noise_scale']:.6g}")

        times: dict = {"model": [], "separate": []}
        for r in range(args.rounds):
            order = ["model", "separate"] if r % 2 == 0 else ["separate", "model"]
            for which in order:
                if which == "model":
                    times["model"].append(run(["backward", model, work / "m.zarr", "--stats", "--no-dA-prev",
                                               "--overwrite", "--quiet"]))
                else:
                    times["separate"].append(sum(
                        run(["backward", f"{model}/layers/{name}", work / f"s-{name}.zarr", "--stats",
                             "--no-dA-prev", "--overwrite", "--quiet"]) for name in layers))
            print(f"round {r + 1}: model {times['model'][-1]:.2f} s, separate {times['separate'][-1]:.2f} s")
        medians = {key: statistics.median(values) for key, values in times.items()}
        ratio = medians["model"] / medians["separate"]
        print(f"median: model job {medians['model']:.2f} s, {len(layers)} separate jobs {medians['separate']:.2f} s, "
              f"ratio {ratio:.2f}")
        idle = idle_report(str(model), work)
        for number, report in enumerate(idle, start=1):
            for worker, figures in report.items():
                print(f"task stream, run {number}: worker {worker}: {figures['tasks']} tasks over {figures['span_s']:.2f} s, "
                      f"idle {figures['idle_s']:.3f} s between them, longest gap {figures['longest_gap_s'] * 1e3:.1f} ms")
        if args.json:
            args.json.write_text(json.dumps({"cpu": cpu_description(), "m": args.m, "layers": layers,
                                             "errors": errors, "times": times, "ratio": ratio, "idle": idle},
                                            indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
