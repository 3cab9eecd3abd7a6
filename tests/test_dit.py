"""Dynamic Influence Tracker: against a forward unroll of the linearised recursion with explicit
Hessians, the finite-difference and leave-one-out oracles, window algebra, recording and replay,
patterns, and bad input."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

import hessfree
from hessfree import queries
from hessfree.errors import InputError, LabelError, RunDirectoryError
from hessfree.methods import dit as dit_mod
from hessfree.run import replay_states, unflatten
from helpers import Crashing

Q = dict(progress=False)


def data64(n=24, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (X[:, 0] - 0.5 * X[:, 1] + 0.4 * torch.randn(n, generator=g, dtype=torch.float64) > 0).double()
    return TensorDataset(X, y)


def mlp64(seed=0, d=3, h=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 1)).double()


def record(model, train, record="every_step", epochs=3, batch_size=6, l2=0.01, **kw):
    return hessfree.fit(model, train, loss="bce", lr=lambda t: 0.8 / np.sqrt(t + 1), epochs=epochs,
                        batch_size=batch_size, seed=0, record=record, l2=l2, progress=False, **kw)


@pytest.fixture(scope="module")
def setup():
    train, val = data64(), data64(n=15, seed=1)
    run = record(mlp64(), train)
    return run, train, val


# ------------------------------------------------------------------------------ brute force
def forward_unroll(run, train, query_fn, t1, t2, mode):
    """I_j by propagating δ_j forwards with explicitly formed Hessians (float64)."""
    traj, log = run.trajectory, run.step_log
    model = copy.deepcopy(run.model).double()
    names, shapes = traj.names, traj.shapes
    X, y = train.tensors
    alpha = traj.l2

    def params(th):
        return dict(zip(names, unflatten(th, shapes)))

    def batch_loss(th, pos):
        out = functional_call(model, params(th), (X[pos],)).reshape(-1)
        per = nn.functional.binary_cross_entropy_with_logits(out, y[pos], reduction="none")
        return per.mean() + 0.5 * alpha * (th * th).sum()

    def sample_grad(th, j):
        th = th.detach().requires_grad_(True)
        out = functional_call(model, params(th), (X[j:j + 1],)).reshape(-1)
        li = nn.functional.binary_cross_entropy_with_logits(out, y[j:j + 1]).sum() + 0.5 * alpha * (th * th).sum()
        return torch.autograd.grad(li, th)[0]

    def q(t):
        th = traj.thetas[t].detach().requires_grad_(True)
        return torch.autograd.grad(query_fn(model, params(th)), th)[0]

    N, P = len(train), traj.thetas.shape[1]
    delta = torch.zeros(N, P, dtype=torch.float64)
    hessians = []
    start = 0 if mode == "delta" else t1
    at_t1 = delta.clone()
    for t in range(start, t2):
        if t == t1:
            at_t1 = delta.clone()
        th = traj.thetas[t]
        pos = torch.as_tensor(log.positions[t])
        H = torch.autograd.functional.hessian(lambda v: batch_loss(v, pos), th)
        hessians.append(H)
        eta = float(log.learning_rates[t])
        delta = delta - eta * delta @ H
        for j in pos.tolist():
            delta[j] += eta / len(pos) * sample_grad(th, j)
    score = delta @ q(t2)
    if mode == "delta" and t1 > 0:
        score = score - at_t1 @ q(t1)
    return score.numpy(), hessians


def val_loss_fn(val):
    X, y = val.tensors

    def f(model, params):
        out = functional_call(model, params, (X,)).reshape(-1)
        return nn.functional.binary_cross_entropy_with_logits(out, y)
    return f


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("window,mode", [((0, 12), "delta"), ((4, 11), "delta"), ((4, 11), "window_removal"),
                                         ((3, 12), "window_removal")])
def test_equals_forward_unroll_of_linearised_recursion(setup, window, mode):
    run, train, val = setup
    ref, hessians = forward_unroll(run, train, val_loss_fn(val), *window, mode)
    # the case is not trivial: indefinite and non-commuting Hessians
    assert min(float(torch.linalg.eigvalsh(H)[0]) for H in hessians) < 0
    A, B = hessians[0], hessians[-1]
    assert float((A @ B - B @ A).abs().max()) > 1e-6 * float(A.abs().max() * B.abs().max())
    s = hessfree.dit(run, train, queries.ValLoss(val), window=window, mode=mode, **Q)
    assert rel(s.values, ref) <= 1e-10


def test_windows_telescope_and_window_removal_from_zero_is_delta(setup):
    run, train, val = setup
    q = queries.ValLoss(val)
    whole = hessfree.dit(run, train, q, window=(2, 12), **Q).values
    a = hessfree.dit(run, train, q, window=(2, 7), **Q).values
    b = hessfree.dit(run, train, q, window=(7, 12), **Q).values
    assert rel(a + b, whole) <= 1e-12
    for t2 in (5, 12):
        d = hessfree.dit(run, train, q, window=(0, t2), mode="delta", **Q).values
        w = hessfree.dit(run, train, q, window=(0, t2), mode="window_removal", **Q).values
        assert rel(w, d) <= 1e-12
    assert hessfree.dit(run, train, q, **Q).meta["windows"] == [[0, 12]]


@pytest.mark.parametrize("mode", ["delta", "window_removal"])
@pytest.mark.parametrize("window", ["all", (3, 9), "epoch:2"])
def test_matches_finite_difference_oracle(setup, mode, window):
    run, train, val = setup
    q = queries.ValLoss(val)
    s = hessfree.dit(run, train, q, window=window, mode=mode, **Q)
    fd = hessfree.oracle.finite_difference(run, train, np.arange(len(train)), q, window=window, mode=mode, **Q)
    assert rel(s.values, fd) <= 1e-6


@pytest.mark.parametrize("make_query", [
    lambda val: queries.Prediction(val.tensors[0][:5], 0),
    lambda val: queries.Saliency(val.tensors[0][0], val.tensors[1][0], 1),
    lambda val: queries.Custom(lambda m: m[2].weight.pow(2).sum() + m(val.tensors[0]).mean()),
])
def test_other_queries_match_finite_difference(setup, make_query):
    run, train, val = setup
    q = make_query(val)
    s = hessfree.dit(run, train, q, window=(2, 10), **Q)
    fd = hessfree.oracle.finite_difference(run, train, np.arange(len(train)), q, window=(2, 10), **Q)
    assert rel(s.values, fd) <= 1e-6


def test_loo_replay_is_a_rerun_without_the_sample(setup):
    run, train, val = setup
    j = 5
    X, y = train.tensors
    model = mlp64()  # same initial weights
    params = list(model.parameters())
    log, alpha = run.step_log, run.trajectory.l2
    for t in range(len(log)):
        pos = [p for p in log.positions[t].tolist() if p != j]
        out = model(X[pos]).reshape(-1)
        per = nn.functional.binary_cross_entropy_with_logits(out, y[pos], reduction="none")
        obj = (per + 0.5 * alpha * sum(p.pow(2).sum() for p in params)).sum() / len(log.positions[t])
        grads = torch.autograd.grad(obj, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= float(log.learning_rates[t]) * g
    with torch.no_grad():
        fv = nn.functional.binary_cross_entropy_with_logits(model(val.tensors[0]).reshape(-1), val.tensors[1])
        f0 = nn.functional.binary_cross_entropy_with_logits(run.model(val.tensors[0]).reshape(-1), val.tensors[1])
    loo = hessfree.oracle.loo_replay(run, train, [j], queries.ValLoss(val), **Q)
    assert abs(loo[0] - float(fv - f0)) <= 1e-10 * abs(float(fv - f0)) + 1e-14


def test_loo_agrees_with_dit_on_a_small_run(setup):
    run, train, val = setup
    q = queries.ValLoss(val)
    s = hessfree.dit(run, train, q, **Q)
    loo = hessfree.oracle.loo_replay(run, train, np.arange(len(train)), q, chunk=7, **Q)
    assert hessfree.metrics.pearson(s.values, loo) > 0.99
    loo32 = hessfree.oracle.loo_replay(run, train, np.arange(len(train)), q, dtype=torch.float32, **Q)
    assert hessfree.metrics.pearson(loo32, loo) > 0.9


def test_epoch_matrix_rows_are_the_epoch_windows(setup):
    run, train, val = setup
    q = queries.ValLoss(val)
    for mode in ("delta", "window_removal"):
        M = hessfree.dit_epochs(run, train, q, mode=mode, **Q)
        assert M.values.shape == (3, len(train))
        for e in range(3):
            one = hessfree.dit(run, train, q, window=f"epoch:{e}", mode=mode, **Q).values
            assert rel(M.values[e], one) <= 1e-12
    D = hessfree.dit_epochs(run, train, q, **Q).values
    assert rel(D.sum(0), hessfree.dit(run, train, q, **Q).values) <= 1e-12


# ------------------------------------------------------------------------------ recording
def test_every_k_replay_reproduces_the_trajectory_bit_for_bit():
    train = data64(n=22)
    full = record(mlp64(), train, "every_step", epochs=3, batch_size=5)
    for K in (3, 5):
        sparse = record(mlp64(), train, K, epochs=3, batch_size=5)
        T = sparse.trajectory.n_steps
        assert list(sparse.trajectory.steps) == sorted(set(range(0, T, K)) | {T})
        replayed = replay_states(sparse, train, 0, T)
        assert torch.equal(replayed, full.trajectory.thetas)
    # float32 too (the default dtype of most models)
    g = torch.Generator().manual_seed(0)
    t32 = TensorDataset(torch.randn(30, 3, generator=g), (torch.rand(30, generator=g) > 0.5).float())
    a = hessfree.fit(mlp64().float(), t32, loss="bce", lr=0.3, epochs=2, batch_size=7, record="every_step",
                     progress=False)
    b = hessfree.fit(mlp64().float(), t32, loss="bce", lr=0.3, epochs=2, batch_size=7, record=4, progress=False)
    assert torch.equal(replay_states(b, t32, 0, b.trajectory.n_steps), a.trajectory.thetas)


def test_dit_from_every_k_run_equals_every_step(setup):
    run, train, val = setup
    sparse = record(mlp64(), train, 4)
    q = queries.ValLoss(val)
    for w in ("all", (3, 10)):
        np.testing.assert_array_equal(hessfree.dit(sparse, train, q, window=w, **Q).values,
                                      hessfree.dit(run, train, q, window=w, **Q).values)


def test_saved_run_round_trip(tmp_path, setup):
    _, train, val = setup
    run = record(mlp64(), train, 4, run_dir=tmp_path / "r")
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["trajectory"]["every"] == 4 and manifest["l2"] == 0.01
    loaded = hessfree.Run.load(tmp_path / "r", mlp64())
    assert torch.equal(loaded.trajectory.thetas, run.trajectory.thetas)
    q = queries.ValLoss(val)
    np.testing.assert_array_equal(hessfree.dit(loaded, train, q, **Q).values, hessfree.dit(run, train, q, **Q).values)


def test_crash_mid_recording_keeps_the_earlier_run(tmp_path):
    train = data64()
    record(mlp64(), train, "every_step", run_dir=tmp_path / "r")
    with pytest.raises(RuntimeError, match="disk error"):
        record(mlp64(), Crashing(train, 60), "every_step", run_dir=tmp_path / "r", overwrite=True)
    assert hessfree.Run.load(tmp_path / "r", mlp64()).trajectory is not None
    # the failed recording removed itself; the earlier run's folder holds its manifest and data only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    assert [p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------ patterns
def test_influence_patterns_classify_known_shapes():
    rng = np.random.default_rng(0)
    E, N = 8, 200
    M = rng.normal(size=(E, N)) * 0.05
    ramp = np.linspace(-2, 2, E)
    M[:, 0] += ramp  # relative influence grows: late
    M[:, 1] -= ramp  # fades: early
    M[:, 2] += np.array([3, -3] * (E // 2))  # sign flips every epoch: fluctuating
    p = hessfree.influence_patterns(M)
    assert list(p.labels[:3]) == ["late", "early", "fluctuating"]
    assert abs(sum(p.shares.values()) - 1) < 1e-12
    noise = p.labels[3:]  # pure noise: a significant slope only at about the test's level
    assert np.isin(noise, ["early", "late"]).mean() < 0.1
    assert -1 <= p.kendall_early_late <= 1
    strict = hessfree.influence_patterns(M, min_epochs=E + 1)  # too few epochs for "fluctuating"
    assert strict.labels[2] != "fluctuating"
    with pytest.raises(InputError):
        hessfree.influence_patterns(M[:1])


# ------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_sweep(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the sweep started before the input was checked")
    monkeypatch.setattr(dit_mod, "sweep", boom)


def test_bad_input_refused_before_the_sweep(setup, no_sweep):
    run, train, val = setup
    q = queries.ValLoss(val)
    plain = hessfree.fit(mlp64(), train, loss="bce", lr=0.1, epochs=1, batch_size=6, progress=False)
    with pytest.raises(InputError, match="without a trajectory"):
        hessfree.dit(plain, train, q, **Q)
    with pytest.raises(InputError, match="without a trajectory"):
        hessfree.dit(hessfree.Run.from_checkpoints(mlp64(), [mlp64().state_dict()], [0.1], loss="bce"), train, q, **Q)
    for window in ((0, 13), (5, 5), (-1, 3), "epoch:3", "epoch:x", "last"):
        with pytest.raises(InputError, match="window"):
            hessfree.dit(run, train, q, window=window, **Q)
    with pytest.raises(InputError, match="mode"):
        hessfree.dit(run, train, q, mode="leave_one_out", **Q)
    with pytest.raises(InputError, match="does not depend"):
        hessfree.dit(run, train, queries.Custom(lambda m: torch.tensor(1.0, dtype=torch.float64)), **Q)
    with pytest.raises(InputError, match="not the one the run was trained on"):
        hessfree.dit(run, data64(n=10), q, **Q)
    with pytest.raises(InputError, match="give a query"):
        hessfree.dit(run, train, None, **Q)
    with pytest.raises(InputError, match="not in the run"):
        hessfree.oracle.loo_replay(run, train, [999], q, **Q)
    x, y = val.tensors
    bad = y.clone()
    bad[2] = 3.0  # not a 0/1 label for the bce run
    for fn in (lambda: hessfree.dit(run, train, queries.ValLoss(TensorDataset(x, bad)), **Q),
               lambda: hessfree.oracle.loo_replay(run, train, [0], TensorDataset(x, bad), **Q)):
        with pytest.raises(LabelError, match="sample id 2 "):
            fn()


@pytest.mark.parametrize("kw,match", [
    (dict(optimizer="adam"), "Adam"),
    (dict(momentum=0.9), "momentum"),
    (dict(weight_decay=1e-4), "l2="),
    (dict(record="sometimes"), "record must be"),
    (dict(record=0), "record must be"),
    (dict(l2=-1.0), "l2 must be"),
])
def test_fit_refuses_what_the_estimators_do_not_cover(kw, match):
    with pytest.raises(InputError, match=match):
        hessfree.fit(mlp64(), data64(), loss="bce", lr=0.1, epochs=1, progress=False, **kw)


@pytest.mark.parametrize("layer,match", [(nn.Dropout(0.2), "Dropout"), (nn.BatchNorm1d(4), "BatchNorm")])
def test_fit_refuses_dropout_and_batchnorm_when_recording(layer, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 1)).double()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=match):
        hessfree.fit(model, data64(), loss="bce", lr=0.1, epochs=1, record="every_step", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing trained
    hessfree.fit(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Linear(4, 1)).double(), data64(), loss="bce",
                 lr=0.1, epochs=1, record="every_step", progress=False)  # p = 0 is fine


# ------------------------------------------------------------------------------ review findings
class Scaled(hessfree.BCEWithLogits):
    name = "custom"

    def forward(self, model, inputs):
        return model(inputs) / 4  # the Task's own forward must be used by DIT and its oracles


def test_custom_task_forward_is_used(setup):
    _, train, val = setup
    run = hessfree.fit(mlp64(), train, loss=Scaled(), lr=0.5, epochs=2, batch_size=6, record="every_step",
                       progress=False)
    q = queries.ValLoss(val)
    s = hessfree.dit(run, train, q, **Q)
    fd = hessfree.oracle.finite_difference(run, train, np.arange(len(train)), q, **Q)
    assert rel(s.values, fd) <= 1e-6


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(3, 3, bias=False)
        self.mid = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3, bias=False)
        self.out.weight = self.emb.weight
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.out(torch.tanh(self.mid(self.emb(x))))))


def test_tied_weights_replay_and_dit():
    train, val = data64(), data64(n=10, seed=1)
    full = record(Tied().double(), train, "every_step")
    sparse = record(Tied().double(), train, 4)
    assert torch.equal(replay_states(sparse, train, 0, sparse.trajectory.n_steps), full.trajectory.thetas)
    q = queries.ValLoss(val)
    np.testing.assert_array_equal(hessfree.dit(sparse, train, q, **Q).values, hessfree.dit(full, train, q, **Q).values)


def test_replay_that_does_not_reproduce_is_refused(setup):
    _, train, val = setup
    sparse = record(mlp64(), train, 4)
    sparse.trajectory.thetas[1] += 1e-3  # a stored state the replay cannot reach
    with pytest.raises(RuntimeError, match="did not reproduce"):
        hessfree.dit(sparse, train, queries.ValLoss(val), **Q)


def test_numpy_int_record_and_random_modules(tmp_path):
    run = record(mlp64(), data64(), np.int64(3), run_dir=tmp_path / "r")
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["record"] == 3
    assert run.trajectory.every == 3
    for layer in (nn.RReLU(), nn.MultiheadAttention(4, 1, dropout=0.1)):
        model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 1)).double()
        with pytest.raises(InputError, match="random"):
            hessfree.fit(model, data64(), loss="bce", lr=0.1, epochs=1, record="every_step", progress=False)


def test_custom_query_data_is_cast_to_the_model_dtype(setup):
    run, train, _ = setup
    x32 = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))  # float32, the model runs in float64
    with_data = hessfree.dit(run, train, queries.Custom(lambda m, x: m(x).sum(), "maximize", data=x32), **Q)
    ref = hessfree.dit(run, train, queries.Custom(lambda m: m(x32.double()).sum(), "maximize"), **Q)
    assert np.array_equal(with_data.values, ref.values)
    with pytest.raises(InputError, match="data="):
        hessfree.dit(run, train, queries.Custom(lambda m: m(x32).sum()), **Q)


@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_global_module_hooks_run_on_the_users_modules_only(hook):
    """A global module hook runs on every module the model calls. DIT's functional wrappers (the
    query and the training loss) must not add a module of their own for it to run on: the query
    value and the losses equal those of the model itself, and a pre-hook does not crash DIT."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    g = torch.Generator().manual_seed(3)
    ds = TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))
    torch.manual_seed(0)
    run = hessfree.fit(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), ds, loss="cross_entropy",
                       lr=0.1, epochs=2, batch_size=8, seed=0, record="every_step", progress=False)
    q = queries.ValLoss(ds)
    handle = (register_module_forward_hook(lambda m, a, out: 2.0 * out if isinstance(out, torch.Tensor) else None)
              if hook == "forward" else register_module_forward_pre_hook(lambda m, a: (a[0].clamp(-10, 10),) + a[1:]))
    try:
        fr = dit_mod.FunctionalRun(run, ds)
        q.prepare(torch.float64, None)
        theta = torch.cat([fr.model.get_parameter(n).detach().reshape(-1) for n in fr.names])
        assert torch.allclose(fr.query_value(q, theta), q.value(fr.model, run.task), rtol=1e-12, atol=0)
        x, y, _ = fr.batch(0)
        assert torch.allclose(fr.losses(theta, x, y), run.task.per_sample_loss(fr.model(x), y), rtol=1e-12, atol=0)
        assert np.isfinite(hessfree.dit(run, ds, q, progress=False).values).all()
    finally:
        handle.remove()
