"""Tokenizers for real models: tokenizer.json directories and GGUF vocabularies, through `tokenizers`.

``Tokenizer.from_dir(path)`` reads a Hugging Face model folder (tokenizer.json, tokenizer_config.json,
chat_template.jinja, generation_config.json); ``Tokenizer.from_gguf_metadata(fields)`` rebuilds the
tokenizer a GGUF file describes:

- ``tokenizer.ggml.model = "gpt2"``: byte-level BPE from the token list and merges, split first by the
  regular expression the model was trained with (``tokenizer.ggml.pre``: default / gpt-2, llama-bpe,
  qwen2, smollm / starcoder; others are refused);
- ``tokenizer.ggml.model = "llama"``: SentencePiece BPE from tokens, scores and token types, "▁" for
  spaces, ``<0xNN>`` byte fallback; merges come from the scores (a merge whose result scores higher
  applies first), as SentencePiece and transformers' conversion do;
- ``tokenizer.huggingface.json``, when present, is used as it is.

Chat templates run in a sandboxed jinja2 environment with the helpers templates expect
(``raise_exception``, ``bos_token``, ``eos_token``, ``tojson`` without HTML escaping).
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime

try:  # the models helper defines the shared error type in config.py
    from .config import UnsupportedModelError  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - until config.py provides it
    class UnsupportedModelError(ValueError):
        """The checkpoint uses something (architecture, tensor, data type, setting) that is not supported."""

__all__ = ["Tokenizer", "IncrementalDecoder", "UnsupportedModelError"]

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split patterns of the byte-level BPE families, by tokenizer.ggml.pre. None: the GPT-2 pattern that
# ByteLevel(use_regex=True) applies itself.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BPE_PRE = {
    "default": ("gpt2", None),
    "gpt-2": ("gpt2", None),
    "gpt2": ("gpt2", None),
    "llama-bpe": ("split", _LLAMA3_SPLIT),
    "llama3": ("split", _LLAMA3_SPLIT),
    "qwen2": ("split", _QWEN2_SPLIT),
    "smollm": ("digits", None),
    "starcoder": ("digits", None),
    "refact": ("digits", None),
    "command-r": ("digits", None),
    "mpt": ("gpt2", None),
}
# Families whose tokenizer.json normalizes to NFC first.
_NFC_PRE = {"qwen2", "command-r", "mpt"}


def _token_str(tok):
    """A special-token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class IncrementalDecoder:
    """Turns tokens into text one at a time for streaming.

    ``push(token_id)`` returns the text that became final with this token (maybe ""): a character split
    over several byte tokens comes out whole once its last byte arrives, and context-dependent decoding
    (SentencePiece's leading space) is resolved by decoding a small window of recent tokens.
    ``flush()`` returns what is left (incomplete bytes as U+FFFD). The concatenation of all outputs
    equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are final
        self._read = 0    # tokens whose text was already returned

    def _decode(self, ids):
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        # an incomplete UTF-8 sequence decodes to U+FFFD: wait for the bytes that complete it
        if len(full) <= len(done) or full.endswith("\ufffd") or not full.startswith(done):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(done):]

    def flush(self) -> str:
        done = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return full[len(done):] if full.startswith(done) else ""


class Tokenizer:
    """A `tokenizers.Tokenizer` with the model's special tokens and chat template.

    Attributes: backend (the tokenizers.Tokenizer), bos_token / eos_token (strings or None),
    bos_token_id, eos_token_ids (set of ids that end generation), chat_template (str or None),
    vocab_size.
    """

    def __init__(self, backend, *, bos_token=None, eos_token=None, eos_token_ids=(), chat_template=None,
                 special_tokens=None):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = None if bos_token is None else backend.token_to_id(bos_token)
        ids = set(int(i) for i in eos_token_ids)
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            ids.add(backend.token_to_id(eos_token))
        self.eos_token_ids = ids
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # extra template variables (unk_token, ...)

    # ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"ids: token id {bad[0]} is outside the vocabulary [0, {n})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str):
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int):
        return self.backend.id_to_token(int(i))

    # ----------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, chat_template: str | None = None,
                            **kwargs) -> str:
        """The prompt text for a conversation ([{"role": ..., "content": ...}, ...]) by the model's template.

        The text already contains the template's special tokens (e.g. the BOS token); encode it with
        ``add_special_tokens=False`` so they are not added twice."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("apply_chat_template: the tokenizer has no chat template (tokenizer_config.json "
                             "'chat_template' or GGUF 'tokenizer.chat_template')")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages: expected a list of {'role': ..., 'content': ...} dicts")
        compiled = _compile_template(template)
        variables = dict(self.special_tokens)
        variables.update(bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        variables.update(kwargs)
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path) -> "Tokenizer | None":
        """From a Hugging Face model folder, or None when it has no tokenizer.json."""
        from tokenizers import Tokenizer as _HFTokenizer
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            return None
        backend = _HFTokenizer.from_file(tj)
        cfg = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        gen = _read_json(os.path.join(path, "generation_config.json")) or {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        jinja = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        # tokens added in tokenizer_config.json only (added_tokens_decoder) are known to tokenizer.json
        # already when transformers saved both; nothing to merge here.
        eos_ids = gen.get("eos_token_id")
        eos_ids = [] if eos_ids is None else ([eos_ids] if isinstance(eos_ids, int) else list(eos_ids))
        specials = {k: _token_str(cfg.get(k)) for k in ("unk_token", "pad_token", "sep_token", "cls_token",
                                                        "mask_token") if cfg.get(k) is not None}
        return cls(backend, bos_token=_token_str(cfg.get("bos_token")), eos_token=_token_str(cfg.get("eos_token")),
                   eos_token_ids=eos_ids, chat_template=template, special_tokens=specials)

    @classmethod
    def from_gguf_metadata(cls, fields: dict) -> "Tokenizer":
        """From GGUF metadata (key -> value, as `load_gguf` gives in ``.metadata``)."""
        from tokenizers import Tokenizer as _HFTokenizer
        model = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise UnsupportedModelError("GGUF metadata has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
        tokens = [str(t) for t in tokens]
        n = len(tokens)
        types = fields.get("tokenizer.ggml.token_type")
        types = [NORMAL] * n if types is None else [int(t) for t in types]
        if len(types) != n:
            raise ValueError(f"tokenizer.ggml.token_type: expected {n} entries (one per token), got {len(types)}")
        ids = {k: fields.get(f"tokenizer.ggml.{k}_token_id")
               for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
        for k, v in ids.items():
            if v is not None and not 0 <= int(v) < n:
                raise ValueError(f"tokenizer.ggml.{k}_token_id: {v} is outside the vocabulary [0, {n})")
        hf_json = fields.get("tokenizer.huggingface.json")
        if hf_json:
            backend = _HFTokenizer.from_str(hf_json)
        elif model == "gpt2":
            backend = _gguf_bpe(fields, tokens, types, ids)
        elif model == "llama":
            backend = _gguf_spm(fields, tokens, types, ids)
        else:
            raise UnsupportedModelError(f"GGUF tokenizer model '{model}' is not supported (supported: gpt2, llama)")
        bos = None if ids["bos"] is None else tokens[int(ids["bos"])]
        eos = None if ids["eos"] is None else tokens[int(ids["eos"])]
        eos_ids = [int(ids[k]) for k in ("eos", "eot", "eom") if ids[k] is not None]
        specials = {}
        for key, name in (("unknown", "unk_token"), ("padding", "pad_token")):
            if ids[key] is not None:
                specials[name] = tokens[int(ids[key])]
        template = fields.get("tokenizer.chat_template")
        return cls(backend, bos_token=bos, eos_token=eos, eos_token_ids=eos_ids, chat_template=template,
                   special_tokens=specials)


# --------------------------------------------------------------------------------------------------
def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _vocab_dict(tokens):
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id
    return vocab


def _add_specials(backend, tokens, types):
    from tokenizers import AddedToken
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (CONTROL, UNKNOWN):
            added.append(AddedToken(t, special=True, normalized=False))
        elif ty == USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    if added:
        backend.add_tokens(added)


def _post_processor(fields, tokens, ids, default_bos):
    from tokenizers import processors
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    add_bos = default_bos if add_bos is None else bool(add_bos)
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    single, specials = "$A", []
    if add_bos and ids["bos"] is not None:
        bos = tokens[int(ids["bos"])]
        single = f"{bos} {single}"
        specials.append((bos, int(ids["bos"])))
    if add_eos and ids["eos"] is not None:
        eos = tokens[int(ids["eos"])]
        single = f"{single} {eos}"
        if (eos, int(ids["eos"])) not in specials:
            specials.append((eos, int(ids["eos"])))
    if single == "$A":
        return None
    pair = single + " " + single.replace("$A", "$B")
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _gguf_bpe(fields, tokens, types, ids):
    """Byte-level BPE (tokenizer.ggml.model = gpt2)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as _HFTokenizer
    pre = fields.get("tokenizer.ggml.pre") or "default"
    if pre not in _BPE_PRE:
        raise UnsupportedModelError(
            f"GGUF tokenizer pre-tokenizer '{pre}' is not supported (supported: {', '.join(sorted(_BPE_PRE))})")
    merges = fields.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    pairs = []
    for m in merges:
        a, sep, b = str(m).partition(" ")
        if not sep:
            raise ValueError(f"tokenizer.ggml.merges: entry {m!r} is not two tokens separated by a space")
        pairs.append((a, b))
    kind, pattern = _BPE_PRE[pre]
    backend = _HFTokenizer(models.BPE(vocab=_vocab_dict(tokens), merges=pairs, ignore_merges=kind == "split"
                                      and pattern == _LLAMA3_SPLIT))
    if kind == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in _NFC_PRE:
        backend.normalizer = normalizers.NFC()  # as these models' tokenizer.json
    backend.decoder = decoders.ByteLevel()
    _add_specials(backend, tokens, types)
    pp = _post_processor(fields, tokens, ids, default_bos=False)
    if pp is not None:
        backend.post_processor = pp
    return backend


def _spm_merges(tokens, types, scores):
    """Merges of a SentencePiece BPE vocabulary: every split of a normal token into two normal tokens,
    the merge of a higher-scoring result first (ties: lower result id, then lower part ids)."""
    normal = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == NORMAL:
            normal.setdefault(t, i)
    found = []
    for t, i in normal.items():
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            ia, ib = normal.get(a), normal.get(b)
            if ia is not None and ib is not None:
                found.append((-float(scores[i]), i, ia, ib, a, b))
    found.sort(key=lambda x: x[:4])
    return [(a, b) for *_, a, b in found]


def _gguf_spm(fields, tokens, types, ids):
    """SentencePiece BPE with byte fallback (tokenizer.ggml.model = llama)."""
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as _HFTokenizer
    scores = fields.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
    if len(scores) != len(tokens):
        raise ValueError(f"tokenizer.ggml.scores: expected {len(tokens)} entries, got {len(scores)}")
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(str(m).split(" ", 1)) for m in merges]
    else:
        pairs = _spm_merges(tokens, types, scores)
    unk = None if ids["unknown"] is None else tokens[int(ids["unknown"])]
    if unk is None:
        unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    backend = _HFTokenizer(models.BPE(vocab=_vocab_dict(tokens), merges=pairs, unk_token=unk, byte_fallback=True,
                                      fuse_unk=True))
    prefix = fields.get("tokenizer.ggml.add_space_prefix")
    prefix = True if prefix is None else bool(prefix)
    replace = normalizers.Replace(" ", "\u2581")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    _add_specials(backend, tokens, types)
    pp = _post_processor(fields, tokens, ids, default_bos=True)
    if pp is not None:
        backend.post_processor = pp
    return backend


# --------------------------------------------------------------------------------------------------
_TEMPLATE_CACHE: dict = {}


@functools.lru_cache(maxsize=None)
def _generation_extension():
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in some
    templates): rendered as its body, since nothing here needs the mask."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationBlock


def _compile_template(source: str):
    """A chat template compiled in a sandbox: no attribute access to internals, no I/O."""
    tpl = _TEMPLATE_CACHE.get(source)
    if tpl is not None:
        return tpl
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_extension()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        tpl = env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from None
    if len(_TEMPLATE_CACHE) > 16:
        _TEMPLATE_CACHE.clear()
    _TEMPLATE_CACHE[source] = tpl
    return tpl
