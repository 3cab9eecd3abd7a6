"""pairwise_influence memory: the dense n_test × N matrix against ``top_k=`` (streamed top-k).

Setting: an MLP ``Linear(20, 64), ReLU, Linear(64, 10)`` (``torch.manual_seed(0)``), three
checkpoints (the initial weights and two seeded perturbations of them, learning rates 0.1), loss
cross-entropy, ``params="all"``, float32, ``batch_size=256``; n_test = 20,000 test samples and N
training samples (``--n-train``, default 2,000 and 10,000), 20 standard-normal features, labels =
argmax of a random linear teacher. The checkpoints share one stacked pass.

Each (N, mode) runs in a fresh subprocess; the peak RSS increase over the baseline (after the data,
the run and a warm-up call on 256 test × 256 training samples, ``gc.collect()``) is measured as in
``oga_memory.py``: ``VmHWM`` reset to ``VmRSS`` through ``/proc/self/clear_refs`` at the baseline,
read after the call. For ``top_k`` the child afterwards computes the dense matrix too (outside the
measurement) and records whether the ids and values equal its top-k (``Scores.helpful`` /
``harmful`` order).

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/pairwise_memory.py    # writes benchmarks/results/pairwise_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from memory_probe import git, reset_peak, run_child, status_kib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "pairwise_memory.json"
D_IN, HIDDEN, CLASSES = 20, 64, 10


def child(n_test: int, n_train: int, top_k: int | None, threads: int) -> dict[str, Any]:
    import gc

    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import hessfree

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(D_IN, CLASSES, generator=g)

    def make(n: int) -> TensorDataset:
        X = torch.randn(n, D_IN, generator=g)
        return TensorDataset(X, (X @ teacher).argmax(1))

    train, test = make(n_train), make(n_test)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = [base_state] + [{k: v + 0.05 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base_state.items()}
                             for i in range(2)]
    run = hessfree.Run.from_checkpoints(model, states, [0.1] * 3, loss="cross_entropy")
    kw = dict(params="all", batch_size=256, progress=False)
    warm = TensorDataset(*[t[:256] for t in train.tensors]), TensorDataset(*[t[:256] for t in test.tensors])
    hessfree.pairwise_influence(run, *warm, top_k=min(top_k or 1, 256), **kw)
    hessfree.pairwise_influence(run, *warm, **kw)
    gc.collect()
    base = reset_peak()  # VmHWM reset to the current RSS
    t0 = time.perf_counter()
    res = hessfree.pairwise_influence(run, train, test, top_k=top_k, **kw)
    wall = time.perf_counter() - t0
    peak = (status_kib("VmHWM") - base) * 1024
    matrix = n_test * n_train * 8
    out: dict[str, Any] = {"n_test": n_test, "n_train": n_train, "top_k": top_k, "peak_increase_bytes": peak,
                           "dense_matrix_bytes": matrix, "ratio_to_dense_matrix": peak / matrix, "wall_s": wall,
                           "checkpoints_per_pass": res.meta["checkpoints_per_pass"]}
    if top_k is not None:
        out["window"] = res.meta["window"]
        dense = hessfree.pairwise_influence(run, train, test, **kw)
        hi = np.argsort(-dense.values, axis=1, kind="stable")[:, :top_k]
        lo = np.argsort(dense.values, axis=1, kind="stable")[:, :top_k]
        out["matches_dense_top_k"] = bool(
            np.array_equal(res.helpful_ids, dense.helpful(top_k))
            and np.array_equal(res.harmful_ids, dense.harmful(top_k))
            and np.array_equal(res.helpful_values, np.take_along_axis(dense.values, hi, 1))
            and np.array_equal(res.harmful_values, np.take_along_axis(dense.values, lo, 1)))
    return out


def run_setting(n_test: int, n_train: int, top_k: int | None, threads: int) -> dict[str, Any]:
    return run_child(__file__, [str(n_train), "--n-test", str(n_test), "--threads", str(threads)]
                     + (["--top-k", str(top_k)] if top_k is not None else []),
                     f"setting n_train={n_train} top_k={top_k}")


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| n_test × N | mode | dense matrix (GB) | peak RSS increase (GB) | ratio to the matrix | wall (s) |"
             " equals dense top-k |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = "dense" if r["top_k"] is None else f"top_k={r['top_k']} (window {r['window']:,})"
        same = "-" if r["top_k"] is None else ("yes" if r["matches_dense_top_k"] else "NO")
        lines.append(f"| {r['n_test']:,} × {r['n_train']:,} | {mode} | {r['dense_matrix_bytes'] / 1e9:.2f} | "
                     f"{r['peak_increase_bytes'] / 1e9:.3f} | {r['ratio_to_dense_matrix']:.2f} | {r['wall_s']:.1f} | "
                     f"{same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-test", type=int, default=20_000)
    ap.add_argument("--n-train", type=int, nargs="+", default=[2_000, 10_000])
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.n_test, args.child, args.top_k if "--top-k" in (argv or sys.argv) else None,
                               args.threads)))
        return 0
    import numpy as np
    import torch

    from hessfree.io import write_json

    t0 = time.perf_counter()
    rows = []
    for n in args.n_train:
        for k in (None, args.top_k):
            r = run_setting(args.n_test, n, k, args.threads)
            print(f"n_test={args.n_test:,} N={n:,} top_k={k}: +{r['peak_increase_bytes'] / 1e9:.3f} GB, "
                  f"{r['wall_s']:.1f} s", flush=True)
            rows.append(r)
    table = format_table(rows)
    payload = {
        "benchmark": "pairwise_memory",
        "setting": {"model": f"Linear({D_IN}, {HIDDEN}), ReLU, Linear({HIDDEN}, {CLASSES})", "checkpoints": 3,
                    "params": "all", "dtype": "float32", "batch_size": 256, "threads": args.threads},
        "measure": "peak RSS increase = VmHWM after the call - VmRSS before it (VmHWM reset via "
                   "/proc/self/clear_refs); "
                   "one fresh subprocess per row; baseline after data, run and a warm-up call, gc.collect()",
        "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "src"))},
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
                        "numpy": np.__version__, "cpu_count": os.cpu_count()},
        "results": rows, "table": table, "seconds": time.perf_counter() - t0,
    }
    print()
    print(table)
    write_json(args.out, payload)
    print(f"wrote {args.out} ({payload['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
