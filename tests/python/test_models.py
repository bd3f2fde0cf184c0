"""Real-model support against transformers: tiny random-init checkpoints of every supported
architecture and config variant, built offline (never downloaded), run through memkernels.load_model.

Checks: logits within 1e-4 (relative to the logit scale) of transformers' fp32 forward and of our
float64 reference forward, greedy tokens equal over 12 steps (also several prompts at once sharing
the paged KV cache), RoPE frequencies equal to transformers' ROPE_INIT_FUNCTIONS, refusals that
name what is not understood, and the CLI's exit codes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import memkernels as mk
from memkernels.models import ModelConfig, UnsupportedModelError, paged_attention_has_window

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
BASE = dict(hidden_size=64, num_hidden_layers=2, vocab_size=128, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

ARCH = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}

# name -> (architecture, config overrides). Sequences in the tests are 20 tokens, so windows of 5-7
# and dynamic / yarn / llama3 scaling with short original contexts all change the result.
VARIANTS = {
    "llama": ("llama", {}),
    "llama_t4_theta": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}),
    "llama_linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0}}),
    "llama_dynamic": ("llama", {"max_position_embeddings": 8,
                                "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                             "rope_theta": 10000.0}}),
    "llama_yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                 "original_max_position_embeddings": 32}}),
    "llama_head_dim_bias": ("llama", {"head_dim": 24, "attention_bias": True, "mlp_bias": True}),
    "llama_tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "mistral_window": ("mistral", {"sliding_window": 6}),
    "qwen2": ("qwen2", {}),
    "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    # untied: with tied embeddings scaled by sqrt(hidden) a random Gemma just repeats its last token
    "gemma": ("gemma", {"head_dim": 16, "tie_word_embeddings": False}),
    "gemma_tied": ("gemma", {"head_dim": 32, "num_key_value_heads": 4}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 7, "tie_word_embeddings": False, "query_pre_attn_scalar": 12,
                          "attn_logit_softcapping": 3.0, "final_logit_softcapping": 2.0}),
    "phi3": ("phi3", {"pad_token_id": 0, "eos_token_id": 1, "sliding_window": 9,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5}}),
}


def build(tmp_path, arch, overrides, *, save_dtype=None, seed=0):
    """A random-init transformers model saved to tmp_path; returns (dir, the fp32 HF model read back)."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCH[arch])
    kw = dict(BASE, **overrides)
    cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # default init is tiny (std 0.02, norms 1): spread it so logits differ per token
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    d = str(tmp_path / arch)
    if save_dtype is not None:
        model = model.to(save_dtype)
    model.save_pretrained(d)
    hf = model_cls.from_pretrained(d, dtype=torch.float32).eval()
    return d, hf


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().numpy()


def hf_greedy(hf, ids, n):
    """transformers' greedy decode with its own KV cache (the loop generate() runs, without its
    logits processors)."""
    toks = []
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            toks.append(int(out.logits[0, -1].argmax()))
            out = hf(torch.tensor([toks[-1:]]), cache=out.cache if hasattr(out, "cache") else out.past_key_values,
                     use_cache=True)
    return toks


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


IDS = np.random.default_rng(7).integers(0, 128, 20).tolist()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_greedy_match_transformers(tmp_path, variant):
    arch, over = VARIANTS[variant]
    d, hf = build(tmp_path, arch, over)
    m = mk.load_model(d)
    ref = hf_logits(hf, IDS)
    ours = m.logits(IDS)
    assert ours.shape == (len(IDS), 128) and ours.dtype == np.float32
    assert rel_err(ours, ref) < TOL, variant
    assert rel_err(ours, m.reference_logits(IDS)) < TOL, variant
    assert rel_err(m.reference_logits(IDS), ref) < TOL, variant
    prompt = IDS[:9]
    if arch == "llama" and "dynamic" in variant:  # dynamic rope keeps state in the HF module: a fresh one
        hf = type(hf).from_pretrained(d, dtype=torch.float32).eval()
    want = hf_greedy(hf, prompt, 12)
    assert len(set(want)) > 1 or variant == "gemma_tied", "degenerate test model: greedy repeats one token"
    assert m.generate(prompt, max_new_tokens=12, stop_at_eos=False) == want, variant


@pytest.mark.parametrize("variant", ["llama", "gemma2", "mistral_window"])
def test_multi_prompt_generate_shares_cache(tmp_path, variant):
    arch, over = VARIANTS[variant]
    d, hf = build(tmp_path, arch, over)
    m = mk.load_model(d)
    shared = IDS[:18]  # a full 16-token page is shared by the first two prompts
    prompts = [shared + [3, 4], shared + [90], IDS[5:11]]
    want = [hf_greedy(hf, p, 12) for p in prompts]
    streamed = [[] for _ in prompts]
    got = m.generate(prompts, max_new_tokens=12, stop_at_eos=False, callback=lambda i, t: streamed[i].append(t))
    assert got == want
    assert streamed == want
    assert m.last_stats["reused_prefix_tokens"] >= 16
    assert m.last_stats["decode_tokens"] == 3 * 11
    # again, now the prefix of every prompt is cached: same tokens
    assert m.generate(prompts, max_new_tokens=12, stop_at_eos=False) == want
    m.cache.check_invariants()


def test_bf16_checkpoint(tmp_path, monkeypatch):
    d, hf = build(tmp_path, "llama", {}, save_dtype=torch.bfloat16)
    # bf16 must not need ml_dtypes
    import memkernels._arrays as arrays
    monkeypatch.setattr(arrays, "bfloat16", None)
    m = mk.load_model(d)
    assert rel_err(m.logits(IDS), hf_logits(hf, IDS)) < TOL
    assert m.generate(IDS[:9], 12, stop_at_eos=False) == hf_greedy(hf, IDS[:9], 12)


def test_sharded_checkpoint(tmp_path):
    cfg_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    torch.manual_seed(1)
    model = model_cls(cfg_cls(**BASE)).eval()
    d = str(tmp_path / "sharded")
    model.save_pretrained(d, max_shard_size="20KB")
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    m = mk.load_model(d)
    assert rel_err(m.logits(IDS), hf_logits(model, IDS)) < TOL


def _t4_layout(d):
    """Rewrites config.json in the transformers 4 layout: rope_theta + rope_scaling {type: ...}."""
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    t = rp.pop("rope_type")
    cfg["rope_scaling"] = None if t == "default" else dict(rp, type=t)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    json.dump(cfg, open(p, "w"))


@pytest.mark.parametrize("variant", ["llama_t4_theta", "llama3", "llama_yarn"])
def test_transformers4_config_layout(tmp_path, variant):
    arch, over = VARIANTS[variant]
    d, hf = build(tmp_path, arch, over)
    _t4_layout(d)
    m = mk.load_model(d)
    assert rel_err(m.logits(IDS), hf_logits(hf, IDS)) < TOL


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 0.8,
     "truncate": False},
])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_frequencies_match_transformers(rope, head_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(rope, rope_theta=50000.0)
    hf_cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=256, rope_parameters=params)
    ours = ModelConfig.from_dict(dict(BASE, model_type="llama", hidden_size=head_dim * 4, head_dim=head_dim,
                                      rope_parameters=params))
    for seq_len in (None, 1000):
        if rope["rope_type"] == "default":
            inv = 1.0 / (50000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
            att = 1.0
        else:
            inv, att = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu", seq_len=seq_len)
        mine, my_att = ours.rope.inv_freq(seq_len)
        np.testing.assert_allclose(mine, inv.double().numpy(), rtol=2e-6)
        assert my_att == pytest.approx(att, rel=1e-6)


def test_quantize_option_reports_drift(tmp_path):
    d, hf = build(tmp_path, "llama", {})
    m = mk.load_model(d, quantize="int8", exact=True)
    q = m.quantization
    assert q["format"] == "int8" and 0 < q["relative_logit_drift"] < 0.05
    # quantized q/k/v (and gate/up) are fused into one matrix each
    assert isinstance(m.weights["model.layers.0.self_attn.qkv_proj.weight"], mk.QuantizedMatrix)
    assert isinstance(m.weights["model.layers.0.mlp.down_proj.weight"], mk.QuantizedMatrix)
    # the quantized model matches the float64 forward of its own (dequantized) weights
    assert rel_err(m.logits(IDS), m.reference_logits(IDS)) < TOL
    # and drifts from the float checkpoint by about the reported amount
    drift = rel_err(m.logits(IDS), hf_logits(hf, IDS))
    assert 1e-5 < drift < 0.1


# -- refusals ------------------------------------------------------------------------------------

def _cfg(**kw):
    return {**BASE, "model_type": "llama", **kw}


@pytest.mark.parametrize("cfg, needle", [
    (_cfg(model_type="mixtral"), "mixtral"),
    (_cfg(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "longrope"),
    (_cfg(rope_scaling={"type": "su", "factor": 2.0}), "'su'"),
    (_cfg(num_local_experts=8), "num_local_experts"),
    (dict(_cfg(model_type="qwen2"), num_experts=4), "num_experts"),
    (_cfg(some_new_thing=3), "some_new_thing"),
    (_cfg(sliding_window=8), "sliding_window"),  # llama has no sliding window: not understood
    (_cfg(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}), "freq_factor"),
    (_cfg(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "foo": 1}), "foo"),
    (_cfg(hidden_act="mish"), "mish"),
    (_cfg(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (_cfg(num_key_value_heads=3), "num_key_value_heads"),
    (dict(_cfg(model_type="gemma2"), layer_types=["sliding_attention", "chunked_attention"], sliding_window=4),
     "chunked_attention"),
])
def test_config_refusals_name_the_problem(cfg, needle):
    with pytest.raises(UnsupportedModelError, match=None) as e:
        ModelConfig.from_dict(cfg)
    assert isinstance(e.value, ValueError)
    assert needle in str(e.value)


def _rewrite_tensors(d, fn):
    from safetensors.numpy import load_file, save_file

    p = os.path.join(d, "model.safetensors")
    t = load_file(p)
    fn(t)
    save_file(t, p, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", np.ones((4, 4), np.float32)), "mlp.extra.weight"),
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"), "model.layers.1.self_attn.k_proj.weight"),
    (lambda t: t.__setitem__("model.norm.weight", np.ones(63, np.float32)), "model.norm.weight"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.ones(64, np.float32)), "q_proj.bias"),
    (lambda t: t.__setitem__("model.norm.weight", np.ones(64, np.int32)), "int32"),
])
def test_tensor_refusals_name_the_tensor(tmp_path, edit, needle):
    d, _ = build(tmp_path, "llama", {})
    _rewrite_tensors(d, edit)
    with pytest.raises(UnsupportedModelError) as e:
        mk.load_model(d)
    assert needle in str(e.value)


def test_dram_budget_options_are_checked(tmp_path):
    d, _ = build(tmp_path, "llama", {})
    with pytest.raises(ValueError, match="dram_budget_bytes"):
        mk.load_model(d, sparsity=0.5)  # sparsity without streaming
    with pytest.raises(UnsupportedModelError, match="CPU only"):
        mk.load_model(d, device="cuda", dram_budget_bytes=1 << 20)


def test_bad_token_ids(tmp_path):
    d, _ = build(tmp_path, "llama", {})
    m = mk.load_model(d)
    with pytest.raises(ValueError, match="token ids"):
        m.logits([1, 128])
    with pytest.raises(ValueError, match="tokenizer"):
        m.generate("hello", 2)


@pytest.mark.skipif(not paged_attention_has_window(), reason="paged_attention has no window= yet (being added)")
def test_window_decode_runs_on_pages(tmp_path, monkeypatch):
    """With window= in paged_attention, sliding-window layers never fall back to reading K/V out."""
    arch, over = VARIANTS["mistral_window"]
    d, hf = build(tmp_path, arch, over)
    m = mk.load_model(d)
    monkeypatch.setattr(type(m.cache) if m.cache is not None else mk.PagedKVCache, "read_kv",
                        lambda *a: pytest.fail("read_kv fallback used"))
    assert m.generate(IDS, 12, stop_at_eos=False) == hf_greedy(hf, IDS, 12)


# -- CLI -----------------------------------------------------------------------------------------

def _cli(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "memkernels", "generate", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_cli_generate_json_and_check(tmp_path):
    d, hf = build(tmp_path, "qwen2", {})
    r = _cli("--model", d, "--tokens", ",".join(map(str, IDS[:9])), "--max-new-tokens", "6", "--json", "--check",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == hf_greedy(hf, IDS[:9], 6)
    for k in ("text", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "max_logit_error"):
        assert k in out
    assert out["peak_rss_bytes"] > 1 << 20
    assert out["max_logit_error_relative"] < TOL


def _bad_model_dirs(tmp_path):
    d, _ = build(tmp_path, "llama", {})
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    cfg = json.load(open(os.path.join(d, "config.json")))
    (unknown / "config.json").write_text(json.dumps(dict(cfg, model_type="falcon")))
    os.link(os.path.join(d, "model.safetensors"), unknown / "model.safetensors")
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file
    t = load_file(os.path.join(d, "model.safetensors"))
    t.pop("model.layers.0.mlp.up_proj.weight")
    save_file(t, str(missing / "model.safetensors"))
    badfile = tmp_path / "bad.gguf"
    badfile.write_bytes(b"GGUF" + b"\x00" * 10)
    notamodel = tmp_path / "x.bin"
    notamodel.write_bytes(b"hello")
    cases = {"unknown model_type": (str(unknown), "falcon"), "missing tensor": (str(missing), "up_proj"),
             "bad gguf": (str(badfile), "bad.gguf"), "not a model": (str(notamodel), "x.bin"),
             "no such path": (str(tmp_path / "nope"), "nope")}
    # bad config.json files (issue 13 #23: these printed tracebacks)
    for name, text, needle in (("zero heads", json.dumps(dict(cfg, num_attention_heads=0)), "num_attention_heads"),
                               ("string size", json.dumps(dict(cfg, hidden_size="64")), "hidden_size"),
                               ("deep nesting", "[" * 100000 + "]" * 100000, "config"),
                               ("truncated json", json.dumps(cfg)[:-5], "config"),
                               ("not an object", "[1, 2]", "config")):
        bad = tmp_path / name.replace(" ", "_")
        bad.mkdir()
        (bad / "config.json").write_text(text)
        os.link(os.path.join(d, "model.safetensors"), bad / "model.safetensors")
        cases["config: " + name] = (str(bad), needle)
    return cases


def test_cli_unsupported_inputs_exit_2(tmp_path):
    cases = _bad_model_dirs(tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    for what, (path, needle) in cases.items():
        r = _cli("--model", path, "--tokens", "1,2,3", cwd=work)
        assert r.returncode == 2, (what, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (what, r.stderr)
        assert needle in lines[0], (what, lines[0])
        assert r.stdout == ""
        assert os.listdir(work) == [], what  # nothing left behind
    r = _cli("--model", cases["missing tensor"][0], "--tokens", "1,x", cwd=work)
    assert r.returncode == 2 and "--tokens" in r.stderr
    # streaming converts through the same loader: the same one-line refusal, no store left behind
    before = sorted(os.listdir(cases["missing tensor"][0]))
    r = _cli("--model", cases["missing tensor"][0], "--tokens", "1,2", "--dram-budget", "1000000", cwd=work)
    assert r.returncode == 2 and "is missing from the checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(cases["missing tensor"][0])) == before
    r = _cli("--model", cases["missing tensor"][0], "--tokens", "1,2", "--sparsity", "0.5", cwd=work)
    assert r.returncode == 2 and "--dram-budget" in r.stderr


# -- tokenizer.json in the checkpoint directory ----------------------------------------------------

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "hello world, hello model", "memory efficient kernels",
          "the quick brown fox jumps over the lazy dog"] * 4


def _add_tokenizer(d):
    """A small BPE tokenizer.json (< 128 ids) trained here, with <s>/</s> and a chat template."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=110, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() <= 128
    tok.save(os.path.join(d, "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template},
              open(os.path.join(d, "tokenizer_config.json"), "w"))


def test_text_prompts_with_tokenizer_json(tmp_path):
    d, hf = build(tmp_path, "llama", {})
    _add_tokenizer(d)
    m = mk.load_model(d)
    assert m.tokenizer is not None and 2 in m.tokenizer.eos_token_ids
    ids = m.tokenizer.encode("the cat sat on the mat")
    assert ids[0] == 1 and len(ids) > 3
    want = hf_greedy(hf, ids, 8)
    assert m.generate("the cat sat on the mat", 8, stop_at_eos=False) == want
    both = m.generate(["the cat sat on the mat", ids], 8, stop_at_eos=False)
    assert both == [want, want]

    r = _cli("--model", d, "--prompt", "the cat sat on the mat", "--max-new-tokens", "8", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    stop = next((i + 1 for i, t in enumerate(want) if t == 2), len(want))  # the CLI stops at </s>
    assert out["tokens"] == want[:stop]
    assert out["text"] == m.tokenizer.decode(want[:stop])

    # streamed text, then the speeds line
    r = _cli("--model", d, "--prompt", "hello world", "--max-new-tokens", "6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    new = m.generate("hello world", 6)
    assert r.stdout.startswith(m.tokenizer.decode(new))
    assert "tokens/s" in r.stdout and "peak RSS" in r.stdout

    chat = m.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    r = _cli("--model", d, "--prompt", "hello", "--chat", "--max-new-tokens", "5", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == m.generate(m.tokenizer.encode(chat, add_special_tokens=False), 5)


def test_dynamic_rope_batched_decode_is_per_sequence(tmp_path):
    """Each sequence of a batch gets the dynamic-NTK frequencies of its own length (as transformers
    running it alone), so batching does not change the tokens."""
    d, _ = build(tmp_path, *VARIANTS["llama_dynamic"])
    m = mk.load_model(d)
    prompts = [IDS[:3], IDS[:11], IDS[4:18]]
    alone = [mk.load_model(d).generate(p, 10, stop_at_eos=False) for p in prompts]
    assert m.generate(prompts, 10, stop_at_eos=False) == alone
    cfg_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    for p, want in zip(prompts, alone):
        assert hf_greedy(model_cls.from_pretrained(d, dtype=torch.float32).eval(), p, 10) == want


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(tmp_path):
    d, _ = build(tmp_path, "llama", {})
    m = mk.load_model(d)
    a = m.generate(IDS[:6], 10, temperature=1.0, seed=3, stop_at_eos=False)
    assert a == m.generate(IDS[:6], 10, temperature=1.0, seed=3, stop_at_eos=False)
    assert a != m.generate(IDS[:6], 10, temperature=1.0, seed=4, stop_at_eos=False)
    greedy = m.generate(IDS[:6], 10, stop_at_eos=False)
    assert m.generate(IDS[:6], 10, temperature=0.7, top_p=1e-6, seed=5, stop_at_eos=False) == greedy
    with pytest.raises(ValueError, match="top_p"):
        m.generate(IDS[:6], 2, temperature=1.0, top_p=0.0)


def test_activation_fields_as_transformers_reads_them():
    g = ModelConfig.from_dict({**BASE, "model_type": "gemma", "hidden_act": "gelu"})
    assert g.hidden_act == "gelu_pytorch_tanh"  # legacy value of the official Gemma configs
    g = ModelConfig.from_dict({**BASE, "model_type": "gemma", "hidden_act": "gelu", "hidden_activation": "gelu"})
    assert g.hidden_act == "gelu"
    assert ModelConfig.from_dict({**BASE, "model_type": "gemma2"}).hidden_act == "gelu_pytorch_tanh"
    with pytest.raises(UnsupportedModelError, match="disagree"):
        ModelConfig.from_dict({**BASE, "model_type": "gemma2", "hidden_act": "silu"})
    assert ModelConfig.from_dict({**BASE, "model_type": "qwen2", "use_mrope": False}).qkv_bias
    with pytest.raises(UnsupportedModelError, match="use_mrope"):
        ModelConfig.from_dict({**BASE, "model_type": "qwen2", "use_mrope": True})


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_other_activations_match_transformers(tmp_path, act):
    d, hf = build(tmp_path, "llama", {"hidden_act": act})
    m = mk.load_model(d)
    assert rel_err(m.logits(IDS), hf_logits(hf, IDS)) < TOL


def test_missing_keys_take_transformers_defaults():
    """A config.json that omits a key means transformers' class default for it."""
    for mt in ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3"):
        hf_cls = getattr(transformers, ARCH[mt][0])
        mine = ModelConfig.from_dict({**BASE, "model_type": mt})
        hf = hf_cls(**BASE)
        assert mine.rms_norm_eps == pytest.approx(hf.rms_norm_eps), mt
        assert mine.tie_word_embeddings == bool(hf.tie_word_embeddings), mt
        assert mine.head_dim == (getattr(hf, "head_dim", None) or 16), mt
        assert mine.rope.theta == hf.rope_parameters["rope_theta"], mt
        hf_window = getattr(hf, "sliding_window", None)
        types = getattr(hf, "layer_types", None) or ["full_attention" if hf_window is None else "sliding_attention"] * 2
        assert mine.layer_windows == [hf_window if t == "sliding_attention" else None for t in types], mt
        if mt == "gemma2":
            assert (mine.attn_softcap, mine.final_softcap) == (hf.attn_logit_softcapping, hf.final_logit_softcapping)
            assert mine.attn_scale == hf.query_pre_attn_scalar ** -0.5


def test_exact_false_allows_int8_activations(tmp_path):
    d, _ = build(tmp_path, "llama", {})
    exact = mk.load_model(d, quantize="int4", exact=True)
    fast = mk.load_model(d, quantize="int4", exact=False)
    ref = exact.reference_logits(IDS[:5])
    assert rel_err(exact.logits(IDS[:5]), ref) < TOL
    assert rel_err(fast.logits(IDS[:5]), ref) < 0.05  # int8 activations: close, not exact
    assert len(fast.generate(IDS[:5], 4, stop_at_eos=False)) == 4


def test_cli_cuda_without_gpu_exits_2(tmp_path):
    if mk.info()["cuda_available"]:
        pytest.skip("a GPU is present")
    d, _ = build(tmp_path, "llama", {})
    r = _cli("--model", d, "--tokens", "1,2", "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("variant", ["llama", "gemma2", "qwen2_window"])
def test_chunked_prefill_equals_one_pass(tmp_path, variant):
    d, hf = build(tmp_path, *VARIANTS[variant])
    m = mk.load_model(d)
    m.prefill_chunk = 7  # smaller than the prompts and the windows' reach
    assert rel_err(m.logits(IDS), hf_logits(hf, IDS)) < TOL
    prompts = [IDS[:18] + [5], IDS[:18] + [6, 7], IDS[3:12]]
    assert m.generate(prompts, 6, stop_at_eos=False) == [hf_greedy(hf, p, 6) for p in prompts]


@pytest.mark.parametrize("variant", ["llama_head_dim_bias", "gemma2", "phi3", "mistral_window"])
def test_torch_arrays_run_the_same_driver(tmp_path, variant):
    """framework='torch' on the CPU: the code path --device cuda takes (torch tensors between the
    kernels, DLPack into them), checked without a GPU."""
    d, hf = build(tmp_path, *VARIANTS[variant])
    m = mk.load_model(d, framework="torch")
    assert not m._numpy
    assert rel_err(m.logits(IDS), hf_logits(hf, IDS)) < TOL
    assert m.generate(IDS[:9], 8, stop_at_eos=False) == hf_greedy(hf, IDS[:9], 8)
    q = mk.load_model(d, framework="torch", quantize="int8", exact=True)
    assert rel_err(q.logits(IDS[:6]), q.reference_logits(IDS[:6])) < TOL


def test_prompt_fully_cached_recomputes_its_last_token(tmp_path):
    d, hf = build(tmp_path, "llama", {})
    m = mk.load_model(d)
    p = IDS[:16]  # exactly one page: the second call finds all of it cached
    want = hf_greedy(hf, p, 6)
    assert m.generate(p, 6, stop_at_eos=False) == want
    assert m.generate(p, 6, stop_at_eos=False) == want
    assert m.last_stats["reused_prefix_tokens"] == 15 and m.last_stats["prefill_tokens"] == 1
    assert m.generate([p, p + [1]], 6, stop_at_eos=False) == [want, hf_greedy(hf, p + [1], 6)]
    m.cache.check_invariants()


@pytest.mark.parametrize("fmt,gs", [("int8", 32), ("int8", None), ("int4_sym", 32), ("int4_min", 32), ("nf4", 32)])
@pytest.mark.parametrize("rows", [(7, 3, 5), (1, 1), (64, 16, 16)])
def test_fuse_rows_stacks_quantized_matrices_bit_for_bit(fmt, gs, rows):
    from memkernels.models.llama import fuse_rows, fuse_rows_supported
    rng = np.random.default_rng(len(rows) + sum(rows))
    for k in (32, 96, 160, 33, 100):  # and partial last groups (stored padded)
        qs = [mk.quantize(rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.1, 3), fmt, group_size=gs)
              for n in rows]
        assert fuse_rows_supported(qs)
        f = fuse_rows(qs)
        assert f.shape == (sum(rows), k) and f.format == fmt
        np.testing.assert_array_equal(mk.dequantize(f), np.concatenate([mk.dequantize(q) for q in qs]))
        x = rng.standard_normal((3, k)).astype(np.float32)
        np.testing.assert_allclose(mk.qgemm(x, f), np.concatenate([mk.qgemm(x, q) for q in qs], 1), rtol=1e-5,
                                   atol=1e-5)


def test_fuse_rows_refuses_mismatched_matrices():
    from memkernels.models.llama import fuse_rows_supported
    rng = np.random.default_rng(3)
    a = mk.quantize(rng.standard_normal((4, 64)).astype(np.float32), "int4_sym", group_size=32)
    assert not fuse_rows_supported([a, mk.quantize(rng.standard_normal((4, 64)).astype(np.float32), "int4_min",
                                                   group_size=32)])
    assert not fuse_rows_supported([a, mk.quantize(rng.standard_normal((4, 64)).astype(np.float32), "int4_sym",
                                                   group_size=64)])
    assert not fuse_rows_supported([a, mk.quantize(rng.standard_normal((4, 96)).astype(np.float32), "int4_sym",
                                                   group_size=32)])
    assert not fuse_rows_supported([a, rng.standard_normal((4, 64)).astype(np.float32)])
    assert not fuse_rows_supported([a, None])


@pytest.mark.parametrize("gs", [32, None])
def test_quantized_embedding_rows_equal_dequantized_rows(gs):
    from memkernels.model import array_ops
    from memkernels.models.llama import _QuantizedRows
    rng = np.random.default_rng(5)
    for n, k in ((50, 64), (3, 32), (129, 96)):
        q = mk.quantize(rng.standard_normal((n, k)).astype(np.float32), "int8", group_size=gs)
        rows = _QuantizedRows(q, array_ops("cpu", "auto"))
        idx = rng.integers(0, n, 7)
        np.testing.assert_array_equal(rows[idx], mk.dequantize(q)[idx])


def test_quantized_linears_are_fused_and_match_the_reference(tmp_path):
    d, hf = build(tmp_path, "llama", {"attention_bias": True, "mlp_bias": True})
    m = mk.load_model(d, quantize="int4_sym", exact=True)
    assert "model.layers.0.self_attn.qkv_proj.weight" in m.weights
    assert "model.layers.0.self_attn.qkv_proj.bias" in m.weights
    assert "model.layers.1.mlp.gate_up_proj.weight" in m.weights and "model.layers.1.mlp.up_proj.bias" not in m.weights
    assert rel_err(m.logits(IDS), m.reference_logits(IDS)) < TOL
    first = m.generate(IDS[:9], 6, stop_at_eos=False)
    m.reset_cache()
    assert m.cache is None and m.generate(IDS[:9], 6, stop_at_eos=False) == first
