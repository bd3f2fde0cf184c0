"""Benchmark: quantized GEMM (memkernels.qgemm) vs dense fp32/bf16 matmul, side by side.

CPU (default): layers 4096x4096, 11008x4096, 4096x11008 (out_features x in_features), batch 1, 8,
32, every format, against NumPy fp32 ``x @ W.T`` and, when installed, torch fp32 / bf16 matmul.
--gguf: the formats GGUF files import into (int8 g32 = Q8_0, int4_min g32 = Q4_1 / Q4_K, int4_sym
g32 = Q4_0) next to int4 g128, batch 1 and 8, on 4096x14336 (a Llama-3-8B down projection).
GPU (--cuda): 8192x28672 and 28672x8192 layers, batch 1..16, against torch.matmul fp16 (cuBLAS).
Prints Markdown tables: time per call (best of the repetitions), the stored bytes per weight and
the ratios peer time / our time ("numpy/ours", "torch fp32/ours", "torch bf16/ours" on the CPU,
"cublas/ours" against torch fp16 on the GPU; > 1 means memkernels is faster). --quick: int4 g128
and one shape only. "+i8x": int8_activations=True (activations quantized to int8 per token, VNNI
dot products; batches up to 8, where it applies).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if "--cpu-time" in sys.argv:  # one thread everywhere, before NumPy/torch start their pools
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_time, fmt_ms, fmt_ratio, print_table, shape_arg  # noqa: E402

import memkernels as mk  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None


CLOCK = time.perf_counter


def bench(fn):
    # best of the repetitions: on a shared machine the median mostly measures the scheduler
    return best_time(fn, repeat=3, max_reps=200, clock=CLOCK)


def cpu(args):
    shapes = [(11008, 4096)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    formats = [("int4", 128)] if args.quick else [("int4", 128), ("int4_sym", 128), ("nf4", 64), ("int8", None),
                                                  ("int3", 128), ("int2", 64), ("int8", 32), ("int4_min", 32)]
    batches = [1, 8] if args.quick else [1, 8, 32]
    i8x = {("int4", 128)}  # formats also timed with int8_activations at batch 1
    if args.gguf:
        shapes = [(4096, 14336)]
        formats = [("int4", 128), ("int8", 32), ("int4_min", 32), ("int4_sym", 32)]
        batches = [1, 8]
        i8x = set(formats)
    if args.shape:
        shapes = [args.shape]
    print(f"memkernels {mk.__version__}, CPU ISA {mk.cpu_isa()}, {mk.num_threads()} threads"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ""))
    headers = ["case", "B/weight", "ours ms", "numpy fp32 ms", "numpy/ours"]
    if torch:
        headers += ["torch fp32 ms", "torch bf16 ms", "torch fp32/ours", "torch bf16/ours"]
    rng = np.random.default_rng(0)

    def rows():
        for n, k in shapes:
            w = rng.standard_normal((n, k), dtype=np.float32)
            tw = torch.from_numpy(w) if torch else None
            tw16 = tw.to(torch.bfloat16) if torch else None
            qms = {(f, g): mk.quantize(w, f, group_size=g) for f, g in formats}
            for b in batches:
                x = rng.standard_normal((b, k), dtype=np.float32)
                if b == 1:
                    xv = x[0]
                    t_np = bench(lambda: w @ xv)
                else:
                    t_np = bench(lambda: x @ w.T)
                if torch:
                    tx = torch.from_numpy(x)
                    tx16 = tx.to(torch.bfloat16)
                    t_t32 = bench(lambda: tx @ tw.T)
                    t_t16 = bench(lambda: tx16 @ tw16.T)
                out = np.empty((b, n), np.float32)
                variants = []
                for f, g in formats:
                    variants.append((f, g, False))
                    if b <= 8 and (f, g) in i8x:
                        variants.append((f, g, True))  # x quantized to int8 on the fly (VNNI)
                for f, g, i8 in variants:
                    qm = qms[(f, g)]
                    t = bench(lambda: mk.qgemm(x, qm, out=out, int8_activations=i8))
                    name = (f if g is None else f"{f} g{g}") + ("+i8x" if i8 else "")
                    row = [f"{n}x{k} batch {b} {name}", f"{qm.bits_per_weight / 8:.3f}", fmt_ms(t, 3),
                           fmt_ms(t_np, 3), fmt_ratio(t_np, t)]
                    if torch:
                        row += [fmt_ms(t_t32, 3), fmt_ms(t_t16, 3), fmt_ratio(t_t32, t), fmt_ratio(t_t16, t)]
                    yield row

    print_table("CPU qgemm, fp32 x", headers, rows(),
                note="y = x @ W.T, case = out x in features, batch, format; ratios: peer ms / ours ms.")


def gpu(args):
    if not mk.info()["cuda_available"] or torch is None or not torch.cuda.is_available():
        print("no CUDA device (or no torch with CUDA): skipping the GPU benchmark")
        return
    shapes = [(28672, 8192)] if args.quick else [(28672, 8192), (8192, 28672), (4096, 4096)]
    if args.shape:
        shapes = [args.shape]
    formats = [("int4", 128)] if args.quick else [("int4", 128), ("nf4", 64), ("int8", None), ("int3", 128),
                                                  ("int8", 32), ("int4_min", 32)]

    def gbench(fn, reps=50):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps / 1e3

    rng = np.random.default_rng(0)

    def rows():
        for n, k in shapes:
            w = rng.standard_normal((n, k), dtype=np.float32) * 0.02
            tw = torch.from_numpy(w).to("cuda", torch.float16)
            qms = {(f, g): mk.quantize(w, f, group_size=g).to("cuda") for f, g in formats}
            for b in [1, 2, 4, 8, 16, 32]:
                x = torch.randn(b, k, device="cuda", dtype=torch.float16)
                out = torch.empty(b, n, device="cuda", dtype=torch.float16)
                t_ref = gbench(lambda: torch.matmul(x, tw.T))
                for f, g in formats:
                    qm = qms[(f, g)]
                    s = torch.cuda.current_stream().cuda_stream
                    t = gbench(lambda: mk.qgemm(x, qm, out=out, stream=s))
                    name = f if g is None else f"{f} g{g}"
                    yield [f"{n}x{k} batch {b} {name}", fmt_ms(t, 4), fmt_ms(t_ref, 4), fmt_ratio(t_ref, t)]

    print_table(f"GPU qgemm, fp16 x, on {torch.cuda.get_device_name(0)}",
                ["case", "ours ms", "cublas fp16 ms", "cublas/ours"], rows(),
                note="cublas: torch.matmul fp16 with the dense weights; ratios: cublas ms / ours ms.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cuda", action="store_true", help="run the GPU benchmark instead of the CPU one")
    ap.add_argument("--gguf", action="store_true",
                    help="CPU: the GGUF import formats (int8 g32, int4_min g32, int4_sym g32) and int4 g128 on "
                         "4096x14336, batch 1 and 8")
    ap.add_argument("--shape", type=shape_arg, default=None,
                    help="one layer shape N_OUTxK_IN instead of the defaults (e.g. 1024x1024 for a smoke run)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread for every library and CPU time (process_time) instead of wall time: "
                         "stabler ratios on a shared, oversubscribed machine")
    args = ap.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        mk.set_num_threads(1)
        if torch is not None:
            torch.set_num_threads(1)
    gpu(args) if args.cuda else cpu(args)


if __name__ == "__main__":
    main()
