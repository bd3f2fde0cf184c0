"""Decode (1 and 8 tokens) of memkernels' int4 formats against torch's int4 CPU kernel and ggml's
MUL_MAT, alternated: each round times ours then the peer (best of 10 calls each), 4 rounds, and the
ratio is taken between the two minima. On a shared machine this is steadier than one pass of
bench/qgemm.py --decode: the weight stream of a 1-token call competes with the other processes for
DRAM, and alternating gives both sides the same chances. 1 thread, CPU time.

    MEMKERNELS_GGML_SRC=/path/to/ggml python bench/qgemm_alternate.py

Pairs: int4 g128 / torch int4 g128 / ggml q4_K, int4 g32 / torch int4 g32, int4_sym g32 / ggml q4_0,
on 4096x14336 and 11008x4096 (out x in features). ggml columns need MEMKERNELS_GGML_SRC (see
bench/qgemm.py --decode).

    python bench/qgemm_alternate.py --kquant [--threads 1,2]

--kquant: the K-quants instead, q4_k / q5_k / q6_k against ggml's q4_K / q5_K / q6_K (same bits per
weight, ggml's own quantization of its own random weights). --threads: 1 is CPU time, more is wall
time (CPU time would add the threads up); both sides run with the same thread count.

    python bench/qgemm_alternate.py --ab BUILD_A BUILD_B [--rounds 8]

--ab: two builds of memkernels against each other (e.g. main's and a branch's: build dirs holding
_memkernels*.so and libmemkernels.so), decode with the default (int8-activation) path: int4 g128,
int4_sym g32, per-channel int8 and q4_k, 1 and 8 tokens, both shapes. One child process per build
keeps its matrices (the same random weights); the rounds alternate A, B, A, B, ... each child
timing every case (best of 10 calls, CPU time, 1 thread); the table gives each side's minimum over
the rounds and B/A. MEMKERNELS_AB_SHAPES=256x4096,... replaces the shapes (a matrix that stays in
L2 measures the kernels' compute without the DRAM contention of a shared machine);
MEMKERNELS_AB_CASES=int4_min:32,int8:0 replaces the formats (format:group, 0 = per channel)."""
from __future__ import annotations

import os
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qgemm as qb  # noqa: E402

import memkernels as mk  # noqa: E402

torch = qb.torch
ROUNDS = 4


def best(fn, reps=10, clock=time.process_time):
    fn()
    b = float("inf")
    for _ in range(reps):
        t = clock()
        fn()
        b = min(b, clock() - t)
    return b


def kquant(threads):
    """q4_k / q5_k / q6_k against ggml q4_K / q5_K / q6_K, alternated, for each thread count."""
    if not os.environ.get("MEMKERNELS_GGML_SRC"):
        print("--kquant needs MEMKERNELS_GGML_SRC (a built ggml tree)")
        return
    rng = np.random.default_rng(0)
    print(f"memkernels {mk.__version__}, CPU ISA {mk.cpu_isa()}, {ROUNDS} alternated rounds, best of 10 calls each")
    print("| shape, tokens | threads | clock | ours | ours ms | ggml | ggml ms | ggml/ours |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in [(4096, 14336), (11008, 4096)]:
        w = rng.standard_normal((n, k), dtype=np.float32)
        for fmt, peer in [("q4_k", "q4_K"), ("q5_k", "q5_K"), ("q6_k", "q6_K")]:
            qm = mk.quantize(w, fmt)
            for th in threads:
                mk.set_num_threads(th)
                cpu_time = th == 1
                clock = time.process_time if cpu_time else time.perf_counter
                for b in (1, 8):
                    x = rng.standard_normal((b, k), dtype=np.float32)
                    out = np.empty((b, n), np.float32)
                    ours, theirs = [], []
                    for _ in range(ROUNDS):
                        ours.append(best(lambda: mk.qgemm(x, qm, out=out), clock=clock))
                        g = qb.ggml_mulmat_s(peer, n, k, b, th, cpu_time, reps=10)
                        if g is not None:
                            theirs.append(g)
                    g = f"{min(theirs) * 1e3:.3f}" if theirs else "-"
                    r = f"{min(theirs) / min(ours):.2f}x" if theirs else "-"
                    print(f"| {n}x{k}, {b} | {th} | {'cpu' if cpu_time else 'wall'} | {fmt} | {min(ours) * 1e3:.3f} | "
                          f"ggml {peer} | {g} | {r} |", flush=True)


def main():
    mk.set_num_threads(1)
    if torch is not None:
        torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"memkernels {mk.__version__}, CPU ISA {mk.cpu_isa()}, 1 thread, CPU time, {ROUNDS} alternated rounds")
    print("| shape, tokens | ours | ours ms | peer | peer ms | peer/ours |")
    print("|---|---|---|---|---|---|")
    for n, k in [(4096, 14336), (11008, 4096)]:
        w = rng.standard_normal((n, k), dtype=np.float32)
        for fmt, g, peer in [("int4", 128, "torch"), ("int4", 128, "q4_K"), ("int4", 32, "torch"),
                             ("int4_sym", 32, "q4_0")]:
            qm = mk.quantize(w, fmt, group_size=g)
            if peer == "torch":
                ti = qb.torch_int4(w, g)
                if ti is None:
                    continue
            elif not os.environ.get("MEMKERNELS_GGML_SRC"):
                continue
            for b in (1, 8):
                x = rng.standard_normal((b, k), dtype=np.float32)
                out = np.empty((b, n), np.float32)
                if peer == "torch":
                    tx = torch.from_numpy(x).to(torch.bfloat16)
                    peer_fn = lambda: best(lambda: ti(tx))  # noqa: E731
                else:
                    peer_fn = lambda: qb.ggml_mulmat_s(peer, n, k, b, 1, True, reps=10)  # noqa: E731
                ours, theirs = [], []
                for _ in range(ROUNDS):
                    ours.append(best(lambda: mk.qgemm(x, qm, out=out)))
                    theirs.append(peer_fn())
                name = f"torch int4 g{g}" if peer == "torch" else f"ggml {peer}"
                print(f"| {n}x{k}, {b} | {fmt} g{g} | {min(ours) * 1e3:.3f} | {name} | {min(theirs) * 1e3:.3f} | "
                      f"{min(theirs) / min(ours):.2f}x |", flush=True)


AB_CASES = [("int4", 128), ("int4_sym", 32), ("int8", None), ("q4_k", None)]
if os.environ.get("MEMKERNELS_AB_CASES"):  # e.g. int4_min:32,int8:0
    AB_CASES = [(c.split(":")[0], int(c.split(":")[1]) or None) for c in os.environ["MEMKERNELS_AB_CASES"].split(",")]
AB_SHAPES = [(4096, 14336), (11008, 4096)]
if os.environ.get("MEMKERNELS_AB_SHAPES"):  # e.g. 256x4096 (out x in): an L2-resident matrix isolates the compute
    AB_SHAPES = [tuple(int(v) for v in sh.split("x")) for sh in os.environ["MEMKERNELS_AB_SHAPES"].split(",")]


def ab_child():
    """Serves --ab: builds the matrices, then times every case once per line read from stdin."""
    import json
    mk.set_num_threads(1)
    rng = np.random.default_rng(0)
    cases = []
    for n, k in AB_SHAPES:
        w = rng.standard_normal((n, k), dtype=np.float32)
        for fmt, g in AB_CASES:
            qm = mk.quantize(w, fmt, group_size=g) if g else mk.quantize(w, fmt)
            for b in (1, 8):
                x = rng.standard_normal((b, k), dtype=np.float32)
                cases.append((f"{n}x{k}, {b} | {fmt}{' g' + str(g) if g else ''}", qm, x, np.empty((b, n), np.float32)))
        del w
    print("ready", flush=True)
    for _ in sys.stdin:
        res = {name: best(lambda: mk.qgemm(x, qm, out=out)) for name, qm, x, out in cases}
        print(json.dumps(res), flush=True)


def ab(build_a, build_b, rounds):
    import json
    import subprocess
    procs = []
    for d in (build_a, build_b):
        d = os.path.abspath(d)
        env = dict(os.environ, MEMKERNELS_BUILD_DIR=d, LD_LIBRARY_PATH=d + ":" + os.environ.get("LD_LIBRARY_PATH", ""),
                   MEMKERNELS_NUM_THREADS="1")
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--ab-child"], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == "ready", d
        procs.append(p)
    times = [{}, {}]
    for _ in range(rounds):
        for i, p in enumerate(procs):
            p.stdin.write("go\n")
            p.stdin.flush()
            for name, t in json.loads(p.stdout.readline()).items():
                times[i][name] = min(times[i].get(name, float("inf")), t)
    for p in procs:
        p.stdin.close()
        p.wait()
    print(f"A = {build_a}, B = {build_b}; 1 thread, CPU time, {rounds} alternated rounds, best of 10 calls each")
    print("| shape, tokens | format | A ms | B ms | B/A |")
    print("|---|---|---|---|---|")
    for name in times[0]:
        a, b = times[0][name], times[1][name]
        print(f"| {name} | {a * 1e3:.3f} | {b * 1e3:.3f} | {b / a:.3f} |")


if __name__ == "__main__":
    if "--ab-child" in sys.argv:
        ab_child()
    elif "--ab" in sys.argv:
        i = sys.argv.index("--ab")
        r = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 8
        ab(sys.argv[i + 1], sys.argv[i + 2], r)
    elif "--kquant" in sys.argv:
        th = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1,2"
        kquant([int(v) for v in th.split(",")])
    else:
        main()
