"""One output residual (softmax − e_y, σ − y) for every closed form, accurate in float32 for
confident samples, where forming p_y − 1 directly cancels."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import hessfree
from hessfree.grads.closed_form import residual_norm
from hessfree.tasks import BCEWithLogits, CrossEntropy, output_residual

Q = dict(progress=False)
LOGITS = torch.tensor([[20.0, 0.0, 0.0], [0.0, 30.0, -5.0], [1.0, 2.0, 3.0], [-3.0, 12.0, 12.0]])
LABELS = torch.tensor([0, 1, 2, 1])


def reference(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64, the label's entry as −(probability off the label) in float64 too."""
    p = torch.softmax(z.double(), 1)
    r = p.clone()
    r[torch.arange(len(y)), y] = -p.scatter(1, y[:, None], 0.0).sum(1)
    return r


def test_cross_entropy_residual_float32_matches_float64():
    r = output_residual(LOGITS, LABELS, CrossEntropy())
    ref = reference(LOGITS, LABELS)
    assert torch.allclose(r.double(), ref, rtol=1e-6, atol=0)
    # the confident sample: its norm is 5.05e-9, not the 2.9e-9 (or 0) of p_y − 1 formed in float32
    assert float(r[0].norm()) == pytest.approx(5.05e-9, rel=1e-2)
    naive = torch.softmax(LOGITS, 1) - nn.functional.one_hot(LABELS, 3).float()
    assert abs(float(naive[0].norm()) - 5.05e-9) > 1e-9  # the cancellation this guards against
    assert torch.allclose(residual_norm(LOGITS, LABELS, CrossEntropy(), "l2").double(), ref.norm(dim=1), rtol=1e-6)
    assert torch.allclose(residual_norm(LOGITS, LABELS, CrossEntropy(), "l1").double(), ref.abs().sum(1), rtol=1e-6)


def test_bce_residual_float32_matches_float64():
    z = torch.tensor([20.0, -20.0, 0.3, 25.0, -17.0])
    y = torch.tensor([1.0, 0.0, 1.0, 0.25, 1.0])
    r = output_residual(z, y, BCEWithLogits())
    ref = torch.sigmoid(z.double()) - y.double()
    assert torch.allclose(r.double(), ref, rtol=1e-6, atol=0)
    assert float(r[0]) == pytest.approx(-2.06e-9, rel=1e-2) and float(torch.sigmoid(z[0]) - 1) == 0.0
    assert torch.allclose(residual_norm(z, y, BCEWithLogits(), "l2").double(), ref.abs(), rtol=1e-6)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_every_consumer_is_accurate_for_confident_samples(loss):
    """The engine (self-influence), OGA's closed form and EL2N, in float32 against float64, on a
    model whose last layer makes confident logits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    classes = 3 if loss == "cross_entropy" else 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes))
    with torch.no_grad():
        model[2].weight.mul_(40.0)
        out = model(x)
    y = out.argmax(1) if classes > 1 else (out.reshape(-1) > 0).float()  # labels the model is sure of
    data = TensorDataset(x, y)
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss=loss)
    for fn in (lambda **kw: hessfree.self_influence(run, data, **kw, **Q),
               lambda **kw: hessfree.outlier_scores(run, data, detector="l2", **kw, **Q),
               lambda **kw: hessfree.baselines.el2n(run, data, **kw, **Q)):
        lo, hi = fn(dtype=torch.float32).values, fn(dtype=torch.float64).values
        assert (hi > 0).all() and (hi < 1e-5).any()  # confident samples are there
        assert abs(lo - hi).max() <= 5e-5 * abs(hi).max() and (abs(lo - hi) <= 1e-4 * abs(hi) + 1e-30).all()
