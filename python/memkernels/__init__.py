"""memkernels: memory-efficient LLM inference kernels for CPU and CUDA on NumPy / DLPack arrays.

Capabilities: flash attention, a paged KV cache with paged attention, low-bit GEMM, sparse SpMM,
and weight streaming from flash storage under a DRAM budget. Call `memkernels.info()` to see the
build (CPU ISA in use, threads, CUDA).
"""
import os as _os

# Development: MEMKERNELS_BUILD_DIR=<cmake build dir> loads the extension built there instead of an
# installed one (see README, "Working on memkernels").
if _os.environ.get("MEMKERNELS_BUILD_DIR"):
    __path__.insert(0, _os.environ["MEMKERNELS_BUILD_DIR"])

from . import _memkernels as _C  # noqa: E402
from ._memkernels import CacheFullError, CorruptDataError
from ._arrays import INT32 as _INT32, as_int as _as_int
from .attention import flash_attention, flash_attention_varlen
from .paged import PagedKVCache, paged_attention, paged_attention_raw
from .quant import (QuantizedMatrix, dequantize, from_bytes, load_quantized, pack_quantized, qgemm, quantize,
                    quantize_gptq)
from .quant import pack_gguf_blocks
from .sparse import SparseMatrix, prune, spmm
from .weight_store import WeightStore, convert_to_weight_store, write_weight_store
from .models import Model, UnsupportedModelError, load_model

__version__ = _C.build_info()["version"]


def cmake_dir() -> str:
    """The folder holding memkernels' CMake package: C++ projects find the installed library, its
    headers and the ``memkernels::memkernels`` target with ``-Dmemkernels_DIR=<this folder>``
    (``python -m memkernels --cmake-dir`` prints it)."""
    return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "cmake")


def include_dir() -> str:
    """The folder holding the C++ headers (``memkernels/memkernels.h``) of the installed package."""
    return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "include")


def info() -> dict:
    """Version, build options, CPU ISA in use, thread count, CUDA built/available and the GPU name."""
    d = dict(_C.build_info())
    d.update(
        cpu_isa=_C.cpu_isa(),
        best_cpu_isa=_C.best_cpu_isa(),
        num_threads=_C.num_threads(),
        cuda_available=_C.cuda_device_count() > 0,
        cuda_device_count=_C.cuda_device_count(),
        gpu_name=_C.cuda_device_name(0) if _C.cuda_device_count() > 0 else None,
    )
    return d


def info_string() -> str:
    """info() as readable text."""
    return _C.info_string()


def num_threads() -> int:
    """Threads the CPU kernels use (default: the number of cores). In a child made by os.fork()
    (or multiprocessing's 'fork') after a kernel ran, 1: the OpenMP threads stay in the parent."""
    return _C.num_threads()


def set_num_threads(n: int) -> None:
    """Sets the CPU kernels' thread count; n <= 0 restores the default."""
    _C.set_num_threads(_as_int(n, "set_num_threads: n", *_INT32))


def cpu_isa() -> str:
    """The CPU instruction set the kernels use now: 'generic', 'avx2' or 'avx512'."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Lowers (or restores) the CPU instruction set used, e.g. to compare or to test each path."""
    _C.set_cpu_isa(name)


__all__ = [
    "CacheFullError", "CorruptDataError", "flash_attention", "flash_attention_varlen", "info", "info_string",
    "cmake_dir", "include_dir",
    "num_threads", "set_num_threads", "cpu_isa", "set_cpu_isa",
    "PagedKVCache", "paged_attention", "paged_attention_raw",
    "QuantizedMatrix", "quantize", "dequantize", "qgemm", "from_bytes", "load_quantized",
    "pack_quantized", "quantize_gptq", "pack_gguf_blocks",
    "SparseMatrix", "prune", "spmm",
    "WeightStore", "write_weight_store", "convert_to_weight_store",
    "Model", "UnsupportedModelError", "load_model",
]
