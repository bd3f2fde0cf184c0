"""Offline simulation of the cold-tail neuron order of a down_int7 / down_int8 streaming store (issue 17).

For each token and layer it records which down columns the exact-contribution criterion reads
(|z_i| * ||down_i|| above the layer's quantile at sparsity S, the run's own threshold), removes the
pinned hot prefix (counts recomputed as StreamingModel._pin_hot does at the given budget), and
merges the misses as the store's load_runs does (a gap of <= merge_gap_bytes / column bytes unneeded
columns, or touching blocks, is one read; a read is at most --max-read bytes). It compares the
store's order (hottest first) with co-activation orders of the cold tail fitted on the calibration
text (Apache-2.0) and evaluated on held-out text (GPL-3):

    python bench/stream_order.py MODEL.gguf --store down_int7.mkws --budget 99013072 --sparsity 0.5

No I/O is simulated beyond counting: reads/token and MiB/token per gap, per order.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CALIB = "/usr/share/common-licenses/Apache-2.0"
EVAL = "/usr/share/common-licenses/GPL-3"


def record_masks(m, ids, piece=256):
    """{layer: (tokens, dff) bool} columns the criterion reads, in the store's order."""
    from memkernels.models.llama import activation
    cfg = m.config
    dff = cfg.intermediate_size
    rec = {}
    orig = m._mlp_down

    def hook(h, L, p):
        if p + "mlp.gate_up_proj.weight" in m._dev:
            gu = m._linear(h, p + "mlp.gate_up_proj.weight")
            g, u = gu[:, :dff], gu[:, dff:]
        else:
            g, u = m._linear(h, p + "mlp.gate_proj.weight"), m._linear(h, p + "mlp.up_proj.weight")
        z = (activation(np, g, cfg.hidden_act) * u).astype(np.float32)[:, m._perm[L]]
        rec.setdefault(L, []).append(np.abs(z) * m._dnorm[L] > m._threshold[L])
        return orig(h, L, p)

    m._mlp_down = hook
    try:
        for at in range(0, len(ids), piece):
            m.logits(ids[at:at + piece])
    finally:
        del m._mlp_down
    return {L: np.concatenate(v) for L, v in rec.items()}


def pinned_counts(m, budget_slots, sparsity):
    """Per-layer pinned prefix lengths, as StreamingModel._pin_hot computes them."""
    from memkernels.models.stream import FREQ_LEVELS, S_STEP
    nl, dff = m.config.num_hidden_layers, m.config.intermediate_size
    room = budget_slots - dff - 2 * m.meta.get("embed_pieces", 1)
    p = np.zeros((nl, dff))
    for L in range(nl):
        f = m.store.get(f"stream/freq/{L}")
        j = min(int(sparsity / S_STEP), len(FREQ_LEVELS) - 2)
        t = (sparsity - FREQ_LEVELS[j]) / S_STEP
        p[L] = f[j] + t * (f[j + 1] - f[j])
    order = np.lexsort((np.tile(np.arange(dff), nl), -p.ravel()))[:max(room, 0)]
    return np.bincount(order // dff, minlength=nl)


def merged(pos, col_bytes, gap_bytes, max_read, block=512):
    """(bytes, reads) of the sorted file positions `pos` merged as WeightStore.load_runs merges them:
    a gap of <= gap_bytes // col_bytes columns or touching blocks joins two neurons, unless the read
    would then span more than max_read aligned bytes."""
    n = len(pos)
    if n == 0:
        return 0, 0
    pos = np.asarray(pos, np.int64)
    gap_cols = gap_bytes // col_bytes
    prev_end = (pos[:-1] + 1) * col_bytes
    touch = (pos[1:] * col_bytes // block) * block <= -(-prev_end // block) * block
    join = (pos[1:] - pos[:-1] - 1 <= gap_cols) | touch
    starts = np.concatenate([[0], np.flatnonzero(~join) + 1])
    ends = np.concatenate([starts[1:], [n]])
    nbytes = reads = 0
    for i0, j0 in zip(starts.tolist(), ends.tolist()):
        span = -(-((pos[j0 - 1] + 1) * col_bytes) // block) * block - (pos[i0] * col_bytes // block) * block
        if span <= max_read:
            nbytes += int(pos[j0 - 1] - pos[i0] + 1) * col_bytes
            reads += 1
            continue
        i = i0
        while i < j0:  # the store cuts a run at its staging size
            j = i + 1
            lo = (pos[i] * col_bytes // block) * block
            while j < j0 and -(-((pos[j] + 1) * col_bytes) // block) * block - lo <= max_read:
                j += 1
            nbytes += int(pos[j - 1] - pos[i] + 1) * col_bytes
            reads += 1
            i = j
    return nbytes, reads


def simulate(masks, orders, counts, col_bytes, gap_bytes, max_read):
    """Per-token totals over layers: orders[L] maps store position -> new file position."""
    tot_b = tot_r = 0
    ntok = next(iter(masks.values())).shape[0]
    for L, K in masks.items():
        pos_of = orders[L]
        hot = counts[L]
        for t in range(ntok):
            idx = np.flatnonzero(K[t])
            idx = idx[idx >= hot] if hot else idx  # the pinned prefix is never read
            b, r = merged(np.sort(pos_of[idx]), col_bytes, gap_bytes, max_read)
            tot_b += b
            tot_r += r
    return tot_b / ntok, tot_r / ntok


# ---- cold-tail orders (positions in the store's current order -> new position) -----------------
def order_spectral(Kc, hot):
    """Fiedler vector of the normalized co-activation graph of the cold neurons."""
    X = Kc[:, hot:].astype(np.float64)
    n = X.shape[1]
    C = X.T @ X
    deg = C.sum(1)
    dis = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
    A = C * dis[:, None] * dis[None, :]
    ev, V = np.linalg.eigh(A)  # the top eigenvectors of D^-1/2 C D^-1/2 = bottom of the normalized Laplacian
    f = V[:, -2] * dis
    return _positions(hot, np.argsort(f, kind="stable"), n)


def order_chain(Kc, hot, sim="cosine"):
    """Greedy nearest-neighbour chain on co-activation: start at the tail's most frequent neuron,
    then always append the unvisited neuron most often read with the last one (cosine of their
    firing vectors; ties / no co-firing: the most frequent left)."""
    X = Kc[:, hot:].astype(np.float64)
    n = X.shape[1]
    C = X.T @ X
    freq = np.diag(C).copy()
    nrm = np.sqrt(np.maximum(freq, 1e-12))
    if sim == "cosine":
        S = C / nrm[:, None] / nrm[None, :]
    elif sim == "hamming":  # minus the tokens that read exactly one of the two: a boundary of a run
        S = -(freq[:, None] + freq[None, :] - 2 * C)
    else:
        S = C
    np.fill_diagonal(S, -np.inf)
    left = np.ones(n, bool)
    cur = int(np.argmax(freq))
    seq = [cur]
    left[cur] = False
    tie = freq * 1e-9  # prefers frequent neurons among equal similarities
    for _ in range(n - 1):
        s = np.where(left, S[cur] + tie, -np.inf)
        cur = int(np.argmax(s))
        seq.append(cur)
        left[cur] = False
    return _positions(hot, np.array(seq), n)


def _positions(hot, tail_seq, n):
    """Position map: the prefix [0, hot) stays, tail neuron hot + tail_seq[k] goes to hot + k."""
    pos = np.arange(hot + n)
    pos[hot + tail_seq] = hot + np.arange(n)
    return pos


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.environ.get("MEMKERNELS_BENCH_GGUF"))
    ap.add_argument("--store", help="a streaming store converted from MODEL (required with a model)")
    ap.add_argument("--quick", action="store_true", help="accepted for `python -m memkernels bench --quick`")
    ap.add_argument("--budget", type=int, default=99013072)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--gaps", default="0,2048,4096,8192")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--max-read", type=int, default=128 << 10)
    ap.add_argument("--orders", default="current,spectral,chain,chain_hamming")
    ap.add_argument("--masks", help="an .npz to save the recorded masks to, or reuse them from")
    ap.add_argument("--oracle", action="store_true",
                    help="also fit the orders on the held-out tokens themselves (an upper bound on what an order can do)")
    a = ap.parse_args()
    if not a.model or not a.store:
        print("stream_order: no model and store (give MODEL.gguf --store STORE.mkws); nothing measured")
        return 0
    import memkernels as mk
    from memkernels.models.stream import StreamingModel, bundle_bytes
    mk.set_num_threads(1)
    m = StreamingModel(a.store, a.budget, sparsity=a.sparsity, pin_hot=False)
    slots = int(m.store.stats()["cache_slots"])
    counts = pinned_counts(m, slots, a.sparsity)
    col = bundle_bytes(m.meta["ffn_dtype"], m.config.hidden_size)
    nl, dff = m.config.num_hidden_layers, m.config.intermediate_size
    if a.masks and os.path.exists(a.masks):
        z = np.load(a.masks)
        Kc = {L: z[f"c{L}"] for L in range(nl)}
        Ke = {L: z[f"e{L}"] for L in range(nl)}
    else:
        tok = m.tokenizer
        Kc = record_masks(m, tok.encode(open(CALIB).read(), add_special_tokens=False)[:a.calib_tokens])
        Ke = record_masks(m, tok.encode(open(EVAL).read(), add_special_tokens=False)[:a.eval_tokens])
        if a.masks:
            np.savez_compressed(a.masks, **{f"c{L}": Kc[L] for L in range(nl)}, **{f"e{L}": Ke[L] for L in range(nl)})
    print(f"cache slots {slots}, pinned {int(counts.sum())} of {nl * dff} (per layer {counts.min()}-{counts.max()}), "
          f"column {col} B, calib {Kc[0].shape[0]} tokens, held-out {Ke[0].shape[0]} tokens", flush=True)
    exact = sum((Ke[L][:, counts[L]:]).sum() for L in range(nl)) / Ke[0].shape[0]
    print(f"needed cold columns/token (held-out): {exact:.0f} = {exact * col / 2**20:.2f} MiB", flush=True)
    makers = {"current": lambda K, h: np.arange(dff), "spectral": order_spectral, "chain": order_chain,
              "chain_count": lambda K, h: order_chain(K, h, sim="count"),
              "chain_hamming": lambda K, h: order_chain(K, h, sim="hamming")}
    gaps = [int(g) for g in a.gaps.split(",")]
    res = {}
    for name in a.orders.split(","):
        orders = {L: makers[name](Kc[L], counts[L]) for L in range(nl)}
        splits = [("calib", Kc), ("held-out", Ke)]
        if a.oracle:
            oracle = {L: makers[name](Ke[L], counts[L]) for L in range(nl)}
        for split, K in splits + ([("oracle", Ke)] if a.oracle else []):
            for g in gaps:
                if split == "oracle":
                    b, r = simulate(K, oracle, counts, col, g, a.max_read)
                    res[(name, split, g)] = (b, r)
                    print(f"{name:12s} {split:8s} gap {g:5d}: {r:8.0f} reads/token {b / 2**20:6.2f} MiB/token", flush=True)
                    continue
                b, r = simulate(K, orders, counts, col, g, a.max_read)
                res[(name, split, g)] = (b, r)
                print(f"{name:12s} {split:8s} gap {g:5d}: {r:8.0f} reads/token {b / 2**20:6.2f} MiB/token", flush=True)
    cols = ["held-out", "calib"] + (["oracle"] if a.oracle else [])
    print("\n| order | gap B | " + " | ".join(f"reads/token ({c}) | MiB/token ({c})" for c in cols) + " |")
    print("|---|---|" + "---|---|" * len(cols))
    for name in a.orders.split(","):
        for g in gaps:
            print(f"| {name} | {g} | " + " | ".join(f"{res[(name, c, g)][1]:.0f} | {res[(name, c, g)][0] / 2**20:.2f}"
                                                 for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
