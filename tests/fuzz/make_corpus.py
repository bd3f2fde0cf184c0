"""Writes the small seed corpora of the fuzzers under tests/fuzz/corpus/<name>/ (deterministic).

python tests/fuzz/make_corpus.py   (with memkernels importable; see tests/run_fuzz.sh)
Files named regress-* are reproducers of fixed findings, added by hand and kept.
Each seed of a checksummed format is written twice: control byte 0 (bytes as is) and 1 (the
harness re-seals the checksum after mutating). Structured fuzzers (paged, sparse_scipy) take
FuzzedDataProvider bytes, so their seeds are fixed random byte strings.
"""
import os
import shutil
import sys
import tempfile

import numpy as np

import memkernels as mk

HERE = os.path.dirname(os.path.abspath(__file__))


def _write(name, seeds):
    d = os.path.join(HERE, "corpus", name)
    os.makedirs(d, exist_ok=True)
    for old in os.listdir(d):  # regress-* files (reproducers of fixed findings) are kept
        if old.startswith("seed-"):
            os.remove(os.path.join(d, old))
    for i, b in enumerate(seeds):
        with open(os.path.join(d, f"seed-{i:02d}"), "wb") as f:
            f.write(b)
    print(f"{name}: {len(seeds)} seeds, {sum(len(b) for b in seeds)} bytes")


def _both(raw):
    return [bytes([c]) + r for r in raw for c in (0, 1)]


def main():
    rng = np.random.default_rng(2024)
    w = lambda r, c: rng.standard_normal((r, c)).astype(np.float32)  # noqa: E731

    quant = [mk.quantize(w(2, 32), "int4", group_size=32), mk.quantize(w(2, 32), "int8"),
             mk.quantize(w(3, 64), "nf4", group_size=64, double_quant=True),
             mk.quantize(w(1, 32), "int3_sym", group_size=32), mk.quantize(w(2, 64), "int2", group_size=64)]
    # partial last groups (version-2 files), from their own generator so the other seeds stay as they were
    rng2 = np.random.default_rng(16)
    quant += [mk.quantize(rng2.standard_normal((2, 33)).astype(np.float32), "int4", group_size=32),
              mk.quantize(rng2.standard_normal((3, 100)).astype(np.float32), "int8"),
              mk.quantize(rng2.standard_normal((1, 70)).astype(np.float32), "int4_min", group_size=64)]
    _write("quant", _both([q.to_bytes() for q in quant]))

    def sparse(r, c, fmt, dt):
        a = mk.prune(w(r, c), 0.6 if fmt != "2:4" else 0.5, method="2:4" if fmt == "2:4" else "magnitude")
        return mk.SparseMatrix.from_dense(a, format=fmt, dtype=dt).to_bytes()

    _write("sparse_bytes", _both([sparse(3, 70, "bitmap", "float32"), sparse(2, 8, "2:4", "float16"),
                                  sparse(3, 10, "csr", "int8"), sparse(2, 65, "bitmap", "bfloat16")]))

    _write("sparse_scipy", [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (16, 48, 96, 160, 256)])
    _write("paged", [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (24, 64, 96, 128, 200)])

    tmp = tempfile.mkdtemp()
    try:
        p1, p2 = os.path.join(tmp, "a.mkws"), os.path.join(tmp, "b.mkws")
        mk.write_weight_store(p1, {"t": w(1, 10)[0], "i": np.arange(6, dtype=np.int32)}, None)
        mk.write_weight_store(p2, {"emb": w(3, 4).astype(np.float16)},
                              {0: {"gate": w(8, 4), "up": w(8, 4), "down": w(4, 8)},
                               3: {"up": w(5, 4).astype(np.float16), "down": w(4, 5).astype(np.float16)}},
                              chunk_bytes=4096)
        raw = [open(p, "rb").read() for p in (p1, p2)]
    finally:
        shutil.rmtree(tmp)
    _write("weight_store", _both(raw))


if __name__ == "__main__":
    sys.exit(main())
