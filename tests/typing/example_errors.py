"""Wrong uses of the public API that the stubs and annotations let mypy catch: test_typing.py expects
an error on each line marked with an E comment, so a package that looked untyped (Any) to mypy fails the test."""
import numpy as np

import memkernels as mk

qm = mk.quantize(np.ones((8, 32), np.float32), "int8")
name: str = qm.out_features  # E: an int
mk.set_num_threads("4")  # E: n is an int
sp = mk.SparseMatrix.from_dense(np.ones((8, 64), np.float32))
fmt: int = sp.format  # E: a str
seq: str = mk.PagedKVCache(1, 8, 4, 2, 32).add_sequence()  # E: an int
n: str = qm.nbytes  # E: an int
