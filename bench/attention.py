"""Flash attention benchmark: memkernels vs naive NumPy vs PyTorch scaled_dot_product_attention.

CPU (fp32): time, GFLOP/s, ratio torch/ours (target >= 1.0) and peak extra memory per method.
GPU (bf16, when a CUDA device and torch with CUDA are present): TFLOP/s vs torch SDPA (flash).
Call overhead (CPU): microseconds per call of the smallest flash_attention / paged_attention calls
(decode steps of small models), where the fixed cost of a call (wrapper, binding, argument checks)
is all there is, next to torch SDPA on the same tiny tensors; target <= 3 us.
Usage: python bench/attention.py [--quick] [--no-memory] [--max-seq N] [--overhead-only]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import best_time, fmt_mib, fmt_ms, fmt_ratio, peak_extra_memory, print_table, try_import  # noqa: E402

import memkernels as mk  # noqa: E402

CPU_SHAPES = [  # (batch, heads, seq, head_dim, causal)
    (1, 16, 1024, 64, False),
    (1, 16, 2048, 128, True),
    (1, 8, 4096, 128, True),
]


def flops(b, h, s, d, causal):
    return 4.0 * b * h * s * s * d / (2 if causal else 1)


def naive_numpy(q, k, v, causal):
    """Textbook attention on (batch, seq, heads, dim) arrays: materialises seq x seq scores."""
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if causal:
        s += np.triu(np.full(s.shape[-2:], -np.inf, dtype=s.dtype), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return (s @ vh).transpose(0, 2, 1, 3)


SETUP = """
import numpy as np
b, h, s, d, causal = {b}, {h}, {s}, {d}, {causal}
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((b, s, h, d), dtype=np.float32) for _ in range(3))
"""
RUNNERS = {
    "memkernels": "import memkernels as mk\nout = np.empty_like(q)\ndef run(): mk.flash_attention(q, k, v, causal=causal, out=out)",
    "numpy": "import sys; sys.path.insert(0, {bench!r})\nfrom attention import naive_numpy\ndef run(): naive_numpy(q, k, v, causal)",
    "torch": "import torch\nqt, kt, vt = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))\n"
             "def run(): torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)",
}


def bench_cpu(quick: bool, memory: bool, max_seq=None):
    torch = try_import("torch")
    rows = []
    for b, h, s, d, causal in CPU_SHAPES[:2] if quick else CPU_SHAPES:
        if max_seq is not None and s > max_seq:
            continue
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((b, s, h, d), dtype=np.float32) for _ in range(3))
        out = np.empty_like(q)
        ours = best_time(lambda: mk.flash_attention(q, k, v, causal=causal, out=out))
        naive = best_time(lambda: naive_numpy(q, k, v, causal), repeat=2)
        t_torch = None
        if torch is not None:
            qt, kt, vt = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
            t_torch = best_time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
        mem = {}
        if memory:
            for name, code in RUNNERS.items():
                if name == "torch" and torch is None:
                    continue
                setup = SETUP.format(b=b, h=h, s=s, d=d, causal=causal)
                mem[name] = peak_extra_memory(setup + code.format(bench=os.path.dirname(os.path.abspath(__file__))))
        gf = flops(b, h, s, d, causal) / 1e9
        rows.append([f"B={b} H={h} S={s} D={d}{' causal' if causal else ''}", fmt_ms(ours), f"{gf / ours:.0f}",
                     fmt_ms(naive), fmt_ms(t_torch), f"{gf / t_torch:.0f}" if t_torch else "n/a",
                     fmt_ratio(naive, ours), fmt_ratio(t_torch, ours), fmt_mib(mem.get("memkernels")),
                     fmt_mib(mem.get("numpy")), fmt_mib(mem.get("torch"))])
    print_table(f"CPU flash attention fp32 ({mk.num_threads()} threads, ISA {mk.cpu_isa()})",
                ["shape", "ours ms", "ours GFLOP/s", "numpy ms", "torch ms", "torch GFLOP/s", "numpy/ours",
                 "torch/ours", "ours extra MiB", "numpy extra MiB", "torch extra MiB"], rows)


def per_call(fn, calls=2000, repeat=7, clock=time.process_time):
    """Best time per call of fn over `repeat` batches of `calls` calls (seconds): CPU time by default,
    which the other processes of a loaded machine disturb less than wall time."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        for _ in range(calls):
            fn()
        best = min(best, (clock() - t) / calls)
    return best


def bench_overhead():
    """Per-call times of decode-sized calls: what a small model (0.1-1B, hundreds of kernel calls per
    token) pays on every call. The torch column is SDPA on the same tensors (inference mode), the
    reference point for the fixed cost of one attention call from Python."""
    torch = try_import("torch")
    rng = np.random.default_rng(0)
    rows = []
    # One torch thread, as ours runs these sizes: torch's idle OpenMP workers spin, which CPU time
    # would otherwise charge to it.
    torch_threads = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        torch.set_num_threads(1)

    def torch_sdpa(q, k, v, mask=None):
        if torch is None:
            return None
        qt, kt, vt = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))) for a in (q, k, v))
        if kt.shape[1] != qt.shape[1]:  # GQA: SDPA on CPU wants the kv heads repeated (or enable_gqa)
            kt = kt.repeat_interleave(qt.shape[1] // kt.shape[1], 1)
            vt = vt.repeat_interleave(qt.shape[1] // vt.shape[1], 1)
        m = None if mask is None else torch.from_numpy(mask)[:, None, None, :]
        with torch.inference_mode():
            return per_call(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=m))

    def row(name, shape, ours, peer):
        rows.append([name, shape, f"{ours * 1e6:.2f}", "n/a" if peer is None else f"{peer * 1e6:.2f}",
                     fmt_ratio(peer, ours)])

    for b, sq, sk, h, hkv, d in [(1, 1, 1, 1, 1, 8), (1, 1, 16, 9, 3, 64), (4, 1, 32, 8, 2, 64)]:
        q = rng.standard_normal((b, sq, h, d), dtype=np.float32)
        k, v = (rng.standard_normal((b, sk, hkv, d), dtype=np.float32) for _ in range(2))
        out = np.empty_like(q)
        shape = f"B={b} q={sq} k={sk} H={h}/{hkv} D={d}"
        row("flash_attention", shape, per_call(lambda: mk.flash_attention(q, k, v, causal=True)), torch_sdpa(q, k, v))
        row("flash_attention out=", shape, per_call(lambda: mk.flash_attention(q, k, v, causal=True, out=out)), None)
        keep = np.ones((b, sk), bool)
        keep[:, : sk // 4] = False  # left padding
        row("flash_attention key_mask", shape, per_call(lambda: mk.flash_attention(q, k, v, causal=True, key_mask=keep)),
            torch_sdpa(q, k, v, keep))
    for batch, ctx, h, hkv, d in [(1, 1, 1, 1, 8), (1, 16, 9, 3, 64), (4, 32, 8, 2, 64)]:
        cache = mk.PagedKVCache(num_layers=1, num_pages=64, page_size=16, kv_heads=hkv, head_dim=d)
        seqs = [cache.add_sequence() for _ in range(batch)]
        k = rng.standard_normal((batch * ctx, hkv, d), dtype=np.float32)
        cache.append(seqs, 0, k, k, counts=[ctx] * batch)
        q = rng.standard_normal((batch, h, d), dtype=np.float32)
        kv = k.reshape(batch, ctx, hkv, d)
        shape = f"B={batch} ctx={ctx} H={h}/{hkv} D={d}"
        sdpa = torch_sdpa(q[:, None], kv, kv)
        row("paged_attention", shape, per_call(lambda: mk.paged_attention(q, cache, 0, seqs)), sdpa)
        ind = cache.build_indices(seqs, 0)
        kp, vp = cache.k_pages(0), cache.v_pages(0)
        row("paged_attention_raw", shape, per_call(lambda: mk.paged_attention_raw(q, kp, vp, *ind)), sdpa)
    if torch is not None:
        torch.set_num_threads(torch_threads)
    print_table(f"CPU call overhead, us per call (CPU time, best of 7 x 2000 calls; torch on 1 thread)",
                ["call", "shape", "ours us", "torch SDPA us", "torch/ours"], rows,
                note="Decode-sized calls run on the calling thread (no thread team), so per-call CPU time is the "
                     "fixed cost plus a tiny kernel. Target: <= 3 us for the smallest shapes.")


def bench_gpu(quick: bool):
    torch = try_import("torch")
    if torch is None or not torch.cuda.is_available() or not mk.info()["cuda_available"]:
        print("\n(GPU benchmark skipped: needs a CUDA device, a CUDA build of memkernels and torch with CUDA)")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    seqs = [1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384]
    for d in (64, 128):
        for s in seqs:
            for causal in (False, True):
                b, h = max(1, 16384 // s), 2048 // d
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                out = torch.empty_like(q)
                sync = torch.cuda.synchronize
                ours = best_time(lambda: mk.flash_attention(q, k, v, causal=causal, out=out), sync=sync)
                qt, kt, vt = (a.transpose(1, 2) for a in (q, k, v))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ref = best_time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                    sync=sync)
                tf = flops(b, h, s, d, causal) / 1e12
                rows.append([f"B={b} H={h} S={s} D={d}{' causal' if causal else ''}", fmt_ms(ours), f"{tf / ours:.0f}",
                             fmt_ms(ref), f"{tf / ref:.0f}", fmt_ratio(ref, ours)])
    print_table(f"GPU flash attention bf16 ({torch.cuda.get_device_name()})",
                ["shape", "ours ms", "ours TFLOP/s", "torch SDPA ms", "torch TFLOP/s", "torch/ours"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess runs")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--max-seq", type=int, default=None, help="CPU: only the shapes with seq <= this (smoke runs)")
    ap.add_argument("--overhead-only", action="store_true", help="only the per-call overhead table")
    args = ap.parse_args()
    if args.overhead_only:
        bench_overhead()
        return
    if not args.gpu_only:
        bench_overhead()
        bench_cpu(args.quick, not args.no_memory, args.max_seq)
    bench_gpu(args.quick)


if __name__ == "__main__":
    main()
