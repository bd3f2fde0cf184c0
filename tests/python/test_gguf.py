"""GGUF loading: files written here with gguf.GGUFWriter, checked against the gguf package's own
dequantizer (bit for bit) and against the transformers checkpoints they were made from."""
import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as T  # noqa: E402

import memkernels as mk  # noqa: E402
from memkernels.models.gguf import (GGUFCheckpoint, UnsupportedModelError, gguf_format_available,  # noqa: E402
                                    load_gguf, unpack_blocks)

LOSSLESS = {"Q4_0": "int4_sym", "Q4_1": "int4_min", "Q8_0": "int8", "Q5_0": "int8", "Q4_K": "int4_min"}
# what load_gguf keeps exactly: the unpack_blocks types, with the K-quants in their own formats
EXACT = {**LOSSLESS, "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}


def needs_format(fmt):
    return pytest.mark.skipif(not gguf_format_available(fmt),
                              reason=f"this memkernels build has no group-32 '{fmt}' with signed scales yet "
                                     "(mk.pack_quantized refuses it)")


def random_raw(rng, qtype, rows, cols, scale=1.0):
    """Raw GGUF rows of type qtype: quantized with the gguf package where it can, otherwise random
    valid blocks (random bits with finite float16 scales, negative ones included, times `scale`)."""
    if qtype in (T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.Q5_1):
        w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 1, (rows, 1)).astype(np.float32)
        w[0, :32] = 0  # an all-zero block: scale 0
        return gguf.quants.quantize(w, qtype)
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // bs, ts), dtype=np.uint8)

    def put_f16(off):
        v = (rng.uniform(1e-3, 2e-2, raw.shape[:2]) * scale * rng.choice([-1, 1], raw.shape[:2])).astype(np.float16)
        raw[..., off:off + 2] = v.view(np.uint8).reshape(*raw.shape[:2], 2)

    if qtype in (T.Q4_K, T.Q5_K):
        put_f16(0)
        put_f16(2)
    elif qtype == T.Q6_K:
        put_f16(208)
    else:
        raise AssertionError(qtype)
    return raw.reshape(rows, -1)


def our_values(fmt, codes, scales, mins):
    """The value table of our formats, in float32, group 32."""
    rows, cols = codes.shape
    s = np.repeat(scales, 32, axis=1)
    if fmt == "int4_sym":
        return s * (codes.astype(np.float32) - np.float32(8))
    if fmt == "int8":
        return s * codes.view(np.int8).astype(np.float32)
    return s * codes.astype(np.float32) + np.repeat(mins, 32, axis=1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q4_K"])
@pytest.mark.parametrize("rows", [1, 7])
def test_unpack_bit_exact(qtype, rows):
    rng = np.random.default_rng(len(qtype) + rows)
    cols = 512 if qtype == "Q4_K" else 96
    raw = random_raw(rng, T[qtype], rows, cols)
    fmt, codes, scales, mins = unpack_blocks(raw, qtype)
    assert fmt == LOSSLESS[qtype]
    assert codes.shape == (rows, cols) and codes.dtype == np.uint8
    assert scales.shape == (rows, cols // 32) and scales.dtype == np.float32
    if fmt.startswith("int4"):
        assert codes.max() <= 15
    want = gguf.quants.dequantize(raw, T[qtype])
    got = our_values(fmt, codes, scales, mins)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), np.asarray(want, np.float32).view(np.uint32))
    if qtype in ("Q4_0", "Q4_K"):
        assert (scales < 0).any() or qtype == "Q4_K" and (mins > 0).any()


# ---------------------------------------------------------------------------------------------------
# a small GGUF writer for the tests
VOCAB = ["<unk>", "<s>", "</s>"] + [f"\u2581{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + \
        [c for c in "abcdefghijklmnopqrstuvwxyz"] + [f"<0x{i:02X}>" for i in range(73)]


def write_gguf(path, arch, tensors, *, hidden, ff, layers, heads, kv_heads, head_dim=None, eps=1e-5, theta=10000.0,
               ctx=256, extra=None, vocab=True):
    """tensors: GGUF name -> (float array, GGUF type name) or (raw uint8 rows, type name, "raw")."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(theta)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    for fn, *args in (extra or []):
        getattr(w, fn)(*args)
    if vocab:
        types = [2, 3, 3] + [1] * 52 + [6] * 73
        w.add_tokenizer_model("llama")
        w.add_token_list(VOCAB)
        w.add_token_scores([-float(i) for i in range(len(VOCAB))])
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    for name, spec in tensors.items():
        arr, tname = spec[0], spec[1]
        if len(spec) == 3:
            w.add_tensor(name, arr, raw_dtype=T[tname])
        elif tname == "F32":
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
        elif tname == "F16":
            w.add_tensor(name, np.ascontiguousarray(arr, np.float16))
        else:
            raw = gguf.quants.quantize(np.ascontiguousarray(arr, np.float32), T[tname])
            w.add_tensor(name, raw, raw_dtype=T[tname])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_permute(w, n_head):
    """llama.cpp's converter permutation of Q/K rows (written here from its description: per head, the
    two halves are interleaved so that RoPE pairs become adjacent rows)."""
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------
def _kquant_model(tmp_path, rng):
    """A one-layer llama with hidden 256 (K-quant blocks are 256 wide) and one tensor per type."""
    H, F, V = 256, 512, len(VOCAB)
    types = {
        "token_embd.weight": ("Q6_K", (V, H)), "blk.0.attn_q.weight": ("Q4_K", (H, H)),
        "blk.0.attn_k.weight": ("Q5_K", (128, H)), "blk.0.attn_v.weight": ("Q4_0", (128, H)),
        "blk.0.attn_output.weight": ("Q4_1", (H, H)), "blk.0.ffn_gate.weight": ("Q8_0", (F, H)),
        "blk.0.ffn_up.weight": ("Q5_0", (F, H)), "blk.0.ffn_down.weight": ("Q4_K", (H, F)),
        "output.weight": ("Q5_1", (V, H)),  # a type still re-quantized (lossy) to int8
    }
    tensors = {n: (random_raw(rng, T[t], *shape), t, "raw") for n, (t, shape) in types.items()}
    tensors["blk.0.attn_norm.weight"] = (rng.uniform(0.5, 1.5, H), "F32")
    tensors["blk.0.ffn_norm.weight"] = (rng.uniform(0.5, 1.5, H), "F16")
    bf = gguf.quants.quantize(rng.uniform(0.5, 1.5, H).astype(np.float32), T.BF16)
    tensors["output_norm.weight"] = (bf, "BF16", "raw")
    path = write_gguf(tmp_path / "k.gguf", "llama", tensors, hidden=H, ff=F, layers=1, heads=4, kv_heads=2)
    return path, tensors


def test_load_all_types_against_gguf_dequantizer(tmp_path, capsys):
    rng = np.random.default_rng(5)
    path, tensors = _kquant_model(tmp_path, rng)
    ck = load_gguf(path, dequantize=True)
    err = capsys.readouterr().err
    assert isinstance(ck, GGUFCheckpoint)
    hf = {
        "token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
        "output_norm.weight": "model.norm.weight", "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
        "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
        "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    }
    assert set(ck.tensors) == set(hf.values())
    for gname, (arr, tname, *_) in tensors.items():
        name = hf[gname]
        got = ck.tensors[name]
        assert got.dtype == np.float32
        if tname == "BF16":
            want = (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif tname in ("F32", "F16"):
            want = np.asarray(arr, np.dtype(tname.lower().replace("f", "float"))).astype(np.float32)
        else:
            want = np.asarray(gguf.quants.dequantize(arr, T[tname]), np.float32)
        if gname in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
            want = np.ascontiguousarray(want[_unpermute_index(want.shape[0], 4 if "attn_q" in gname else 2)])
        np.testing.assert_array_equal(got, want, err_msg=gname)
        np.testing.assert_array_equal(ck.dequantized(name), want, err_msg=gname)
    assert ck.tensor_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_K"
    # rows of an embedding alone
    np.testing.assert_array_equal(ck.dequantized("model.embed_tokens.weight", rows=[5, 0, 5]),
                                  ck.tensors["model.embed_tokens.weight"][[5, 0, 5]])
    assert err == "" and ck.warnings == []  # float32 values are exact: nothing to warn about
    assert ck.config["tie_word_embeddings"] is False
    assert ck.config["vocab_size"] == len(VOCAB) and ck.config["head_dim"] == 64


def _unpermute_index(rows, n_head):
    """Independent inverse of llama_permute: the GGUF row that holds each HF row."""
    idx = np.arange(rows)
    return np.argsort(llama_permute(idx, n_head))


@needs_format("int4_min")
@needs_format("int8")
@needs_format("int4_sym")
def test_load_quantized_matches_dequantizer(tmp_path, capsys):
    rng = np.random.default_rng(6)
    path, tensors = _kquant_model(tmp_path, rng)
    ref = load_gguf(path, dequantize=True, verbose=False)
    ck = load_gguf(path)
    err = capsys.readouterr().err
    assert err.count("warning") == 1, err  # one line per file
    assert "Q5_1" in err and "Q5_K" not in err and "Q6_K" not in err and str(path) in err
    for name, t in ck.tensors.items():
        tname = ck.tensor_types[name]
        if tname in ("F32", "F16", "BF16"):
            assert isinstance(t, np.ndarray)
            continue
        assert isinstance(t, mk.QuantizedMatrix), name
        got = mk.dequantize(t)
        want = ref.tensors[name]
        if tname in EXACT:
            assert t.format == EXACT[tname], (name, t.format)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {tname}")
        else:  # re-quantized to int8, group 32: within half a step of each group's scale
            step = np.repeat(np.abs(want).reshape(want.shape[0], -1, 32).max(-1) / 127, 32, axis=1)
            assert np.all(np.abs(got - want) <= step * 0.5001 + 1e-12), name
            reported = float(re.search(rf"{tname} weights have no exact.*?max abs error ([0-9.e-]+)",
                                       " ".join(ck.warnings)).group(1))
            assert np.abs(got - want).max() <= reported * 1.005  # printed with 3 significant digits
            assert reported > 0


@needs_format("int4_min")
@needs_format("int8")
@needs_format("int4_sym")
def test_lossy_warning_lists_types(tmp_path, capsys):
    rng = np.random.default_rng(7)
    path, _ = _kquant_model(tmp_path, rng)
    ck = load_gguf(path, verbose=False)
    assert capsys.readouterr().err == ""
    assert len(ck.warnings) == 1 and "Q5_1" in ck.warnings[0]


# ---------------------------------------------------------------------------------------------------
# checkpoints made by transformers, converted as llama.cpp's converter does
def _hf_model(arch, **over):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    common.update(over)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**{"tie_word_embeddings": False, "rope_theta": 5000.0, **common})
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=4)
    elif arch == "phi3":
        cfg = transformers.Phi3Config(**common, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    elif arch == "gemma":
        cfg = transformers.GemmaConfig(**common, head_dim=16, hidden_activation="gelu_pytorch_tanh")
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                        hidden_activation="gelu_pytorch_tanh")
    else:
        raise AssertionError(arch)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",  # Phi-3's fused projections
}


def llama3_divisors(theta, head_dim, rs):
    """The rope_freqs tensor llama.cpp's converter writes for a Llama 3 rope scaling (from its description)."""
    inv = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    wl = 2 * np.pi / inv
    orig, lo, hi = rs["original_max_position_embeddings"], rs["low_freq_factor"], rs["high_freq_factor"]
    factor = rs["factor"]
    sm = (orig / wl - lo) / (hi - lo)
    return np.where(wl < orig / hi, 1.0, np.where(wl > orig / lo, factor, 1 / ((1 - sm) / factor + sm)))


def hf_to_gguf(model, arch, path, qtype="F32"):
    """Writes a transformers model as llama.cpp's converter would: names, Q/K permutation (llama),
    norm + 1 (Gemma), metadata. 2-D weights in qtype, 1-D tensors in F32."""
    c = model.config
    gemma = arch in ("gemma", "gemma2")
    if arch == "mistral":
        arch = "llama"  # llama.cpp writes Mistral models as llama
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    layer_map = dict(_LAYER_TO_GGUF)
    if arch == "gemma2":
        layer_map.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                          "post_feedforward_layernorm": "post_ffw_norm"})
    else:
        layer_map["post_attention_layernorm"] = "ffn_norm"
    tensors = {}
    for k, v in sd.items():
        if k in _TO_GGUF:
            g = _TO_GGUF[k]
        else:
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
            g = f"blk.{m.group(1)}.{layer_map[m.group(2)]}.{m.group(3)}"
        if arch == "llama" and (".q_proj." in k or ".k_proj." in k):
            v = llama_permute(v, c.num_attention_heads if ".q_proj." in k else c.num_key_value_heads)
        if gemma and k.endswith("norm.weight"):
            v = v + np.float32(1)
        tensors[g] = (v, qtype if v.ndim == 2 else "F32")
    rp = getattr(c, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    extra = []
    rs = rp if rp.get("rope_type") == "llama3" else (getattr(c, "rope_scaling", None) or {})
    if rs.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = (llama3_divisors(theta, c.head_dim, rs), "F32")
    if getattr(c, "sliding_window", None) and c.model_type == "mistral":
        extra.append(("add_sliding_window", c.sliding_window))
    if arch == "gemma2":
        extra = [("add_attn_logit_softcapping", c.attn_logit_softcapping),
                 ("add_final_logit_softcapping", c.final_logit_softcapping), ("add_sliding_window", c.sliding_window)]
    return write_gguf(path, arch, tensors, hidden=c.hidden_size, ff=c.intermediate_size, layers=c.num_hidden_layers,
                      heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                      head_dim=getattr(c, "head_dim", None), eps=c.rms_norm_eps, theta=theta, extra=extra,
                      ctx=c.max_position_embeddings), sd


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_float_tensors_and_config_equal_transformers(tmp_path, arch):
    model = _hf_model(arch)
    path, sd = hf_to_gguf(model, arch, tmp_path / f"{arch}.gguf")
    ck = load_gguf(path)
    assert set(ck.tensors) == set(sd)
    for k, v in sd.items():
        got = np.asarray(ck.tensors[k])
        if arch == "gemma2" and k.endswith("norm.weight"):
            # stored as w + 1 in float32: back within one rounding of 1
            np.testing.assert_allclose(got, v, rtol=0, atol=2 ** -23, err_msg=k)
        else:
            np.testing.assert_array_equal(got, v, err_msg=k)
    c, cfg = model.config, ck.config
    assert cfg["model_type"] == arch
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert cfg[key] == getattr(c, key), key
    rp = getattr(c, "rope_parameters", None) or {}
    assert cfg["rope_theta"] == rp.get("rope_theta", getattr(c, "rope_theta", None))
    assert cfg["head_dim"] == getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "query_pre_attn_scalar"):
            assert cfg[key] == getattr(c, key), key
        assert cfg["layer_types"] == list(c.layer_types)
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    config_mod = pytest.importorskip("memkernels.models.config")
    mc = config_mod.ModelConfig.from_dict(cfg)  # the models package accepts every key
    assert mc.head_dim == cfg["head_dim"] and mc.tie_word_embeddings == c.tie_word_embeddings
    assert ck.tokenizer is not None and ck.tokenizer.eos_token_ids == {2}


def test_llama_qk_unpermute_is_needed(tmp_path):
    """Without the inverse permutation Q and K would differ: the check above can fail."""
    model = _hf_model("llama")
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(llama_permute(q, 4), q)
    np.testing.assert_array_equal(llama_permute(q, 4)[_unpermute_index(64, 4)], q)


@needs_format("int8")
def test_llama_q8_0_rows_unpermuted(tmp_path):
    """Quantized Q/K rows move whole: the result is the quantization of the HF tensor itself."""
    model = _hf_model("llama")
    path, sd = hf_to_gguf(model, "llama", tmp_path / "q8.gguf", qtype="Q8_0")
    ck = load_gguf(path)
    for k in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        want = gguf.quants.dequantize(gguf.quants.quantize(sd[k], T.Q8_0), T.Q8_0)
        np.testing.assert_array_equal(mk.dequantize(ck.tensors[k]), want)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    rng = np.random.default_rng(1)
    H, hd, theta = 64, 64, 500000.0
    # Llama 3.1 parameters; the divisors computed as the converter's documentation describes
    factor, lo, hi, orig = 8.0, 1.0, 4.0, 8192
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    wl = 2 * np.pi / inv
    sm = (orig / wl - lo) / (hi - lo)
    div = np.where(wl < orig / hi, 1.0, np.where(wl > orig / lo, factor, 1 / ((1 - sm) / factor + sm)))
    assert ((div > 1) & (div < factor)).sum() >= 2
    tensors = {"token_embd.weight": (rng.standard_normal((len(VOCAB), H)), "F32"),
               "output_norm.weight": (rng.standard_normal(H), "F32"), "rope_freqs.weight": (div, "F32")}
    path = write_gguf(tmp_path / "l3.gguf", "llama", tensors, hidden=H, ff=96, layers=0, heads=1, kv_heads=1,
                      theta=theta)
    rs = load_gguf(path).config["rope_scaling"]
    assert rs["rope_type"] == "llama3"
    assert rs["factor"] == factor and rs["low_freq_factor"] == lo
    assert rs["high_freq_factor"] == pytest.approx(hi, rel=1e-5)
    assert rs["original_max_position_embeddings"] == pytest.approx(orig, rel=1e-5)
    # a tensor that is not a Llama 3 scaling is refused
    tensors["rope_freqs.weight"] = (rng.uniform(1, 8, hd // 2), "F32")
    path = write_gguf(tmp_path / "bad.gguf", "llama", tensors, hidden=H, ff=96, layers=0, heads=1, kv_heads=1,
                      theta=theta)
    with pytest.raises(UnsupportedModelError, match="rope"):
        load_gguf(path)


# ---------------------------------------------------------------------------------------------------
def _tiny(tmp_path, name="t.gguf", arch="llama", extra=None, more=None, layers=1):
    rng = np.random.default_rng(2)
    H = 64
    tensors = {"token_embd.weight": (rng.standard_normal((len(VOCAB), H)), "F32"),
               "output_norm.weight": (rng.standard_normal(H), "F32")}
    for i in range(layers):
        tensors[f"blk.{i}.attn_norm.weight"] = (rng.standard_normal(H), "F32")
    tensors.update(more or {})
    return write_gguf(tmp_path / name, arch, tensors, hidden=H, ff=96, layers=layers, heads=4, kv_heads=4,
                      extra=extra)


def test_corrupt_and_truncated_files(tmp_path):
    good = _tiny(tmp_path)
    load_gguf(good)
    data = good.read_bytes()
    for cut in (10, 100, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(mk.CorruptDataError, match=re.escape(str(bad))):
            load_gguf(bad)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(mk.CorruptDataError, match="junk.gguf"):
        load_gguf(junk)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_gguf(tmp_path / "missing.gguf")
    assert issubclass(mk.CorruptDataError, ValueError)


def test_unsupported_inputs(tmp_path):
    with pytest.raises(UnsupportedModelError, match="architecture 'mamba'"):
        load_gguf(_tiny(tmp_path, "a.gguf", arch="mamba"))
    with pytest.raises(UnsupportedModelError, match="'blk.0.attn_sinks.weight'"):
        load_gguf(_tiny(tmp_path, "b.gguf", more={"blk.0.attn_sinks.weight": (np.ones(4), "F32")}))
    with pytest.raises(UnsupportedModelError, match="'blk.3.attn_norm.weight'"):  # a layer beyond block_count
        load_gguf(_tiny(tmp_path, "c.gguf", more={"blk.3.attn_norm.weight": (np.ones(64), "F32")}))
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        load_gguf(_tiny(tmp_path, "d.gguf", extra=[("add_expert_count", 8)]))
    with pytest.raises(UnsupportedModelError, match="'llama.some_new_setting'"):
        load_gguf(_tiny(tmp_path, "e.gguf", extra=[("add_float32", "llama.some_new_setting", 2.0)]))
    with pytest.raises(UnsupportedModelError, match="split into 3 files"):
        load_gguf(_tiny(tmp_path, "s.gguf", extra=[("add_uint16", "split.count", 3)]))
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'longrope'"):
        load_gguf(_tiny(tmp_path, "f.gguf", extra=[("add_string", "llama.rope.scaling.type", "longrope")]))
    # a data type without a dequantizer (integer tensor)
    with pytest.raises(UnsupportedModelError, match="I32"):
        load_gguf(_tiny(tmp_path, "g.gguf", more={"blk.0.attn_q.weight": (np.ones((64, 64), np.int32), "I32", "raw")}))


def test_unknown_ggml_type_number(tmp_path):
    path = _tiny(tmp_path, more={"blk.0.attn_q.weight": (np.ones((64, 64)), "F32")})
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == 0  # F32
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match="data type 99"):
        load_gguf(path)


@pytest.mark.skipif(gguf_format_available("int4_min"), reason="the format exists in this build")
def test_missing_format_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(3)
    raw = random_raw(rng, T.Q4_1, 64, 64)
    path = _tiny(tmp_path, more={"blk.0.attn_q.weight": (raw, "Q4_1", "raw")})
    with pytest.raises(UnsupportedModelError, match="int4_min.*dequantize=True"):
        load_gguf(path)
    assert load_gguf(path, dequantize=True).tensors["model.layers.0.self_attn.q_proj.weight"].dtype == np.float32


# ---------------------------------------------------------------------------------------------------
# end to end through memkernels.load_model (the models helper's forward)
needs_load_model = pytest.mark.skipif(not hasattr(mk, "load_model"), reason="memkernels.load_model not available yet")


@needs_load_model
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_end_to_end_f32_logits_equal_transformers(tmp_path, arch):
    torch = pytest.importorskip("torch")
    model = _hf_model(arch)
    path, _ = hf_to_gguf(model, arch, tmp_path / f"{arch}.gguf")
    ids = [1, 5, 9, 30, 31, 7, 100, 3, 64, 12, 2, 77]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    m = mk.load_model(str(path), exact=True) if _accepts_exact() else mk.load_model(str(path))
    got = np.asarray(m.logits(ids))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}


@needs_load_model
@pytest.mark.parametrize("arch,over", [
    ("mistral", {}), ("gemma", {}), ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"head_dim": 32}), ("llama", {"rope_parameters": LLAMA3_ROPE, "head_dim": 16}), ("phi3", {}),
], ids=["mistral-window", "gemma", "llama-bias", "llama-head-dim", "llama3-rope", "phi3"])
def test_end_to_end_variants_equal_transformers(tmp_path, arch, over):
    torch = pytest.importorskip("torch")
    model = _hf_model(arch, **over)
    path, _ = hf_to_gguf(model, arch, tmp_path / f"{arch}.gguf")
    ck = load_gguf(path)
    if "rope_parameters" in over:
        rs = ck.config["rope_scaling"]
        assert rs["rope_type"] == "llama3" and rs["original_max_position_embeddings"] == 64
        assert rs["high_freq_factor"] == pytest.approx(4.0)
    if arch == "mistral":
        assert ck.config["model_type"] == "mistral" and ck.config["sliding_window"] == 4
    ids = [1, 5, 9, 30, 31, 7, 100, 3, 64, 12, 2, 77, 90, 91]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(mk.load_model(str(path), exact=True).logits(ids))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@needs_load_model
@needs_format("int8")
@needs_format("int4_sym")
@needs_format("int4_min")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_end_to_end_quantized_equals_float64_reference(tmp_path, qtype):
    torch = pytest.importorskip("torch")
    model = _hf_model("llama")
    path, _ = hf_to_gguf(model, "llama", tmp_path / "q.gguf", qtype=qtype)
    ref = load_gguf(path, dequantize=True)
    # the float64 forward of the dequantized weights: transformers in float64 with those weights
    m64 = model.double()
    with torch.no_grad():
        for k, p in m64.state_dict().items():
            p.copy_(torch.from_numpy(ref.tensors[k].astype(np.float64)))
        ids = [1, 4, 8, 15, 16, 23, 42, 2]
        want = m64(torch.tensor([ids])).logits[0].numpy()
    m = mk.load_model(str(path), exact=True) if _accepts_exact() else mk.load_model(str(path))
    np.testing.assert_allclose(np.asarray(m.logits(ids), np.float64), want, rtol=0, atol=1e-4)


def _accepts_exact():
    import inspect
    try:
        return "exact" in inspect.signature(mk.load_model).parameters
    except (TypeError, ValueError):
        return False


def test_mutated_files_fail_cleanly(tmp_path):
    """Random byte changes in the header and metadata: a clean error (or a successful load), never
    another exception type, a crash, or a read past the end."""
    good = _tiny(tmp_path, more={"blk.0.attn_q.weight": (np.ones((64, 64)), "Q8_0")}).read_bytes()
    from memkernels.models.gguf import read_gguf_metadata
    header_end = good.index(b"blk.0.attn_q.weight") + 64
    rng = np.random.default_rng(11)
    bad = tmp_path / "m.gguf"
    outcomes = set()
    for _ in range(150):
        data = bytearray(good)
        for at in rng.integers(4, header_end, size=rng.integers(1, 4)):
            data[at] = rng.integers(0, 256)
        bad.write_bytes(bytes(data))
        try:
            load_gguf(bad, verbose=False)
            outcomes.add("ok")
        except (mk.CorruptDataError, UnsupportedModelError) as e:
            assert str(bad) in str(e)
            outcomes.add(type(e).__name__)
    assert "CorruptDataError" in outcomes
    assert read_gguf_metadata(_tiny(tmp_path, "n.gguf"))["general.architecture"] == "llama"


def test_unsupported_tokenizer_keeps_weights(tmp_path, capsys):
    # a byte-level vocabulary with a pre-tokenizer this loader does not know
    rng = np.random.default_rng(4)
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    for fn, v in (("add_context_length", 64), ("add_embedding_length", 64), ("add_block_count", 0),
                  ("add_feed_forward_length", 96), ("add_head_count", 4), ("add_head_count_kv", 4),
                  ("add_layer_norm_rms_eps", 1e-5)):
        getattr(w, fn)(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("some-new-family")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(125)])
    w.add_token_merges(["a b"])
    w.add_tensor("token_embd.weight", rng.standard_normal((128, 64)).astype(np.float32))
    w.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = load_gguf(tmp_path / "v.gguf")
    assert ck.tokenizer is None
    assert "some-new-family" in capsys.readouterr().err
    assert any("no tokenizer" in x and "some-new-family" in x for x in ck.warnings)
    assert ck.tensors["model.embed_tokens.weight"].shape == (128, 64)


@needs_load_model
@needs_format("int4_min")
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_end_to_end_kquant_equals_float64_reference(tmp_path, qtype):
    """K-quant blocks (random, valid) for every linear weight: logits equal a float64 forward of the
    dequantized weights (the import into q4_k / q5_k / q6_k is exact)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    H, F, V = 256, 512, len(VOCAB)
    model = _hf_model("llama", hidden_size=H, intermediate_size=F, num_hidden_layers=1)
    names = {"attn_q": (H, H), "attn_k": (128, H), "attn_v": (128, H), "attn_output": (H, H),
             "ffn_gate": (F, H), "ffn_up": (F, H), "ffn_down": (H, F)}
    tensors = {f"blk.0.{n}.weight": (random_raw(rng, T[qtype], *shape, scale=5e-3), qtype, "raw")
               for n, shape in names.items()}
    tensors["blk.0.attn_norm.weight"] = (rng.uniform(0.5, 1.5, H), "F32")
    tensors["blk.0.ffn_norm.weight"] = (rng.uniform(0.5, 1.5, H), "F32")
    tensors["output_norm.weight"] = (rng.uniform(0.5, 1.5, H), "F32")
    tensors["token_embd.weight"] = (rng.standard_normal((V, H)), "F32")
    tensors["output.weight"] = (rng.standard_normal((V, H)) * 0.05, "F16")
    path = write_gguf(tmp_path / "k.gguf", "llama", tensors, hidden=H, ff=F, layers=1, heads=4, kv_heads=2,
                      theta=5000.0)
    ref = load_gguf(path, dequantize=True)
    m64 = model.double()
    with torch.no_grad():
        for k, p in m64.state_dict().items():
            p.copy_(torch.from_numpy(ref.tensors[k].astype(np.float64)))
        ids = [1, 4, 8, 15, 16, 23, 42, 2]
        want = m64(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(want).max() > 0.1  # not a degenerate model
    m = mk.load_model(str(path), exact=True)
    np.testing.assert_allclose(np.asarray(m.logits(ids), np.float64), want, rtol=0, atol=1e-4)


@needs_format("int4_min")
@needs_format("int8")
def test_quantized_model_keeps_embedding_quantized_and_fuses_projections(tmp_path):
    """Q4_1 linears and a tied Q8_0 embedding (SmolLM2's mix): the embedding is gathered from the file
    per step (no float32 table), q/k/v and gate/up run as one fused QuantizedMatrix each, and the
    forward still equals the float64 reference of the file's own weights (exact=True); the default
    (int8 activations for 1-8 tokens) stays close to it."""
    rng = np.random.default_rng(21)
    H, F, V = 128, 96 * 2, len(VOCAB)
    names = {"attn_q": (H, H), "attn_k": (64, H), "attn_v": (64, H), "attn_output": (H, H),
             "ffn_gate": (F, H), "ffn_up": (F, H), "ffn_down": (H, F)}
    tensors = {}
    for L in range(2):
        for n, shape in names.items():
            tensors[f"blk.{L}.{n}.weight"] = (rng.standard_normal(shape) * 0.1, "Q4_1")
        tensors[f"blk.{L}.attn_norm.weight"] = (rng.uniform(0.5, 1.5, H), "F32")
        tensors[f"blk.{L}.ffn_norm.weight"] = (rng.uniform(0.5, 1.5, H), "F32")
    tensors["output_norm.weight"] = (rng.uniform(0.5, 1.5, H), "F32")
    tensors["token_embd.weight"] = (rng.standard_normal((V, H)), "Q8_0")
    path = write_gguf(tmp_path / "mix.gguf", "llama", tensors, hidden=H, ff=F, layers=2, heads=4, kv_heads=2)
    ref = load_gguf(path, dequantize=True)
    m = mk.load_model(str(path), exact=True)
    assert m._embedding_rows is not None  # rows come from the memory-mapped file
    ids = np.array([3, 0, V - 1, 17, 3])
    np.testing.assert_array_equal(np.asarray(m._embed[ids]), ref.tensors["model.embed_tokens.weight"][ids])
    for L in range(2):
        p = f"model.layers.{L}."
        assert isinstance(m.weights[p + "self_attn.qkv_proj.weight"], mk.QuantizedMatrix)
        assert isinstance(m.weights[p + "mlp.gate_up_proj.weight"], mk.QuantizedMatrix)
        assert p + "self_attn.q_proj.weight" not in m.weights and p + "mlp.up_proj.weight" not in m.weights
        want = np.concatenate([ref.tensors[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        np.testing.assert_array_equal(mk.dequantize(m.weights[p + "self_attn.qkv_proj.weight"]), want)
    seq = [1, 4, 8, 15, 16, 23, 42, 2, 9]
    want = m.reference_logits(seq)
    got = np.asarray(m.logits(seq), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    exact_tokens = m.generate(seq, 6, stop_at_eos=False)
    fast = mk.load_model(str(path))  # default: int8 activations on 1-8 token steps
    assert not fast.exact
    step = np.asarray(fast.logits(seq[:4]), np.float64)
    assert np.abs(step - want[:4]).max() < 0.05 * np.abs(want[:4]).max()
    fast.generate(seq, 3, stop_at_eos=False)
    fast.reset_cache()
    assert fast.cache is None
    m.reset_cache()
    assert m.generate(seq, 6, stop_at_eos=False) == exact_tokens  # a cold cache gives the same tokens
