"""Paged decode attention benchmark: paged vs contiguous vs PyTorch SDPA, and memory waste.

Decode (q_len 1), 32 query heads / 8 kv heads, head_dim 128, contexts 4k and 16k, batch 1 and 16.
  paged      memkernels.paged_attention over a PagedKVCache (page_size 16)
  contig     the same kernel on a contiguous cache (one page per sequence, paged_attention_raw)
  flash      memkernels.flash_attention with seq_q = 1 (our contiguous flash kernel)
  sdpa       torch.nn.functional.scaled_dot_product_attention(enable_gqa=True), if torch is installed
GB/s counts the K/V bytes read once. Then the memory a ragged batch takes in pages vs a cache
preallocated at the maximum length. On a CUDA device (--cuda) the paged kernel's GB/s is printed.
Prints Markdown tables; ratios are "other/ours" (other time / paged time, preallocated / paged
memory): > 1 means the paged kernel is faster / smaller.

python bench/paged_attention.py [--quick] [--dtype float32|float16|bfloat16] [--threads N] [--cuda]
                                [--ctx N] [--max-len N]   (--quick --ctx 512 --max-len 1024: a smoke run)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_time, fmt_ms, fmt_ratio, print_table  # noqa: E402

import memkernels as mk  # noqa: E402

H, KVH, D = 32, 8, 128


def timeit(fn, max_reps=50):
    """Best of several runs, in seconds: the CPU is often shared, and the minimum is the least disturbed."""
    return best_time(fn, repeat=3, min_time=0.3, max_reps=max_reps)


def np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def bench_decode(batch, ctx, dtype, page_size=16):
    rng = np.random.default_rng(0)
    dt = np_dtype(dtype)
    pages_per_seq = (ctx + page_size - 1) // page_size
    cache = mk.PagedKVCache(1, batch * pages_per_seq, page_size, KVH, D, dtype)
    ids = [cache.add_sequence() for _ in range(batch)]
    k = rng.standard_normal((batch, ctx, KVH, D), dtype=np.float32).astype(dt)
    v = rng.standard_normal((batch, ctx, KVH, D), dtype=np.float32).astype(dt)
    for i, s in enumerate(ids):
        cache.append([s], 0, k[i], v[i], counts=[ctx])
    q = rng.standard_normal((batch, H, D), dtype=np.float32).astype(dt)
    out = np.empty_like(q)
    row = {}
    row["paged"] = timeit(lambda: mk.paged_attention(q, cache, 0, ids, out=out))
    # the same kernel, one page per sequence = a contiguous (batch, ctx, kvh, D) cache
    indptr = np.arange(batch + 1, dtype=np.int32)
    indices = np.arange(batch, dtype=np.int32)
    last = np.full(batch, ctx, dtype=np.int32)
    row["contig"] = timeit(lambda: mk.paged_attention_raw(q, k, v, indptr, indices, last, out=out))
    ref = mk.paged_attention_raw(q, k, v, indptr, indices, last).astype(np.float32)
    err = np.max(np.abs(out.astype(np.float32) - ref))
    assert err < 1e-2, f"paged and contiguous differ by {err}"
    q4 = q[:, None]
    out4 = np.empty_like(q4)
    row["flash"] = timeit(lambda: mk.flash_attention(q4, k, v, out=out4), max_reps=10)
    try:
        import torch

        tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        tq = torch.from_numpy(q.astype(np.float32)).to(tdt)[:, :, None]  # (B, H, 1, D)
        tk = torch.from_numpy(k.astype(np.float32)).to(tdt).transpose(1, 2).contiguous()  # (B, KVH, S, D)
        tv = torch.from_numpy(v.astype(np.float32)).to(tdt).transpose(1, 2).contiguous()
        f = torch.nn.functional.scaled_dot_product_attention
        with torch.inference_mode():
            row["sdpa"] = timeit(lambda: f(tq, tk, tv, enable_gqa=True), max_reps=20)
        del tk, tv
    except ImportError:
        row["sdpa"] = None
    kv_bytes = 2 * batch * ctx * KVH * D * dt.itemsize
    return row, kv_bytes


def bench_waste(page_size=16, batch=64, max_len=16384, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_len + 1, size=batch)
    cache = mk.PagedKVCache(1, int(sum((n + page_size - 1) // page_size for n in lens)), page_size, KVH, D,
                            "float16")
    z = np.zeros((max_len, KVH, D), dtype=np.float16)
    for n in lens:
        s = cache.add_sequence()
        cache.append([s], 0, z[:n], z[:n], counts=[int(n)])
    st = cache.stats()
    used = st["pages_used"] * page_size
    return lens, used, batch * max_len, st


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4k context only")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--cuda", action="store_true", help="also time the CUDA kernel (needs torch with CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for memkernels and torch (0: default)")
    ap.add_argument("--ctx", type=int, default=None, help="one CPU decode context length instead of 4k (and 16k)")
    ap.add_argument("--max-len", type=int, default=16384,
                    help="longest sequence of the ragged batch in the memory-waste table (default 16384)")
    args = ap.parse_args()
    if args.threads > 0:
        mk.set_num_threads(args.threads)
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    info = mk.info()
    print(f"memkernels {info['version']}  isa={info['cpu_isa']}  threads={info['num_threads']}  dtype={args.dtype}")
    try:
        import torch

        print(f"torch {torch.__version__}  threads={torch.get_num_threads()}")
    except ImportError:
        print("torch not installed: the sdpa columns are n/a")
    ctxs = [args.ctx] if args.ctx else [4096] if args.quick else [4096, 16384]

    def decode_rows():
        for ctx in ctxs:
            for batch in (1, 16):
                row, nbytes = bench_decode(batch, ctx, args.dtype)
                p = row["paged"]
                yield [f"batch {batch} ctx {ctx}", fmt_ms(p, 3), f"{nbytes / p / 1e9:.1f}", fmt_ms(row["contig"], 3),
                       fmt_ms(row["flash"], 3), fmt_ms(row["sdpa"], 3), fmt_ratio(row["contig"], p),
                       fmt_ratio(row["flash"], p), fmt_ratio(row["sdpa"], p)]

    print_table(f"CPU paged decode, {args.dtype}",
                ["case", "paged ms", "GB/s", "contig ms", "flash ms", "sdpa ms", "contig/ours", "flash/ours",
                 "sdpa/ours"], decode_rows(),
                note=f"{H} q / {KVH} kv heads, head_dim {D}, page_size 16; ours = paged; ratios: other ms / paged ms.")

    lens, used, prealloc, st = bench_waste(max_len=args.max_len)
    print_table(f"KV memory, ragged batch of {len(lens)}, lengths 1..{args.max_len}",
                ["case", "paged token slots", "fragmentation %", "prealloc token slots", "paged % of prealloc",
                 "paged waste %", "prealloc waste %", "prealloc/ours"],
                [["paged vs max-length preallocation", used, f"{st['fragmentation'] * 100:.2f}", prealloc,
                  f"{used / prealloc * 100:.1f}", f"{(1 - lens.sum() / used) * 100:.2f}",
                  f"{(1 - lens.sum() / prealloc) * 100:.1f}", fmt_ratio(prealloc, used)]],
                note=f"mean length {lens.mean():.0f}, page_size 16; prealloc/ours: token slots of a cache "
                     "preallocated at the maximum length / paged token slots.")

    if args.cuda:
        bench_cuda(args.dtype)


def bench_cuda(dtype):
    import torch

    if not torch.cuda.is_available() or not mk.info()["cuda_available"]:
        print("no CUDA device")
        return
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    # device copy bandwidth for reference
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    for _ in range(10):
        y.copy_(x)
    ev1.record()
    torch.cuda.synchronize()
    copy_bw = 2 * x.numel() * 10 / (ev0.elapsed_time(ev1) * 1e-3) / 1e9
    del x, y

    def rows():
        for ctx in (4096, 16384):
            for batch in (1, 16, 64):
                ps = 16
                cache = mk.PagedKVCache(1, batch * ((ctx + ps - 1) // ps), ps, KVH, D, dtype, device="cuda")
                ids = [cache.add_sequence() for _ in range(batch)]
                for s in ids:
                    k = torch.randn(ctx, KVH, D, dtype=tdt, device="cuda")
                    cache.append([s], 0, k, k, counts=[ctx])
                q = torch.randn(batch, H, D, dtype=tdt, device="cuda")
                out = torch.empty_like(q)
                for _ in range(3):
                    mk.paged_attention(q, cache, 0, ids, out=out)
                torch.cuda.synchronize()
                reps = 20
                ev0.record()
                for _ in range(reps):
                    mk.paged_attention(q, cache, 0, ids, out=out)
                ev1.record()
                torch.cuda.synchronize()
                t = ev0.elapsed_time(ev1) * 1e-3 / reps
                nbytes = 2 * batch * ctx * KVH * D * q.element_size()
                del cache
                t_copy = nbytes / (copy_bw * 1e9)  # the device copy, for as many bytes of traffic
                yield [f"batch {batch} ctx {ctx}", f"{t * 1e6:.1f}", f"{nbytes / t / 1e9:.0f}",
                       f"{nbytes / t / 1e9 / copy_bw * 100:.0f}", fmt_ratio(t_copy, t)]

    print_table(f"CUDA paged decode, {dtype}, on {torch.cuda.get_device_name()}",
                ["case", "paged us", "GB/s", "% of copy bandwidth", "copy/ours"], rows(),
                note=f"page_size 16; device copy bandwidth (read + write) {copy_bw:.0f} GB/s; copy/ours: time of the "
                     "device copy for as many bytes of traffic / paged time.")


if __name__ == "__main__":
    main()
