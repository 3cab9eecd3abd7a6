"""The small run and datasets the store tests (and their subprocess drivers) share."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import hessfree
from helpers import mlp

CHUNKS = dict(chunk_rows=12, batch_size=5)  # chunks that are not whole batches, and a short last chunk


def case(n: int = 41, m: int = 6, seed: int = 0):
    """(run with 3 checkpoints, training set of n samples, query set of m) with deterministic values."""
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n + m, 6, generator=g), torch.randint(0, 3, (n + m,), generator=g)
    states = []
    model = mlp(seed)
    for _ in range(3):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    run = hessfree.Run.from_checkpoints(mlp(seed), states, [0.1, 0.2, 0.3])
    return run, TensorDataset(X[:n], y[:n]), TensorDataset(X[n:], y[n:])
