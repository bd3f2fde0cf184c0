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
dot products; batches up to 64, where it applies; since issue 14 the default, "exact" rows use
exact=True). Peers in the same run when present: torch's int4 CPU kernel
(``_weight_int4pack_mm_for_cpu``, group 128 and 32, bf16 activations) and torch bf16 ``F.linear``;
ggml's MUL_MAT through ggml's own ``test-backend-ops perf`` binary when MEMKERNELS_GGML_TEST_BACKEND_OPS
names one (its perf shapes are fixed: 4096x14336 at 1-8 and 512 tokens, 2 threads, wall time).
"GB/s": weight bytes read per call / our time.
--prefill: 16, 32, 128, 512 tokens on 4096x14336 and 11008x4096, every prefill format (default and
exact=True) against torch bf16 F.linear, torch int4 and ggml (512 tokens: its perf shapes), 1 thread
(CPU time) and 2 threads (wall time), ours and the peers alternating in each of --rounds rounds.
--kquant: the K-quant formats (q4_k, q5_k, q6_k; GGUF Q4_K / Q5_K / Q6_K imported losslessly) on
4096x14336 and 11008x4096, batch 1 and 8, 1 and 2 threads, next to ggml q4_K / q6_K and torch int4.
--decode: per-token decode (1 and 8 tokens) of int4 g128/g32, int4_sym g32, int4_min g32 and int8 g32
on 4096x14336 and 11008x4096 next to torch int4 and ggml's MUL_MAT of the matching type (q4_K, q4_0,
q8_0) timed with the same thread count and clock by bench/ggml/ggml_mulmat.c (MEMKERNELS_GGML_SRC names
a ggml source tree built in its build/ folder). Rerun: MEMKERNELS_GGML_SRC=/work/ggml-src python
bench/qgemm.py --decode --cpu-time (1 thread, CPU time) and ... --decode --threads 2 (wall time).
--lowbit: int3 / int3_sym / int2 / int2_sym / nf4 (and int4 g128) at 1 and 8 tokens on 4096x14336 and
11008x4096, the default path against exact=True, NumPy fp32 and torch bf16, alternating in --rounds rounds.
Rerun: python bench/qgemm.py --lowbit --cpu-time --rounds 3 (1 thread, CPU time).
--small: per-call times over a 135M model's decode shapes (SmolLM2: hidden 576, FFN 1536, vocab
49152), 1 token, next to NumPy fp32 on the same data, plus the fixed cost of the smallest calls.
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
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    torch = None


def torch_int4(w, group):
    """torch's packed int4 CPU weights for w (N, K) float32: asymmetric round-to-nearest per group of
    `group`, as torch's own int4 weight-only quantizer lays them out. Returns a function x -> y taking
    bf16 x (tokens, K), or None when this torch lacks the kernel."""
    if torch is None or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    n, k = w.shape
    wg = torch.from_numpy(w).reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)


GGML_TYPES = {"int4 g128": None, "int4_sym g32": "q4_0", "int4_min g32": "q4_1", "int8 g32": "q8_0"}


def ggml_mul_mat_us(types="q4_0|q4_1|q4_K|q8_0", tokens="1|8", timeout=1800):
    """{(ggml type, n_out, tokens, k): microseconds per MUL_MAT} from the binary named by
    MEMKERNELS_GGML_TEST_BACKEND_OPS (ggml's `test-backend-ops perf -o MUL_MAT`), {} without one.
    types / tokens: regex alternatives of ggml's fixed perf cases (its shape is 4096x14336 only;
    it runs on all cores)."""
    exe = os.environ.get("MEMKERNELS_GGML_TEST_BACKEND_OPS")
    if not exe:
        return {}
    import re
    import subprocess

    pat = f"type_a=({types}),type_b=f32,m=4096,n=({tokens}),k=14336,"
    try:
        res = subprocess.run([exe, "perf", "-o", "MUL_MAT", "-b", "CPU", "-p", pat], capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"ggml test-backend-ops failed: {e}")
        return {}
    times = {}
    for m in re.finditer(r"MUL_MAT\(type_a=(\w+),type_b=f32,m=(\d+),n=(\d+),k=(\d+),[^)]*\):\s+\d+ runs -\s+([\d.]+) us/run",
                         res.stdout):
        times[(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))] = float(m.group(5))
    if not times:
        print("ggml test-backend-ops printed no MUL_MAT timings:\n" + res.stdout[-2000:] + res.stderr[-2000:])
    return times


_GGML_EXE = []


def ggml_mulmat_s(gtype, n, k, tokens, threads, cpu_time, reps=7):
    """Seconds per ggml MUL_MAT (best of reps) from bench/ggml/ggml_mulmat.c, compiled once against the
    ggml tree named by MEMKERNELS_GGML_SRC (headers in include/, libraries in build/src); CPU time when
    cpu_time, else wall time. None without MEMKERNELS_GGML_SRC or when it fails."""
    src = os.environ.get("MEMKERNELS_GGML_SRC")
    if not src:
        return None
    import subprocess
    import tempfile

    if not _GGML_EXE:
        exe = os.path.join(tempfile.mkdtemp(prefix="mk_ggml_"), "ggml_mulmat")
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ggml", "ggml_mulmat.c")
        lib = os.path.join(src, "build", "src")
        r = subprocess.run(["cc", "-O2", here, "-I" + os.path.join(src, "include"), "-L" + lib, "-lggml", "-lggml-base",
                            "-lggml-cpu", "-lm", "-Wl,-rpath," + lib, "-o", exe], capture_output=True, text=True)
        _GGML_EXE.append(exe if r.returncode == 0 else None)
        if r.returncode:
            print("cannot build bench/ggml/ggml_mulmat.c:\n" + r.stderr[-2000:])
    if not _GGML_EXE[0]:
        return None
    r = subprocess.run([_GGML_EXE[0], gtype, str(n), str(k), str(tokens), str(threads), str(reps)], capture_output=True,
                       text=True)
    if r.returncode:
        return None
    cpu_us, wall_us = (float(v) for v in r.stdout.split())
    return (cpu_us if cpu_time else wall_us) * 1e-6


CLOCK = time.perf_counter
SMALL = "--small" in sys.argv  # microsecond calls: more repetitions


def bench(fn):
    # best of the repetitions: on a shared machine the median mostly measures the scheduler
    return best_time(fn, repeat=3, max_reps=2000 if SMALL else 200, clock=CLOCK)


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
    headers = ["case", "B/weight", "ours ms", "GB/s", "numpy fp32 ms", "numpy/ours"]
    if torch:
        headers += ["torch fp32 ms", "torch bf16 ms", "torch fp32/ours", "torch bf16/ours",
                    "torch int4 g128 ms", "torch int4 g32 ms", "torch int4 g128/ours", "torch int4 g32/ours"]
    ggml = ggml_mul_mat_us()
    if ggml:
        headers += ["ggml q4_K ms", "ggml same-format ms", "ggml q4_K/ours", "ggml same/ours"]
    rng = np.random.default_rng(0)

    def rows():
        for n, k in shapes:
            w = rng.standard_normal((n, k), dtype=np.float32)
            tw = torch.from_numpy(w) if torch else None
            tw16 = tw.to(torch.bfloat16) if torch else None
            qms = {(f, g): mk.quantize(w, f, group_size=g) for f, g in formats}
            ti4 = {g: torch_int4(w, g) for g in (128, 32)} if torch else {}
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
                    t_t16 = bench(lambda: F.linear(tx16, tw16))
                    t_i4 = {g: (bench(lambda: f(tx16)) if f else None) for g, f in ti4.items()}
                out = np.empty((b, n), np.float32)
                variants = []
                for f, g in formats:
                    variants.append((f, g, False))
                    if b <= 64 and (f, g) in i8x:
                        variants.append((f, g, True))  # x quantized to int8 on the fly (VNNI)
                for f, g, i8 in variants:
                    qm = qms[(f, g)]
                    t = bench(lambda: mk.qgemm(x, qm, out=out, exact=not i8))
                    fname = f if g is None else f"{f} g{g}"
                    name = fname + ("+i8x" if i8 else " exact")
                    row = [f"{n}x{k} batch {b} {name}", f"{qm.bits_per_weight / 8:.3f}", fmt_ms(t, 3),
                           f"{qm.nbytes / t / 1e9:.1f}", fmt_ms(t_np, 3), fmt_ratio(t_np, t)]
                    if torch:
                        row += [fmt_ms(t_t32, 3), fmt_ms(t_t16, 3), fmt_ratio(t_t32, t), fmt_ratio(t_t16, t),
                                fmt_ms(t_i4[128], 3), fmt_ms(t_i4[32], 3), fmt_ratio(t_i4[128], t),
                                fmt_ratio(t_i4[32], t)]
                    if ggml:
                        gk = ggml.get(("q4_K", n, b, k))
                        gs = ggml.get((GGML_TYPES.get(fname), n, b, k))
                        gk, gs = (None if v is None else v * 1e-6 for v in (gk, gs))
                        row += [fmt_ms(gk, 3), fmt_ms(gs, 3), fmt_ratio(gk, t), fmt_ratio(gs, t)]
                    yield row

    print_table("CPU qgemm, fp32 x", headers, rows(),
                note="y = x @ W.T, case = out x in features, batch, format; ratios: peer ms / ours ms. "
                     "torch int4: bf16 x, asymmetric int4 weights packed by torch. ggml: test-backend-ops perf "
                     "(its own thread count and wall clock; only its 4096x14336 shapes exist there). GB/s: our "
                     "stored weight bytes / our time.")


def kquant(args):
    """q4_k / q5_k / q6_k (K-quant super-blocks) next to ggml's q4_K / q6_K and torch int4 / bf16."""
    shapes = [args.shape] if args.shape else [(4096, 14336), (11008, 4096)]
    threads = [1] if args.cpu_time else [1, 2]  # --cpu-time: one thread, process time
    print(f"memkernels {mk.__version__}, CPU ISA {mk.cpu_isa()}"
          + (f", torch {torch.__version__}" if torch else ""))
    ggml = ggml_mul_mat_us("q4_K|q5_K|q6_K", "1|8")
    rng = np.random.default_rng(0)
    headers = ["case", "threads", "q4_k ms", "q4_k GB/s", "q4_k exact ms", "q5_k ms", "q6_k ms", "q6_k GB/s"]
    if torch:
        headers += ["torch int4 g128 ms", "torch bf16 ms", "torch int4/q4_k", "torch bf16/q4_k"]
    headers += ["ggml q4_K ms", "ggml q6_K ms", "ggml q4_K/q4_k", "ggml q6_K/q6_k"]

    def rows():
        for n, k in shapes:
            w = rng.standard_normal((n, k), dtype=np.float32) * 0.02
            qms = {f: mk.quantize(w, f) for f in ("q4_k", "q5_k", "q6_k")}
            ti4 = torch_int4(w, 128) if torch else None
            tw16 = torch.from_numpy(w).to(torch.bfloat16) if torch else None
            for nt in threads:
                mk.set_num_threads(nt)
                if torch:
                    torch.set_num_threads(nt)
                for b in (1, 8):
                    x = rng.standard_normal((b, k), dtype=np.float32)
                    out = np.empty((b, n), np.float32)
                    t = {f: bench(lambda: mk.qgemm(x, qm, out=out)) for f, qm in qms.items()}
                    t_ex = bench(lambda: mk.qgemm(x, qms["q4_k"], out=out, exact=True))
                    row = [f"{n}x{k} batch {b}", str(nt), fmt_ms(t["q4_k"], 3),
                           f"{qms['q4_k'].nbytes / t['q4_k'] / 1e9:.1f}", fmt_ms(t_ex, 3), fmt_ms(t["q5_k"], 3),
                           fmt_ms(t["q6_k"], 3), f"{qms['q6_k'].nbytes / t['q6_k'] / 1e9:.1f}"]
                    if torch:
                        tx16 = torch.from_numpy(x).to(torch.bfloat16)
                        t_i4 = bench(lambda: ti4(tx16)) if ti4 else None
                        t_16 = bench(lambda: F.linear(tx16, tw16))
                        row += [fmt_ms(t_i4, 3), fmt_ms(t_16, 3), fmt_ratio(t_i4, t["q4_k"]), fmt_ratio(t_16, t["q4_k"])]
                    # test-backend-ops runs on every core: its figure is set against our 2-thread rows
                    gk = ggml.get(("q4_K", n, b, k)) if nt == 2 else None
                    g6 = ggml.get(("q6_K", n, b, k)) if nt == 2 else None
                    gk, g6 = (None if v is None else v * 1e-6 for v in (gk, g6))
                    row += [fmt_ms(gk, 3), fmt_ms(g6, 3), fmt_ratio(gk, t["q4_k"]), fmt_ratio(g6, t["q6_k"])]
                    yield row
        mk.set_num_threads(max(threads))

    print_table("CPU qgemm, K-quant super-block formats, fp32 x", headers, rows(),
                note="ours: the default path (int8 activations, VNNI / AVX2) unless 'exact'; ratios: peer ms / "
                     "ours ms (> 1: memkernels faster). torch int4 g128: bf16 x, torch's packed int4. ggml: "
                     "test-backend-ops perf MUL_MAT (all cores, so only beside the 2-thread rows; its perf list "
                     "has 4096x14336 only).")
def decode(args):
    """Per-token decode comparison (1 and 8 tokens by default) on the issue-14 shapes: each of our
    int4-family formats next to the peer that stores the same information (torch int4 g128 / g32 for
    int4 g128 / g32; ggml q4_K for int4 g128 and int4_min g32, q4_0 for int4_sym g32, q8_0 for int8
    g32), all timed in this run."""
    shapes = [args.shape] if args.shape else [(4096, 14336), (11008, 4096)]
    tokens = [1, 8]
    threads = mk.num_threads()
    cpu_time = CLOCK is time.process_time
    print(f"memkernels {mk.__version__}, CPU ISA {mk.cpu_isa()}, {threads} threads, "
          f"{'CPU time' if cpu_time else 'wall time'}" + (f", torch {torch.__version__}" if torch else "")
          + (", ggml: MEMKERNELS_GGML_SRC" if os.environ.get("MEMKERNELS_GGML_SRC") else ", no ggml"))
    # ours, the torch peer (group), the ggml peer
    cases = [("int4", 128, 128, "q4_K"), ("int4", 32, 32, None), ("int4_sym", 32, 32, "q4_0"),
             ("int4_min", 32, None, "q4_K"), ("int8", 32, None, "q8_0")]
    rng = np.random.default_rng(0)

    def rows():
        for n, k in shapes:
            w = rng.standard_normal((n, k), dtype=np.float32)
            ti4 = {g: torch_int4(w, g) for g in (128, 32)} if torch else {}
            qms = {(f, g): mk.quantize(w, f, group_size=g) for f, g, _, _ in cases}
            for b in tokens:
                x = rng.standard_normal((b, k), dtype=np.float32)
                out = np.empty((b, n), np.float32)
                t_i4 = {}
                if torch:
                    tx16 = torch.from_numpy(x).to(torch.bfloat16)
                    t_i4 = {g: (bench(lambda: f(tx16)) if f else None) for g, f in ti4.items()}
                t_gg = {gt: ggml_mulmat_s(gt, n, k, b, threads, cpu_time) for gt in ("q4_K", "q4_0", "q8_0")}
                for f, g, tg, gt in cases:
                    qm = qms[(f, g)]
                    t = bench(lambda: mk.qgemm(x, qm, out=out))
                    ti, tgg = t_i4.get(tg), t_gg.get(gt)
                    yield [f"{n}x{k} {b} tok {f} g{g}", f"{qm.bits_per_weight:.2f}", fmt_ms(t, 3),
                           f"{qm.nbytes / t / 1e9:.1f}", f"int4 g{tg}" if tg else "", fmt_ms(ti, 3), fmt_ratio(ti, t),
                           gt or "", fmt_ms(tgg, 3), fmt_ratio(tgg, t)]

    print_table("CPU qgemm decode (default path: int8 activations) vs torch int4 and ggml MUL_MAT",
                ["case", "bits/w", "ours ms", "GB/s", "torch peer", "torch ms", "torch/ours", "ggml peer", "ggml ms",
                 "ggml/ours"], rows(),
                note="fp32 x (torch: bf16 x, its packed int4 weights); ggml: bench/ggml/ggml_mulmat.c, ggml's own "
                     "quantization and MUL_MAT (f32 activations, plain CPU graph, no repacked buffer), same thread "
                     "count and clock. Ratios > 1: ours faster. Target (issue 14): >= 1.2x.")


LOWBIT = [("int3", 128), ("int3_sym", 64), ("int2", 64), ("int2_sym", 32), ("nf4", 64), ("int4", 128)]


def lowbit(args):
    """The 2- and 3-bit formats (and nf4, int4 g128 for scale) at 1 and 8 tokens: the default path
    (int8 activations where the format has them) against exact=True, NumPy fp32 and torch bf16
    F.linear on the same layer, the four alternating in each of --rounds rounds (best of)."""
    shapes = [args.shape] if args.shape else [(4096, 14336), (11008, 4096)]
    formats = [(f, g) for f, g in LOWBIT if not args.formats or f in args.formats]
    cpu_time = CLOCK is time.process_time
    print(f"memkernels {mk.__version__}, CPU ISA {mk.cpu_isa()}, {mk.num_threads()} threads, "
          f"{'CPU time' if cpu_time else 'wall time'}" + (f", torch {torch.__version__}" if torch else ""))
    rng = np.random.default_rng(0)

    def rows():
        for n, k in shapes:
            w = rng.standard_normal((n, k), dtype=np.float32)
            tw16 = torch.from_numpy(w).to(torch.bfloat16) if torch else None
            qms = {(f, g): mk.quantize(w, f, group_size=g) for f, g in formats}
            for b in (1, 8):
                x = rng.standard_normal((b, k), dtype=np.float32)
                out = np.empty((b, n), np.float32)
                tx16 = torch.from_numpy(x).to(torch.bfloat16) if torch else None
                fns = {"numpy": (lambda: w @ x[0]) if b == 1 else (lambda: x @ w.T)}
                if torch:
                    fns["torch bf16"] = lambda: F.linear(tx16, tw16)
                for key, qm in qms.items():
                    fns[key + (False,)] = lambda qm=qm: mk.qgemm(x, qm, out=out)
                    fns[key + (True,)] = lambda qm=qm: mk.qgemm(x, qm, out=out, exact=True)
                best = {name: float("inf") for name in fns}
                for _ in range(args.rounds):  # alternate every variant in each round
                    for name, fn in fns.items():
                        best[name] = min(best[name], bench(fn))
                for (f, g) in formats:
                    qm = qms[(f, g)]
                    t, te = best[(f, g, False)], best[(f, g, True)]
                    tn, tt = best["numpy"], best.get("torch bf16")
                    yield [f"{n}x{k} {b} tok {f} g{g}", f"{qm.bits_per_weight:.2f}", fmt_ms(t, 3),
                           f"{qm.nbytes / t / 1e9:.1f}", fmt_ms(te, 3), fmt_ratio(te, t), fmt_ms(tn, 3),
                           fmt_ratio(tn, t), fmt_ms(tt, 3), fmt_ratio(tt, t)]

    print_table("CPU qgemm, 2- / 3-bit formats and nf4: default vs exact=True vs dense peers",
                ["case", "bits/w", "default ms", "GB/s", "exact ms", "exact/default", "numpy fp32 ms",
                 "numpy/default", "torch bf16 ms", "torch bf16/default"], rows(),
                note="default: int8 activations (int3 / int2 / nf4 too since the issue-14 follow-up); "
                     "all variants alternate in each round, best of the rounds. Ratios > 1: the default is faster.")


SMOL = [("q_proj / o_proj", 576, 576), ("k_proj / v_proj", 192, 576), ("gate / up", 1536, 576),
        ("down", 576, 1536), ("lm_head", 49152, 576)]
SMOL_CALLS = {"q_proj / o_proj": 2, "k_proj / v_proj": 2, "gate / up": 2, "down": 1}  # per layer, 30 layers


def small(args):
    """Per-call times of a 135M model's decode GEMVs and of the smallest kernel calls."""
    print(f"memkernels {mk.__version__}, CPU ISA {mk.cpu_isa()}, {mk.num_threads()} threads")
    rng = np.random.default_rng(0)
    formats = [("int4_sym", 32), ("int8", 32), ("int4_min", 32), ("int4", 32)]

    def us(t):
        return "n/a" if t is None else f"{t * 1e6:.1f}"

    per_token = {f: [0.0, 0.0] for f in formats}
    per_token_np = [0.0]

    def rows():
        for role, n, k in SMOL:
            w = rng.standard_normal((n, k), dtype=np.float32) * 0.05
            x = rng.standard_normal(k, dtype=np.float32)
            t_np = bench(lambda: w @ x)
            ti4 = torch_int4(w, 32) if torch else None
            t_i4 = None
            if ti4:
                tx16 = torch.from_numpy(x[None]).to(torch.bfloat16)
                t_i4 = bench(lambda: ti4(tx16))
            calls = SMOL_CALLS.get(role, 1 / 30) * 30
            per_token_np[0] += calls * t_np
            for f, g in formats:
                qm = mk.quantize(w, f, group_size=g)
                t = bench(lambda: mk.qgemm(x, qm))
                te = bench(lambda: mk.qgemm(x, qm, exact=True))
                per_token[(f, g)][0] += calls * t
                per_token[(f, g)][1] += calls * te
                yield [f"{role} {n}x{k} {f} g{g}", us(t), us(te), f"{qm.nbytes / t / 1e9:.1f}", us(t_np),
                       fmt_ratio(t_np, t), us(t_i4) if f == "int4" else "", fmt_ratio(t_i4, t) if f == "int4" else ""]

    print_table("CPU qgemm, small-model decode shapes (1 token)",
                ["case", "ours us", "ours exact us", "GB/s", "numpy fp32 us", "numpy/ours", "torch int4 g32 us",
                 "torch int4/ours"], rows(),
                note="case = layer, out x in features, format; 'ours' is the default (int8 activations), "
                     "'exact' exact=True. torch int4 g32: bf16 x.")
    # the GEMVs of one decode step of the 30-layer model (7 per layer + the vocabulary projection)
    print_table("CPU qgemm, one 135M-model decode step (210 layer GEMVs + lm_head)",
                ["format", "ours ms", "ours exact ms", "numpy fp32 ms"],
                ([f"{f} g{g}", fmt_ms(a, 2), fmt_ms(b, 2), fmt_ms(per_token_np[0], 2)]
                 for (f, g), (a, b) in per_token.items()),
                note="Sum of the per-call times above x calls per token; llama.cpp decodes the whole model "
                     "(every op) in 8-9.5 ms per token on this machine with 2 threads (issue 14).")

    def fixed():
        qm = mk.quantize(rng.standard_normal((8, 32), dtype=np.float32), "int4", group_size=32)
        x = rng.standard_normal((1, 32), dtype=np.float32)
        out = np.empty((1, 8), np.float32)
        yield ["qgemm 8x32 int4 g32, 1 token", us(bench(lambda: mk.qgemm(x, qm)))]
        yield ["qgemm 8x32 int4 g32, 1 token, out=", us(bench(lambda: mk.qgemm(x, qm, out=out)))]
        yield ["qgemm 8x32 int4 g32, 1 token, exact", us(bench(lambda: mk.qgemm(x, qm, exact=True)))]
        q = rng.standard_normal((1, 1, 1, 8), dtype=np.float32)
        yield ["flash_attention 1x1x1x8", us(bench(lambda: mk.flash_attention(q, q, q)))]
        q = rng.standard_normal((1, 1, 9, 64), dtype=np.float32)
        kv = rng.standard_normal((1, 1, 3, 64), dtype=np.float32)
        yield ["flash_attention 9 heads, 3 kv heads, d 64, 1 key", us(bench(lambda: mk.flash_attention(q, kv, kv)))]
        c = mk.PagedKVCache(1, 8, 16, 3, 64)
        sid = c.add_sequence()
        c.append([sid], 0, kv[0], kv[0])
        q3 = q[0]
        yield ["paged_attention decode, 9 heads, 3 kv heads, d 64, 1 key",
               us(bench(lambda: mk.paged_attention(q3, c, 0, [sid])))]
        yield ["numpy: np.empty((1, 8)) (reference)", us(bench(lambda: np.empty((1, 8), np.float32)))]

    print_table("Fixed cost per call from Python (smallest problems)", ["call", "us"], fixed(),
                note="Each is almost entirely fixed cost: wrapper, argument conversion and checks, dispatch.")


PREFILL_TOKENS = [16, 32, 128, 512]
PREFILL_FORMATS = [("int4", 128), ("int4_sym", 32), ("int4_min", 32), ("nf4", 64), ("int8", None)]
GGML_PREFILL = {"int4 g128": "q4_K", "int4_sym g32": "q4_0", "int4_min g32": "q4_1"}


def prefill(args):
    """Prefill (16-512 tokens): ours (default = bf16 activations where the CPU has AVX512-BF16, and
    exact=True) against torch bf16 F.linear and torch's int4 kernel, alternating ours / peer in one
    loop, best of the rounds; 1 thread (CPU time) and 2 threads (wall time)."""
    if torch is None:
        print("torch is not installed: the prefill table compares against torch, skipping")
        return
    shapes = [args.shape] if args.shape else [(4096, 14336), (11008, 4096)]
    tokens = [16, 32] if args.quick else PREFILL_TOKENS
    formats = [("int4", 128)] if args.quick else PREFILL_FORMATS
    ggml = ggml_mul_mat_us("q4_0|q4_1|q4_K", "16|32|128|512", timeout=3600)
    rng = np.random.default_rng(0)
    print(f"memkernels {mk.__version__}, CPU ISA {mk.cpu_isa()}, torch {torch.__version__}; "
          f"{args.rounds} rounds, ours and the peers alternating in each")

    def timed(fn, clock):
        t = clock()
        fn()
        return clock() - t

    def rows():
        for n, k in shapes:
            w = rng.standard_normal((n, k), dtype=np.float32)
            tw16 = torch.from_numpy(w).to(torch.bfloat16)
            ti4 = torch_int4(w, 128)
            qms = {(f, g): mk.quantize(w, f, group_size=g) for f, g in formats}
            for threads in args.threads:
                mk.set_num_threads(threads)
                torch.set_num_threads(threads)
                clock = time.process_time if threads == 1 else time.perf_counter
                for b in tokens:
                    x = rng.standard_normal((b, k), dtype=np.float32)
                    tx16 = torch.from_numpy(x).to(torch.bfloat16)
                    out = np.empty((b, n), np.float32)
                    calls = {"torch bf16": lambda: F.linear(tx16, tw16)}
                    if ti4:
                        calls["torch int4"] = lambda: ti4(tx16)
                    for (f, g), qm in qms.items():
                        calls[(f, g, False)] = lambda qm=qm: mk.qgemm(x, qm, out=out)
                        calls[(f, g, True)] = lambda qm=qm: mk.qgemm(x, qm, out=out, exact=True)
                    for fn in calls.values():
                        fn()  # warm-up
                    best = {key: float("inf") for key in calls}
                    for _ in range(args.rounds):  # alternate: each round times every call once
                        for key, fn in calls.items():
                            best[key] = min(best[key], timed(fn, clock))
                    t16, ti = best["torch bf16"], best.get("torch int4")
                    for (f, g), qm in qms.items():
                        fname = f if g is None else f"{f} g{g}"
                        gk = ggml.get((GGML_PREFILL.get(fname, ""), n, b, k)) if threads == 2 else None
                        gk = None if gk is None else gk * 1e-6
                        for exact in (False, True):
                            t = best[(f, g, exact)]
                            yield [f"{n}x{k} {b} tok {fname}" + (" exact" if exact else ""), threads, fmt_ms(t, 2),
                                   f"{2 * n * k * b / t / 1e9:.0f}", fmt_ms(t16, 2), fmt_ratio(t16, t),
                                   fmt_ms(ti, 2), fmt_ratio(ti, t), fmt_ms(gk, 2), fmt_ratio(gk, t)]

    print_table("CPU qgemm prefill", ["case", "threads", "ours ms", "GFLOP/s", "torch bf16 ms", "torch bf16/ours",
                                      "torch int4 g128 ms", "torch int4/ours", "ggml same ms", "ggml/ours"], rows(),
                note="case = out x in features, tokens, format; default = bf16 activations (AVX512-BF16) from 32 "
                     "tokens (int4/int4_sym/int4_min/int8/int3/int2/nf4) or 12 (others), int8 activations below; exact = fp32 "
                     "activations. 1 thread: CPU time (process_time), 2 threads: wall time; best of the rounds, "
                     "ours and peers alternating. torch int4: bf16 x, asymmetric int4 g128 packed by torch. ggml: "
                     "test-backend-ops perf (its own threads and clock; only its 4096x14336 shapes), same-format "
                     "type (q4_K for int4 g128, q4_0 for int4_sym g32, q4_1 for int4_min g32).")


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
    ap.add_argument("--kquant", action="store_true",
                    help="CPU: q4_k / q5_k / q6_k on 4096x14336 and 11008x4096, batch 1 and 8, 1 and 2 threads, "
                         "next to ggml q4_K / q6_K and torch int4 / bf16")
    ap.add_argument("--small", action="store_true",
                    help="CPU: per-call times over a 135M model's decode shapes and the fixed cost per call")
    ap.add_argument("--prefill", action="store_true",
                    help="CPU: prefill (16, 32, 128, 512 tokens) against torch bf16 F.linear / torch int4 / ggml, "
                         "1 and 2 threads")
    ap.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=None,
                    help="thread counts: --prefill runs each (default 1,2); the other modes use the first "
                         "for memkernels, torch and ggml (default: all cores)")
    ap.add_argument("--rounds", type=int, default=3, help="--prefill: alternating rounds (best of)")
    ap.add_argument("--tokens", type=lambda v: [int(t) for t in v.split(",")], default=None,
                    help="--prefill: token counts (default 16,32,128,512)")
    ap.add_argument("--decode", action="store_true",
                    help="CPU: per-token decode table (1 and 8 tokens) of the int4 formats and int8 vs torch int4 and "
                         "ggml (MEMKERNELS_GGML_SRC: a ggml source tree built in its build/ folder)")
    ap.add_argument("--lowbit", action="store_true",
                    help="CPU: int3 / int3_sym / int2 / int2_sym / nf4 (and int4 g128) at 1 and 8 tokens, default "
                         "path vs exact=True vs NumPy fp32 vs torch bf16, alternating in --rounds rounds")
    ap.add_argument("--formats", type=lambda v: v.split(","), default=None,
                    help="--lowbit: only these formats (comma-separated)")
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
    if args.threads and not args.prefill:
        mk.set_num_threads(args.threads[0])
        if torch is not None:
            torch.set_num_threads(args.threads[0])
    if args.prefill and not args.threads:
        args.threads = [1, 2]
    if args.cuda:
        gpu(args)
    elif args.decode:
        decode(args)
    elif args.lowbit:
        lowbit(args)
    elif args.small:
        small(args)
    elif args.prefill:
        if args.tokens:
            PREFILL_TOKENS[:] = args.tokens
        prefill(args)
    elif args.kquant:
        kquant(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()
