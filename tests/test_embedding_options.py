"""nn.Embedding options that change what autograd returns: ``sparse=True`` (sparse gradients)
and ``scale_grad_by_freq=True`` (gradients divided by word counts within the batch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import hessfree
from hessfree import queries
from hessfree.errors import InputError

Q = dict(progress=False)


class Bag(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 4, **kw)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(self.emb(x).mean(1))


def data():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randint(0, 11, (20, 5), generator=g), torch.randint(0, 3, (20,), generator=g)
    return TensorDataset(X, y), TensorDataset(X[:6].clone(), y[:6].clone())


def per_sample_grads(model, ds):
    rows = []
    for i in range(len(ds)):
        x, y = ds[i]
        loss = nn.functional.cross_entropy(model(x[None]), y[None])
        rows.append(torch.cat([g.to_dense().reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def test_sparse_embedding_scores_are_exact():
    train, target = data()
    model = Bag(sparse=True).double()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
    G, T = per_sample_grads(model, train), per_sample_grads(model, target)
    f64 = dict(dtype=torch.float64, **Q)
    checks = [
        (hessfree.self_influence(run, train, **f64).values, (G * G).sum(1)),
        (hessfree.influence(run, train, target, **f64).values, G @ T.mean(0)),
        (hessfree.pairwise_influence(run, train, target, **f64).values, T @ G.T),
        (hessfree.outlier_scores(run, train, detector="l2", params="all", **f64).values, G.norm(dim=1)),
    ]
    for got, want in checks:
        want = want.detach().numpy()
        assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()


def test_sparse_embedding_trains_and_tracks_like_a_dense_one():
    train, val = data()
    runs = [hessfree.fit(Bag(**kw).double(), train, lr=0.1, epochs=2, batch_size=5, record="every_step", **Q)
            for kw in ({"sparse": True}, {})]
    last = len(runs[0]) - 1
    assert torch.allclose(runs[0].checkpoint_state(last)["emb.weight"], runs[1].checkpoint_state(last)["emb.weight"],
                          rtol=0, atol=1e-14)
    d = [hessfree.dit(r, train, queries.ValLoss(val), **Q).values for r in runs]
    np.testing.assert_allclose(d[0], d[1], rtol=1e-10, atol=1e-15)


def test_frequency_scaled_embedding_is_refused_for_target_influence_only():
    train, target = data()
    model = Bag(scale_grad_by_freq=True).double()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
    with pytest.raises(InputError, match="scale_grad_by_freq"):
        hessfree.influence(run, train, target, dtype=torch.float64, **Q)
    # without the layer in params= the target gradient is exact again
    G, T = per_sample_grads(model, train), per_sample_grads(model, target)
    got = hessfree.influence(run, train, target, params=["lin"], dtype=torch.float64, **Q).values
    want = (G[:, -15:] @ T[:, -15:].mean(0)).detach().numpy()  # lin.weight (12) and lin.bias (3) come last
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    # per-sample scores need no target gradient: they stay exact (each sample's own word counts)
    s = hessfree.self_influence(run, train, dtype=torch.float64, **Q).values
    assert np.abs(s - (G * G).sum(1).numpy()).max() <= 1e-12 * (G * G).sum(1).max().item()
