"""Weight streaming benchmark: a sparse FFN stack about twice the DRAM budget, read from disk per token.

Methods (same tokens, same active neurons, same compute):
  naive     each layer's gate/up/down read whole per token with O_DIRECT (page cache bypassed)
  mmap      np.memmap of the standard layout, active rows/columns indexed; page cache dropped
            (posix_fadvise DONTNEED) before the run, then the kernel caches what it faulted in
  ours      memkernels.WeightStore: bundled neurons, coalesced O_DIRECT reads, windowing cache under
            the budget (+ "ours+prefetch": layer-ahead prefetch of the next layer's active set,
            given by an oracle predictor here)
Activity: a fraction `--active` of each layer's neurons fire per token; between tokens `--churn` of
that set is replaced by other neurons (correlated across tokens, as observed in ReLU-fied LLMs).
Reports tokens/s and MB read per token (the store's own count, and /proc/self/io read_bytes), and,
as Markdown tables, the ratios other method / ours per token ("naive/ours bytes", "mmap/ours time",
...: > 1 means the WeightStore reads fewer bytes / is faster).
Generated files go to --dir (default /var/tmp: on disk, O_DIRECT works) and are deleted afterwards.

  python bench/weight_stream.py            # ~300 MB model, 150 MB budget
  python bench/weight_stream.py --quick    # ~100 MB model
"""
from __future__ import annotations

import argparse
import mmap
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_ratio, print_table  # noqa: E402

import memkernels as mk  # noqa: E402

DT = np.float32  # fp32 weights: NumPy's fp16->fp32 conversion would dominate the compute of every method


def proc_read_bytes() -> int:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def ffn(x, gate, up, down_t):
    """Sparse FFN over the active neurons: (silu(gate x) * (up x)) @ down_t."""
    g = gate.astype(np.float32) @ x
    u = up.astype(np.float32) @ x
    h = g / (1.0 + np.exp(-g)) * u
    return h @ down_t.astype(np.float32)


def make_activity(rng, n_layers, d_ff, active, churn, tokens):
    k = int(d_ff * active)
    sets = []
    cur = [rng.choice(d_ff, k, replace=False) for _ in range(n_layers)]
    for _ in range(tokens):
        nxt = []
        for s in cur:
            keep = s[rng.random(k) >= churn]
            pool = np.setdiff1d(np.arange(d_ff), keep)
            nxt.append(np.sort(np.concatenate([keep, rng.choice(pool, k - keep.size, replace=False)])))
        sets.append(nxt)
        cur = nxt
    return sets


def write_files(d, n_layers, d_model, d_ff, rng):
    """The same random weights twice: our store (bundled) and a standard-layout raw file."""
    raw_path, store_path = os.path.join(d, "wstream_std.bin"), os.path.join(d, "wstream.mkws")
    layers = {}
    with open(raw_path, "wb") as f:
        for layer in range(n_layers):
            gate = (rng.standard_normal((d_ff, d_model), dtype=np.float32) * 0.02).astype(DT)
            up = (rng.standard_normal((d_ff, d_model), dtype=np.float32) * 0.02).astype(DT)
            down = (rng.standard_normal((d_model, d_ff), dtype=np.float32) * 0.02).astype(DT)
            for a in (gate, up, down):
                f.write(a.tobytes())
            layers[layer] = {"gate": gate, "up": up, "down": down}
        os.fsync(f.fileno())
    mk.write_weight_store(store_path, None, layers)
    return raw_path, store_path


def run_naive(raw_path, acts, n_layers, d_model, d_ff, x):
    layer_bytes = 3 * d_ff * d_model * np.dtype(DT).itemsize
    buf = mmap.mmap(-1, layer_bytes)  # page aligned, as O_DIRECT needs
    arr = np.frombuffer(buf, dtype=DT)
    fd = os.open(raw_path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    nread = 0
    try:
        t0, r0 = time.perf_counter(), proc_read_bytes()
        for token in acts:
            h = x
            for layer in range(n_layers):
                got = 0
                while got < layer_bytes:
                    got += os.preadv(fd, [memoryview(buf)[got:]], layer * layer_bytes + got)
                nread += got
                gate = arr[: d_ff * d_model].reshape(d_ff, d_model)
                up = arr[d_ff * d_model: 2 * d_ff * d_model].reshape(d_ff, d_model)
                down = arr[2 * d_ff * d_model:].reshape(d_model, d_ff)
                ids = token[layer]
                h = h + ffn(h, gate[ids], up[ids], down[:, ids].T)
        dt = time.perf_counter() - t0
        return dt, nread, proc_read_bytes() - r0
    finally:
        os.close(fd)
        del arr  # the buffer is freed with its last view


def run_mmap(raw_path, acts, n_layers, d_model, d_ff, x, warmup, drop_every_token):
    drop_cache(raw_path)
    mm = np.memmap(raw_path, dtype=DT, mode="r")
    per = 3 * d_ff * d_model

    def token_pass(token):
        nonlocal mm
        h = x
        for layer in range(n_layers):
            base = layer * per
            gate = mm[base: base + d_ff * d_model].reshape(d_ff, d_model)
            up = mm[base + d_ff * d_model: base + 2 * d_ff * d_model].reshape(d_ff, d_model)
            down = mm[base + 2 * d_ff * d_model: base + per].reshape(d_model, d_ff)
            ids = token[layer]
            h = h + ffn(h, gate[ids], up[ids], down[:, ids].T)
        if drop_every_token:  # the model does not fit: nothing survives in the page cache
            del mm, gate, up, down  # mapped pages cannot be dropped: unmap first
            drop_cache(raw_path)
            mm = np.memmap(raw_path, dtype=DT, mode="r")

    r0 = proc_read_bytes()
    for token in acts[:warmup]:
        token_pass(token)
    warm_bytes = proc_read_bytes() - r0
    t0, r0 = time.perf_counter(), proc_read_bytes()
    for token in acts[warmup:]:
        token_pass(token)
    dt = time.perf_counter() - t0
    rb = proc_read_bytes() - r0
    del mm
    drop_cache(raw_path)
    return dt, warm_bytes, rb


def run_ours(store_path, acts, n_layers, budget, x, prefetch, warmup, io_threads=4):
    drop_cache(store_path)
    with mk.WeightStore.open(store_path, budget, window_tokens=5, io_threads=io_threads) as ws:
        mode = ws.io_mode

        def token_pass(token):
            h = x
            if prefetch:
                ws.prefetch(0, token[0])
            for layer in range(n_layers):
                if prefetch and layer + 1 < n_layers:
                    ws.prefetch(layer + 1, token[layer + 1])  # overlaps with this layer's compute
                rows = ws.get_rows(layer, token[layer])
                h = h + ffn(h, rows[:, 0], rows[:, 1], rows[:, 2])
            ws.next_token()

        for token in acts[:warmup]:
            token_pass(token)
        ws.wait_prefetch()
        ws.reset_stats()
        t0, r0 = time.perf_counter(), proc_read_bytes()
        for token in acts[warmup:]:
            token_pass(token)
        ws.wait_prefetch()
        dt = time.perf_counter() - t0
        s = ws.stats()
        return dt, s["bytes_read"], proc_read_bytes() - r0, s, mode


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=1536)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--active", type=float, default=0.10)
    ap.add_argument("--churn", type=float, default=0.2)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved repetitions; the median is reported")
    ap.add_argument("--io-threads", type=int, default=4)
    args = ap.parse_args()
    n_layers = args.layers or (2 if args.quick else 4)
    d_model, d_ff = args.d_model, args.d_ff
    tokens = args.tokens or (12 if args.quick else 24)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = 2
    rng = np.random.default_rng(0)
    model_bytes = n_layers * 3 * d_model * d_ff * np.dtype(DT).itemsize
    budget = model_bytes // 2
    workdir = os.path.join(args.dir, f"mk_wstream_{os.getpid()}")
    os.makedirs(workdir)
    naive_tokens = max(3, tokens // 4)
    names = ["naive whole-layer O_DIRECT", "mmap (cache dropped before the run)", "mmap (cache dropped every token)",
             "ours (bundled + window)", "ours + layer-ahead prefetch"]
    counts = [naive_tokens, tokens, tokens, tokens, tokens]
    res = {n: [] for n in names}  # (seconds, counted bytes, /proc bytes)
    stats = {}
    try:
        t = time.perf_counter()
        raw_path, store_path = write_files(workdir, n_layers, d_model, d_ff, rng)
        gen_s = time.perf_counter() - t
        acts = make_activity(rng, n_layers, d_ff, args.active, args.churn, tokens + warmup)
        x = rng.standard_normal(d_model).astype(np.float32) * 0.01
        for _ in range(rounds):  # interleaved, so a noisy neighbour hurts every method alike
            res[names[0]].append(run_naive(raw_path, acts[warmup:warmup + naive_tokens], n_layers, d_model, d_ff, x))
            dt, warm_m, rb = run_mmap(raw_path, acts, n_layers, d_model, d_ff, x, warmup, False)
            res[names[1]].append((dt, -1, rb))
            dt, _, rb = run_mmap(raw_path, acts, n_layers, d_model, d_ff, x, warmup, True)
            res[names[2]].append((dt, -1, rb))
            for name, pf in ((names[3], False), (names[4], True)):
                dt, nb, rb, st, mode = run_ours(store_path, acts, n_layers, budget, x, pf, warmup, args.io_threads)
                res[name].append((dt, nb, rb))
                stats[name] = st
    finally:
        for f in os.listdir(workdir):
            os.remove(os.path.join(workdir, f))
        os.rmdir(workdir)

    def med(name, k):
        return float(np.median([r[k] for r in res[name]]))

    mb = 1e6
    print(f"# weight streaming: {n_layers} FFN layers, d_model={d_model}, d_ff={d_ff}, fp32; model "
          f"{model_bytes / mb:.0f} MB, DRAM budget {budget / mb:.0f} MB; {args.active:.0%} neurons active, "
          f"{args.churn:.0%} churn/token; store io_mode={mode}, {args.io_threads} I/O threads; median of {rounds} "
          f"interleaved rounds; {platform.node()} {time.strftime('%Y-%m-%d %H:%M')} "
          f"(files written in {gen_s:.1f} s, deleted)")

    def mb_or_na(b):
        return "n/a" if b is None else f"{b / mb:.2f}"

    per_token = {}  # name -> (seconds, counted bytes, /proc/self/io bytes) per token, None where not known
    rows = []
    for name, n in zip(names, counts):
        dt, nb, rb = med(name, 0), med(name, 1), med(name, 2)
        per_token[name] = (dt / n, nb / n if nb >= 0 else None, rb / n if rb >= 0 else None)
        rows.append([name, n, f"{n / dt:.2f}", f"{1e3 * dt / n:.1f}", mb_or_na(per_token[name][1]),
                     mb_or_na(per_token[name][2])])
    print_table("Weight streaming per method", ["method", "tokens", "tokens/s", "ms/token", "MB read/token (counted)",
                                                "MB read/token (/proc/self/io)"], rows)

    def ratio(other, ours):
        return "n/a" if other is None or not ours else fmt_ratio(other, ours)

    naive, mm, mm_drop = (per_token[n] for n in names[:3])
    rows = []
    for label in names[3:]:
        t, counted, _ = per_token[label]
        rows.append([label, ratio(naive[1], counted), ratio(naive[0], t), ratio(mm_drop[2], counted),
                     ratio(mm_drop[0], t), ratio(mm[0], t)])
    print_table("Weight streaming, ours vs the other methods",
                ["method", "naive/ours bytes", "naive/ours time", "mmap-drop/ours bytes", "mmap-drop/ours time",
                 "mmap/ours time"], rows,
                note="Per token, other / ours: bytes read (ours and naive: counted; mmap-drop: /proc/self/io), time. "
                     "mmap = cache dropped before the run, mmap-drop = cache dropped every token.")
    print_table("WeightStore statistics",
                ["method", "hit rate", "reads/token", "peak resident MB", "staging MB", "budget MB", "prefetched"],
                [[label, f"{stats[label]['hit_rate']:.2f}", f"{stats[label]['reads_issued'] / tokens:.0f}",
                  f"{stats[label]['peak_resident_bytes'] / mb:.1f}", f"{stats[label]['staging_bytes'] / mb:.1f}",
                  f"{budget / mb:.0f}", stats[label]["prefetched"]] for label in names[3:]])
    print(f"\nWarm-up tokens excluded: {warmup} (mmap, ours). mmap's page cache is not bounded by the budget: its "
          f"{warmup} warm-up tokens read {warm_m / mb:.0f} MB (readahead) and later tokens hit the cache; dropping "
          "the cache every token shows mmap when the model does not fit. Naive reads every layer whole every token.")


if __name__ == "__main__":
    main()
