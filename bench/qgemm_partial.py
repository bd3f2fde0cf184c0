"""qgemm with a partial last group (in_features not a multiple of the group size) against the same
matrix with whole groups (in_features rounded up): the cost of the per-call zero-padded copy of x.

python bench/qgemm_partial.py [--repeat N]   (CPU; single-threaded process time, best of N)
"""
import argparse
import time

import numpy as np

import memkernels as mk


def best(fn, repeat):
    t = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        t.append(time.process_time() - t0)
    return min(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    mk.set_num_threads(1)
    rng = np.random.default_rng(0)
    print("| format | N | K (partial) | K_pad | tokens | partial ms | whole ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, g in (("int4", 32), ("int4", 128), ("int8", None)):
        for n, k in ((4096, 688), (2048, 1000)):
            qp = mk.quantize(rng.standard_normal((n, k)).astype(np.float32), fmt, group_size=g)
            kp = qp.padded_in_features
            qw = mk.quantize(rng.standard_normal((n, kp)).astype(np.float32), fmt, group_size=g)
            for t in (1, 16):
                xp = rng.standard_normal((t, k)).astype(np.float32)
                xw = rng.standard_normal((t, kp)).astype(np.float32)
                a = b = 0.0
                for _ in range(2):  # alternate, keep the best of each
                    a = min(a or 1e9, best(lambda: mk.qgemm(xp, qp), args.repeat))
                    b = min(b or 1e9, best(lambda: mk.qgemm(xw, qw), args.repeat))
                print(f"| {fmt} g{g or 'row'} | {n} | {k} | {kp} | {t} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
