"""Command line: python -m memkernels {info,demo,convert,bench}."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import memkernels as mk


def _time(fn, repeat=3):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cmd_info(args) -> int:
    print(mk.info_string(), end="")
    return 0


def _naive_attention(q, k, v, causal):
    """Plain NumPy attention (materialises the seq x seq scores), batch 1, MHA."""
    qh, kh, vh = (np.ascontiguousarray(a[0].transpose(1, 0, 2)) for a in (q, k, v))
    s = qh @ kh.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    if causal:
        s += np.triu(np.full(s.shape[-2:], -np.inf, dtype=s.dtype), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return (s @ vh).transpose(1, 0, 2)[None]


def demo_attention():
    rng = np.random.default_rng(0)
    print("flash attention (fp32, batch 1, 8 heads, head_dim 128, causal)")
    print(f"  {'seq':>6} {'memkernels':>12} {'numpy naive':>12} {'speed-up':>9} {'max err':>9}")
    for s in (256, 1024, 2048):
        q, k, v = (rng.standard_normal((1, s, 8, 128), dtype=np.float32) for _ in range(3))
        ours = _time(lambda: mk.flash_attention(q, k, v, causal=True))
        naive = _time(lambda: _naive_attention(q, k, v, True), repeat=1)
        err = np.abs(mk.flash_attention(q, k, v, causal=True) - _naive_attention(q, k, v, True)).max()
        print(f"  {s:>6} {ours * 1e3:>10.2f}ms {naive * 1e3:>10.2f}ms {naive / ours:>8.1f}x {err:>9.1e}")


def demo_model(args) -> int:
    """Runs a checkpoint (given, or the seeded random one written here) through memkernels.load_model
    with the FFN streamed under a DRAM budget, then checks the logits against the float64 NumPy
    forward of the checkpoint's own weights."""
    import os
    import shutil
    import tempfile

    from . import model as M
    from .models import UnsupportedModelError, load_model, reference_forward
    from .models.stream import StreamingModel, store_path_for

    work = args.work_dir or tempfile.mkdtemp(prefix="memkernels-demo-")
    os.makedirs(work, exist_ok=True)
    try:
        if args.model:
            path, source = args.model, f"checkpoint {args.model}"
        else:
            path = os.path.join(work, "seeded-model")
            M.write_random_checkpoint(path, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                      intermediate_size=4 * args.hidden, num_attention_heads=max(1, args.hidden // 32),
                                      num_key_value_heads=max(1, args.hidden // 128), hidden_act=args.act,
                                      seed=args.seed)
            source = "seeded random weights"
        # convert once with a generous budget, then size the real budget from what stays resident
        probe = load_model(path, dram_budget_bytes=1 << 40, stream_dir=work)
        resident, ffn = probe.resident_bytes, probe.whole_layer_bytes_per_token
        staging = probe.store.stats()["staging_bytes"]
        del probe
        budget = resident + staging + int(args.budget_fraction * ffn)
        m = load_model(path, dram_budget_bytes=budget, stream_dir=work, sparsity=args.sparsity,
                       predictor=args.predictor)
    except (UnsupportedModelError, ValueError, OSError, mk.CorruptDataError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    assert isinstance(m, StreamingModel)
    cfg = m.config
    print(f"\nmodel: {cfg.model_type}, {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads, d_ff={cfg.intermediate_size}, "
          f"FFN act {cfg.hidden_act} ({source})")
    print(f"  streaming store {store_path_for(path, work)}: resident weights {resident / 2**20:.2f} MiB, "
          f"streamed FFN {ffn / 2**20:.2f} MiB ({m.meta['ffn_dtype']})")
    print(f"  DRAM budget for the weights: {budget / 2**20:.2f} MiB (resident + I/O staging + "
          f"{args.budget_fraction:.0%} of the FFN), sparsity {args.sparsity:.0%} ({args.predictor})")
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (args.prompt_len, args.prompt_len // 2 + 3, 7)]
    rss_before = M.peak_rss_bytes()
    out = m.generate(prompts, max_new_tokens=args.tokens, stop_at_eos=False)
    st, ss = m.last_stats, m.stream_stats()
    rss_run = M.peak_rss_bytes()
    for i, (p, o) in enumerate(zip(prompts, out)):
        print(f"  prompt {i} ({len(p)} tokens) -> {o}")
    print(f"\n  prefill {st['prefill_tokens']} tokens {st['prefill_s']:.3f}s, decode {st['decode_tokens']} tokens "
          f"{st['decode_s']:.3f}s ({st['decode_tokens'] / max(st['decode_s'], 1e-9):.1f} tok/s)")
    print(f"  streamed per decode token: {ss['bytes_read_per_token'] / 2**20:.3f} MiB (whole FFN layers: "
          f"{ss['whole_layer_bytes_per_token'] / 2**20:.3f} MiB), neuron hit rate {ss['hit_rate']:.0%}, "
          f"neurons kept {ss['neurons_kept_fraction']:.0%} ({ss['io_mode']} I/O)")
    print(f"  the model run held at most {ss['peak_resident_bytes'] / 2**20:.2f} MiB of weights (budget "
          f"{budget / 2**20:.2f} MiB); process peak RSS {rss_run / 2**20:.0f} MiB "
          f"({rss_before / 2**20:.0f} MiB before generating; the check below is not counted)")
    print("  checking logits against the float64 NumPy forward of the checkpoint ...", flush=True)
    from .models.weights import read_checkpoint_tensors
    if os.path.isdir(path):
        weights = read_checkpoint_tensors(path)
    else:
        from .models.gguf import load_gguf
        weights = dict(load_gguf(path, verbose=False).tensors)
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    err = 0.0
    for p, o in zip(prompts, out):
        seq = p + o
        ours = m.logits(seq)
        ref = reference_forward(cfg, weights, seq)
        scale = max(float(np.abs(ref).max()), 1e-30)
        e = float(np.abs(ours - ref).max()) / scale if np.isfinite(ours).all() and np.isfinite(ref).all() \
            else float("inf")
        err = max(err, e)
    tol = 1e-4 if args.sparsity == 0 else float("inf")
    ok = np.isfinite(err) and err <= tol and ss["peak_resident_bytes"] <= budget
    print(f"  max |logit - float64 reference| / max |logit| = {err:.2e}"
          + ("" if args.sparsity == 0 else " (sparsity > 0 approximates the dense model: only finiteness checked)"))
    print("  OK" if ok else "  MISMATCH")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def cmd_demo(args) -> int:
    from . import model as M

    if args.device != "cpu":
        if args.device.startswith("cuda") and not mk.info()["cuda_available"]:
            why = "memkernels sees no CUDA device" if mk.info()["cuda_built"] else \
                "this memkernels was built without CUDA (reinstall with nvcc on the PATH)"
            print(f"error: --device {args.device}: {why}", file=sys.stderr)
            return 2
    try:
        ops = M.array_ops(args.device, args.framework)
    except ValueError as e:
        print(f"error: --device {args.device} --framework {args.framework}: {e}", file=sys.stderr)
        return 2
    print(mk.info_string())
    if ops.device == "cpu" and ops.xp is not np:
        print(f"error: --framework {args.framework}: the streaming demo runs NumPy arrays on the CPU",
              file=sys.stderr)
        return 2
    if ops.device != "cpu":
        print("error: the demo streams weights from flash, which runs on the CPU only; for GPU kernel timings "
              "run python -m memkernels bench, for a GPU model run python -m memkernels generate --device cuda",
              file=sys.stderr)
        return 2
    if not args.model_only:
        demo_attention()
    return demo_model(args)


def cmd_convert(args) -> int:
    src = args.src[0] if len(args.src) == 1 else args.src
    try:
        info = mk.convert_to_weight_store(src, args.dst, ffn_pattern=None if args.no_bundle else
                                          mk.weight_store.DEFAULT_FFN_PATTERN)
    except (ValueError, OSError, mk.CorruptDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {len(info['tensors'])} tensors stored whole, "
          f"{len(info['ffn_layers'])} FFN layers bundled by neuron")
    return 0


def _find_bench_dir(given):
    import os

    cands = [given] if given else [os.path.join(os.getcwd(), "bench"),
                                   os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench")]
    for cand in cands:
        if os.path.isfile(os.path.join(cand, "_common.py")):
            return os.path.abspath(cand)
    return None


def _ratio_rows(bench_name, text):
    """Pulls every ratio cell ('1.23x' under a header containing '/') out of the Markdown tables a
    benchmark printed: (benchmark, table, case, column, value)."""
    rows, table, headers = [], "", None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("### "):
            table, headers = line[4:], None
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if headers is None:
                headers = cells
                continue
            for h, c in zip(headers, cells):
                if "/" in h and c.endswith("x"):
                    try:
                        rows.append((bench_name, table, cells[0], h, float(c[:-1])))
                    except ValueError:
                        pass
        elif not line.startswith("|"):
            headers = None if not line else headers
    return rows


def cmd_bench(args) -> int:
    import glob
    import json
    import os
    import subprocess

    bench_dir = _find_bench_dir(args.bench_dir)
    if bench_dir is None:
        print("error: no bench/ directory found (run from the source tree or pass --bench-dir)", file=sys.stderr)
        return 2
    scripts = sorted(p for p in glob.glob(os.path.join(bench_dir, "*.py")) if not os.path.basename(p).startswith("_"))
    if args.only:
        scripts = [p for p in scripts if os.path.splitext(os.path.basename(p))[0] in args.only]
    summary, failed = [], []
    for path in scripts:
        name = os.path.splitext(os.path.basename(path))[0]
        cmd = [sys.executable, path] + (["--quick"] if args.quick else [])
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        print(res.stdout, end="")
        if res.returncode != 0:
            failed.append(name)
            print(res.stderr[-2000:], file=sys.stderr)
        summary += _ratio_rows(name, res.stdout)
    print("\n### Summary: ratios against peers (> 1 means memkernels is faster / smaller)\n")
    print("| benchmark | table | case | ratio | value |")
    print("|---|---|---|---|---|")
    for bench, table, case, col, val in summary:
        print(f"| {bench} | {table} | {case} | {col} | {val:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": mk.info(), "failed": failed,
                       "ratios": [dict(benchmark=b, table=t, case=c, ratio=r, value=v) for b, t, c, r, v in summary]},
                      f, indent=1)
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


def _peak_rss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # Linux reports KiB


def cmd_generate(args) -> int:
    """Loads a real checkpoint, streams generated text, then prints speeds and peak RSS."""
    import json

    from .models import UnsupportedModelError

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        if args.tokens is not None:
            try:
                ids = [int(t) for t in args.tokens.replace(",", " ").split()]
            except ValueError:
                return fail(f"--tokens: expected integers separated by commas or spaces, got {args.tokens!r}")
            if not ids:
                return fail("--tokens: no token ids given")
        if args.dram_budget is None and (args.sparsity or args.predictor or args.stream_dir or args.whole_layer_reads
                                         or args.ffn_format):
            return fail("--sparsity / --predictor / --stream-dir / --whole-layer-reads / --ffn-format need --dram-budget")
        if args.dram_budget is not None and args.check:
            return fail("--check runs the dense float64 reference: load without --dram-budget")
        skw = {} if args.dram_budget is None else dict(
            sparsity=args.sparsity, predictor=args.predictor or "threshold", stream_dir=args.stream_dir,
            whole_layer_reads=args.whole_layer_reads, ffn_format=args.ffn_format or "int4_int8")
        m = mk.load_model(args.model, device=args.device, dram_budget_bytes=args.dram_budget,
                          quantize=args.quantize, exact=args.exact, **skw)
        tok = m.tokenizer
        if args.tokens is None:
            if tok is None:
                return fail(f"{args.model} has no tokenizer: give --tokens instead of --prompt")
            text = args.prompt
            if args.chat:
                text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
                ids = tok.encode(text, add_special_tokens=False)
            else:
                ids = tok.encode(text, add_special_tokens=True)
        elif args.chat:
            return fail("--chat needs --prompt (text), not --tokens")
        if any(t < 0 or t >= m.config.vocab_size for t in ids):
            return fail(f"--tokens: ids must be in [0, {m.config.vocab_size})")
    except (UnsupportedModelError, ValueError, TypeError, OSError, mk.CorruptDataError) as e:
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    for w in m.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if m.quantization:
        q = m.quantization
        print(f"quantized to {q['format']}: logit drift vs the float checkpoint {q['max_abs_logit_drift']:.4g} "
              f"(relative {q['relative_logit_drift']:.3g})", file=sys.stderr)
    stream = not args.json
    decoder = tok.incremental_decoder() if tok is not None and hasattr(tok, "incremental_decoder") else None

    def on_token(_, t):
        if not stream:
            return
        piece = decoder.push(t) if decoder is not None else (tok.decode([t]) if tok is not None else f" {t}")
        sys.stdout.write(piece)
        sys.stdout.flush()

    new = m.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed, callback=on_token)
    if stream and decoder is not None:
        sys.stdout.write(decoder.flush())
    st = m.last_stats
    text = tok.decode(new) if tok is not None else " ".join(map(str, new))
    result = {"tokens": new, "text": text,
              "prefill_tokens_per_s": st["prefill_tokens"] / st["prefill_s"] if st["prefill_s"] > 0 else None,
              "decode_tokens_per_s": st["decode_tokens"] / st["decode_s"] if st["decode_s"] > 0 else None,
              "prefill_tokens": st["prefill_tokens"], "decode_tokens": st["decode_tokens"]}
    if args.check:
        ref = m.reference_logits(ids + new)
        m.exact = True  # the check compares float activations (the int8-activation default drifts a little)
        ours = m.logits(ids + new)
        err = float(np.abs(ours - ref).max())
        result["max_logit_error"] = err
        result["max_logit_error_relative"] = err / max(float(np.abs(ref).max()), 1e-30)
    if m.quantization:
        result["quantization"] = m.quantization
    if hasattr(m, "stream_stats"):
        result["stream"] = m.stream_stats()
    result["peak_rss_bytes"] = _peak_rss_bytes()
    if args.json:
        print(json.dumps(result))
        return 0
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    if "stream" in result:
        ss = result["stream"]
        print(f"\n\nstreamed: {ss['bytes_read_per_token'] / 2**20:.2f} MiB read per token (whole layers: "
              f"{ss['whole_layer_bytes_per_token'] / 2**20:.2f} MiB), hit rate {ss['hit_rate']:.1%}, "
              f"weights held at most {ss['peak_resident_bytes'] / 2**20:.1f} MiB of a "
              f"{ss['dram_budget_bytes'] / 2**20:.1f} MiB budget", end="")
    print(f"\n\nprefill {result['prefill_tokens']} tokens: {fmt(result['prefill_tokens_per_s'])} tokens/s, "
          f"decode {result['decode_tokens']} tokens: {fmt(result['decode_tokens_per_s'])} tokens/s, "
          f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB")
    if args.check:
        ok = result["max_logit_error_relative"] <= 1e-4
        print(f"check vs float64 forward of the checkpoint's weights: max logit error {result['max_logit_error']:.3g} "
              f"(relative {result['max_logit_error_relative']:.3g}) {'OK' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    return 0


def main(argv=None) -> int:
    if list(sys.argv[1:] if argv is None else argv) == ["--cmake-dir"]:  # as pybind11 / nanobind do
        print(mk.cmake_dir())
        return 0
    parser = argparse.ArgumentParser(prog="python -m memkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build and machine information").set_defaults(fn=cmd_info)
    d = sub.add_parser("demo", help="run a small decoder on every kernel and check it against NumPy")
    d.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (every kernel and array on that GPU)")
    d.add_argument("--framework", choices=["auto", "numpy", "torch", "cupy"], default="auto",
                   help="array library between kernels (auto: NumPy on the CPU, PyTorch or else CuPy on a GPU)")
    d.add_argument("--model", help="a Llama-style checkpoint directory (config.json + *.safetensors)")
    d.add_argument("--tokens", type=int, default=16, help="tokens to generate per sequence")
    d.add_argument("--prompt-len", type=int, default=24)
    d.add_argument("--hidden", type=int, default=256, help="hidden size of the seeded model (multiple of 128)")
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--act", choices=["relu", "silu"], default="relu", help="FFN activation of the seeded model")
    d.add_argument("--sparsity", type=float, default=0.0,
                   help="fraction of FFN neurons predicted off and not read (0: exact, checked)")
    d.add_argument("--predictor", choices=["threshold", "lowrank"], default="threshold")
    d.add_argument("--budget-fraction", type=float, default=0.5,
                   help="DRAM budget = resident weights + this fraction of the streamed FFN bytes")
    d.add_argument("--work-dir", help="where the weight store is written (kept when given)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--model-only", action="store_true", help="skip the kernel timing table")
    d.set_defaults(fn=cmd_demo)
    c = sub.add_parser("convert", help="write a weight store from a checkpoint directory or .safetensors/.npz/.npy files")
    c.add_argument("src", nargs="+", help="a directory (config.json + *.safetensors) or files")
    c.add_argument("dst", help="the weight store to write")
    c.add_argument("--no-bundle", action="store_true", help="store the FFN matrices whole, not by neuron")
    c.set_defaults(fn=cmd_convert)
    g = sub.add_parser("generate", help="generate text with a real checkpoint (HF directory or .gguf file)")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors) or .gguf file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer)")
    src.add_argument("--tokens", help="prompt token ids, comma or space separated")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--dram-budget", type=int, default=None, metavar="BYTES",
                   help="stream the FFN weights from a weight store (converted once, cached next to the model) "
                        "with at most BYTES of weights in memory")
    g.add_argument("--sparsity", type=float, default=0.0,
                   help="with --dram-budget: fraction of FFN neurons predicted off and never read (0: exact)")
    g.add_argument("--predictor", choices=["threshold", "lowrank"], default=None,
                   help="with --dram-budget: how neurons are chosen (default threshold: exact gate + calibrated "
                        "magnitude threshold; lowrank: a fitted low-rank predictor)")
    g.add_argument("--stream-dir", default=None, help="with --dram-budget: where the converted store is cached")
    g.add_argument("--ffn-format", choices=["int4_int8", "down_int8", "down_int7", "int4", "int8"], default=None,
                   help="with --dram-budget: store format of a quantized FFN (default int4_int8: up and down streamed "
                        "per neuron; down_int7 / down_int8: gate/up resident, 7-bit / int8 down columns streamed and "
                        "read by their exact contribution)")
    g.add_argument("--whole-layer-reads", action="store_true",
                   help="with --dram-budget: read every FFN layer whole each token (the naive baseline)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streamed text")
    g.add_argument("--check", action="store_true",
                   help="compare the logits with a float64 NumPy forward of the checkpoint's own weights")
    g.add_argument("--exact", action="store_true", default=False,
                   help="float activations everywhere (default: quantized weights quantize 1-8-token "
                        "activations to int8, as llama.cpp does)")
    g.add_argument("--fast", dest="exact", action="store_false",
                   help="int8-activation qgemm for quantized weights (the default)")
    g.add_argument("--quantize", choices=["int8", "int4", "int4_sym", "nf4"], default=None,
                   help="quantize the linear weights at load (prints the logit drift vs the float weights)")
    g.set_defaults(fn=cmd_generate)
    b = sub.add_parser("bench", help="run every benchmark in bench/ and print a summary of ratios")
    b.add_argument("--quick", action="store_true", help="fewer shapes per benchmark")
    b.add_argument("--json", metavar="FILE", help="also write the ratios as JSON")
    b.add_argument("--bench-dir", help="the bench/ folder (default: ./bench or the source tree's)")
    b.add_argument("--only", nargs="*", help="benchmark names to run (default: all)")
    b.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
