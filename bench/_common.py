"""Shared benchmark helpers: best-of timing, peer detection, table printing, peak memory probes."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def best_time(fn, repeat=5, min_time=0.2, sync=None, max_reps=50, clock=time.perf_counter):
    """Best time of fn() over at least `repeat` runs (after one warm-up), running on until
    min_time has passed or max_reps runs were made. The minimum is the least disturbed run.
    clock: wall time by default; time.process_time for CPU time on a loaded machine."""
    fn()
    if sync:
        sync()
    best, total, n = float("inf"), 0.0, 0
    while n < repeat or total < min_time:
        t = clock()
        fn()
        if sync:
            sync()
        dt = clock() - t
        best, total, n = min(best, dt), total + dt, n + 1
        if n >= max_reps:
            break
    return best


def try_import(name):
    try:
        return __import__(name)
    except Exception:
        return None


def shape_arg(text):
    """argparse type for a matrix shape 'ROWSxCOLS' -> (rows, cols)."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS, e.g. 4096x4096, not {text!r}") from None
    return rows, cols


def print_table(title, headers, rows, note=None):
    """Prints a Markdown table (so results can be pasted into bench/results/), then `note` as a
    paragraph. `rows` may be a generator: each row is printed (and flushed) as soon as it is
    measured. Ratio columns are named "peer/ours" and formatted with fmt_ratio: that is what
    `python -m memkernels bench` collects into its summary (keep titles short, it repeats them)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|", flush=True)
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |", flush=True)
    if note:
        print(f"\n{note}", flush=True)


def fmt_ms(t, digits=2):
    """Seconds as milliseconds with `digits` decimals ('n/a' for None)."""
    return "n/a" if t is None else f"{t * 1e3:.{digits}f}"


def fmt_ratio(a, b):
    """a / b as 'x.xx' (how many times faster we are when a is the peer time and b ours); ratios
    under 0.1 keep two significant digits ('0.0043x', never a misleading '0.00x')."""
    if a is None or b is None:
        return "n/a"
    r = a / b
    return f"{r:.2f}x" if r >= 0.1 or r == 0 else f"{r:.2g}x"


def peak_extra_memory(code: str) -> int | None:
    """Runs `code` in a fresh Python: it must set up inputs, then call `run()`. Returns the peak
    resident memory added by run() in bytes (VmHWM after minus VmRSS before), Linux only."""
    prog = f"""
import json, sys
{code}
def _status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = _status('VmRSS:')
run()
print(json.dumps(_status('VmHWM:') - before))
"""
    try:
        res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ))
        return int(json.loads(res.stdout.strip().splitlines()[-1]))
    except Exception:
        return None


def fmt_mib(b):
    return "n/a" if b is None else f"{b / 2**20:.1f}"
