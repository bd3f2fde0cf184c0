"""Accuracy of qgemm's approximate paths on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF, int4_min
g32 weights) against the same weights run exactly (load_model(path, exact=True)).

Per mode: top-1 agreement of the logits with the exact ones, mean KL(exact || ours) per position,
and the perplexity of the text (ours; the exact model's in the last column).

  prefill-default  a 512-token prompt in one call per layer, default dispatch (on AVX512-BF16 CPUs
                   the bf16 prefill kernel from 32 tokens; int8 activations below)
  prefill-int8     the same with MEMKERNELS_INT8_MAX_TOKENS=1000000: the int8-activation path for
                   every token count (the whole prompt on the integer kernels)
  decode           teacher-forced decode of the first --decode tokens, one token per call (the
                   default decode path: int8 activations)

Each mode runs in a child process (the token limit is read once per process). --build DIR runs
another build of the extension (MEMKERNELS_BUILD_DIR=DIR, its libmemkernels.so first on
LD_LIBRARY_PATH), e.g. main's for a before/after table:

    python bench/qgemm_quality.py --build build/main-before --build build/qdecode

Text: /usr/share/common-licenses/GPL-3 (--text), model: --model or $MEMKERNELS_BENCH_GGUF (without one it
says so and exits 0, as under `python -m memkernels bench`). 1 thread by default (--threads).

    python bench/qgemm_quality.py --blocks

--blocks: the choice of the x block, in NumPy (no kernel): the inputs of every linear layer of the
exact model on the prompt are recorded, rounded to int8 with one scale per token and block of B
weights (B = 32 ... 256, and one per token), and multiplied in float64 by the dequantized weights;
the table gives the relative error ||x_q W^T - x W^T|| / ||x W^T|| (Frobenius, per layer, then the
mean and the worst layer), next to the bf16 kernel's (x and W rounded to bf16)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODEL = os.environ.get("MEMKERNELS_BENCH_GGUF")  # a GGUF checkpoint (SmolLM2-135M-Instruct Q4_1 here)
TEXT = "/usr/share/common-licenses/GPL-3"
MODES = ("prefill-default", "prefill-int8", "decode")


def log_softmax(z):
    import numpy as np
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def token_ids(model, text_path, n):
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    ids = list(model.tokenizer.encode(text[: 12 * n], add_special_tokens=False))
    if len(ids) < n:
        raise SystemExit(f"{text_path}: only {len(ids)} tokens, {n} wanted")
    return ids[:n]


def child(args):
    """Runs one mode, prints one JSON line with the logits' statistics."""
    import numpy as np

    from memkernels.models import load_model
    from memkernels.models.llama import PAGE_SIZE

    mode = args.child
    exact = load_model(args.model, exact=True)
    ours = load_model(args.model)
    n = args.prompt if mode.startswith("prefill") else args.decode
    ids = token_ids(ours, args.text, n)
    ref = exact.logits(ids)
    if mode.startswith("prefill"):
        got = ours.logits(ids)
    else:  # teacher-forced decode: one token per forward, the cache growing
        ours._ensure_cache(-(-len(ids) // PAGE_SIZE) + 1)
        sid = ours.cache.add_sequence()
        try:
            got = np.stack([ours._forward([sid], [[t]], [i])[0] for i, t in enumerate(ids)])
        finally:
            ours.cache.free(sid)
    pe, pa = log_softmax(ref), log_softmax(got)
    kl = (np.exp(pe) * (pe - pa)).sum(-1)
    nxt = np.asarray(ids[1:])
    rows = np.arange(len(ids) - 1)
    print(json.dumps({
        "mode": mode, "tokens": len(ids),
        "top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "kl": float(kl.mean()), "kl_max": float(kl.max()),
        "ppl": float(np.exp(-pa[:-1][rows, nxt].mean())),
        "ppl_exact": float(np.exp(-pe[:-1][rows, nxt].mean())),
    }))


def round_blocks(x, blk):
    """x (T, K) float32 as int8 codes times one scale per token and block of blk (float64)."""
    import numpy as np
    T, K = x.shape
    out = np.empty((T, K))
    for k0 in range(0, K, blk):
        xb = x[:, k0:k0 + blk]
        amax = np.abs(xb).max(1, keepdims=True)
        dx = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        out[:, k0:k0 + blk] = np.rint(xb * (np.float32(1) / dx)) * dx.astype(np.float64)
    return out


def to_bf16(a):
    import numpy as np
    b = np.asarray(a, np.float32).view(np.uint32)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000  # round to nearest even
    return b.view(np.float32).astype(np.float64)


def blocks(args):
    import numpy as np

    import memkernels as mk
    from memkernels import QuantizedMatrix
    from memkernels.models import load_model

    model = load_model(args.model, exact=True)
    ids = token_ids(model, args.text, args.prompt)
    seen = []
    orig = model._linear

    def record(x, name, bias_name=None):
        w = model._dev[name]
        if isinstance(w, QuantizedMatrix):
            seen.append((name, np.array(x, np.float32), w))
        return orig(x, name, bias_name)

    model._linear = record
    model.logits(ids)
    sizes = [32, 64, 128, 256]
    errs = {b: [] for b in sizes + ["token", "bf16"]}
    for name, x, w in seen:
        d = mk.dequantize(w).astype(np.float64)
        y = x.astype(np.float64) @ d.T
        ny = np.linalg.norm(y)
        for b in sizes + ["token"]:
            xr = round_blocks(x, x.shape[1] if b == "token" else b)
            errs[b].append(np.linalg.norm((xr - x) @ d.T) / ny)
        errs["bf16"].append(np.linalg.norm(to_bf16(x) @ to_bf16(d).T - y) / ny)
    print(f"{len(seen)} quantized linear layers of {os.path.basename(args.model)} on a {len(ids)}-token prompt; "
          "relative error of the product, x rounded as below (weights exact; bf16: both rounded)\n")
    print("| x rounding | mean rel. error | worst layer |")
    print("|---|---:|---:|")
    for b, e in errs.items():
        label = {"token": "int8, one scale per token", "bf16": "bf16 x and W (the prefill kernel)"}.get(
            b, f"int8, one scale per {b} weights")
        print(f"| {label} | {np.mean(e):.2e} | {np.max(e):.2e} |")


def run_mode(args, build, mode):
    env = dict(os.environ)
    env["MEMKERNELS_NUM_THREADS"] = str(args.threads)
    env["OMP_NUM_THREADS"] = str(args.threads)
    if build:
        d = os.path.abspath(build)
        env["MEMKERNELS_BUILD_DIR"] = d
        env["LD_LIBRARY_PATH"] = d + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    if mode == "prefill-int8":
        env["MEMKERNELS_INT8_MAX_TOKENS"] = "1000000"
    else:
        env.pop("MEMKERNELS_INT8_MAX_TOKENS", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model", args.model, "--text", args.text,
           "--prompt", str(args.prompt), "--decode", str(args.decode)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{mode} ({build or 'installed'}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL, help="GGUF file (default: $MEMKERNELS_BENCH_GGUF)")
    ap.add_argument("--quick", action="store_true", help="128-token prompt, 32 decode tokens")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens of the prefill modes")
    ap.add_argument("--decode", type=int, default=128, help="tokens of the teacher-forced decode")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--build", action="append", default=[],
                    help="a build dir holding _memkernels*.so and libmemkernels.so (repeatable); "
                         "none: the installed package")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", action="store_true", help="the x block study (NumPy), see above")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.model:
        print("qgemm_quality: no model (give --model MODEL.gguf or set MEMKERNELS_BENCH_GGUF); nothing measured")
        return 0
    if args.quick:
        args.prompt, args.decode = min(args.prompt, 128), min(args.decode, 32)
    if args.blocks:
        return blocks(args)
    if args.child:
        return child(args)
    builds = args.build or [None]
    print(f"model {os.path.basename(args.model)}, text {args.text}, against load_model(exact=True)\n")
    print("| build | mode | tokens | top-1 vs exact | mean KL | max KL | ppl | ppl exact |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for mode in args.modes.split(","):
        for b in builds:
            r = run_mode(args, b, mode)
            print(f"| {b or 'installed'} | {mode} | {r['tokens']} | {100 * r['top1']:.1f}% | {r['kl']:.2e} | "
                  f"{r['kl_max']:.2e} | {r['ppl']:.3f} | {r['ppl_exact']:.3f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
