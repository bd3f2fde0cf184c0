"""attn_implementation="memkernels" in transformers 5 against the implementations users trust ("sdpa";
"eager" for Gemma2, which transformers runs without sdpa), on tiny random-init models built offline, padded batches."""
import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mk_hf = pytest.importorskip("memkernels.integrations.transformers", exc_type=ImportError)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _config(arch, **extra):
    if arch == "llama":
        return transformers.LlamaConfig(**COMMON, **extra)
    if arch == "mistral":
        return transformers.MistralConfig(**COMMON, **{"sliding_window": 5, **extra})
    if arch == "qwen2":
        return transformers.Qwen2Config(**COMMON, **{"use_sliding_window": True, "sliding_window": 4,
                                                     "max_window_layers": 1,
                                                     "layer_types": ["sliding_attention", "full_attention"], **extra})
    if arch == "gemma2":
        # Softcap off here (the default 50 barely acts on tiny logits); test_softcap_matches_eager sets a small one.
        return transformers.Gemma2Config(**COMMON, **{"head_dim": 16, "sliding_window": 4,
                                                      "attn_logit_softcapping": None, "query_pre_attn_scalar": 24,
                                                      **extra})
    raise ValueError(arch)


def _models(arch, reference="sdpa", **extra):
    mk_hf.register()
    if arch == "gemma2":
        reference = "eager"  # transformers 5 has no sdpa path for Gemma2 (softcaps)
    torch.manual_seed(0)
    cfg = _config(arch, **extra)
    # Each model gets its own config: from_config records the attention implementation in it.
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=reference).eval()
    with torch.no_grad():  # random init is small; spread the weights so attention is far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="memkernels").eval()
    ours.load_state_dict(model.state_dict())
    assert ours.config._attn_implementation == "memkernels" and model.config._attn_implementation == reference
    return model, ours


def _batch(seq=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, seq), generator=g)
    mask = torch.ones(4, seq, dtype=torch.long)
    mask[1, :4] = 0           # left padding
    mask[2, seq - 3:] = 0     # right padding
    mask[3, :1] = 0           # one pad token on the left
    return ids, mask


def _compare(ref_model, our_model, ids, mask, tol=1e-4):
    with torch.no_grad():
        want = ref_model(input_ids=ids, attention_mask=mask).logits
        got = our_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    assert torch.isfinite(got[real]).all()
    err = (got[real] - want[real]).abs().max().item()
    assert err < tol, f"max logit error {err} on real tokens"
    return err


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_padded_batch_matches_reference(arch):
    ref, ours = _models(arch)
    ids, mask = _batch()
    _compare(ref, ours, ids, mask)
    _compare(ref, ours, ids, None)  # no padding: the copy-free flash_attention path


def test_softcap_matches_eager():
    ref, ours = _models("gemma2", reference="eager", attn_logit_softcapping=2.0)
    ids, mask = _batch()
    _compare(ref, ours, ids, mask)


def test_softcap_changes_the_result():
    """Gemma2's softcap reaches the kernel: with a tiny cap, logits differ from the uncapped model."""
    _, capped = _models("gemma2", reference="eager", attn_logit_softcapping=0.5)
    _, uncapped = _models("gemma2", reference="eager")
    ids, mask = _batch()
    with torch.no_grad():
        a = capped(input_ids=ids, attention_mask=mask).logits
        b = uncapped(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max().item() > 1e-2


def test_sliding_window_convention():
    """transformers' sliding_window S is memkernels' window S - 1: S = 2 (each token sees itself and
    one before) must match sdpa; a model with S = 3 must not (the window reaches the kernel)."""
    ref, ours = _models("mistral", sliding_window=2)
    ids, mask = _batch()
    _compare(ref, ours, ids, mask)
    ref3, _ = _models("mistral", sliding_window=3)
    with torch.no_grad():
        diff = (ref3(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
    assert diff > 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_left_padded_generation_matches_sdpa(arch):
    """Greedy decoding with a KV cache (prefill, then one query against the cache per step)."""
    ref, ours = _models(arch)
    ids, mask = _batch(9)
    ids, mask = ids[:2], mask[:2]  # row 0 full, row 1 left-padded
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, **kw)
        got = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


def test_packed_sequences_by_position_ids():
    """One row holding two sequences (position_ids restart, no mask), as in packed batches."""
    ref, ours = _models("llama")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (1, 12), generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        want = torch.cat([ref(input_ids=ids[:, :5]).logits, ref(input_ids=ids[:, 5:]).logits], 1)
        got = ours(input_ids=ids, position_ids=pos).logits
    assert (got - want).abs().max().item() < 1e-4


def test_mask_function_is_registered():
    from transformers import AttentionInterface, AttentionMaskInterface

    mk_hf.register()
    assert AttentionInterface._global_mapping["memkernels"] is mk_hf.memkernels_attention
    assert AttentionMaskInterface._global_mapping["memkernels"] is mk_hf.memkernels_mask
    m = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(mk_hf.memkernels_mask(2, 3, 3, attention_mask=m), m.bool())
    assert mk_hf.memkernels_mask(2, 2, 2, attention_mask=m) is None  # last 2 columns hold no padding
    assert mk_hf.memkernels_mask(2, 3, 3, attention_mask=None) is None


def test_padding_holes_with_a_sliding_window_match_sdpa():
    """Padding anywhere in a row (not only at its ends), with a sliding window, prefill and decode:
    the key mask goes to the kernel, positions stay those of the padded row, as in sdpa."""
    _, ours = _models("mistral")
    layer = ours.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    keep = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    k, v = torch.randn(3, 2, 8, 16, generator=g), torch.randn(3, 2, 8, 16, generator=g)
    k[~keep.unsqueeze(1).expand_as(k[..., 0])] = float("nan")  # padding keys may hold anything
    for q_len in (8, 1):
        q = torch.randn(3, 4, q_len, 16, generator=g)
        with torch.no_grad():
            got, _ = mk_hf.memkernels_attention(layer, q, k, v, keep, scaling=0.25, sliding_window=3)
        i = torch.arange(8 - q_len, 8)[:, None]
        j = torch.arange(8)[None, :]
        allowed = (j <= i) & (j > i - 3) & keep[:, None, :]  # (batch, q_len, kv_len)
        kk = torch.where(keep[:, None, :, None], k, 0.0).repeat_interleave(2, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q, kk, v.repeat_interleave(2, 1),
                                                                attn_mask=allowed[:, None], scale=0.25)
        want = want.transpose(1, 2)
        seen = allowed.any(-1)  # rows with a visible key (sdpa gives NaN for the others; ours 0)
        torch.testing.assert_close(got[seen], want[seen], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(got).all() and (got[~seen] == 0).all()


def test_unsupported_inputs_raise():
    ref, ours = _models("mistral")
    layer = ours.model.layers[0].self_attn
    q = torch.randn(1, 4, 6, 16)
    k = torch.randn(1, 2, 6, 16)
    with pytest.raises(ValueError, match="4-D"):
        mk_hf.memkernels_attention(layer, q, k, k, torch.ones(1, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="key-padding mask of shape"):
        mk_hf.memkernels_attention(layer, q, k, k, torch.ones(2, 6, dtype=torch.bool))
    ids, mask = _batch()
    with pytest.raises(ValueError, match="requires grad"):  # grad mode on, trainable weights
        ours(input_ids=ids, attention_mask=mask)
