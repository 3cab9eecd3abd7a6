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


def test_fit_with_a_first_dropout_that_writes_in_place_only_in_training():
    """The label check runs in eval mode, where Dropout(inplace=True) writes nothing; training must
    still find out that it writes in train mode, and train exactly like Dropout(inplace=False)."""
    ds = TensorDataset(torch.randn(24, 5, generator=torch.Generator().manual_seed(3)), torch.randint(0, 3, (24,)))
    saved = ds.tensors[0].clone()
    finals = []
    for inplace in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Dropout(0.3, inplace=inplace), nn.Linear(5, 3))
        torch.manual_seed(1)  # the same dropout draws for both
        run = hessfree.fit(model, ds, lr=0.1, epochs=2, batch_size=8, **Q)
        finals.append(run.checkpoint_state(len(run) - 1))
        assert torch.equal(ds.tensors[0], saved)
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[1])


def test_dit_saliency_query_with_an_inplace_model():
    ds = TensorDataset(data(24).tensors[0].float(), data(24).tensors[1])
    x0, y0 = ds.tensors[0][0].clone(), ds.tensors[1][0].clone()
    d = []
    for inplace in (True, False):
        run = hessfree.fit(Halve(inplace), ds, lr=0.1, epochs=1, batch_size=8, record="every_step", **Q)
        d.append(hessfree.dit(run, ds, queries.Saliency(x0, y0, 2), **Q).values)
    np.testing.assert_allclose(d[0], d[1], rtol=1e-10, atol=1e-15)


class HalveFromCall(Halve):
    """Writes into its input from its ``start``-th call on (vmap traces forward once per batch)."""

    def __init__(self, start: int):
        super().__init__(True)
        self.calls, self.start = 0, start

    def forward(self, x):
        self.calls += 1
        x = x.div_(2) if self.calls >= self.start else x / 2
        return self.head(self.body(x))


def test_a_later_write_under_vmap_is_refused_too():
    with pytest.raises(InputError, match="later batch"):
        hessfree.self_influence(run_of(HalveFromCall(4)), data(), dtype=torch.float64, batch_size=8, ghost=False,
                                **Q)


def test_copies_keep_the_batch_containers():
    from collections import UserDict, namedtuple

    from hessfree.tasks import _clone

    P = namedtuple("P", "a b")
    x = torch.ones(2)
    for batch in (P(x, [x, {"k": x}]), UserDict({"ids": x}), {"a": (x, x)}):
        c = _clone(batch)
        assert type(c) is type(batch)
        flat = lambda o: [o] if isinstance(o, torch.Tensor) else [t for v in (o.values() if hasattr(o, "values") else o)
                                                                     for t in flat(v)]  # noqa: E731
        assert all(a is not b and torch.equal(a, b) for a, b in zip(flat(c), flat(batch)))


def test_namedtuple_and_userdict_batches_are_scored():
    """Batches whose inputs are a namedtuple or a UserDict (as a tokenizer's BatchEncoding is) keep
    their type through casting, copying and stacking, and score as the plain-tuple batch does."""
    from collections import UserDict, namedtuple

    from torch.utils.data import Dataset

    Pair = namedtuple("Pair", "a b")

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fa, self.fb, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            a, b = (x["a"], x["b"]) if isinstance(x, UserDict) else (x[0], x[1])
            return self.head(torch.tanh(self.fa(a) + self.fb(b)))

    g = torch.Generator().manual_seed(0)
    # a and b of one shape: a mix-up of the two when a batch is taken apart and rebuilt would go unseen otherwise
    A, B, y = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g), torch.randint(0, 3, (20,), generator=g)

    class Items(Dataset):
        def __init__(self, make):
            self.make = make

        def __len__(self):
            return 20

        def __getitem__(self, i):
            return self.make(A[i], B[i]), y[i]

    model = Two().double()
    run = hessfree.Run.from_checkpoints(model, [copy.deepcopy(model.state_dict())] * 2, [0.5, 0.25],
                                        loss="cross_entropy")
    scored = {}
    for name, make in (("tuple", lambda a, b: (a, b)), ("namedtuple", Pair), ("userdict", lambda a, b: UserDict(a=a, b=b))):
        ds = Items(make)
        scored[name] = [hessfree.self_influence(run, ds, dtype=torch.float64, batch_size=8, **Q).values,
                        hessfree.outlier_scores(run, ds, detector="l2", params="all", dtype=torch.float64,
                                                batch_size=8, **Q).values]
        # the vmap fallback too (torch.func maps over the tensors; a UserDict is no pytree it knows)
        scored[name].append(hessfree.self_influence(run, ds, dtype=torch.float64, batch_size=8, ghost=False,
                                                    **Q).values)
    for name in ("namedtuple", "userdict"):
        for got, want in zip(scored[name], scored["tuple"]):
            np.testing.assert_allclose(got, want, rtol=1e-12)


def test_userdict_batches_through_fit_and_dit():
    """Training and DIT on UserDict batches (as a tokenizer's BatchEncoding is) give the values of
    the plain-tensor dataset."""
    from collections import UserDict

    from torch.utils.data import Dataset

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(4, 3)

        def forward(self, b):
            return self.fc(torch.tanh(b if isinstance(b, torch.Tensor) else b["x"]))

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)

    class Items(Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return UserDict(x=X[i]), y[i]

    got = {}
    for name, ds in (("tensor", TensorDataset(X, y)), ("userdict", Items())):
        run = hessfree.fit(M(), ds, loss="cross_entropy", lr=0.1, epochs=2, batch_size=8, seed=0,
                           record="every_step", progress=False)
        got[name] = hessfree.dit(run, ds, hessfree.queries.ValLoss(ds), progress=False).values
    np.testing.assert_allclose(got["userdict"], got["tensor"], rtol=1e-12, atol=1e-15)
    assert np.abs(got["tensor"]).max() > 0


def test_vmap_fallback_refuses_non_tensor_entries_clearly():
    """The vmap fallback maps over every entry of a batch: a number or string among the inputs gets
    a specific InputError (torch.func's own error named none of the user's objects)."""
    from collections import UserDict

    from torch.utils.data import Dataset

    from hessfree.errors import InputError

    class Flagged(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return UserDict(x=torch.full((3,), float(i)), tag="s"), i % 3

    class Use(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, b):
            return self.fc(b["x"])

    model = Use()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
    assert hessfree.self_influence(run, Flagged(), batch_size=4, **Q).values.shape == (6,)  # hooks: fine
    with pytest.raises(InputError, match=r"inputs hold str values besides tensors.*vmap\(grad\) fallback"):
        hessfree.self_influence(run, Flagged(), batch_size=4, ghost=False, **Q)


def test_vmap_fallback_takes_none_entries_and_refuses_global_backward_hooks():
    """None in a batch (an absent mask) passes through the vmap fallback as it is; a global module
    backward hook, which torch.func cannot run through, gets a specific InputError."""
    from collections import UserDict

    from torch.nn.modules.module import register_module_full_backward_hook
    from torch.utils.data import Dataset, default_collate

    from hessfree.errors import InputError
    from hessfree.grads.engine import GradientEngine

    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)

    class Masked(Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return UserDict(x=X[i]), y[i]

    class Use(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.ln, self.fc = nn.LayerNorm(3), nn.Linear(3, 3)

        def forward(self, b):
            return self.fc(self.ln(b["x"] if b.get("mask") is None else b["x"] * b["mask"]))

    def with_none(items):  # default_collate cannot collate None: the batch is built by hand
        xb, yb = default_collate(items)
        xb["mask"] = None
        return xb, yb

    model = Use().double()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
    names = [n for n, _ in model.named_parameters()]
    batch = with_none([Masked()[i] for i in range(12)])
    with GradientEngine(model, run.task, names, dtype=torch.float64) as hooks, \
            GradientEngine(model, run.task, names, dtype=torch.float64, ghost=False) as ref:
        hooks.bind(run.checkpoint_state(0))
        ref.bind(run.checkpoint_state(0))
        a, b = hooks.batch_grads(batch).sq_norms(), ref.batch_grads(batch).sq_norms()
    assert torch.allclose(a, b, rtol=1e-12, atol=0)
    handle = register_module_full_backward_hook(lambda m, gi, go: None)
    try:
        with pytest.raises(InputError, match="global module backward hook"):
            hessfree.self_influence(run, Masked(), batch_size=4, ghost=False, dtype=torch.float64, **Q)
    finally:
        handle.remove()


def test_verdicts_are_per_model_object_and_inference_tensors_are_always_copied():
    from hessfree.tasks import Task

    class EqualHalve(Halve):  # all instances compare equal and hash alike
        def __eq__(self, other):
            return isinstance(other, EqualHalve)

        def __hash__(self):
            return 0

    ds = data()
    saved = ds.tensors[0].clone()
    for inplace in (False, True):  # the reader first: its verdict must not carry over to the writer
        hessfree.self_influence(run_of(EqualHalve(inplace)), ds, dtype=torch.float64, batch_size=16, **Q)
        assert torch.equal(ds.tensors[0], saved)
    model, task = Halve(True).double(), Task()
    with torch.inference_mode():
        x = torch.ones(4, 5, dtype=torch.float64)
        for _ in range(3):
            task.safe_forward(model, x)
        assert torch.equal(x, torch.ones(4, 5, dtype=torch.float64))
