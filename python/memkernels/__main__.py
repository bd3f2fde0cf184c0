"""Command line: python -m memkernels {info,demo,bench}."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import memkernels as mk


def _time(fn, repeat=3):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cmd_info(args) -> int:
    print(mk.info_string(), end="")
    return 0


def _naive_attention(q, k, v, causal):
    """Plain NumPy attention (materialises the seq x seq scores), batch 1, MHA."""
    qh, kh, vh = (np.ascontiguousarray(a[0].transpose(1, 0, 2)) for a in (q, k, v))
    s = qh @ kh.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    if causal:
        s += np.triu(np.full(s.shape[-2:], -np.inf, dtype=s.dtype), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return (s @ vh).transpose(1, 0, 2)[None]


def demo_attention():
    rng = np.random.default_rng(0)
    print("flash attention (fp32, batch 1, 8 heads, head_dim 128, causal)")
    print(f"  {'seq':>6} {'memkernels':>12} {'numpy naive':>12} {'speed-up':>9} {'max err':>9}")
    for s in (256, 1024, 2048):
        q, k, v = (rng.standard_normal((1, s, 8, 128), dtype=np.float32) for _ in range(3))
        ours = _time(lambda: mk.flash_attention(q, k, v, causal=True))
        naive = _time(lambda: _naive_attention(q, k, v, True), repeat=1)
        err = np.abs(mk.flash_attention(q, k, v, causal=True) - _naive_attention(q, k, v, True)).max()
        print(f"  {s:>6} {ours * 1e3:>10.2f}ms {naive * 1e3:>10.2f}ms {naive / ours:>8.1f}x {err:>9.1e}")


def cmd_demo(args) -> int:
    print(mk.info_string())
    demo_attention()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build and machine information").set_defaults(fn=cmd_info)
    sub.add_parser("demo", help="run the kernels on this machine and check them").set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
