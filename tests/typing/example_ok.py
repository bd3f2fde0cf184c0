"""A small program on memkernels' public API; tests/python/test_typing.py runs mypy on it (no errors)."""
import numpy as np

import memkernels as mk

rng = np.random.default_rng(0)
q = rng.standard_normal((1, 16, 4, 32), dtype=np.float32)
k = rng.standard_normal((1, 16, 2, 32), dtype=np.float32)
out = mk.flash_attention(q, k, k, causal=True, window=(7, 0), softcap=30.0)
padded = mk.flash_attention(q, k, k, causal=True, seqused_k=np.array([12], np.int32),
                            key_mask=np.ones((1, 16), dtype=bool))

w = rng.standard_normal((64, 128), dtype=np.float32)
qm: mk.QuantizedMatrix = mk.quantize(w, "int4", group_size=32)
rows: int = qm.out_features
blob: bytes = qm.to_bytes()
y = mk.qgemm(rng.standard_normal((3, 128), dtype=np.float32), qm)

sp = mk.SparseMatrix.from_dense(mk.prune(w, 0.7), dtype="float16")
shape: tuple[int, int] = sp.shape
per_weight: float = sp.bytes_per_weight

cache = mk.PagedKVCache(num_layers=1, num_pages=8, page_size=4, kv_heads=2, head_dim=32)
seq: int = cache.add_sequence()
mk.set_num_threads(2)
threads: int = mk.num_threads()
isa: str = mk.cpu_isa()
cmake: str = mk.cmake_dir()
print(out.shape, padded.shape, rows, len(blob), y.shape, shape, per_weight, seq, threads, isa, cmake)
