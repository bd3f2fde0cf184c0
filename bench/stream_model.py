"""Weight streaming of a real model under a DRAM budget (issue 17): quality vs sparsity, then speed,
bytes read and memory at two budgets, vs naive whole-layer streaming and llama.cpp through mmap.

    python bench/stream_model.py MODEL.gguf [--work-dir DIR] [--quick] [--part quality|speed]
    MEMKERNELS_BENCH_GGUF=MODEL.gguf python -m memkernels bench --only stream_model   (no model: exits 0)

Steps (each measurement in its own subprocess, so peak RSS is per configuration):
1. convert: the GGUF file into the streaming store (--ffn-format int4_int8 by default here: up rows
   4-bit, down columns int8; calibration on /usr/share/common-licenses/Apache-2.0).
2. quality: perplexity on a different English text (/usr/share/common-licenses/GPL-3, first
   --ppl-tokens tokens, windows of 256 tokens) and top-1 agreement with the dense model: the dense
   model greedily generates --new tokens after a prompt; each sparse model predicts every one of them
   teacher-forced (argmax equal to the dense token). Threshold predictor with uniform per-layer
   sparsity at --levels, the calibrated per-layer allocation at --calibrated-levels, the low-rank
   predictor at --lowrank-levels, and S=0 of a second store (--store2, e.g. the all-int4 one).
3. speed: decode --new tokens after a 32-token prompt at budgets = resident weights + I/O staging
   + 50 % / 25 % of the streamed FFN bytes: ours (hot neurons pinned) at S=0 and --speed-sparsity,
   ours with the LRU window only, and whole-layer reads (clear the cache each token, read every
   neuron) on the same store; --repeat rounds alternate them. Peak RSS = VmHWM reset
   (/proc/self/clear_refs) after load, so it is the decode's.
   Options for round 3: --budgets B50,B25 (fixed byte budgets), --budget-store (take the budgets from
   another store), --naive-store (run the naive rows on another store, e.g. int4_int8 when ours is a
   down_int8 store), --threads 1 (one compute thread: on a loaded machine a 2-thread OpenMP region
   waits for a descheduled thread), --merge-gap, --max-read. Ours and naive alternate
   (naive, ours, naive, ...; reversed on odd rounds).
4. llama.cpp (if /work/venv/bench has llama_cpp; --no-llamacpp skips it), in each round: the same file through mmap; before
   every token the file's pages are dropped from the process (madvise MADV_DONTNEED on its mapping)
   and from the page cache (posix_fadvise DONTNEED, no root needed), as if the model did not fit;
   and the same with the model left in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CALIB = "/usr/share/common-licenses/Apache-2.0"
EVAL = "/usr/share/common-licenses/GPL-3"
PROMPT = "The GNU General Public License is a free, copyleft license for software and other kinds of works. It"


def _rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child_convert(a):
    from memkernels.models.stream import convert_for_streaming
    t0 = time.perf_counter()
    meta = convert_for_streaming(a.model, a.store, calibration_text=open(CALIB).read(), ffn_format=a.ffn_format)
    print(json.dumps({"convert_s": time.perf_counter() - t0, "ffn_dtype": meta["ffn_dtype"],
                      "store_bytes": os.path.getsize(a.store), "rss": _rss()}))


def _eval_ids(tok, n):
    return tok.encode(open(EVAL).read(), add_special_tokens=False)[:n]


def _ppl(m, ids, win=256):
    import numpy as np
    nll, n = 0.0, 0
    for at in range(0, len(ids) - 1, win):
        chunk = ids[at:at + win + 1]
        if len(chunk) < 2:
            break
        lg = m.logits(chunk[:-1]).astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll += float((lse - lg[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        n += len(chunk) - 1
    return float(np.exp(nll / n))


def child_quality(a):
    import numpy as np
    import memkernels as mk
    from memkernels.models.stream import StreamingModel
    dense = mk.load_model(a.model)
    ids = _eval_ids(dense.tokenizer, a.ppl_tokens)
    prompt = dense.tokenizer.encode(PROMPT, add_special_tokens=False)
    gen = dense.generate(prompt, max_new_tokens=a.new, stop_at_eos=False)
    rows = [{"config": "dense (GGUF weights in memory)", "ppl": _ppl(dense, ids), "agree": 1.0, "kept": 1.0}]
    del dense
    seq = prompt + gen
    levels = [float(x) for x in a.levels.split(",")]
    lr_levels = [float(x) for x in a.lowrank_levels.split(",")] if a.lowrank_levels else []
    uni_levels = [float(x) for x in a.calibrated_levels.split(",")] if a.calibrated_levels else []
    stores = [(a.store, "")] + ([(a.store2, " (" + a.store2_label + ")")] if a.store2 else [])
    runs = [(st_, lab, "threshold", "uniform", s) for st_, lab in stores for s in (levels if not lab else [0.0])]
    runs += [(a.store, "", "threshold", "calibrated", s) for s in uni_levels]
    runs += [(a.store, "", "lowrank", "uniform", s) for s in lr_levels]
    for store, lab, predictor, alloc, s in runs:
        m = StreamingModel(store, 1 << 34, sparsity=s, predictor=predictor, allocation=alloc, pin_hot=False)
        p = _ppl(m, ids)
        kept = m.stream_stats()["neurons_kept_fraction"]
        am = m.logits(seq[:-1]).argmax(-1)[len(prompt) - 1:]
        rows.append({"config": f"stream {m.meta['ffn_dtype']}{lab} {predictor} {alloc} S={s:.2f}", "ppl": p,
                     "kept": kept, "agree": float((am == np.asarray(gen)).mean()),
                     "layer_sparsity": [round(float(x), 2) for x in m.layer_sparsity]})
        print(json.dumps(rows[-1]), file=sys.stderr)
        del m
    print(json.dumps({"rows": rows, "ppl_tokens": len(ids), "new": a.new}))


def child_speed(a):
    import memkernels as mk
    from memkernels.models.stream import StreamingModel
    if a.threads:
        mk.set_num_threads(a.threads)
    base = _rss()
    t0 = time.perf_counter()
    m = StreamingModel(a.store, a.budget, sparsity=a.sparsity, whole_layer_reads=a.whole, merge_gap_bytes=a.merge_gap,
                       pin_hot=not a.no_pin, max_read_bytes=a.max_read)
    load_s = time.perf_counter() - t0
    prompt = m.tokenizer.encode(PROMPT, add_special_tokens=False)[:32]
    load = _rss()
    _reset_peak()
    m.generate(prompt, max_new_tokens=4, stop_at_eos=False)  # warm-up (its reads are not counted)
    m.reset_stream_stats()
    c0 = time.process_time()
    m.generate(prompt, max_new_tokens=a.new, stop_at_eos=False)
    cpu = time.process_time() - c0
    st = m.last_stats
    r = _rss()
    print(json.dumps({"decode_tokens_per_s": st["decode_tokens"] / st["decode_s"], "stream": m.stream_stats(),
                      "load_s": load_s, "cpu_s_per_token_incl_prefill": cpu / max(st["decode_tokens"], 1),
                      "rss_after_import": base["VmRSS"], "rss_after_load": load["VmRSS"],
                      "peak_rss_decode": r["VmHWM"], "mk_threads": mk.info().get("num_threads") if hasattr(mk, "info")
                      else None}))


def child_llamacpp(a):
    import ctypes
    import numpy as np
    from llama_cpp import Llama
    base = _rss()
    llm = Llama(a.model, n_ctx=256, n_threads=os.cpu_count(), use_mmap=True, verbose=False, logits_all=False)
    toks = llm.tokenize(PROMPT.encode(), add_bos=False)[:32]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fd = os.open(a.model, os.O_RDONLY)
    real = os.path.realpath(a.model)

    def drop():
        if not a.drop:
            return
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith(real):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    libc.madvise(lo, hi - lo, 4)  # MADV_DONTNEED
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    llm.reset()
    llm.eval(toks)
    _reset_peak()
    out, t0 = [], None
    for i in range(a.new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if i == 0:
            t0 = time.perf_counter()
        drop()
        llm.eval([nxt])
    dt = time.perf_counter() - t0
    r = _rss()
    print(json.dumps({"decode_tokens_per_s": (a.new - 1) / dt, "peak_rss_decode": r["VmHWM"],
                      "rss_after_import": base["VmRSS"], "dropped": bool(a.drop)}))


def run(args, py=sys.executable):
    r = subprocess.run([py, os.path.abspath(__file__)] + args, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{args[:2]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.environ.get("MEMKERNELS_BENCH_GGUF"))
    ap.add_argument("--quick", action="store_true", help="8 new tokens, 256 perplexity tokens, threshold S=0.5 only")
    ap.add_argument("--work-dir", default="/tmp/mk-stream-bench")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--child", choices=["convert", "quality", "speed", "llamacpp"])
    ap.add_argument("--store")
    ap.add_argument("--budget", type=int, default=0)
    ap.add_argument("--sparsity", type=float, default=0.0)
    ap.add_argument("--whole", action="store_true")
    ap.add_argument("--merge-gap", type=int, default=4 << 10)
    ap.add_argument("--max-read", type=int, default=128 << 10,
                    help="speed: the store's largest read (its I/O staging is ~5 of them; less staging = more cache)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the calibrated hot neurons (LRU window only)")
    ap.add_argument("--ffn-format", default="int4_int8", choices=["int4", "int4_int8", "int8", "down_int8", "down_int7"], help="store format of up/down")
    ap.add_argument("--store2", help="quality: also measure S=0 on this store (e.g. the int8 one)")
    ap.add_argument("--store2-label", default="int8 store")
    ap.add_argument("--calibrated-levels", default="0.25,0.5",
                    help="threshold sparsities also measured with the calibrated per-layer allocation")
    ap.add_argument("--speed-sparsity", default="0.25,0.5", help="our speed rows: these sparsities (+ S=0)")
    ap.add_argument("--repeat", type=int, default=1, help="speed: alternate the configurations this many times")
    ap.add_argument("--drop", action="store_true")
    ap.add_argument("--budgets", help="speed: the two budgets in bytes (50 %%, 25 %%) instead of computing them")
    ap.add_argument("--budget-store", help="speed: take the budgets (resident + staging + 50/25 %% of the FFN) from this store")
    ap.add_argument("--naive-store", help="speed: run the whole-layer (naive) rows on this store (e.g. int4_int8: up and down)")
    ap.add_argument("--lru-row", action="store_true", help="speed: also the LRU-window-only row (no pinning)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--threads", type=int, default=0,
                    help="speed: memkernels compute threads (0: its default); 1 on a loaded machine, where a 2-thread "
                         "OpenMP region waits for a descheduled thread")
    ap.add_argument("--levels", default="0,0.1,0.2,0.25,0.4,0.5,0.6,0.7", help="threshold sparsities measured")
    ap.add_argument("--lowrank-levels", default="0.25,0.5", help="lowrank sparsities measured")
    ap.add_argument("--part", choices=["all", "quality", "speed"], default="all")
    ap.add_argument("--out", help="also write the results as JSON here")
    a = ap.parse_args()
    if not a.model or not os.path.isfile(a.model):
        print("stream_model: no model (give MODEL.gguf or set MEMKERNELS_BENCH_GGUF); nothing measured")
        return 0
    if a.quick:
        a.new, a.ppl_tokens, a.levels, a.lowrank_levels = 8, 256, "0,0.5", "0.5"
    if a.child:
        return {"convert": child_convert, "quality": child_quality, "speed": child_speed,
                "llamacpp": child_llamacpp}[a.child](a)
    os.makedirs(a.work_dir, exist_ok=True)
    store = a.store or os.path.join(a.work_dir, os.path.basename(a.model) + f".{a.ffn_format}.stream.mkws")
    common = [a.model, "--store", store, "--new", str(a.new)]
    if not os.path.exists(store):
        print("convert:", run(common + ["--child", "convert", "--ffn-format", a.ffn_format]))
    import memkernels as mk
    from memkernels.models.stream import StreamingModel
    # the budgets come from --budget-store when given (e.g. the int4_int8 store, so that a down_int8
    # store, whose resident part is larger, is measured under the same byte counts)
    probe = StreamingModel(a.budget_store or store, 1 << 34, pin_hot=False)
    resident, ffn = probe.resident_bytes, probe.whole_layer_bytes_per_token
    staging = probe.store.stats()["staging_bytes"]
    file_bytes = os.path.getsize(a.model)
    del probe
    res = {"file_bytes": file_bytes, "resident_bytes": resident, "ffn_store_bytes": ffn, "staging_bytes": staging}
    if a.part in ("all", "quality"):
        res["quality"] = run(common + ["--child", "quality", "--ppl-tokens", str(a.ppl_tokens),
                                     "--levels", a.levels, "--lowrank-levels", a.lowrank_levels,
                                     "--calibrated-levels", a.calibrated_levels]
                             + (["--store2", a.store2, "--store2-label", a.store2_label] if a.store2 else []))
    res["speed"] = []
    res["llamacpp"] = []
    bench_py = "/work/venv/bench/bin/python"
    have_llama = a.part != "quality" and not a.no_llamacpp and os.path.exists(bench_py) and subprocess.run(
        [bench_py, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if a.part != "quality" and not have_llama:
        res["llamacpp_missing"] = "no llama_cpp in /work/venv/bench"
    # every configuration once per round, rounds alternate (the machine's load drifts)
    for rep in range(a.repeat if a.part != "quality" else 0):
        for frac, fixed_budget in zip((0.5, 0.25), [int(x) for x in a.budgets.split(",")] if a.budgets else (0, 0)):
            budget = fixed_budget or resident + staging + int(frac * ffn)
            confs = [(f"ours S={s:g}", ["--sparsity", str(s)]) for s in
                     [0.0] + [float(x) for x in a.speed_sparsity.split(",") if x]]
            confs += [("ours S=0, LRU window only (no pinning)", ["--no-pin"])] if a.lru_row else []
            naive = ("whole-layer reads (naive)", ["--whole"] + (["--store", a.naive_store] if a.naive_store else []))
            # ours and naive alternate (the machine's load drifts): naive, ours, naive, ours, ..., naive
            seq = [naive]
            for c in confs:
                seq += [c, naive]
            if rep % 2:
                seq = seq[::-1]
            for label, extra in seq:
                try:
                    r = run(common + ["--child", "speed", "--budget", str(budget), "--max-read", str(a.max_read),
                                      "--merge-gap", str(a.merge_gap), "--threads", str(a.threads)] + extra)
                except RuntimeError as e:  # e.g. a budget below a down_int8 store's resident part
                    r = {"error": str(e)[-400:]}
                r.update(label=label, budget=budget, frac=frac, round=rep)
                res["speed"].append(r)
                print(json.dumps(r), file=sys.stderr)
        for drop in ((True, False) if have_llama else ()):
            try:
                r = run(common + ["--child", "llamacpp"] + (["--drop"] if drop else []), py=bench_py)
                r["round"] = rep
                res["llamacpp"].append(r)
            except RuntimeError as e:
                res["llamacpp"].append({"error": str(e)[-500:], "dropped": drop})
            print(json.dumps(res["llamacpp"][-1]), file=sys.stderr)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
