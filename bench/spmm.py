"""SpMM benchmark: memkernels sparse (bitmap fp32 / fp16 values) vs dense NumPy fp32, SciPy CSR and
torch CSR (when installed), for pruned linear layers y = x @ W.T on the CPU.

    python bench/spmm.py            # 4096x4096 and 11008x4096, 50/70/90% sparsity, N = 1, 8, 32
    python bench/spmm.py --quick    # 4096x4096 at 70%, N = 1, 8
    python bench/spmm.py --cuda     # also the CUDA kernel vs torch fp16 dense (cuBLAS), when available

Times are the best of several runs, in milliseconds; "x dense" and "x scipy" are their time
divided by ours (fp16 values). Bytes/weight counts every buffer (values + masks / indices + row
pointers). W is random with a uniformly random zero pattern (what magnitude pruning of a
Gaussian matrix gives), x is standard normal, both float32.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_time  # noqa: E402

import memkernels as mk  # noqa: E402


def best_ms(fn):
    # Idle first: the previous peer's thread pool (OpenBLAS, torch's OpenMP) may still spin-wait.
    time.sleep(0.2)
    return best_time(fn, repeat=3, min_time=0.3, max_reps=60) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
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
    sparsities = [0.7] if args.quick else [0.5, 0.7, 0.9]
    tokens = [1, 8] if args.quick else [1, 8, 32]
    info = mk.info()
    print(f"memkernels {info['version']}, CPU ISA {info['cpu_isa']}, {info['num_threads']} threads")
    hdr = (f"{'shape':>11} {'sp':>4} {'N':>3} | {'ours32':>7} {'ours16':>7} {'dense':>7} {'scipy':>7} {'torch':>7} | "
           f"{'x dense':>7} {'x scipy':>7} | B/w: {'o32':>5} {'o16':>5} {'csr':>5} {'dense':>5}")
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    for rows, cols in shapes:
        base = rng.standard_normal((rows, cols), dtype=np.float32)
        for s in sparsities:
            w = np.where(rng.random((rows, cols), dtype=np.float32) < s, np.float32(0), base)
            sp32 = mk.SparseMatrix.from_dense(w, dtype="float32")
            sp16 = mk.SparseMatrix.from_dense(w, dtype="float16")
            csr = sps.csr_matrix(w) if sps else None
            tcsr = torch.from_numpy(w).to_sparse_csr() if torch is not None else None
            csr_bpw = (csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes) / w.size if csr is not None else np.nan
            for n in tokens:
                x = rng.standard_normal((n, cols), dtype=np.float32)
                out = np.empty((n, rows), np.float32)
                t32 = best_ms(lambda: mk.spmm(sp32, x, out=out))
                t16 = best_ms(lambda: mk.spmm(sp16, x, out=out))
                td = best_ms(lambda: x @ w.T)
                ts = best_ms(lambda: csr @ x.T) if csr is not None else np.nan
                tt = np.nan
                if tcsr is not None:
                    xt = torch.from_numpy(x.T.copy())
                    tt = best_ms(lambda: torch.sparse.mm(tcsr, xt))
                print(f"{rows:>5}x{cols:<5} {int(s * 100):>3}% {n:>3} | {t32:7.3f} {t16:7.3f} {td:7.3f} {ts:7.3f} "
                      f"{tt:7.3f} | {td / t16:7.2f} {ts / t16:7.2f} | {sp32.bytes_per_weight:10.3f} "
                      f"{sp16.bytes_per_weight:5.3f} {csr_bpw:5.3f} {4.0:5.1f}", flush=True)
            del csr, tcsr

    if args.cuda and info["cuda_available"] and torch is not None and torch.cuda.is_available():
        print("\nCUDA (fp16 activations, fp16 values) vs torch fp16 dense (cuBLAS)")
        for rows, cols in shapes:
            base = rng.standard_normal((rows, cols), dtype=np.float32)
            for s in sparsities:
                w = np.where(rng.random((rows, cols), dtype=np.float32) < s, np.float32(0), base)
                spg = mk.SparseMatrix.from_dense(w, dtype="float16").to("cuda")
                wg = torch.from_numpy(w).to("cuda", torch.float16)
                for n in tokens:
                    xg = torch.randn(n, cols, device="cuda", dtype=torch.float16)
                    og = torch.empty(n, rows, device="cuda", dtype=torch.float16)

                    def cuda_ms(fn, reps=50):
                        fn()
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            fn()
                        torch.cuda.synchronize()
                        return (time.perf_counter() - t0) / reps * 1e3

                    to = cuda_ms(lambda: mk.spmm(spg, xg, out=og))
                    tc = cuda_ms(lambda: xg @ wg.T)
                    print(f"{rows:>5}x{cols:<5} {int(s * 100):>3}% N={n:>3}: ours {to:.4f} ms, cuBLAS {tc:.4f} ms, "
                          f"ratio {tc / to:.2f}")


if __name__ == "__main__":
    main()
