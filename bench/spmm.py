"""SpMM benchmark: memkernels sparse (bitmap fp32 / fp16 values) vs dense NumPy fp32, SciPy CSR and
torch CSR (when installed), for pruned linear layers y = x @ W.T on the CPU.

    python bench/spmm.py            # 4096x4096 and 11008x4096, 50/70/90% sparsity, N = 1, 8, 32
    python bench/spmm.py --quick    # 4096x4096 at 70%, N = 1, 8
    python bench/spmm.py --cuda     # also the CUDA kernel vs torch fp16 dense (cuBLAS), when available
    python bench/spmm.py --quick --shape 1024x1024   # a smoke run

Prints Markdown tables. Times are the best of several runs, in milliseconds; "numpy/ours",
"scipy/ours", "torch/ours" (and "cublas/ours" on the GPU) are the peer's time divided by ours (fp16
values): > 1 means memkernels is faster. B/w = bytes per weight, counting every buffer (values +
masks / indices + row pointers). W is random with a uniformly random zero pattern (what magnitude pruning of a
Gaussian matrix gives), x is standard normal, both float32.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_time, fmt_ms, fmt_ratio, print_table, shape_arg  # noqa: E402

import memkernels as mk  # noqa: E402


def best_s(fn):
    # Idle first: the previous peer's thread pool (OpenBLAS, torch's OpenMP) may still spin-wait.
    time.sleep(0.2)
    return best_time(fn, repeat=3, min_time=0.3, max_reps=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--shape", type=shape_arg, default=None, help="one layer shape ROWSxCOLS instead of the defaults")
    args = ap.parse_args()
    if args.threads:
        mk.set_num_threads(args.threads)
    try:
        import scipy.sparse as sps
    except ImportError:
        sps = None
    try:
        import torch
    except ImportError:
        torch = None

    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    if args.shape:
        shapes = [args.shape]
    sparsities = [0.7] if args.quick else [0.5, 0.7, 0.9]
    tokens = [1, 8] if args.quick else [1, 8, 32]
    info = mk.info()
    print(f"memkernels {info['version']}, CPU ISA {info['cpu_isa']}, {info['num_threads']} threads")
    rng = np.random.default_rng(0)

    def cpu_rows():
        for rows, cols in shapes:
            base = rng.standard_normal((rows, cols), dtype=np.float32)
            for s in sparsities:
                w = np.where(rng.random((rows, cols), dtype=np.float32) < s, np.float32(0), base)
                sp32 = mk.SparseMatrix.from_dense(w, dtype="float32")
                sp16 = mk.SparseMatrix.from_dense(w, dtype="float16")
                csr = sps.csr_matrix(w) if sps else None
                tcsr = torch.from_numpy(w).to_sparse_csr() if torch is not None else None
                csr_bpw = None
                if csr is not None:
                    csr_bpw = (csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes) / w.size
                for n in tokens:
                    x = rng.standard_normal((n, cols), dtype=np.float32)
                    out = np.empty((n, rows), np.float32)
                    t32 = best_s(lambda: mk.spmm(sp32, x, out=out))
                    t16 = best_s(lambda: mk.spmm(sp16, x, out=out))
                    td = best_s(lambda: x @ w.T)
                    ts = best_s(lambda: csr @ x.T) if csr is not None else None
                    tt = None
                    if tcsr is not None:
                        xt = torch.from_numpy(x.T.copy())
                        tt = best_s(lambda: torch.sparse.mm(tcsr, xt))
                    yield [f"{rows}x{cols} {int(s * 100)}% N={n}", fmt_ms(t32, 3), fmt_ms(t16, 3), fmt_ms(td, 3),
                           fmt_ms(ts, 3), fmt_ms(tt, 3), fmt_ratio(td, t16), fmt_ratio(ts, t16), fmt_ratio(tt, t16),
                           f"{sp32.bytes_per_weight:.3f}", f"{sp16.bytes_per_weight:.3f}",
                           "n/a" if csr_bpw is None else f"{csr_bpw:.3f}", "4.0"]
                del csr, tcsr

    print_table("CPU SpMM, fp32 x",
                ["case", "ours32 ms", "ours16 ms", "numpy dense ms", "scipy CSR ms", "torch CSR ms", "numpy/ours",
                 "scipy/ours", "torch/ours", "ours32 B/w", "ours16 B/w", "CSR B/w", "dense B/w"], cpu_rows(),
                note="y = x @ W.T; ours32 / ours16: bitmap with fp32 / fp16 values; ratios: peer ms / ours16 ms; "
                     "B/w: bytes per weight.")

    if args.cuda and info["cuda_available"] and torch is not None and torch.cuda.is_available():

        def cuda_ms(fn, reps=50):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / reps * 1e3

        def cuda_rows():
            for rows, cols in shapes:
                base = rng.standard_normal((rows, cols), dtype=np.float32)
                for s in sparsities:
                    w = np.where(rng.random((rows, cols), dtype=np.float32) < s, np.float32(0), base)
                    spg = mk.SparseMatrix.from_dense(w, dtype="float16").to("cuda")
                    wg = torch.from_numpy(w).to("cuda", torch.float16)
                    for n in tokens:
                        xg = torch.randn(n, cols, device="cuda", dtype=torch.float16)
                        og = torch.empty(n, rows, device="cuda", dtype=torch.float16)
                        to = cuda_ms(lambda: mk.spmm(spg, xg, out=og))
                        tc = cuda_ms(lambda: xg @ wg.T)
                        yield [f"{rows}x{cols} {int(s * 100)}% N={n}", f"{to:.4f}", f"{tc:.4f}", fmt_ratio(tc, to)]

        print_table(f"CUDA SpMM, fp16 x, on {torch.cuda.get_device_name()}",
                    ["case", "ours ms", "cublas ms", "cublas/ours"], cuda_rows(),
                    note="ours: fp16 values, fp16 activations; cublas: torch fp16 dense x @ W.T.")


if __name__ == "__main__":
    main()
