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
from hessfree.grads.select import select_parameters
from helpers import brute_grads

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


def last_grads(run, ds):
    """(N, P) per-sample gradients over every trainable parameter at the run's last checkpoint."""
    return brute_grads(run, ds, select_parameters(run.model))[-1]


def test_sparse_embedding_scores_are_exact():
    train, target = data()
    model = Bag(sparse=True).double()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
    G, T = last_grads(run, train), last_grads(run, target)
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
    G, T = last_grads(run, train), last_grads(run, target)
    got = hessfree.influence(run, train, target, params=["lin"], dtype=torch.float64, **Q).values
    want = (G[:, -15:] @ T[:, -15:].mean(0)).detach().numpy()  # lin.weight (12) and lin.bias (3) come last
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    # per-sample scores need no target gradient: they stay exact (each sample's own word counts)
    s = hessfree.self_influence(run, train, dtype=torch.float64, **Q).values
    assert np.abs(s - (G * G).sum(1).numpy()).max() <= 1e-12 * (G * G).sum(1).max().item()


class TiedLM(nn.Module):
    """A bag-of-words model whose output layer is the embedding matrix (tied weights); ``head_first``
    registers the head before the embedding, so the tied tensor is named 'head.weight'."""

    def __init__(self, head_first: bool = False, **kw):
        super().__init__()
        torch.manual_seed(0)
        if head_first:
            self.head = nn.Linear(4, 11, bias=False)
            self.emb = nn.Embedding(11, 4, **kw)
        else:
            self.emb = nn.Embedding(11, 4, **kw)
            self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x).mean(1)))


def lm_data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randint(0, 11, (12, 5), generator=g), torch.randint(0, 11, (12,), generator=g))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over embedding_bag
def test_sparse_embeddings_through_the_vmap_fallback_and_tied_weights():
    train, _ = data()
    f64 = dict(dtype=torch.float64, **Q)
    model = Bag(sparse=True).double()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
    G = last_grads(run, train)
    np.testing.assert_allclose(hessfree.self_influence(run, train, ghost=False, **f64).values,
                               (G * G).sum(1).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(hessfree.outlier_scores(run, train, detector="l2", params="all", gradient_path="vmap",
                                                       **f64).values, G.norm(dim=1).detach().numpy(), rtol=1e-12)
    assert model.emb.sparse  # put back after scoring
    lm, lm_ds = TiedLM(sparse=True).double(), lm_data()
    run = hessfree.Run.from_checkpoints(lm, [lm.state_dict()], [1.0], loss="cross_entropy")
    G = last_grads(run, lm_ds)
    np.testing.assert_allclose(hessfree.self_influence(run, lm_ds, **f64).values, (G * G).sum(1).detach().numpy(),
                               rtol=1e-12)
    bag = nn.Sequential(nn.EmbeddingBag(11, 4, mode="mean", sparse=True), nn.Linear(4, 3)).double()
    run = hessfree.fit(bag, train, lr=0.1, epochs=1, batch_size=5, record="every_step", **Q)
    G = last_grads(run, train)
    np.testing.assert_allclose(hessfree.self_influence(run, train, checkpoints="last", **f64).values,
                               run.learning_rates[-1] * (G * G).sum(1).detach().numpy(), rtol=1e-12)
    with pytest.raises(InputError, match="no double backward for nn.EmbeddingBag"):
        hessfree.dit(run, train, queries.ValLoss(data()[1]), **Q)


def test_frequency_scaling_is_found_through_tied_weights_and_embedding_bags():
    lm_ds, target = lm_data(), TensorDataset(*(t[:4].clone() for t in lm_data().tensors))
    for model, params in ((TiedLM(head_first=True, scale_grad_by_freq=True), "all"),
                          (TiedLM(head_first=True, scale_grad_by_freq=True), ["head.weight"]),
                          (nn.Sequential(nn.EmbeddingBag(11, 4, scale_grad_by_freq=True), nn.Linear(4, 11)), "all")):
        run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
        with pytest.raises(InputError, match="scale_grad_by_freq"):
            hessfree.influence(run, lm_ds, target, params=params, **Q)
    model = TiedLM(scale_grad_by_freq=True)
    run = hessfree.fit(model, lm_ds, lr=0.1, epochs=1, batch_size=4, record="every_step", **Q)
    with pytest.raises(InputError, match="dit is not exact .*scale_grad_by_freq"):
        hessfree.dit(run, lm_ds, queries.ValLoss(target), **Q)


def test_gaussian_ensemble_keeps_tied_weights_tied():
    lm, lm_ds = TiedLM(), lm_data()
    run = hessfree.Run.from_checkpoints(lm, [lm.state_dict()], [1.0], loss="cross_entropy")
    s = hessfree.ensemble(hessfree.self_influence, members=3, perturbation="gaussian", sigma=0.01)(run, lm_ds, **Q)
    assert np.isfinite(s.values).all()


def test_a_non_finite_tied_weight_is_not_called_a_mismatch():
    lm = TiedLM()
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    state["emb.weight"][0, 0] = state["head.weight"][0, 0] = float("nan")
    hessfree.Run.from_checkpoints(lm, [state], [1.0], loss="cross_entropy")  # equal, NaN included: accepted
