"""Tokenizer: tokenizer.json folders and GGUF vocabularies against transformers and sentencepiece.

Every tokenizer is trained here, offline, on a few sentences: byte-level BPE with the `tokenizers`
trainers (one per pre-tokenizer family GGUF names), SentencePiece BPE with byte fallback with the
`sentencepiece` trainer. The GGUF path writes the vocabulary with gguf.GGUFWriter, reads it back, and
must give the same ids as the reference tokenizer.
"""
import json

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
gguf = pytest.importorskip("gguf")

from memkernels.models.tokenizer import Tokenizer, UnsupportedModelError  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! It's 2024, numbers 12345 and 3.14159 are here.",
    "Tokenizers split text into pieces; naïve café déjà vu — emojis 🙂🚀 too.",
    "    indented code:\n\tdef f(x):\n\t\treturn x*2\n",
    "Ünïcödé and 日本語 text, with CJK 汉字 characters.",
    "They'll say we've done it, and I'd agree: THEY'RE RIGHT.",
    "and some more text about foxes, dogs and the weather in the mountains",
]
PROBES = CORPUS + [
    "", " ", "x", "  two  spaces  ", "\n\n\nnewlines\r\n", "numbers 1234567890 and 42",
    "unseen words: zyxw qqq 🦊 ﬁ", "MiXeD CaSe'S 'quoted'", "tab\tsep\tvalues",
    "<|im_start|>user\nhello<|im_end|>", "<|im_start|><|im_end|>text<|bos|>",
]
SPECIALS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
            "{{ raise_exception('system message must come first') }}{% endif %}"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# The split patterns of the byte-level families, written out here independently of the module.
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _hf_pre(pre):
    """(pre_tokenizer, normalizer, ignore_merges) of the HF tokenizer.json for a GGUF pre name."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    bl = pre_tokenizers.ByteLevel
    if pre == "default":
        return bl(add_prefix_space=False, use_regex=True), None, False
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), "isolated"),
                                        bl(add_prefix_space=False, use_regex=False)]), None, True
    if pre == "qwen2":
        return (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2), "isolated"),
                                         bl(add_prefix_space=False, use_regex=False)]), normalizers.NFC(), False)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        bl(add_prefix_space=False, use_regex=True)]), None, False
    raise AssertionError(pre)


def make_bpe_dir(tmp_path, pre="default", add_bos=True, vocab_size=420):
    """A byte-level BPE tokenizer trained on CORPUS, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    pt, norm, ignore_merges = _hf_pre(pre)
    tok = HFTok(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pt
    if norm is not None:
        tok.normalizer = norm
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                           special_tokens=[("<|bos|>", 0)])
    d = tmp_path / f"bpe-{pre}"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d, tok


def read_gguf_metadata(path):
    from memkernels.models.gguf import read_gguf_metadata as read
    return read(path)


def write_vocab_gguf(path, model, tokens, types, *, merges=None, scores=None, pre=None, bos=None, eos=None,
                     unk=None, add_bos=None, add_eos=None, add_space_prefix=None, template=None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if unk is not None:
        w.add_unk_token_id(unk)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read_gguf_metadata(path)


def bpe_to_gguf(tmp_path, d, pre, add_bos=True):
    """The GGUF vocabulary of a tokenizer.json (as llama.cpp's converter lays it out)."""
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}
    types = [3 if t in special else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return write_vocab_gguf(tmp_path / f"vocab-{pre}.gguf", "gpt2", tokens, types, merges=merges, pre=pre,
                            bos=vocab["<|bos|>"], eos=vocab["<|eos|>"], add_bos=add_bos, template=TEMPLATE)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2", "smollm"])
def test_bpe_dir_and_gguf_match_transformers(tmp_path, pre):
    transformers = pytest.importorskip("transformers")
    d, _ = make_bpe_dir(tmp_path, pre)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = Tokenizer.from_dir(d)
    from_gguf = Tokenizer.from_gguf_metadata(bpe_to_gguf(tmp_path, d, pre))
    for text in PROBES:
        want = hf.encode(text)
        assert ours.encode(text) == want, text
        assert from_gguf.encode(text) == want, (pre, text)
        assert from_gguf.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert ours.decode(want, skip_special_tokens=skip) == hf.decode(want, skip_special_tokens=skip)
            assert from_gguf.decode(want, skip_special_tokens=skip) == hf.decode(want, skip_special_tokens=skip)
    assert ours.bos_token_id == from_gguf.bos_token_id == hf.bos_token_id == 0
    assert ours.eos_token_ids == from_gguf.eos_token_ids == {hf.eos_token_id}
    assert ours.vocab_size == from_gguf.vocab_size == len(hf)


def test_bpe_pre_tokenizers_differ():
    """The patterns matter: the families split digits differently (so the test above can fail)."""
    from tokenizers import Regex, pre_tokenizers
    text = "abc 12345"
    splits = {p: [s for s, _ in pre_tokenizers.Split(Regex(pat), "isolated").pre_tokenize_str(text)]
              for p, pat in (("llama", LLAMA3), ("qwen2", QWEN2))}
    assert splits["llama"] == ["abc", " ", "123", "45"]
    assert splits["qwen2"] == ["abc", " ", "1", "2", "3", "4", "5"]


def test_gguf_add_bos_flag(tmp_path):
    d, _ = make_bpe_dir(tmp_path, "default", add_bos=False)
    on = Tokenizer.from_gguf_metadata(bpe_to_gguf(tmp_path, d, "default", add_bos=True))
    (tmp_path / "x").mkdir()
    off = Tokenizer.from_gguf_metadata(bpe_to_gguf(tmp_path / "x", d, "default", add_bos=False))
    plain = Tokenizer.from_dir(d).encode("hello world")
    assert off.encode("hello world") == plain
    assert on.encode("hello world") == [0] + plain
    assert on.encode("hello world", add_special_tokens=False) == plain


def test_unknown_pre_tokenizer_and_model_refused(tmp_path):
    d, _ = make_bpe_dir(tmp_path, "default")
    meta = bpe_to_gguf(tmp_path, d, "default")
    meta["tokenizer.ggml.pre"] = "some-new-family"
    with pytest.raises(UnsupportedModelError, match="some-new-family"):
        Tokenizer.from_gguf_metadata(meta)
    meta["tokenizer.ggml.pre"] = "default"
    meta["tokenizer.ggml.model"] = "t5"
    with pytest.raises(UnsupportedModelError, match="'t5'"):
        Tokenizer.from_gguf_metadata(meta)
    meta["tokenizer.ggml.model"] = "gpt2"
    meta["tokenizer.ggml.bos_token_id"] = 10 ** 6
    with pytest.raises(ValueError, match="bos_token_id"):
        Tokenizer.from_gguf_metadata(meta)


def test_from_dir_without_tokenizer(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


def test_unigram_dir_matches_transformers(tmp_path):
    """A Unigram (SentencePiece-unigram style, Metaspace) tokenizer.json loads as transformers loads it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFTok(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 3, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                                unk_token="<unk>", show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "unk_token": "<unk>"}))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_dir(tmp_path)
    for text in PROBES:
        ids = hf.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------
def _train_spm(tmp_path, **extra):
    spm = pytest.importorskip("sentencepiece")
    prefix = str(tmp_path / "sp")
    # Llama's settings: BPE, byte fallback, no normalization, whitespace kept as it is
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_prefix=prefix, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        hard_vocab_limit=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, **extra)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def _spm_vocab(sp):
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             5 if sp.is_unused(i) else 1 for i in range(n)]
    return tokens, scores, types


def test_sentencepiece_gguf_matches_sentencepiece(tmp_path):
    sp = _train_spm(tmp_path)
    tokens, scores, types = _spm_vocab(sp)
    assert types.count(6) == 256  # byte fallback pieces exist
    meta = write_vocab_gguf(tmp_path / "spm.gguf", "llama", tokens, types, scores=scores, bos=1, eos=2, unk=0,
                            add_bos=True, add_eos=False, template=TEMPLATE)
    ours = Tokenizer.from_gguf_metadata(meta)
    fallback_used = False
    for text in PROBES + ["ǅ ⨀ unseen symbols ∰ use byte fallback"]:
        want = sp.encode(text)
        got = ours.encode(text, add_special_tokens=False)
        if "<|" in text:
            continue  # these are plain text to sentencepiece and to us alike, checked below
        assert got == want, text
        assert ours.encode(text) == [1] + want
        fallback_used |= any(types[i] == 6 for i in want)
        assert ours.decode(want) == sp.decode(want), text
    assert fallback_used
    assert ours.encode("a<|im_start|>b", add_special_tokens=False) == sp.encode("a<|im_start|>b")
    # control tokens are matched in text and skipped on decode
    assert ours.encode("hi</s>", add_special_tokens=False)[-1] == 2
    assert ours.decode([1, *sp.encode("hi"), 2]) == "hi"
    assert ours.decode([1, *sp.encode("hi"), 2], skip_special_tokens=False) == "<s> hi</s>"
    assert ours.bos_token_id == 1 and ours.eos_token_ids == {2}


def test_sentencepiece_without_space_prefix(tmp_path):
    """Gemma-style vocabularies: no dummy "▁" prefix (tokenizer.ggml.add_space_prefix = false)."""
    sp = _train_spm(tmp_path, add_dummy_prefix=False)
    tokens, scores, types = _spm_vocab(sp)
    meta = write_vocab_gguf(tmp_path / "spm.gguf", "llama", tokens, types, scores=scores, bos=1, eos=2, unk=0,
                            add_bos=False, add_space_prefix=False)
    ours = Tokenizer.from_gguf_metadata(meta)
    for text in PROBES:
        if "<|" in text:
            continue
        assert ours.encode(text) == sp.encode(text), text
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_sentencepiece_merges_follow_scores():
    """The highest-scoring merged piece applies first, whatever the order of the vocabulary."""
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "c", "ab", "bc", "\u2581a"]
    types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 1]
    base = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_space_prefix": False}
    # "abc": ab scores higher -> [ab, c]; bc higher -> [a, bc]
    t1 = Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.scores": [0, 0, 0, -1, -1, -1, -1, -2, -3, -9]})
    t2 = Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.scores": [0, 0, 0, -1, -1, -1, -1, -3, -2, -9]})
    assert t1.encode("abc") == [7, 6]
    assert t2.encode("abc") == [4, 8]
    # no byte pieces in this vocabulary: an unknown character becomes <unk>
    assert t1.encode("abz") == [7, 0]


# ------------------------------------------------------------------------------------------------
def _stream(tok, ids, skip=True):
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


def test_incremental_decoder_byte_level(tmp_path):
    d, _ = make_bpe_dir(tmp_path, "llama-bpe")
    tok = Tokenizer.from_dir(d)
    text = "Emoji 🦊🙂 in 日本語, accents déjà — unseen 𝔘𝔫𝔦𝔠𝔬𝔡𝔢!"
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    # 🦊 is 4 bytes that the tiny vocabulary never merged: it needs several tokens, output once whole
    fox = tok.encode("🦊", add_special_tokens=False)
    assert len(fox) > 1
    assert _stream(tok, fox)[:-1] == [""] * (len(fox) - 1) + ["🦊"]


def test_incremental_decoder_sentencepiece(tmp_path):
    sp = _train_spm(tmp_path)
    tokens, scores, types = _spm_vocab(sp)
    tok = Tokenizer.from_gguf_metadata(write_vocab_gguf(tmp_path / "s.gguf", "llama", tokens, types, scores=scores,
                                                        bos=1, eos=2, unk=0, add_bos=True))
    for text in ["The lazy dog 🦊 jumps", "  leading spaces and 日本", "x"]:
        ids = tok.encode(text) + [2]
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert "".join(_stream(tok, ids, skip=False)) == tok.decode(ids, skip_special_tokens=False)
    # incomplete bytes at the end come out on flush as the replacement character, as decode() gives
    ids = tok.encode("🦊", add_special_tokens=False)[:-1]
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_decode_rejects_bad_ids(tmp_path):
    d, _ = make_bpe_dir(tmp_path)
    tok = Tokenizer.from_dir(d)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")


# ------------------------------------------------------------------------------------------------
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Hi there!  "},
    {"role": "assistant", "content": "Hello. ✓"},
    {"role": "user", "content": "Bye"},
]


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tmp_path, gen):
    transformers = pytest.importorskip("transformers")
    d, _ = make_bpe_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = Tokenizer.from_dir(d)
    want = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == want
    from_gguf = Tokenizer.from_gguf_metadata(bpe_to_gguf(tmp_path, d, "default"))
    assert from_gguf.apply_chat_template(MESSAGES, add_generation_prompt=gen) == want
    assert want.startswith("<|bos|><|im_start|>system\nYou are terse.<|im_end|>")


def test_chat_template_tojson_and_loop_controls(tmp_path):
    transformers = pytest.importorskip("transformers")
    template = ("{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
                "{{ m | tojson }}|{{ m['content'] | tojson(indent=2) }}\n{% endfor %}{{ eos_token }}")
    d, _ = make_bpe_dir(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    msgs = [{"role": "user", "content": "<b>naïve & \"quoted\"</b>"}, {"role": "skip", "content": "x"},
            {"role": "assistant", "content": ["list", 1]}]
    want = transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(msgs, tokenize=False)
    assert Tokenizer.from_dir(d).apply_chat_template(msgs) == want
    assert "naïve" in want and "<b>" in want


def test_chat_template_errors_and_sandbox(tmp_path):
    d, _ = make_bpe_dir(tmp_path)
    tok = Tokenizer.from_dir(d)
    import jinja2
    with pytest.raises(jinja2.TemplateError, match="system message must come first"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template(MESSAGES, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="does not compile"):
        tok.apply_chat_template(MESSAGES, chat_template="{% for %}")
    with pytest.raises(TypeError, match="messages"):
        tok.apply_chat_template("hello")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_chat_template_file_and_generation_config(tmp_path):
    """transformers 5 saves the template as chat_template.jinja; generation_config.json may add eos ids."""
    d, _ = make_bpe_dir(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "[q]"
    assert tok.eos_token_ids == {1, 3}
    assert np.array_equal(sorted(tok.eos_token_ids), [1, 3])


@pytest.mark.parametrize("json_adds_bos", [True, False])
def test_from_dir_follows_tokenizer_json_like_transformers(tmp_path, json_adds_bos):
    """tokenizer.json's post-processor decides BOS (transformers 5 too), whatever add_bos_token says."""
    transformers = pytest.importorskip("transformers")
    d, _ = make_bpe_dir(tmp_path, "default", add_bos=json_adds_bos)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = not json_adds_bos
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    want = transformers.AutoTokenizer.from_pretrained(str(d)).encode("hello there")
    assert Tokenizer.from_dir(d).encode("hello there") == want
    assert (want[0] == 0) == json_adds_bos


def test_chat_template_generation_block_and_namespace(tmp_path):
    """`{% generation %}` blocks (assistant-mask templates) and namespace() render as in transformers."""
    transformers = pytest.importorskip("transformers")
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{% if m['role'] == 'assistant' %}{% generation %}<a>{{ m['content'] }}</a>{% endgeneration %}"
                "{% else %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}[{{ ns.n }}]"
                "{% if add_generation_prompt %}<a>{% endif %}")
    d, _ = make_bpe_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    want = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, chat_template=template)
    got = Tokenizer.from_dir(d).apply_chat_template(MESSAGES, chat_template=template)
    assert got == want and "<a>Hello. ✓</a>" in got and "[4]" in got
