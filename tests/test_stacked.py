"""Several checkpoints in one pass (hessfree.grads.stacked) give the same scores as one at a time.

Every test scores twice: with stacking (the default) and with it switched off by making the
group size 1, and checks both the values and which path ran (``checkpoints_per_pass``).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessfree
from hessfree.methods import common
from helpers import SmallCNN, TokenModel, brute_grads, images, mlp, rel_err, tabular, tokens, trained_run

Q = dict(progress=False, dtype=torch.float64)


def _both(monkeypatch, fn):
    stacked = fn()
    with monkeypatch.context() as m:
        m.setattr(common, "_STACK_SAMPLES", 0)  # group size 1: one checkpoint per pass
        single = fn()
    assert single.meta["checkpoints_per_pass"] == 1
    return stacked, single


def _close(a, b, tol=1e-12):
    a, b = torch.as_tensor(a.values), torch.as_tensor(b.values)
    assert float((a - b).abs().max()) <= tol * float(b.abs().max())


CASES = {
    "mlp": (lambda: mlp(0), lambda: tabular(40)),
    "cnn": (SmallCNN, lambda: images(30)),
    "tokens": (TokenModel, lambda: tokens(30)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("params", ["all", "last_layer", "first"])
def test_stacked_equals_one_at_a_time(monkeypatch, name, params):
    make_model, make_data = CASES[name]
    data = make_data()
    run = trained_run(make_model(), data)
    assert len(run.checkpoints) >= 4
    if params == "first":
        params = [next(iter(dict(run.model.named_parameters())))]
    test = torch.utils.data.Subset(data, list(range(0, len(data), 3)))
    for fn in (lambda: hessfree.self_influence(run, data, params=params, batch_size=7, **Q),
               lambda: hessfree.pairwise_influence(run, data, test, params=params, batch_size=7, **Q)):
        stacked, single = _both(monkeypatch, fn)
        assert stacked.meta["checkpoints_per_pass"] == len(run.checkpoints)
        _close(stacked, single)


def test_stacked_matches_bruteforce_and_float32(monkeypatch):
    data = tabular(40)
    run = trained_run(mlp(0), data)
    names = [n for n, _ in run.model.named_parameters()]
    ref = sum(lr * g.pow(2).sum(1) for lr, g in zip(run.learning_rates, brute_grads(run, data, names)))
    s64 = hessfree.self_influence(run, data, batch_size=16, **Q)
    assert s64.meta["checkpoints_per_pass"] > 1
    assert rel_err(s64.values, ref) <= 1e-9
    s32, one32 = _both(monkeypatch, lambda: hessfree.self_influence(run, data, batch_size=16, progress=False))
    assert rel_err(s32.values, ref) <= 5e-5
    _close(s32, one32, 1e-5)


class GroupedConv(nn.Module):
    """Conv2d with groups, no bias and 'same' padding (stacked as one grouped convolution)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding="same", groups=2, bias=False)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def test_grouped_conv_stacks(monkeypatch):
    data = images(24)
    run = trained_run(GroupedConv(), data)
    params = ["conv1.weight", "conv1.bias", "fc.weight", "fc.bias"]  # grouped conv2: unselected, still stacked
    stacked, single = _both(monkeypatch, lambda: hessfree.self_influence(run, data, params=params, batch_size=5,
                                                                           **Q))
    assert stacked.meta["checkpoints_per_pass"] > 1
    _close(stacked, single)


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def test_differing_layernorm_scores_one_at_a_time(monkeypatch):
    data = tabular(30)
    run = trained_run(WithLayerNorm(), data)
    for params in ("all", "last_layer"):  # LayerNorm on the vmap fallback, or merely trained
        stacked, single = _both(monkeypatch, lambda: hessfree.self_influence(run, data, params=params, **Q))
        assert stacked.meta["checkpoints_per_pass"] == 1
        _close(stacked, single)


def test_later_group_that_cannot_stack(monkeypatch):
    """Checkpoints 0–1 differ only in Linear weights, 2–3 also in the LayerNorm: groups of two
    stack the first pair and score the second one at a time."""
    data = tabular(30)
    model = WithLayerNorm()
    torch.manual_seed(3)
    states = []
    for k in range(4):
        s = {n: v.clone() for n, v in model.state_dict().items()}
        s["fc1.weight"] += 0.1 * k
        s["fc2.bias"] -= 0.05 * k
        if k >= 2:
            s["norm.weight"] += 0.2 * k
        states.append(s)
    run = hessfree.Run.from_checkpoints(model, states, [0.1, 0.2, 0.3, 0.4], loss="cross_entropy")
    monkeypatch.setattr(common, "_STACK_SAMPLES", 2 * 10)
    fn = lambda: hessfree.self_influence(run, data, params="last_layer", batch_size=10, **Q)  # noqa: E731
    stacked, single = _both(monkeypatch, fn)
    assert stacked.meta["checkpoints_per_pass"] == 2
    _close(stacked, single)


class SequenceFirst(nn.Module):
    """A Linear fed (T, B, d): its first dimension is not the batch, so it cannot stack."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.proj = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.emb(ids).transpose(0, 1)))  # (T, B, 7)
        return self.head(h.mean(0))


class FunctionalWeight(nn.Module):
    """An unselected layer's weight used outside its module (F.linear in the forward)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(F.linear(x, self.fc1.weight, self.fc1.bias)))


class WeightSum(nn.Module):
    """An unselected weight read outside its module without a shape error: stacked, its sum would
    mix the checkpoints, which only the first-batch comparison can see."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * (1 + 0.1 * self.fc1.weight.sum().tanh())


@pytest.mark.parametrize("which", ["sequence_first", "functional_weight", "weight_sum"])
def test_unstackable_forward_is_detected(monkeypatch, which):
    if which == "sequence_first":
        data, model, params = tokens(30), SequenceFirst(), "all"
    else:
        model = FunctionalWeight() if which == "functional_weight" else WeightSum()
        data, params = tabular(30), ["fc2.weight", "fc2.bias"]
    run = trained_run(model, data)
    stacked, single = _both(monkeypatch, lambda: hessfree.self_influence(run, data, params=params, **Q))
    assert stacked.meta["checkpoints_per_pass"] == 1
    _close(stacked, single)


def test_stacked_reruns_bit_identical():
    data = tabular(40)
    run = trained_run(mlp(0), data)
    a = hessfree.self_influence(run, data, batch_size=16, progress=False)
    b = hessfree.self_influence(run, copy.deepcopy(data), batch_size=16, progress=False)
    assert a.meta["checkpoints_per_pass"] > 1
    assert (a.values == b.values).all()
