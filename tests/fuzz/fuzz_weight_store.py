"""Fuzzes WeightStore.open (and the reads after it) with mutated bytes of small valid store files.

The last byte picks the open options (budget, max_read_bytes, io_threads). Control byte: bit 0 re-seals the header and directory CRC-32Cs after the mutation (reaches the
directory parser and the offset/size checks behind them); the other bits pick neuron ids to read.
An opened store must then serve every tensor and neuron (or raise CorruptDataError on a data
checksum): reads of whole tensors, get_rows, prefetch, next_token.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import memkernels as mk  # noqa: E402
from fuzz_common import feature, main, reseal_weight_store, split_control  # noqa: E402

_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
_PATH = os.path.join(tempfile.mkdtemp(prefix="mk-fuzz-ws-", dir=_DIR), "f.mkws")


def one_input(data: bytes) -> None:
    ctl, payload = split_control(data)
    if ctl & 1:
        payload = reseal_weight_store(payload)
    with open(_PATH, "wb") as f:
        f.write(payload)
    opt = payload[-1] if payload else 0  # the options come from the last byte (of the file, too)
    budget = (1 << 20, 1 << 16, 1 << 40, 3 << 20)[opt & 3]
    max_read = (1 << 20, 1, 1 << 62, -1)[(opt >> 2) & 3]
    with mk.WeightStore.open(_PATH, budget, io_threads=1 + ((opt >> 4) & 3), direct_io=False, window_tokens=1,
                             max_read_bytes=max_read) as ws:
        st = ws.stats()
        if st["staging_bytes"] + st["cache_capacity_bytes"] > min(budget, 2 * len(payload) + (8 << 20)):
            raise AssertionError(f"the store holds {st['staging_bytes']} + {st['cache_capacity_bytes']} bytes "
                                 f"for a {len(payload)}-byte file under a {budget}-byte budget")
        feature(f"ok {len(ws.tensors())} {len(ws.layers())}")
        for t in ws.tensors():
            try:
                a = ws.get(t["name"])
            except mk.CorruptDataError:
                continue
            if tuple(a.shape) != tuple(t["shape"]):
                raise AssertionError(f"tensor {t['name']!r}: shape {a.shape} != {t['shape']}")
        for li in ws.layers():
            n = li["neurons"]
            ids = np.array([(ctl >> 1) % n, n - 1, 0, (ctl >> 3) % n], np.int64)
            ws.prefetch(li["layer"], ids[:2])
            try:
                rows = ws.get_rows(li["layer"], ids)
            except mk.CorruptDataError:
                rows = None
            if rows is not None and rows.shape != (4, li["parts"], li["d_model"]):
                raise AssertionError(f"layer {li['layer']}: get_rows shape {rows.shape}")
            ws.next_token()
            ws.wait_prefetch()
        st = ws.stats()
        if st["resident_bytes"] > ws.dram_budget_bytes:
            raise AssertionError("resident bytes exceed the DRAM budget")


if __name__ == "__main__":
    main(one_input)
