"""Outlier Gradient Analysis memory: peak RSS of ``outlier_scores(detector="iforest")`` against
one float32 copy of the N × P gradient features.

Setting: N synthetic samples (``--n``, default 50,000, 100,000 and 200,000) of 256 standard-normal
features (seeded ``torch.Generator``), labels = argmax of a seeded random linear teacher over 10
classes; the model is a bare ``nn.Linear(256, 10)`` (``torch.manual_seed``, not trained), scored
through the public API with the defaults ``params="last_layer_weight"`` (the weight, bias
excluded: P = 10 × 256 = 2,560 features) and ``gradient_path="auto"`` (the closed form (p − e_y) hᵀ),
``detector="iforest"``, ``dtype=torch.float32``, ``batch_size=256``, ``random_state=0``.

Each setting runs in a fresh subprocess (so one setting's freed-but-kept memory does not hide
another's). The child builds the data and the model, makes one warm-up call on the first 1,024
samples (imports scikit-learn, starts torch's thread pool), runs ``gc.collect()``, then takes
its baseline: the resident set size (``VmRSS`` in ``/proc/self/status``), with the kernel's
peak-RSS mark reset to it (``echo 5 > /proc/self/clear_refs``). After the timed call the peak
is ``VmHWM``: the kernel's exact high-water mark of the resident set, not a sampled value, so a
short-lived copy cannot slip between samples. The increase is ``VmHWM − baseline``. As a cross-check the child
also reports ``ru_maxrss`` (``resource.getrusage(RUSAGE_SELF)``, never reset: the peak over the
whole process, which equals the call's peak whenever the call's peak is the highest of the
process, true here since the data are 10× smaller than the features) minus the same baseline.

Reported per setting: the peak increase in bytes, its ratio to one float32 copy of the features
(N · P · 4 bytes), the wall time of the call, whether the features-memory warning was logged,
and a SHA-256 of the returned scores (to check that a code change leaves them bit-identical).
Acceptance (issue): at N = 200,000 the increase is at most 1.5 float32 copies.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/oga_memory.py          # writes benchmarks/results/oga_memory.json
    PYTHONPATH=src .venv/bin/python benchmarks/oga_memory.py --n 20000 --out /tmp/oga_memory.json   # smoke run

The child processes get ``PYTHONPATH`` = this checkout's ``src`` (first), so the library of this
checkout is the one measured. Linux only (``/proc/self/status``, ``/proc/self/clear_refs``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from memory_probe import git, reset_peak, run_child, status_kib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "oga_memory.json"
D_IN, CLASSES = 256, 10
P = D_IN * CLASSES  # features with params="last_layer_weight"
LIMIT = 1.5  # acceptance: peak increase / one float32 copy, at the largest N
WARMUP_N = 1024


def child(n: int, detector: str, threads: int, batch_size: int) -> dict[str, Any]:
    """One setting, measured in this (fresh) process."""
    import gc
    import hashlib
    import resource

    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import hessfree

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, D_IN, generator=g)
    teacher = torch.randn(D_IN, CLASSES, generator=g)
    y = (X @ teacher).argmax(1)
    data = TensorDataset(X, y)
    torch.manual_seed(0)
    model = nn.Linear(D_IN, CLASSES)
    kw = dict(detector=detector, batch_size=batch_size, random_state=0, progress=False)

    warned: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warned.append(record.getMessage())

    logging.getLogger("hessfree").addHandler(Catch())
    hessfree.outlier_scores(model, TensorDataset(X[:WARMUP_N], y[:WARMUP_N]), **kw)  # imports, thread pool
    warned.clear()
    gc.collect()
    base_kib = reset_peak()  # VmHWM reset to the current RSS
    t0 = time.perf_counter()
    s = hessfree.outlier_scores(model, data, **kw)
    wall = time.perf_counter() - t0
    hwm_kib = status_kib("VmHWM")
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    after_kib = status_kib("VmRSS")
    assert s.meta["n_features"] == P, s.meta["n_features"]
    one_copy = n * P * 4
    peak = (hwm_kib - base_kib) * 1024
    return {
        "n": n, "p": P, "detector": detector, "gradient_path": s.meta["gradient_path"],
        "batch_size": batch_size, "threads": threads,
        "baseline_rss_bytes": base_kib * 1024,
        "peak_increase_bytes": peak,
        "one_float32_copy_bytes": one_copy,
        "ratio_to_one_copy": peak / one_copy,
        "ru_maxrss_increase_bytes": (maxrss_kib - base_kib) * 1024,
        "rss_after_increase_bytes": (after_kib - base_kib) * 1024,
        "wall_s": wall,
        "gradients_s": s.meta["timing"].get("gradients_s"),
        "detector_s": s.meta["timing"].get("detector_s"),
        "warnings": warned,
        "scores_sha256": hashlib.sha256(np.ascontiguousarray(s.values).tobytes()).hexdigest(),
    }


def run_setting(n: int, args: argparse.Namespace) -> dict[str, Any]:
    return run_child(__file__, [str(n), "--detector", args.detector, "--threads", str(args.threads),
                                "--batch-size", str(args.batch_size)], f"setting n={n}")


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| N | P | one float32 copy (GB) | peak RSS increase (GB) | ratio | ru_maxrss check (GB) | wall (s) "
             "| warned |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['p']:,} | {r['one_float32_copy_bytes'] / 1e9:.2f} | "
                     f"{r['peak_increase_bytes'] / 1e9:.2f} | {r['ratio_to_one_copy']:.2f} | "
                     f"{r['ru_maxrss_increase_bytes'] / 1e9:.2f} | {r['wall_s']:.1f} | "
                     f"{'yes' if r['warnings'] else 'no'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[50_000, 100_000, 200_000],
                    help="numbers of samples, one fresh subprocess each (default 50000 100000 200000)")
    ap.add_argument("--detector", default="iforest", help="detector= of outlier_scores (default iforest)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--batch-size", type=int, default=256, help="batch_size= of outlier_scores (default 256)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if min(args.n) < 1 or args.threads < 1 or args.batch_size < 1:
        ap.error("--n, --threads and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.detector, args.threads, args.batch_size)))
        return 0
    import numpy as np
    import sklearn
    import torch

    from hessfree.io import write_json

    t0 = time.perf_counter()
    rows = []
    for n in args.n:
        r = run_setting(n, args)
        print(f"n={n:,}: +{r['peak_increase_bytes'] / 1e9:.2f} GB peak ({r['ratio_to_one_copy']:.2f} float32 copies), "
              f"{r['wall_s']:.1f} s", flush=True)
        rows.append(r)
    largest = max(rows, key=lambda r: r["n"])
    table = format_table(rows)
    payload = {
        "benchmark": "oga_memory",
        "setting": {"model": f"nn.Linear({D_IN}, {CLASSES}) (bias present, not selected)",
                    "params": "last_layer_weight", "p": P, "detector": args.detector, "dtype": "float32",
                    "batch_size": args.batch_size, "threads": args.threads, "warmup_n": WARMUP_N,
                    "data": f"X ~ N(0, 1) ({D_IN} features, seed 0), y = argmax(X @ teacher), teacher ~ N(0, 1)"},
        "measure": "peak RSS increase = VmHWM after the call - VmRSS before it, VmHWM reset to VmRSS at the "
                   "baseline via /proc/self/clear_refs (5); baseline after the data, the model and a warm-up call "
                   f"on {WARMUP_N} samples, gc.collect(); one fresh subprocess per setting. ru_maxrss_increase = "
                   "getrusage(RUSAGE_SELF).ru_maxrss - the same baseline (never reset: a cross-check)",
        "acceptance": {"limit_ratio": LIMIT, "n": largest["n"], "ratio": largest["ratio_to_one_copy"],
                       "pass": largest["ratio_to_one_copy"] <= LIMIT},
        "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "src"))},
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
                        "numpy": np.__version__, "scikit-learn": sklearn.__version__, "cpu_count": os.cpu_count()},
        "results": rows,
        "table": table,
        "seconds": time.perf_counter() - t0,
    }
    print()
    print(table)
    print(f"\nacceptance (ratio <= {LIMIT} at N = {largest['n']:,}): "
          f"{'PASS' if payload['acceptance']['pass'] else 'FAIL'} ({largest['ratio_to_one_copy']:.2f})")
    write_json(args.out, payload)
    print(f"wrote {args.out} ({payload['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
