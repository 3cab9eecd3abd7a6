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
from torch.utils.data import TensorDataset

import hessfree
from hessfree.errors import InputError
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
    for pair, fn in ((False, lambda: hessfree.self_influence(run, data, params=params, batch_size=7, **Q)),
                     (True, lambda: hessfree.pairwise_influence(run, data, test, params=params, batch_size=7, **Q))):
        stacked, single = _both(monkeypatch, fn)
        # Conv2d weights differ between the checkpoints and Conv2d is not stacked: one at a time; a
        # train x test matrix over an embedding's gradients does not stack (it would not pay)
        alone = name == "cnn" or (pair and name == "tokens" and params != "last_layer")
        assert stacked.meta["checkpoints_per_pass"] == (1 if alone else len(run.checkpoints))
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
    """Conv2d with groups, no bias and 'same' padding: convolutions are never stacked."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding="same", groups=2, bias=False)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def test_conv_checkpoints_go_one_at_a_time(monkeypatch):
    data = images(24)
    run = trained_run(GroupedConv(), data)
    params = ["conv1.weight", "conv1.bias", "fc.weight", "fc.bias"]
    stacked, single = _both(monkeypatch, lambda: hessfree.self_influence(run, data, params=params, batch_size=5,
                                                                           **Q))
    assert stacked.meta["checkpoints_per_pass"] == 1
    _close(stacked, single)
    off = hessfree.self_influence(run, data, params=params, batch_size=5, stack=False, **Q)
    assert off.meta["checkpoints_per_pass"] == 1
    _close(off, single)


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


def _hand_run(model, change, learning_rates=(0.1, 0.2, 0.3, 0.4)):
    """A Run of hand-made checkpoints, one per learning rate: ``change(state, k)`` edits
    checkpoint k's tensors."""
    states = []
    for k in range(len(learning_rates)):
        st = {n: v.clone() for n, v in model.state_dict().items()}
        change(st, k)
        states.append(st)
    return hessfree.Run.from_checkpoints(model, states, list(learning_rates), loss="cross_entropy")


def test_later_group_that_cannot_stack(monkeypatch):
    """Checkpoints 0–1 differ only in Linear weights, 2–3 also in the LayerNorm: groups of two
    stack the first pair and score the second one at a time."""
    data = tabular(30)
    model = WithLayerNorm()
    torch.manual_seed(3)

    def change(st, k):
        st["fc1.weight"] += 0.1 * k
        st["fc2.bias"] -= 0.05 * k
        if k >= 2:
            st["norm.weight"] += 0.2 * k
    run = _hand_run(model, change)
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


class MeanScaled(nn.Module):
    """fc1's weight read outside fc1 (its mean scales the output): stacked, the mean mixes checkpoints."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * (1 + 0.1 * self.fc1.weight.mean())


class FirstEntry(MeanScaled):
    """Stacked, fc1.weight.flatten()[0] is checkpoint 0's entry for every checkpoint."""

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) * self.fc1.weight.flatten()[0]))


def test_every_new_set_of_stacked_layers_is_checked(monkeypatch):
    """Groups of two: checkpoints 0–1 differ only in fc2, 2–3 also in fc1 (read outside its layer).
    The first group stacks; the second brings a new stacked layer, fails its check, goes one at a
    time."""
    def change(st, k):
        st["fc2.weight"] += 0.1 * k
        if k >= 2:
            st["fc1.weight"] += 0.2 * k
    run = _hand_run(MeanScaled(), change)
    data = tabular(40)
    monkeypatch.setattr(common, "_STACK_SAMPLES", 2 * 10)
    fn = lambda: hessfree.self_influence(run, data, params=["fc2.weight", "fc2.bias"], batch_size=10, **Q)  # noqa: E731
    stacked, single = _both(monkeypatch, fn)
    assert stacked.meta["checkpoints_per_pass"] == 2
    _close(stacked, single)


def test_every_checkpoint_of_the_group_is_checked(monkeypatch):
    def change(st, k):
        st["fc1.weight"][0, 0] += 0.5 * k
        st["fc2.weight"] += 0.1 * k
    run = _hand_run(FirstEntry(), change)
    data = tabular(40)
    stacked, single = _both(monkeypatch, lambda: hessfree.self_influence(run, data, params=["fc2.weight"],
                                                                           batch_size=10, **Q))
    assert stacked.meta["checkpoints_per_pass"] == 1  # checkpoint 0's rows alone would have passed
    _close(stacked, single)


class SortsByLength(nn.Module):
    """Sorts its batch by sequence length around a Linear (as packed sequences need), then unsorts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.proj, self.head = nn.Embedding(11, 5, padding_idx=0), nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, ids):
        order = torch.argsort((ids != 0).sum(1), descending=True, stable=True)
        h = torch.tanh(self.proj(self.emb(ids[order])))[torch.argsort(order)]
        mask = (ids != 0).unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp_min(1))


def test_a_model_that_reorders_its_batch_is_caught_beyond_the_first_samples(monkeypatch):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 11, (48, 6), generator=g)
    for i in range(16, 48):  # the first 16 samples have full length: their sort is the identity
        ids[i, int(torch.randint(2, 7, (1,), generator=g)):] = 0
    data = TensorDataset(ids, torch.randint(0, 3, (48,), generator=g))

    def change(st, k):
        for n in st:
            if st[n].is_floating_point():
                st[n] += 0.3 * k * torch.randn(st[n].shape, generator=g)
    run = _hand_run(SortsByLength(), change)
    stacked, single = _both(monkeypatch, lambda: hessfree.self_influence(run, data, batch_size=16, **Q))
    assert stacked.meta["checkpoints_per_pass"] == 1
    _close(stacked, single)


def test_a_users_instance_forward_is_left_alone():
    data = tabular(40)
    run = trained_run(mlp(0), data)
    lin = run.model[0]

    def patched(x, _orig=type(lin).forward, _m=lin):
        return _orig(_m, x) * 2.0
    lin.forward = patched
    s = hessfree.self_influence(run, data, params="last_layer", batch_size=16, **Q)
    assert vars(lin).get("forward") is patched  # still the user's, after the call
    ref = hessfree.self_influence(run, data, params="last_layer", batch_size=16, stack=False, **Q)
    _close(s, ref)
    assert s.meta["checkpoints_per_pass"] == 1


def test_float16_group_sums_do_not_overflow_the_finite_check(monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    run = _hand_run(model, lambda st, k: [v.add_(0.01 * k) for v in st.values()])
    X = torch.randn(32, 6)
    X = 60 * X / X.norm(dim=1, keepdim=True)
    X[5] *= 2.5  # each checkpoint's squared norm fits in float16, their sum over 4 does not
    data = TensorDataset(X, torch.randint(0, 3, (32,)))
    stacked, single = _both(monkeypatch, lambda: hessfree.self_influence(run, data, batch_size=16, dtype=torch.float16,
                                                                           progress=False))
    assert stacked.meta["checkpoints_per_pass"] == 4
    _close(stacked, single, 1e-3)


def test_stack_must_be_a_bool():
    data = tabular(10)
    run = trained_run(mlp(0), data)
    with pytest.raises(InputError, match="stack must be"):
        hessfree.self_influence(run, data, stack="yes", **Q)


class SequenceFirstSometimes(nn.Module):
    """Runs its Linear sequence-first for batches holding a token id 10 (the same per-sample
    result either way); stacked, such a batch cannot go through the stacked Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.proj, self.head = nn.Embedding(11, 5), nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, ids):
        e = self.emb(ids)
        if bool((ids == 10).any()):
            h = self.proj(e.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.proj(e)
        return self.head(torch.tanh(h).mean(1))


def _sometimes_sequence_first(n_checkpoints=4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 10, (48, 6), generator=g)
    ids[40, 2] = 10  # not among the 16 check samples (positions 0, 3, 6, …, 38, 41, 44, 47)
    data = TensorDataset(ids, torch.randint(0, 3, (48,), generator=g))
    def change(st, k):
        for n in st:
            st[n] += 0.2 * k * torch.randn(st[n].shape, generator=g)
    return _hand_run(SequenceFirstSometimes(), change, [0.1] * n_checkpoints), data


def test_a_stacked_group_that_fails_part_way(monkeypatch, caplog):
    """The check samples (spread over the data) pass; a later batch cannot be stacked. Self-influence
    scores that group again one checkpoint at a time, and every group after it too (one warning);
    pairwise does the same when the test batches fail, else says to pass stack=False."""
    run, data = _sometimes_sequence_first(12)
    monkeypatch.setattr(common, "_STACK_SAMPLES", 4 * 16)  # groups of 4
    with caplog.at_level("WARNING", logger="hessfree.methods.common"):
        stacked, single = _both(monkeypatch, lambda: hessfree.self_influence(run, data, batch_size=16, **Q))
    assert stacked.meta["checkpoints_per_pass"] == 1  # the group that failed is not counted as stacked
    assert sum("failed part-way" in r.getMessage() for r in caplog.records) == 1
    _close(stacked, single)
    sub = torch.utils.data.Subset
    lin = ["proj.weight", "proj.bias", "head.weight", "head.bias"]  # pairwise stacks Linear layers only
    with pytest.raises(RuntimeError, match="stack=False"):
        hessfree.pairwise_influence(run, data, sub(data, [0, 1]), params=lin, batch_size=16, **Q)
    first_bad = hessfree.pairwise_influence(run, data, sub(data, [40, 1]), params=lin, batch_size=16,
                                            **Q)  # test batch fails
    ref = hessfree.pairwise_influence(run, data, sub(data, [40, 1]), params=lin, batch_size=16, stack=False, **Q)
    assert ref.meta["checkpoints_per_pass"] == 1
    _close(first_bad, ref)


class DetachedScale(nn.Module):
    """A detached statistic of fc1's weight scales the output: the engine's sum check cannot see
    it (no gradient flows), only the stacked check can."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * (1 + self.fc1.weight.detach().abs().mean())


def test_every_group_is_checked(monkeypatch):
    """The first group's checkpoints barely differ (its check passes in float32); later groups
    differ a lot and must be checked again, not trusted because the same layers passed before."""
    def change(st, k):
        st["fc1.weight"] += 1e-7 * k if k < 4 else 0.5 * (k - 3)
        st["fc2.weight"] += 0.1 * k
    run = _hand_run(DetachedScale(), change, [0.1] * 8)
    data = tabular(40)
    monkeypatch.setattr(common, "_STACK_SAMPLES", 4 * 10)  # groups of 4
    s = hessfree.self_influence(run, data, batch_size=10, progress=False)
    ref = hessfree.self_influence(run, data, batch_size=10, progress=False, stack=False)
    assert s.meta["checkpoints_per_pass"] == 4  # the first group stacked
    _close(s, ref, 1e-6)
    s64 = hessfree.self_influence(run, data, batch_size=10, **Q)  # float64: even the 1e-7 mixing is refused
    assert s64.meta["checkpoints_per_pass"] == 1


# --- models that are row-wise by construction skip the checks (stacked.rowwise_by_construction)
def _not_called(*_a, **_k):
    raise AssertionError("the stacking check ran for a model that is row-wise by construction")


def test_a_rowwise_sequential_skips_both_checks_and_stays_exact(monkeypatch):
    data = tabular(40)
    run = trained_run(mlp(0), data)
    names = [n for n, _ in run.model.named_parameters()]
    ref = sum(lr * g.pow(2).sum(1) for lr, g in zip(run.learning_rates, brute_grads(run, data, names)))
    monkeypatch.setattr(common.Scorer, "_check_batch", _not_called)
    monkeypatch.setattr("hessfree.grads.engine._sums_to", _not_called)
    s = hessfree.self_influence(run, data, batch_size=16, **Q)
    assert s.meta["checkpoints_per_pass"] == len(run.checkpoints)
    assert rel_err(s.values, ref) <= 1e-9


def _seq():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(6, 5), nn.GELU()), nn.Dropout(0.3), nn.Linear(5, 3))


class _Sub(nn.Sequential):
    pass


@pytest.mark.parametrize("change", ["none", "subclass", "flatten0", "hook", "pre_hook", "instance_forward",
                                    "tied", "layernorm", "conv", "custom_module", "global_hook", "train_dropout",
                                    "instance_call_impl", "class_forward", "compiled", "tied_bias"])
def test_rowwise_by_construction(change, monkeypatch):
    from hessfree.grads.stacked import rowwise_by_construction

    m = _seq()
    handle = None
    if change == "subclass":
        m = _Sub(*m)
    elif change == "flatten0":
        m[0] = nn.Flatten(0)
    elif change == "hook":
        m[3].register_forward_hook(lambda mod, i, o: o)
    elif change == "pre_hook":
        m[1].register_forward_pre_hook(lambda mod, i: i)
    elif change == "instance_forward":
        m[1][1].forward = lambda x: x
    elif change == "tied":  # one Parameter registered in two layers
        m.append(nn.Linear(3, 3))
        m.append(nn.Linear(3, 3))
        m[5].weight = m[4].weight
    elif change == "tied_bias":
        m.append(nn.Linear(3, 3))
        m[4].bias = m[3].bias
    elif change == "layernorm":
        m.insert(2, nn.LayerNorm(5))
    elif change == "conv":
        m.insert(0, nn.Conv2d(1, 1, 1))
    elif change == "custom_module":
        m[1] = TokenModel()
    elif change == "global_hook":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: o)
    elif change == "train_dropout":
        m.train()
    elif change == "instance_call_impl":  # would bypass the engine's hooks on that layer
        m[3]._call_impl = lambda x, _m=m[3]: F.linear(x, _m.weight, _m.bias)
    elif change == "class_forward":  # a patched class forward may mix rows
        monkeypatch.setattr(nn.GELU, "forward", lambda self, x: torch.tanh(x - x.mean(0, keepdim=True)))
    elif change == "compiled":
        m[3]._compiled_call_impl = m[3]._call_impl
    if change != "train_dropout":
        m.eval()
    try:
        assert rowwise_by_construction(m) is (change == "none")
    finally:
        if handle is not None:
            handle.remove()


def test_a_custom_task_or_model_keeps_the_checks(monkeypatch):
    from hessfree.grads.engine import GradientEngine
    from hessfree.tasks import CrossEntropy

    class MyCE(CrossEntropy):
        pass

    names = [n for n, _ in mlp(0).named_parameters()]
    for model, task, expect in ((mlp(0), CrossEntropy(), True), (mlp(0), MyCE(), False),
                                (TokenModel(), CrossEntropy(), False)):
        names = [n for n, _ in model.named_parameters()]
        with GradientEngine(model, task, names) as eng:
            assert eng.exact_by_construction is expect
            assert eng.can_stack is expect  # before any batch: proven, or waiting for the first-batch check
