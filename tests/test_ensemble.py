"""The perturbation ensemble: members=1 is the base, reruns are bit-identical, each member's
perturbation is the same on both sides of an inner product, and detection quality holds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hessfree
from hessfree.errors import InputError
from helpers import images, SmallCNN, mlp, tabular, trained_run


@pytest.fixture(scope="module")
def setting():
    data = tabular(n=30, seed=0)
    return trained_run(mlp(0), data), data


def test_one_member_is_the_base(setting):
    run, data = setting
    base = hessfree.self_influence(run, data, progress=False)
    for pert in ("dropout", "gaussian"):
        one = hessfree.ensemble(hessfree.self_influence, members=1, perturbation=pert)(run, data, progress=False)
        assert np.array_equal(one.values, base.values)


@pytest.mark.parametrize("pert", ["dropout", "gaussian"])
def test_reruns_bit_identical_and_seed_matters(setting, pert):
    run, data = setting
    kw = dict(members=3, perturbation=pert, rate=0.3, sigma=0.05)
    a = hessfree.ensemble(hessfree.self_influence, seed=7, **kw)(run, data, progress=False)
    b = hessfree.ensemble(hessfree.self_influence, seed=7, **kw)(run, data, progress=False)
    c = hessfree.ensemble(hessfree.self_influence, seed=8, **kw)(run, data, progress=False)
    base = hessfree.self_influence(run, data, progress=False)
    assert np.array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values) and not np.allclose(a.values, base.values)
    assert a.meta["ensemble"]["members"] == 3 and a.meta["base_method"] == "self_influence"
    # the model is left as it was: no hooks, no noise
    again = hessfree.self_influence(run, data, progress=False)
    assert np.array_equal(again.values, base.values)


@pytest.mark.parametrize("pert", ["dropout", "gaussian"])
def test_same_perturbation_on_both_sides(pert):
    """diag(pairwise(train, train)) = self-influence only if each member perturbs both sides alike."""
    torch.manual_seed(0)
    data = images(n=12, seed=0)
    run = trained_run(SmallCNN(), data)
    kw = dict(members=3, perturbation=pert, rate=0.5, sigma=0.05, seed=1)
    s = hessfree.ensemble(hessfree.self_influence, **kw)(run, data, dtype=torch.float64, progress=False)
    p = hessfree.ensemble(hessfree.pairwise_influence, **kw)(run, data, data, dtype=torch.float64, progress=False)
    base = hessfree.self_influence(run, data, dtype=torch.float64, progress=False)
    assert not np.allclose(s.values, base.values)  # the perturbation did something
    assert np.allclose(np.diag(p.values), s.values, rtol=1e-10)


def test_zscore_combination(setting):
    run, data = setting
    kw = dict(members=3, rate=0.5, seed=3)
    z = hessfree.ensemble(hessfree.self_influence, combine="zscore", **kw)(run, data, progress=False)
    m = hessfree.ensemble(hessfree.self_influence, combine="mean", **kw)(run, data, progress=False)
    assert abs(z.values.mean()) < 1e-9  # the mean of per-member z-scores is centred
    assert np.corrcoef(z.values, m.values)[0, 1] > 0.9 and not np.allclose(z.values, m.values)


def test_target_influence_uses_the_member_perturbation(setting):
    """With the target = the training loss itself, Σ_i score_i = N·||q||² ≥ 0 for every member only
    when target and training gradients see the same perturbation; we check the ensemble mean of it."""
    run, data = setting
    one_ckpt = hessfree.Run.from_checkpoints(run.model, [run.checkpoint_state(-1)], [1.0])
    kw = dict(members=4, perturbation="dropout", rate=0.5, seed=2)
    infl = hessfree.ensemble(hessfree.influence, **kw)(one_ckpt, data, hessfree.targets.Loss(data),
                                                       dtype=torch.float64, progress=False)
    pair = hessfree.ensemble(hessfree.pairwise_influence, **kw)(one_ckpt, data, data, dtype=torch.float64,
                                                                progress=False)
    assert np.allclose(infl.values, pair.values.mean(0), rtol=1e-9)


def test_ensemble_keeps_detection_quality_on_the_demo():
    from hessfree.workflows.demo import digits_noisy

    d = digits_noisy(0.1, 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    run = hessfree.fit(model, d["train"], lr=0.05, epochs=30, batch_size=32, checkpoint_every=225, seed=0,
                       progress=False)
    base = hessfree.metrics.auroc(hessfree.self_influence(run, d["train"], progress=False), d["flipped"])
    ens = hessfree.metrics.auroc(hessfree.ensemble(hessfree.self_influence)(run, d["train"], progress=False),
                                 d["flipped"])
    assert ens >= base - 0.005


def test_bad_arguments(setting):
    run, data = setting
    for kw in (dict(members=0), dict(perturbation="mixup"), dict(combine="median"), dict(rate=1.5),
               dict(perturbation="gaussian", sigma=0)):
        with pytest.raises(InputError):
            hessfree.ensemble(hessfree.self_influence, **kw)
    with pytest.raises(InputError, match="hessfree.Run"):
        hessfree.ensemble(hessfree.self_influence)(data, data)
