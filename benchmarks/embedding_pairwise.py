"""A newcomer's text classifier: is hessfree's train x test matrix as fast as writing it by hand?

Model: Embedding(V, D) -> mean over the T tokens -> Linear(D, C), all parameters, float32, random
tokens and labels (seeded), at two sizes: V, D, T = 100, 16, 10 and 500, 32, 20 (C = 2). The train x test TracIn matrix sum_k eta_k g_test(theta_k) . g_train(theta_k),
N_TRAIN x N_TEST, with 1 and with 5 checkpoints, is computed

* by ``hessfree.pairwise_influence`` (default ``stack=True``: several checkpoints share one pass where the
  engine can, and ``stack=False``: one checkpoint at a time), and
* by hand: per checkpoint, the per-sample gradients in closed form (residual r = softmax(z) - onehot(y);
  dW = r h^T, db = r, and (W^T r) / T added to the embedding row of every token), materialised as an
  (n, P) matrix with ``index_add_``, then one (n_test, P) @ (P, n_train) product.

Each time is the median of ``--repeats`` calls after one warm-up call, in this process, with
``torch.set_num_threads(--threads)``. The hand-written result in float64 is the reference for the error.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/embedding_pairwise.py              # 1 thread, writes the JSON
    PYTHONPATH=src .venv/bin/python benchmarks/embedding_pairwise.py --quick      # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import hessfree

DEFAULT_OUT = Path(__file__).parent / "results" / "embedding_pairwise.json"
SIZES = [(100, 16, 10), (500, 32, 20)]  # (V, D, T)
C = 2
LR = 0.1
V, D, T = SIZES[0]  # set per size by main()


class MeanPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(1))


def make_data(n_train: int, n_test: int) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, V, (n_train + n_test, T), generator=g)
    y = torch.randint(0, C, (n_train + n_test,), generator=g)
    return TensorDataset(X[:n_train], y[:n_train]), TensorDataset(X[n_train:], y[n_train:])


def make_states(train: TensorDataset, k: int) -> list[dict[str, torch.Tensor]]:
    """k checkpoints, one plain-SGD step of lr LR on the mean loss over the training set apart."""
    torch.manual_seed(0)
    model = MeanPool()
    X, y = train.tensors
    states = []
    for _ in range(k):
        states.append({n: v.detach().clone() for n, v in model.state_dict().items()})
        model.zero_grad()
        F.cross_entropy(model(X), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return states


def by_hand(states: list[dict], train: TensorDataset, test: TensorDataset, dtype: torch.dtype) -> np.ndarray:
    def grads(state: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        E, W, b = (state[k].to(dtype) for k in ("emb.weight", "head.weight", "head.bias"))
        n = len(X)
        h = E[X].mean(1)  # (n, D)
        r = torch.softmax(h @ W.T + b, 1) - F.one_hot(y, C).to(dtype)  # (n, C)
        dE = torch.zeros(n * V, D, dtype=dtype)
        rows = (X + torch.arange(n)[:, None] * V).reshape(-1)
        dE.index_add_(0, rows, ((r @ W) / T).repeat_interleave(T, 0))
        return torch.cat([dE.view(n, V * D), (r[:, :, None] * h[:, None, :]).reshape(n, -1), r], 1)

    out = torch.zeros(len(test), len(train), dtype=dtype)
    for state in states:
        out += LR * (grads(state, *test.tensors) @ grads(state, *train.tensors).T)
    return out.numpy()


def timed(call: Callable[[], np.ndarray], repeats: int) -> tuple[list[float], np.ndarray]:
    out = call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return times, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=1600)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--checkpoints", type=int, nargs="+", default=[1, 5])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: 200 x 50, 1 repeat")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.repeats = 200, 50, 1
    torch.set_num_threads(args.threads)
    global V, D, T
    rows = []
    for V, D, T in SIZES:
        rows += measure_size(args)
    result = {
        "model": "Embedding(V, D) -> mean over T tokens -> Linear(D, 2), all parameters, float32",
        "n_train": args.n_train, "n_test": args.n_test, "threads": args.threads, "repeats": args.repeats,
        "loadavg": os.getloadavg(), "torch": torch.__version__, "rows": rows,
    }
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def measure_size(args: argparse.Namespace) -> list[dict]:
    train, test = make_data(args.n_train, args.n_test)
    rows = []
    for k in args.checkpoints:
        states = make_states(train, k)
        ref = by_hand(states, train, test, torch.float64)
        run = hessfree.Run.from_checkpoints(MeanPool(), states, [LR] * k)
        calls = {
            "by hand (materialised)": lambda: by_hand(states, train, test, torch.float32),
            "hessfree stack=True": lambda: hessfree.pairwise_influence(run, train, test, progress=False).values,
            "hessfree stack=False": lambda: hessfree.pairwise_influence(run, train, test, progress=False,
                                                                        stack=False).values,
        }
        for name, call in calls.items():
            times, out = timed(call, args.repeats)
            err = float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())
            rows.append({"V": V, "D": D, "T": T, "checkpoints": k, "method": name, "seconds": times,
                         "median_s": statistics.median(times), "rel_err_vs_float64_by_hand": err})
            print(f"V={V} D={D} T={T}  {k} checkpoint(s)  {name:24s} {statistics.median(times):7.3f} s  "
                  f"(min {min(times):.3f}, max {max(times):.3f})  rel. error {err:.1e}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
