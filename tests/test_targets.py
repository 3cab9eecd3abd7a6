"""Every target's gradient against a float64 central finite difference of the target itself."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import hessfree
import hessfree.tasks
from hessfree import targets
from hessfree.errors import InputError
from hessfree.grads.engine import GradientEngine
from hessfree.grads.select import select_parameters


def _data(n=40, d=5, classes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2 if classes is None else classes, (n,), generator=g)
    s = torch.randint(0, 2, (n,), generator=g)
    return TensorDataset(x, y.double() if classes is None else y), s


def _model(out, seed=0, linear=False):
    torch.manual_seed(seed)
    if linear:
        return nn.Sequential(nn.Linear(5, out)).double()
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, out)).double()


def _fd_check(model, loss, target, value_fn=None, h=1e-6):
    """Compare q·v with (f(θ+hv) − f(θ−hv)) / 2h along a random direction v of the parameters."""
    task = hessfree.tasks.resolve_task(loss)
    names = select_parameters(model, "all")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    v = {n: torch.randn(state[n].shape, generator=g, dtype=torch.float64) for n in names}
    with GradientEngine(model, task, names, dtype=torch.float64) as eng:
        eng.bind(state)
        q = target.gradient(eng)
        value = value_fn(eng) if value_fn else (lambda: target.value(eng))
        analytic = sum(float((q[n] * v[n]).sum()) for n in names)
        f = []
        for sign in (1, -1):
            eng.bind({k: (t + sign * h * v[k] if k in v else t) for k, t in state.items()})
            with torch.no_grad():
                f.append(float(value()))
    numeric = (f[0] - f[1]) / (2 * h)
    assert abs(analytic) > 1e-8
    assert abs(analytic - numeric) / abs(analytic) <= 1e-6, (analytic, numeric)


@pytest.mark.parametrize("classes", [None, 3])
def test_demographic_parity_gradient(classes):
    data, s = _data(classes=classes)
    model = _model(1 if classes is None else classes)
    _fd_check(model, "bce" if classes is None else "cross_entropy",
              targets.DemographicParity(data, s, positive_class=1))


@pytest.mark.parametrize("form", ["loss", "tpr"])
@pytest.mark.parametrize("classes", [None, 3])
def test_equal_opportunity_gradient(form, classes):
    data, s = _data(classes=classes)
    model = _model(1 if classes is None else classes)
    _fd_check(model, "bce" if classes is None else "cross_entropy",
              targets.EqualOpportunity(data, s, form=form, positive_class=1))


@pytest.mark.parametrize("attack", [targets.FGSM(0.1), targets.PGD(0.1, steps=3), targets.Boundary(1.3)])
def test_robustness_gradient_with_attacked_inputs_fixed(attack):
    data, _ = _data()
    model = _model(1, linear=isinstance(attack, targets.Boundary))
    target = targets.Robustness(data, attack)

    def value_fn(eng):
        fixed = target.attacked(eng)  # attacked at the unperturbed checkpoint, then held fixed
        return lambda: target.loss_on(eng, fixed)

    _fd_check(model, "bce", target, value_fn)


def test_custom_and_loss_gradient():
    data, _ = _data(classes=3)
    model = _model(3)
    x = data.tensors[0][:4]
    _fd_check(model, "cross_entropy", targets.Custom(lambda m, inp: m(inp).logsumexp(1).mean(), x))
    _fd_check(model, "cross_entropy", targets.Loss(data, batch_size=7))


def test_absolute_gap_sign():
    """Harmful = increases the ABSOLUTE gap: the gradient is sign(gap) × ∇(signed gap)."""
    data, s = _data()
    model = _model(1)
    names = select_parameters(model, "all")
    for sens in (s, 1 - s):  # swapping the groups flips the signed gap, not the target
        t = targets.DemographicParity(data, sens)
        with GradientEngine(model, hessfree.BCEWithLogits(), names, dtype=torch.float64) as eng:
            eng.bind(model.state_dict())
            signed = t.signed(eng)
            q = t.gradient(eng)
            q_signed = eng.dense_grad(t.signed(eng))
        sign = 1.0 if float(signed.detach()) >= 0 else -1.0
        for n in names:
            assert torch.allclose(q[n], sign * q_signed[n])


def test_bad_target_inputs():
    data, s = _data()
    with pytest.raises(InputError, match="one per sample"):
        targets.DemographicParity(data, s[:-1]).validate()
    with pytest.raises(InputError, match="binary"):
        targets.DemographicParity(data, s + 1).validate()
    with pytest.raises(InputError, match="both sensitive groups"):
        targets.DemographicParity(data, torch.zeros_like(s)).validate()
    with pytest.raises(InputError, match="form"):
        targets.EqualOpportunity(data, s, form="odds")
    with pytest.raises(InputError, match="eps"):
        targets.FGSM(0.0)
    with pytest.raises(InputError, match="does not depend"):
        model = _model(1)
        t = targets.Custom(lambda m, d: torch.tensor(1.0, dtype=torch.float64))
        with GradientEngine(model, hessfree.BCEWithLogits(), select_parameters(model, "all"),
                            dtype=torch.float64) as eng:
            eng.bind(model.state_dict())
            t.gradient(eng)


def test_boundary_refuses_a_nonlinear_model_before_scoring():
    data, _ = _data()
    train = TensorDataset(data.tensors[0].float(), data.tensors[1].float())
    model = _model(1).float()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="bce")
    with pytest.raises(InputError, match="linear model"):
        hessfree.influence(run, train, targets.Robustness(train, targets.Boundary()), progress=False)


def test_fairness_influence_end_to_end():
    """influence() with a fairness target equals Σ_k η_k g_i·q_k from the engine's own pieces."""
    data, s = _data(n=30)
    train = TensorDataset(data.tensors[0], data.tensors[1])
    model = _model(1)
    run = hessfree.fit(model, train, loss="bce", lr=0.2, epochs=2, batch_size=10, checkpoint_every=3,
                       progress=False)
    t = targets.DemographicParity(data, s)
    scores = hessfree.influence(run, train, t, dtype=torch.float64, progress=False)
    names = select_parameters(model, "all")
    ref = torch.zeros(len(train), dtype=torch.float64)
    for k, eta in enumerate(run.learning_rates):
        m = _model(1)
        m.load_state_dict(run.checkpoint_state(k))
        with GradientEngine(m, run.task, names, dtype=torch.float64) as eng:
            eng.bind(run.checkpoint_state(k))
            q = t.gradient(eng)
        for i in range(len(train)):
            x, y = train[i]
            loss = run.task.per_sample_loss(m(x[None]), y[None])[0]
            gi = torch.autograd.grad(loss, [dict(m.named_parameters())[n] for n in names])
            ref[i] += eta * sum(float((a * q[n]).sum()) for a, n in zip(gi, names))
    assert torch.allclose(torch.as_tensor(scores.values), ref, rtol=1e-9, atol=1e-12)
    assert scores.meta["target"]["name"] == "DemographicParity"
