"""Models that write into their inputs in place (``x /= 255``, a first ``ReLU(inplace=True)``).

hessfree hands models views of the user's TensorDataset and runs several passes over one batch;
such a model must neither change the dataset nor see an already-changed batch. Every score must
equal that of the same model written out of place.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import hessfree
from hessfree import queries
from hessfree.errors import InputError

Q = dict(progress=False)


class Halve(nn.Module):
    """x ↦ x / 2, in place or not; the rest is an MLP (so the engine takes the hook path)."""

    def __init__(self, inplace: bool, d: int = 5, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.inplace = inplace
        self.body = nn.Sequential(nn.Linear(d, 7), nn.Tanh())
        self.head = nn.Linear(7, classes)

    def forward(self, x):
        x = x.div_(2) if self.inplace else x / 2
        return self.head(self.body(x))


def relu_first(inplace: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.ReLU(inplace=inplace), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def data(n: int = 40, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def run_of(model: nn.Module) -> hessfree.Run:
    model = model.double()
    return hessfree.Run.from_checkpoints(model, [copy.deepcopy(model.state_dict())] * 2, [0.5, 0.25],
                                         loss="cross_entropy")


SCORERS = {
    "self_influence": lambda run, ds: hessfree.self_influence(run, ds, dtype=torch.float64, batch_size=16, **Q),
    "self_influence_vmap": lambda run, ds: hessfree.self_influence(run, ds, dtype=torch.float64, batch_size=16,
                                                                   ghost=False, **Q),
    "influence": lambda run, ds: hessfree.influence(run, ds, data(12, 1), dtype=torch.float64, batch_size=16, **Q),
    "oga_l2": lambda run, ds: hessfree.outlier_scores(run, ds, detector="l2", dtype=torch.float64, batch_size=16, **Q),
    "oga_l1_vmap": lambda run, ds: hessfree.outlier_scores(run, ds, detector="l1", gradient_path="vmap",
                                                           dtype=torch.float64, batch_size=16, **Q),
    "oga_iforest": lambda run, ds: hessfree.outlier_scores(run, ds, detector="iforest", dtype=torch.float64,
                                                           batch_size=16, **Q),
    "loss": lambda run, ds: hessfree.baselines.loss(run, ds, dtype=torch.float64, batch_size=16, **Q),
}


@pytest.mark.parametrize("make", [Halve, relu_first], ids=["x.div_(2)", "ReLU(inplace=True) first"])
@pytest.mark.parametrize("scorer", list(SCORERS))
def test_an_inplace_model_leaves_the_dataset_alone_and_scores_as_its_out_of_place_twin(make, scorer):
    ds = data()
    if make is relu_first:  # negative inputs are what ReLU(inplace=True) would overwrite
        assert bool((ds.tensors[0] < 0).any())
    saved = [t.clone() for t in ds.tensors]
    got = SCORERS[scorer](run_of(make(True)), ds)
    assert all(torch.equal(a, b) for a, b in zip(ds.tensors, saved)), "the dataset was changed"
    want = SCORERS[scorer](run_of(make(False)), data())
    np.testing.assert_allclose(got.values, want.values, rtol=1e-12, atol=1e-14)


def test_fit_and_dit_with_an_inplace_model():
    ds = TensorDataset(*(t.float() for t in data(32).tensors[:1]), data(32).tensors[1])
    saved = ds.tensors[0].clone()
    runs = []
    for inplace in (True, False):
        model = Halve(inplace)
        runs.append(hessfree.fit(model, ds, lr=0.1, epochs=2, batch_size=8, record="every_step", **Q))
        assert torch.equal(ds.tensors[0], saved), "fit changed the dataset"
    for a, b in zip(runs[0].checkpoints, runs[1].checkpoints):
        sa, sb = a.state(), b.state()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    val = queries.ValLoss(TensorDataset(ds.tensors[0][:8].clone(), ds.tensors[1][:8].clone()))
    d = [hessfree.dit(r, ds, val, window="all", **Q).values for r in runs]
    assert torch.equal(ds.tensors[0], saved), "dit changed the dataset"
    np.testing.assert_allclose(d[0], d[1], rtol=1e-10, atol=1e-14)


class HalveLater(Halve):
    """Writes into its input only for batches whose first feature exceeds 2."""

    def forward(self, x):
        x = x.div_(2) if bool((x[:, 0] > 2).any()) else x / 2
        return self.head(self.body(x))


def test_a_model_that_writes_into_later_batches_only_is_refused():
    ds = data()
    X = ds.tensors[0]
    X[:16, 0] = X[:16, 0].clamp(max=1.0)
    X[30, 0] = 3.0  # the batch holding sample 30 is written into; the first batch is not
    with pytest.raises(InputError, match="later batch"):
        hessfree.self_influence(run_of(HalveLater(True)), ds, dtype=torch.float64, batch_size=16, **Q)
