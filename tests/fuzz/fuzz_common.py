"""Shared pieces of the atheris fuzzers in this folder.

Every fuzzer defines `one_input(data: bytes)`, which feeds `data` to one memkernels entry point that
takes untrusted bytes or indices. The contract under test: the call either succeeds (and then the
result is checked against a NumPy oracle where one is cheap) or raises one of DOCUMENTED. Any
other exception, a failed oracle check, or a crash (ASan/UBSan report, signal) is a finding.

Run one fuzzer:   python tests/fuzz/fuzz_quant.py tests/fuzz/corpus/quant -max_total_time=30
Replay a corpus:  python tests/fuzz/fuzz_quant.py tests/fuzz/corpus/quant -runs=0
(see tests/run_fuzz.sh for the ASan-preloaded CI run). The formats with a checksum are fuzzed
twice over: the first input byte chooses whether the harness re-seals the checksums after the
mutation, so the fuzzer also reaches the structural checks behind them.
"""
from __future__ import annotations

import os
import re
import struct
import sys

import numpy as np

import memkernels as mk

DOCUMENTED = (ValueError, TypeError, MemoryError, mk.CorruptDataError, OSError)


# The C++ code is not coverage-instrumented (gcc has no libFuzzer instrumentation), so the harness
# turns outcomes into Python coverage: `feature(key)` takes one of _NFEAT distinct branches of a
# generated, atheris-instrumented if/elif chain per key (e.g. each error message with its numbers
# removed), so an input reaching a new check or a new kind of success counts as new coverage.
_NFEAT = 256
_src = "def _branch(h):\n" + "".join(f"    {'if' if i == 0 else 'elif'} h == {i}:\n        return {i}\n"
                                         for i in range(_NFEAT))
_ns: dict = {}
exec(compile(_src, "<fuzz-features>", "exec"), _ns)
_branch = _ns["_branch"]


def feature(key: str) -> None:
    import zlib

    _branch(zlib.crc32(re.sub(r"-?\d+", "#", key).encode()) % _NFEAT)


def guarded(fn):
    """fn(data) with the documented exceptions swallowed; everything else propagates (a finding)."""

    def run(data: bytes) -> None:
        try:
            fn(data)
        except DOCUMENTED as e:
            feature(f"{type(e).__name__}: {e}")

    run.__name__ = getattr(fn, "__name__", "one_input")
    return run


def main(one_input) -> None:
    """Entry point of each fuzzer script: atheris with libFuzzer's command line."""
    import atheris

    global _branch
    _branch = atheris.instrument_func(_branch)
    # Instrument the harness module and memkernels' Python wrappers (not NumPy: too slow).
    import types

    mods = [sys.modules[one_input.__module__]] + [m for n, m in list(sys.modules.items()) if n.startswith("memkernels")]
    for mod in mods:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__:
                setattr(mod, name, atheris.instrument_func(obj))
    fn = getattr(sys.modules[one_input.__module__], one_input.__name__)
    atheris.Setup(sys.argv, atheris.instrument_func(guarded(fn)))
    atheris.Fuzz()


def corpus_dir(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", name)


# ---- checksums of the serialised formats (mirrors of the C++ ones, to re-seal mutated bytes) ----
_M64 = (1 << 64) - 1


def fnv1a64(b: bytes) -> int:
    """quant.cpp's byte-wise 64-bit FNV-1a."""
    h = 0xCBF29CE484222325
    for c in b:
        h = ((h ^ c) * 0x100000001B3) & _M64
    return h


def sparse_checksum(b: bytes) -> int:
    """sparse.cpp's word-wise FNV variant (8-byte words, then the tail bytes)."""
    h = 1469598103934665603
    n8 = len(b) // 8 * 8
    for (w,) in struct.iter_unpack("<Q", b[:n8]):
        h = ((h ^ w) * 1099511628211) & _M64
        h ^= h >> 29
    for c in b[n8:]:
        h = ((h ^ c) * 1099511628211) & _M64
    return h


def reseal_tail64(b: bytes, fn) -> bytes:
    """Replaces the trailing 8-byte checksum of b by fn(body)."""
    if len(b) < 8:
        return b
    return b[:-8] + struct.pack("<Q", fn(b[:-8]))


def reseal_weight_store(b: bytes) -> bytes:
    """Recomputes the directory CRC (when the header's directory range lies in b) and the header CRC."""
    if len(b) < 64:
        return b
    out = bytearray(b)
    dir_offset, dir_bytes = struct.unpack_from("<QQ", out, 16)
    if dir_offset <= len(out) and dir_bytes <= len(out) - dir_offset:
        struct.pack_into("<I", out, 48, mk._C.crc32c(bytes(out[dir_offset:dir_offset + dir_bytes])))
    struct.pack_into("<I", out, 60, mk._C.crc32c(bytes(out[:60])))
    return bytes(out)


def split_control(data: bytes):
    """(control byte, rest): the first byte steers the harness, the rest is the payload."""
    if not data:
        return 0, b""
    return data[0], data[1:]


def finite_close(got, ref, rtol: float, what: str) -> None:
    """Oracle check for accepted inputs with finite, moderate reference values."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"{what}: shape {got.shape} != {ref.shape}")
    if not np.all(np.isfinite(ref)) or (ref.size and np.max(np.abs(ref)) > 1e6):
        return
    err = np.max(np.abs(got - ref), initial=0.0)
    bound = rtol * max(1.0, np.max(np.abs(ref), initial=0.0))
    if not err <= bound:
        raise AssertionError(f"{what}: max error {err} > {bound}")
