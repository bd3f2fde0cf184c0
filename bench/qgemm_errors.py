"""Relative error of each CPU qgemm path against the float64 product (issue 14).

For each format, the error of the kernel path alone (against x @ dequantize(W)^T in float64, so the
weight quantization error is not counted) and, separately, the quantization error of the format
(float64 product with the original W). Paths:

  exact       exact=True: fp32 activations (1 token: the decode kernel; 32 tokens: the prefill fp32 kernel)
  int8 x      the default for int4 / int4_sym / int4_min / int8 / int3 / int3_sym / int2 / int2_sym / K-quants
              at 1-64 tokens on VNNI or AVX2: activations quantized to int8 per token
  bf16        the default from 32 tokens (12 for the other formats) on AVX512-BF16: x and W rounded to bf16

Which path a default call takes depends on the CPU (see memkernels/quant.h); the table says what
this CPU ran. Errors: max over outputs of |y - y64| / sum_k |w x| (the quantity the documented
bounds are written in) and ||y - y64|| / ||y64|| over the whole output.

    python bench/qgemm_errors.py [--shape 4096x4096]
"""
from __future__ import annotations

import argparse

import numpy as np

import memkernels as mk
from _common import print_table

CASES = [("int4", 128), ("int4", 32), ("int4_sym", 32), ("int4_min", 32), ("nf4", 64), ("int8", None),
         ("int8", 32), ("int3", 128), ("int3_sym", 64), ("int2", 64), ("int2_sym", 32), ("q4_k", None), ("q5_k", None),
         ("q6_k", None)]


def rel_errors(y, y64, mag):
    d = np.abs(y.astype(np.float64) - y64)
    return float((d / mag).max()), float(np.linalg.norm(d) / np.linalg.norm(y64))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x4096", help="N_OUTxK_IN (default 4096x4096)")
    args = ap.parse_args()
    n, k = (int(v) for v in args.shape.lower().split("x"))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k), dtype=np.float32)
    xs = {t: rng.standard_normal((t, k), dtype=np.float32) for t in (1, 8, 32)}
    info = mk.info()
    print(f"memkernels {mk.__version__}, CPU ISA {info.get('best_cpu_isa')}, shape {n}x{k}, W and x ~ N(0, 1)")

    def rows():
        for fmt, g in CASES:
            qm = mk.quantize(w, fmt, group_size=g)
            d = mk.dequantize(qm).astype(np.float64)
            absd = np.abs(d)
            quant_err = []
            for t, x in xs.items():
                x64 = x.astype(np.float64)
                y64 = x64 @ d.T
                mag = np.abs(x64) @ absd.T
                for exact in (True, False):
                    y = mk.qgemm(x, qm, exact=exact)
                    mx, nrm = rel_errors(y, y64, mag)
                    path = "exact" if exact else ("int8 x / bf16 (default)" if t == 32 else "int8 x (default)")
                    if exact and t == 1:
                        true64 = x64 @ w.astype(np.float64).T
                        quant_err.append(float(np.linalg.norm(y64 - true64) / np.linalg.norm(true64)))
                    yield [f"{fmt} g{g or qm.group_size}", str(t), path, f"{mx:.2e}", f"{nrm:.2e}",
                           f"{quant_err[0]:.2e}" if quant_err else ""]

    print_table("CPU qgemm: relative error of each path against the float64 product", [
        "format", "tokens", "path", "max |y-y64| / sum|w x|", "||y-y64|| / ||y64||", "format's own error"],
        rows(), note="y64: float64 product with the dequantized weights (the kernel's error alone); "
                     "format's own error: float64 product with dequantized vs original W (||.|| relative), "
                     "the same for every path of that format.")


if __name__ == "__main__":
    main()
