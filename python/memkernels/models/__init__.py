"""Real-model support: configs, safetensors and GGUF checkpoints, tokenizer, one Llama-family
forward on memkernels kernels, generation.

    m = memkernels.load_model("path/to/checkpoint_dir_or_file.gguf")
    m.logits([1, 2, 3])                 # (3, vocab) float32
    m.generate("Hello", max_new_tokens=20)

A checkpoint is understood completely or refused with `UnsupportedModelError` (a ValueError)
naming the model_type, config field, rope type or tensor that is not understood.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from .config import ModelConfig, RopeConfig, UnsupportedModelError
from .llama import Model, paged_attention_has_window, reference_forward
from .weights import read_checkpoint_tensors

QUANTIZE_FORMATS = ("int8", "int4", "int4_sym", "nf4")


def load_model(path, device: str = "cpu", dram_budget_bytes=None, quantize=None, exact: bool = False,
               framework: str = "auto", *, sparsity: float = 0.0, predictor: str = "threshold",
               stream_dir=None, calibration_text=None, whole_layer_reads: bool = False,
               ffn_format: str = "int4_int8") -> Model:
    """Loads a checkpoint directory (config.json + *.safetensors, optional tokenizer.json) or a .gguf file.

    device: 'cpu' or 'cuda[:N]' (arrays through PyTorch or CuPy). Weights run as stored: float
    tensors as float32 matmuls (float16/bfloat16 converted to float32 once, at load), GGUF
    quantized tensors through qgemm. quantize: None, or one of QUANTIZE_FORMATS to quantize every
    linear weight at load (the measured logit drift vs the float weights is in `m.quantization`).
    exact: keep activations in float everywhere. The default (False) lets qgemm on quantized weights
    (GGUF, quantize=) quantize 1-8-token activations to int8 (one scale per token and weight group) and use integer
    dot products, as llama.cpp does for its quantized matmuls; float weights are unaffected. Pass
    exact=True to compare with a float reference.
    framework: the arrays between kernels: 'auto' (NumPy on the CPU; PyTorch, else CuPy, on a
    GPU), 'numpy', 'torch' or 'cupy'.
    dram_budget_bytes: stream the FFN up/down weights from a weight store under this budget of
    weight bytes (see memkernels.models.stream; CPU only): the checkpoint is converted once into
    `stream_dir` (default: next to it) with sparsity thresholds and low-rank predictors calibrated
    on `calibration_text`. sparsity: fraction of FFN neurons predicted off and never read (0: exact);
    predictor: 'threshold' (exact gate, calibrated magnitude threshold) or 'lowrank'.
    whole_layer_reads: read every FFN layer whole each token (the naive streaming baseline).
    ffn_format: how a quantized checkpoint's FFN is stored: 'int4_int8' (up rows and down columns
    streamed per neuron), 'down_int7' / 'down_int8' (gate and up resident, only 7-bit / int8 down
    columns streamed, read by the exact contribution |act(gate) * up| * ||down||: fewer bytes per
    token at the same perplexity when the budget holds the up projections), 'int4' or 'int8'.
    Returns a StreamingModel (its activations stay float: `exact` does not apply there).
    """
    if dram_budget_bytes is None:
        if sparsity or whole_layer_reads or stream_dir is not None or ffn_format != "int4_int8":
            raise ValueError("sparsity / whole_layer_reads / stream_dir / ffn_format apply to streaming: give "
                             "dram_budget_bytes")
    else:
        if device != "cpu":
            raise UnsupportedModelError(f"dram_budget_bytes: streaming runs on the CPU only, got device={device!r}")
        # The streamed FFN runs float activations whatever `exact` says (its int8 rows are small GEMVs).
        if quantize is not None:
            raise UnsupportedModelError("dram_budget_bytes: streaming runs the weights as stored; quantize= is not "
                                        "supported with a budget")
        from .stream import open_streaming
        return open_streaming(path, dram_budget_bytes, sparsity=sparsity, predictor=predictor, stream_dir=stream_dir,
                              calibration_text=calibration_text, whole_layer_reads=whole_layer_reads,
                              ffn_format=ffn_format)
    if quantize is not None and quantize not in QUANTIZE_FORMATS:
        raise ValueError(f"quantize: expected None or one of {QUANTIZE_FORMATS}, got {quantize!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise UnsupportedModelError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
        cfg = ModelConfig.from_json(cfg_path)
        tensors = read_checkpoint_tensors(path)
        from .tokenizer import Tokenizer
        tok = Tokenizer.from_dir(path)
        return Model(cfg, tensors, tok, device=device, exact=exact, quantize=quantize, source=path,
                     framework=framework, _own_tensors=True)
    if path.endswith(".gguf") or _is_gguf(path):
        from .gguf import load_gguf
        ck = load_gguf(path)
        cfg = ModelConfig.from_dict(ck.config)
        emb = ck.tensors.get("model.embed_tokens.weight")
        rows = None
        if not isinstance(emb, np.ndarray) and ck.tensor_types.get("model.embed_tokens.weight") in ("Q8_0", "Q4_0",
                                                                                                    "Q4_1"):
            # embedding rows straight from the memory-mapped file (the gguf package's dequantizer,
            # which the loader's formats equal bit for bit): no float32 copy of the table
            rows = functools.partial(ck.dequantized, "model.embed_tokens.weight")
        tensors, ck.tensors = dict(ck.tensors), {}  # the model owns them (and may fuse some) from here
        return Model(cfg, tensors, ck.tokenizer, device=device, exact=exact, quantize=quantize,
                     source=path, warnings=getattr(ck, "warnings", ()), framework=framework, embedding_rows=rows,
                     _own_tensors=True)
    if not os.path.exists(path):
        raise UnsupportedModelError(f"model path {path!r} does not exist")
    raise UnsupportedModelError(f"{path}: not a checkpoint directory (config.json + *.safetensors) or a .gguf file")


def _is_gguf(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


__all__ = ["ModelConfig", "RopeConfig", "UnsupportedModelError", "Model", "load_model", "reference_forward",
           "paged_attention_has_window", "QUANTIZE_FORMATS"]
