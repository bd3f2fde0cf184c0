"""Paged decode attention benchmark: paged vs contiguous vs PyTorch SDPA, and memory waste.

Decode (q_len 1), 32 query heads / 8 kv heads, head_dim 128, contexts 4k and 16k, batch 1 and 16.
  paged      memkernels.paged_attention over a PagedKVCache (page_size 16)
  contig     the same kernel on a contiguous cache (one page per sequence, paged_attention_raw)
  flash      memkernels.flash_attention with seq_q = 1 (our contiguous flash kernel)
  sdpa       torch.nn.functional.scaled_dot_product_attention(enable_gqa=True), if torch is installed
GB/s counts the K/V bytes read once. Then the memory a ragged batch takes in pages vs a cache
preallocated at the maximum length. On a CUDA device (--cuda) the paged kernel's GB/s is printed.

python bench/paged_attention.py [--quick] [--dtype float32|float16|bfloat16] [--threads N] [--cuda]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_time  # noqa: E402

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
        row["sdpa"] = float("nan")
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
        print("torch not installed: no SDPA column")
    print()
    hdr = (f"{'batch':>5} {'ctx':>6} | {'paged ms':>9} {'GB/s':>6} | {'contig ms':>9} {'flash ms':>9} "
           f"{'sdpa ms':>9} | {'contig/paged':>12} {'flash/paged':>11} {'sdpa/paged':>10}")
    print(hdr)
    print("-" * len(hdr))
    ctxs = [4096] if args.quick else [4096, 16384]
    for ctx in ctxs:
        for batch in (1, 16):
            row, nbytes = bench_decode(batch, ctx, args.dtype)
            p = row["paged"]
            print(f"{batch:>5} {ctx:>6} | {p * 1e3:>9.3f} {nbytes / p / 1e9:>6.1f} | {row['contig'] * 1e3:>9.3f} "
                  f"{row['flash'] * 1e3:>9.3f} {row['sdpa'] * 1e3:>9.3f} | {row['contig'] / p:>12.2f} "
                  f"{row['flash'] / p:>11.2f} {row['sdpa'] / p:>10.2f}")

    print()
    lens, used, prealloc, st = bench_waste()
    print(f"ragged batch of {len(lens)} sequences, lengths 1..16384 (mean {lens.mean():.0f}), page_size 16:")
    print(f"  token slots: paged {used} (fragmentation {st['fragmentation'] * 100:.2f}%), "
          f"max-length preallocation {prealloc} -> paged uses {used / prealloc * 100:.1f}% "
          f"(waste {(1 - lens.sum() / used) * 100:.2f}% vs {(1 - lens.sum() / prealloc) * 100:.1f}%)")

    if args.cuda:
        bench_cuda(args.dtype)


def bench_cuda(dtype):
    import torch

    if not torch.cuda.is_available() or not mk.info()["cuda_available"]:
        print("no CUDA device")
        return
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    print("\nCUDA decode (paged, page_size 16)")
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
    print(f"device copy bandwidth (read + write): {copy_bw:.0f} GB/s")
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
            print(f"  batch {batch:>3} ctx {ctx:>6}: {t * 1e6:8.1f} us  {nbytes / t / 1e9:7.0f} GB/s  "
                  f"({nbytes / t / 1e9 / copy_bw * 100:.0f}% of copy bandwidth)")
            del cache


if __name__ == "__main__":
    main()
