"""Streaming decode speed by read engine and merge gap (issue 17): ours (sparse, hot neurons pinned)
against naive whole-layer reads (every neuron of every layer each token, the next layer read ahead),
alternating in one run, each configuration in its own subprocess (bench/stream_model.py --child speed).

    python bench/stream_io.py MODEL.gguf --store down_int7.mkws --naive-store int4_int8.mkws \
        --sparsity 0.5 --gaps 0,512,1024,2048,8192 --engines aio,threads --repeat 3 --budget 99013072

Prints one row per configuration and round, then the best tok/s of each (rounds alternate the order:
naive, ours..., reversed on odd rounds): tok/s, MiB and reads per token, CPU ms per token (the whole
process: compute, I/O submission and completion; prefill included) and the speed-up over the naive
row of the same engine. `--engines threads` is the pread thread pool (MEMKERNELS_STORE_IO=threads).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def child(model, engine, args, threads):
    env = dict(os.environ, MEMKERNELS_STORE_IO=engine)
    if threads == 1:  # NumPy's BLAS too: its idle threads spin on a loaded 2-core machine (both rows alike)
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
    r = subprocess.run([sys.executable, os.path.join(HERE, "stream_model.py"), model, "--child", "speed"] + args,
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{args} failed:\n{r.stderr[-3000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    s = d["stream"]
    return {"tok_s": d["decode_tokens_per_s"], "mib": s["bytes_read_per_token"] / 2**20,
            "reads": s.get("reads_per_token", float("nan")), "cpu_ms": d["cpu_s_per_token_incl_prefill"] * 1e3,
            "engine": s.get("io_engine", engine), "hit": s["hit_rate"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.environ.get("MEMKERNELS_BENCH_GGUF"))
    ap.add_argument("--store", help="a streaming store converted from MODEL (required with a model)")
    ap.add_argument("--quick", action="store_true", help="accepted for `python -m memkernels bench --quick`")
    ap.add_argument("--naive-store", help="the store the naive rows read whole (default: --store)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--gaps", default="2048", help="merge gaps in bytes for our rows")
    ap.add_argument("--engines", default="aio,threads")
    ap.add_argument("--budget", type=int, default=99013072)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-read", type=int, default=128 << 10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    if not a.model or not a.store:
        print("stream_io: no model and store (give MODEL.gguf --store STORE.mkws); nothing measured")
        return 0
    common = ["--budget", str(a.budget), "--new", str(a.new), "--threads", str(a.threads), "--max-read", str(a.max_read)]
    configs = []
    for eng in a.engines.split(","):
        configs.append((f"naive {eng}", eng, ["--whole", "--store", a.naive_store or a.store, "--sparsity", "0",
                                               "--merge-gap", "0"]))
        for g in a.gaps.split(","):
            configs.append((f"ours {eng} gap {g}", eng, ["--store", a.store, "--sparsity", str(a.sparsity),
                                                         "--merge-gap", g]))
    rows = {name: [] for name, _, _ in configs}
    for r in range(a.repeat):
        for name, eng, args in (configs if r % 2 == 0 else configs[::-1]):
            m = child(a.model, eng, args + common, a.threads)
            rows[name].append(m)
            print(f"round {r} {name:24s} {m['engine']:7s} {m['tok_s']:6.2f} tok/s {m['mib']:6.2f} MiB/tok "
                  f"{m['reads']:7.0f} reads/tok {m['cpu_ms']:6.1f} CPU ms/tok hit {m['hit']:.2f}", flush=True)
    print(f"\n| configuration | tok/s (best of {a.repeat}) | MiB/token | reads/token | CPU ms/token (min) | vs naive |")
    print("|---|---|---|---|---|---|")
    for name, _, _ in configs:
        best = max(rows[name], key=lambda m: m["tok_s"])
        naive = max(rows["naive " + name.split()[1]], key=lambda m: m["tok_s"])
        print(f"| {name} | {best['tok_s']:.2f} | {best['mib']:.2f} | {best['reads']:.0f} | "
              f"{min(m['cpu_ms'] for m in rows[name]):.1f} | {best['tok_s'] / naive['tok_s']:.2f}x |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
