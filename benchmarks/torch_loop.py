"""The PyTorch peer of ``dconv backward``: one process, a loop over the same Zarr chunks.

Reads ``A_prev`` and ``dZ`` chunk by chunk from a dconv input group, runs
autograd's conv backward (NCHW views of the NHWC chunks), writes ``dA_prev`` to
a Zarr array uncompressed (as dconv writes it) and sums ``dW`` and ``db`` in
float64. ``bench_job.py`` times this whole command, imports included, beside
``dconv backward``::

    python benchmarks/torch_loop.py in.zarr torch-out.zarr --batch-chunk 256

Prints the seconds of the loop alone (after imports and opening the input).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import zarr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--batch-chunk", type=int, default=256)
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    group = zarr.open_group(args.inputs, mode="r")
    A_arr, dZ_arr = group["A_prev"], group["dZ"]
    W = torch.from_numpy(np.ascontiguousarray(group["W"][:].transpose(3, 2, 0, 1)))
    hp = group.attrs["hparameters"]
    start = time.perf_counter()
    target = zarr.open_group(args.out, mode="w")
    dA_out = target.create_array(
        "dA_prev", shape=A_arr.shape, chunks=(args.batch_chunk, *A_arr.shape[1:]), dtype=A_arr.dtype, compressors=None
    )
    dW_total = torch.zeros_like(W, dtype=torch.float64)
    db_total = torch.zeros(W.shape[0], dtype=torch.float64)
    for i in range(0, A_arr.shape[0], args.batch_chunk):
        A = torch.from_numpy(A_arr[i : i + args.batch_chunk]).permute(0, 3, 1, 2).requires_grad_(True)
        dZ = torch.from_numpy(dZ_arr[i : i + args.batch_chunk]).permute(0, 3, 1, 2)
        Wg = W.clone().requires_grad_(True)
        b = torch.zeros(W.shape[0], dtype=W.dtype, requires_grad=True)
        Z = torch.nn.functional.conv2d(A, Wg, b, stride=hp["stride"], padding=hp["pad"])
        dA, dW, db = torch.autograd.grad(Z, (A, Wg, b), dZ)
        dA_out[i : i + args.batch_chunk] = dA.permute(0, 2, 3, 1).numpy()
        dW_total += dW.double()
        db_total += db.double()
    target.create_array("dW", data=dW_total.permute(2, 3, 1, 0).numpy())
    target.create_array("db", data=db_total.numpy().reshape(1, 1, 1, -1))
    print(f"loop seconds {time.perf_counter() - start:.3f}")


if __name__ == "__main__":
    main()
