"""Outlier Gradient Analysis: closed forms, every gradient path and detector input against a float64
per-sample autograd loop, projection, flagging, determinism and bad input."""
from __future__ import annotations

import subprocess
import sys
import hashlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import hessfree
from hessfree.errors import InputError, LabelError, ParameterSelectionError
from hessfree.grads.closed_form import HeadCapture
from hessfree.grads.projection import SparseProjection, chunk_rows
from hessfree.grads.select import select_parameters
from hessfree.methods import outlier as outlier_mod
from helpers import SmallCNN, TokenModel, brute_grads, images, mlp, tabular, tokens, trained_run

Q = dict(progress=False)


class Recorder:
    """A detector that keeps what it was given: the inputs the detectors see."""

    def fit(self, X):
        self.fitted = np.array(X, copy=True)
        return self

    def score_samples(self, X):
        self.scored = np.array(X, copy=True)
        return -np.linalg.norm(X, axis=1)


def head_model(classes: int, bias: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, classes, bias=bias))


def head_case(kind: str, bias: bool):
    """(run, data) for a CE (3 classes) or BCE (one logit) head, trained a little."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(37, 6, generator=g)
    if kind == "ce":
        data, model, loss = TensorDataset(X, torch.randint(0, 3, (37,), generator=g)), head_model(3, bias), "cross_entropy"
    else:
        data, model, loss = TensorDataset(X, (torch.rand(37, generator=g) > 0.5).float()), head_model(1, bias), "bce"
    return trained_run(model, data, loss=loss), data


def max_rel(x, ref) -> float:
    x, ref = torch.as_tensor(np.asarray(x), dtype=torch.float64), torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    return float((x - ref).abs().max() / ref.abs().max())


HEADS = [(k, b) for k in ("ce", "bce") for b in (True, False)]


@pytest.mark.parametrize("kind,bias", HEADS)
@pytest.mark.parametrize("params", ["last_layer_weight", "last_layer"])
def test_closed_form_matches_autograd(kind, bias, params):
    run, data = head_case(kind, bias)
    names = select_parameters(run.model, params)
    G = brute_grads(run, data, names)[-1]  # (N, P) at the final checkpoint
    kw = dict(params=params, dtype=torch.float64, batch_size=10, **Q)
    for det, ref in (("l2", G.norm(dim=1)), ("l1", G.abs().sum(1))):
        s = hessfree.outlier_scores(run, data, detector=det, gradient_path="closed_form", **kw)
        assert s.meta["gradient_path"] == "closed_form"
        assert max_rel(s.values, ref) <= 1e-6
    rec = Recorder()
    s = hessfree.outlier_scores(run, data, detector=rec, gradient_path="closed_form", **kw)
    assert rec.scored.shape == tuple(G.shape)
    assert max_rel(rec.scored, G) <= 1e-6  # the detector's inputs: the outer products (p − e_y) hᵀ (and r)
    assert max_rel(s.values, G.norm(dim=1)) <= 1e-6


@pytest.mark.parametrize("kind,bias", HEADS)
def test_closed_form_factors_directly(kind, bias):
    """HeadGrads itself: dense(), l1(), l2() against the autograd loop, float64."""
    run, data = head_case(kind, bias)
    names = select_parameters(run.model, "last_layer")
    G = brute_grads(run, data, names)[-1]
    model = run.model.double().eval()
    model.load_state_dict(run.checkpoint_state(-1))
    head = model[2]
    X, y = data.tensors
    with HeadCapture(head, "2", names, run.task) as cap:
        hg = cap.grads(model, X.double(), y.double() if kind == "bce" else y)
    assert max_rel(hg.dense(names), G) <= 1e-10
    assert max_rel(hg.l2(), G.norm(dim=1)) <= 1e-10
    assert max_rel(hg.l1(), G.abs().sum(1)) <= 1e-10
    run.model.float()


ENGINE_CASES = {
    "mlp": (lambda: mlp(0), tabular, ["all", "last_layer_weight", ["0.weight", "2"]]),
    "cnn": (lambda: (torch.manual_seed(0), SmallCNN())[1], images, ["all", ["conv1"]]),
    "tokens": (lambda: (torch.manual_seed(0), TokenModel())[1], tokens, ["all", ["emb"]]),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
@pytest.mark.parametrize("path", ["engine", "vmap"])
def test_engine_and_vmap_detector_inputs_match_autograd(case, path):
    build, make, specs = ENGINE_CASES[case]
    data = make(n=23, seed=0)
    run = trained_run(build(), data)
    for params in specs:
        names = select_parameters(run.model, params)
        G = brute_grads(run, data, names)[-1]
        rec = Recorder()
        s = hessfree.outlier_scores(run, data, detector=rec, params=params, gradient_path=path,
                                    dtype=torch.float64, batch_size=9, **Q)
        assert max_rel(rec.scored, G) <= 1e-9, (case, params)
        assert s.meta["gradient_path"] in (("factorised",) if path == "engine" else ("vmap",))
        l1 = hessfree.outlier_scores(run, data, detector="l1", params=params, gradient_path=path,
                                     dtype=torch.float64, batch_size=9, **Q)
        assert max_rel(l1.values, G.abs().sum(1)) <= 1e-9


def test_auto_uses_closed_form_only_when_it_applies():
    run, data = head_case("ce", True)
    assert hessfree.outlier_scores(run, data, detector="l2", **Q).meta["gradient_path"] == "closed_form"
    # the head's output is not the model's output (a Tanh follows): auto falls back, forced refuses
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3), nn.Tanh())
    r = trained_run(model, data)
    names = select_parameters(r.model, "last_layer_weight")
    G = brute_grads(r, data, names)[-1]
    s = hessfree.outlier_scores(r, data, detector="l2", dtype=torch.float64, **Q)
    assert s.meta["gradient_path"] == "factorised"
    assert max_rel(s.values, G.norm(dim=1)) <= 1e-9
    with pytest.raises(InputError, match="closed_form"):
        hessfree.outlier_scores(r, data, detector="l2", gradient_path="closed_form", **Q)
    # all parameters: not a final-layer closed form
    assert hessfree.outlier_scores(run, data, detector="l2", params="all", **Q).meta["gradient_path"] == "factorised"
    with pytest.raises(InputError, match="closed_form"):
        hessfree.outlier_scores(run, data, params="all", gradient_path="closed_form", **Q)


def test_float32_paths_agree():
    run, data = head_case("ce", True)
    vals = [hessfree.outlier_scores(run, data, detector="l2", gradient_path=p, **Q).values
            for p in ("closed_form", "engine", "vmap")]
    assert max_rel(vals[1], vals[0]) <= 1e-5 and max_rel(vals[2], vals[0]) <= 1e-5


def test_bare_model_and_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Dropout(0.5), nn.ReLU(), nn.Linear(9, 3))
    data = tabular(n=30)
    run = trained_run(model, data)
    model.train()
    a = hessfree.outlier_scores(model, data, detector="l2", dtype=torch.float64, **Q)
    b = hessfree.outlier_scores(run, data, detector="l2", dtype=torch.float64, **Q)
    assert model.training  # mode put back
    np.testing.assert_array_equal(a.values, b.values)  # dropout off: deterministic, same as the Run's last checkpoint
    G = brute_grads(run, data, select_parameters(model, "last_layer_weight"))[-1]
    assert max_rel(a.values, G.norm(dim=1)) <= 1e-9


def test_l2_is_sqrt_of_one_checkpoint_self_influence():
    run, data = head_case("ce", True)
    s = hessfree.outlier_scores(run, data, detector="l2", params="last_layer", dtype=torch.float64, **Q)
    si = hessfree.self_influence(run, data, params="last_layer", checkpoints="last", dtype=torch.float64, **Q)
    np.testing.assert_allclose(s.values ** 2 * run.checkpoints[-1].learning_rate, si.values, rtol=1e-10)


def noisy_blobs(n=400, flips=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    X = torch.randn(n, 6, generator=g) * 0.6 + 2.0 * nn.functional.one_hot(y, 6).float()
    y_noisy = y.clone()
    y_noisy[:flips] = (y[:flips] + 1) % 3
    return TensorDataset(X, y_noisy), torch.arange(n) < flips


@pytest.fixture(scope="module")
def noisy():
    data, truth = noisy_blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    run = hessfree.fit(model, data, lr=0.1, epochs=15, batch_size=32, seed=0, progress=False)
    return run, data, truth


@pytest.mark.parametrize("detector", ["iforest", "l1", "l2", "lof"])
def test_detectors_find_flipped_labels(noisy, detector):
    run, data, truth = noisy
    s = hessfree.outlier_scores(run, data, detector=detector, **Q)
    assert s.meta["kind"] == "outlier" and s.meta["detector"] == detector
    assert hessfree.metrics.auroc(s, truth) > 0.9
    assert s.values.shape == (len(data),)


def test_ocsvm_with_reference_and_iforest_novelty(noisy):
    run, data, truth = noisy
    clean = TensorDataset(*[t[~truth][:150] for t in data.tensors])
    s = hessfree.outlier_scores(run, data, detector="ocsvm", reference=clean, detector_options={"nu": 0.1}, **Q)
    assert s.meta["reference_used"] and s.meta["n_reference"] == 150
    assert hessfree.metrics.auroc(s, truth) > 0.9
    rec = Recorder()
    hessfree.outlier_scores(run, data, detector=rec, reference=clean, **Q)
    assert rec.fitted.shape[0] == 150 and rec.scored.shape[0] == len(data)  # fitted on the reference only


def test_reruns_bit_identical_and_seed_matters(noisy):
    run, data, _ = noisy
    a = hessfree.outlier_scores(run, data, detector="iforest", random_state=3, **Q)
    b = hessfree.outlier_scores(run, data, detector="iforest", random_state=3, **Q)
    c = hessfree.outlier_scores(run, data, detector="iforest", random_state=4, **Q)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)
    p = hessfree.outlier_scores(run, data, detector="iforest", params="all", projection=16, random_state=3, **Q)
    q = hessfree.outlier_scores(run, data, detector="iforest", params="all", projection=16, random_state=3, **Q)
    np.testing.assert_array_equal(p.values, q.values)
    assert p.meta["projection"]["n_components"] == 16


def test_flag_exact_count_and_stable_ties():
    s = hessfree.Scores(np.array([1.0, 3.0, 3.0, 0.5, 3.0, 2.0]), np.arange(6), {"kind": "outlier", "flag_k": 2})
    np.testing.assert_array_equal(s.flag(), [False, True, True, False, False, False])  # ties: lower position
    assert s.flag(4).sum() == 4 and s.flag(4)[5]
    assert s.flag(0.5).sum() == 3
    for bad in (0, -1, 7, 1.0, True):
        with pytest.raises(InputError):
            s.flag(bad)
    with pytest.raises(InputError, match="budget"):
        hessfree.Scores(s.values, s.sample_ids, {"kind": "outlier"}).flag()
    truth = np.array([0, 1, 1, 0, 0, 0], bool)
    assert hessfree.metrics.detection_accuracy(s, truth, 2) == float(np.mean(s.flag(2) == truth)) == 1.0


def test_flag_count_on_real_scores(noisy):
    run, data, truth = noisy
    s = hessfree.outlier_scores(run, data, k=30, **Q)
    assert s.flag().sum() == 30
    assert s.meta["flag_k"] == 30


# ------------------------------------------------------------------------------ projection
def test_projection_equals_dense_product_across_chunks():
    P, k = chunk_rows(64) * 2 + 37, 64  # three chunks, the last partial
    proj = SparseProjection(P, k, seed=5, dtype=torch.float64)
    R = proj.dense()
    assert R.shape == (P, k)
    G = torch.randn(5, P, dtype=torch.float64)
    torch.testing.assert_close(proj.project(G), G @ R, rtol=1e-12, atol=1e-12)
    assert proj.nnz == int((R != 0).sum())
    nz = R[R != 0].abs()
    torch.testing.assert_close(nz, torch.full_like(nz, 1 / (proj.density * k) ** 0.5))
    assert abs(proj.nnz / (P * k) - proj.density) < 0.2 * proj.density


def test_projection_preserves_inner_products_on_average():
    P, k = 2000, 256
    G = torch.randn(40, P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ratios = []
    for seed in range(5):
        Z = SparseProjection(P, k, seed=seed, dtype=torch.float64).project(G)
        ratios.append((Z.norm(dim=1) ** 2 / G.norm(dim=1) ** 2).mean().item())
    assert abs(np.mean(ratios) - 1) < 0.05


_HASH = ("import hashlib, torch; from hessfree.grads.projection import SparseProjection as S; "
         "print(hashlib.sha256(S(5000, 32, seed=7, dtype=torch.float64).dense().numpy().tobytes()).hexdigest())")


def test_same_seed_same_projection_in_another_process():
    here = hashlib.sha256(SparseProjection(5000, 32, seed=7, dtype=torch.float64).dense().numpy().tobytes()).hexdigest()
    other = subprocess.run([sys.executable, "-c", _HASH], capture_output=True, text=True, check=True).stdout.strip()
    assert here == other
    assert not torch.equal(SparseProjection(5000, 32, seed=8).dense(), SparseProjection(5000, 32, seed=7).dense())


# ------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_gradient_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("gradient work started before the input was checked")
    monkeypatch.setattr(outlier_mod._Collector, "run", boom)


def test_bad_input_refused_before_gradient_work(noisy, no_gradient_work):
    run, data, _ = noisy
    with pytest.raises(InputError, match="reference"):
        hessfree.outlier_scores(run, data, detector="ocsvm", **Q)
    wrong = TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long))
    with pytest.raises(InputError, match="input shape"):
        hessfree.outlier_scores(run, data, detector="ocsvm", reference=wrong, **Q)
    for k in (0, -3, len(data) + 1):
        with pytest.raises(InputError, match=r"k must be an int with 1 <= k <= 400"):
            hessfree.outlier_scores(run, data, k=k, **Q)

    class NoScore:
        def fit(self, X):
            return self

    with pytest.raises(InputError, match="score_samples"):
        hessfree.outlier_scores(run, data, detector=NoScore(), **Q)
    for det, opts in (("iforest", {"n_estimator": 10}), ("ocsvm", {"nu": 2.0}), ("lof", {"novelty": True})):
        with pytest.raises(InputError, match="detector_options|novelty"):
            hessfree.outlier_scores(run, data, detector=det, detector_options=opts, reference=data, **Q)
    with pytest.raises(InputError, match="unknown detector"):
        hessfree.outlier_scores(run, data, detector="knn", **Q)
    with pytest.raises(InputError, match="own loss"):
        hessfree.outlier_scores(run, data, loss="bce", **Q)
    with pytest.raises(InputError, match="projection"):
        hessfree.outlier_scores(run, data, projection=0, **Q)
    with pytest.raises(InputError, match="gradient_path"):
        hessfree.outlier_scores(run, data, gradient_path="fast", **Q)
    with pytest.raises(InputError, match="Run or a trained"):
        hessfree.outlier_scores("model.pt", data, **Q)
    bad_labels = TensorDataset(data.tensors[0][:10], torch.full((10,), 7))
    with pytest.raises(LabelError):
        hessfree.outlier_scores(run, data, detector="ocsvm", reference=bad_labels, **Q)
    with pytest.raises(LabelError):
        hessfree.outlier_scores(run, bad_labels, **Q)


def test_last_layer_weight_selection():
    model = mlp(0)
    assert select_parameters(model, "last_layer_weight") == ["4.weight"]

    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.offset = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return x + self.offset

    with pytest.raises(ParameterSelectionError, match="no trainable 'weight'"):
        select_parameters(nn.Sequential(nn.Linear(3, 2), Shift()), "last_layer_weight")


@pytest.mark.parametrize("kind,bias", HEADS)
def test_closed_form_norms_flushed_across_batches(monkeypatch, kind, bias):
    """HeadNorms forms the residuals many batches at a time; flushing every few (uneven) batches
    gives the per-sample norms of the autograd loop, in order."""
    from hessfree.grads import closed_form

    monkeypatch.setattr(closed_form.HeadNorms, "_FLUSH_ELEMENTS", 25)
    run, data = head_case(kind, bias)
    names = select_parameters(run.model, "last_layer")
    G = brute_grads(run, data, names)[-1]
    for det, ref in (("l2", G.norm(dim=1)), ("l1", G.abs().sum(1))):
        s = hessfree.outlier_scores(run, data, detector=det, params="last_layer", gradient_path="closed_form",
                                    dtype=torch.float64, batch_size=4, **Q)
        assert max_rel(s.values, ref) <= 1e-9


class HeadLastUntil(nn.Module):
    """The head's output is the model's output object only for batches whose first feature stays
    below 2 (else a copy, ×1, is returned: the same values, but the closed form must give way)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Sequential(nn.Linear(6, 9), nn.Tanh()), nn.Linear(9, 3)

    def forward(self, x):
        out = self.head(self.body(x))
        return out * 1.0 if bool((x[:, 0] >= 2).any()) else out


def test_closed_form_gives_way_mid_run_and_keeps_earlier_norms(monkeypatch):
    from hessfree.grads import closed_form

    monkeypatch.setattr(closed_form.HeadNorms, "_FLUSH_ELEMENTS", 30)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(30, 6, generator=g).clamp(-1.9, 1.9)
    X[22, 0] = 3.0  # from the batch holding sample 22 on, the head is no longer the model's output
    data = TensorDataset(X, torch.randint(0, 3, (30,), generator=g))
    run = hessfree.Run.from_checkpoints(HeadLastUntil(), [HeadLastUntil().state_dict()], [1.0],
                                        loss="cross_entropy")
    G = brute_grads(run, data, select_parameters(run.model, "last_layer_weight"))[-1]
    held = []  # what the head's hook still holds whenever the capture is closed
    exit_ = closed_form.HeadCapture.__exit__
    monkeypatch.setattr(closed_form.HeadCapture, "__exit__", lambda self, *e: (held.append(len(self._calls)),
                                                                               exit_(self, *e))[1])
    s = hessfree.outlier_scores(run, data, detector="l2", dtype=torch.float64, batch_size=4, **Q)
    assert held == [0, 0]  # closed when the closed form gave way, and nothing captured after that
    assert s.meta["gradient_path"] == "factorised"  # the path it ended on
    assert max_rel(s.values, G.norm(dim=1)) <= 1e-9
    with pytest.raises(InputError, match="last operation"):
        hessfree.outlier_scores(run, data, detector="l2", gradient_path="closed_form", batch_size=4, **Q)


def test_closed_form_norms_name_the_nonfinite_sample(monkeypatch):
    from hessfree.errors import NonFiniteError
    from hessfree.grads import closed_form

    monkeypatch.setattr(closed_form.HeadNorms, "_FLUSH_ELEMENTS", 20)
    run, data = head_case("ce", True)
    X, y = data.tensors
    X = X.clone()
    X[29, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"sample id\(s\) \[29\]"):
        hessfree.outlier_scores(run, TensorDataset(X, y), detector="l1", gradient_path="closed_form",
                                batch_size=4, **Q)


def test_residual_norm_stays_accurate_for_confident_samples():
    """||p - e_y|| from the off-label mass: no cancellation in 1 - p_y when p_y is near 1
    (forming p_y - 1 in float32 would give 0 for it, and half the L1 norm)."""
    from hessfree.grads.closed_form import residual_norm
    from hessfree.tasks import CrossEntropy

    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (200,), generator=g)
    z[torch.arange(200), y] += torch.linspace(0, 40, 200, dtype=torch.float64)  # p_y from ~1/7 to 1 - 1e-17
    r = torch.softmax(z, 1)
    r[torch.arange(200), y] = -(r.scatter(1, y[:, None], 0.0).sum(1))  # p_y - 1 = -(mass off the label), exact
    for ord, ref in (("l1", r.abs().sum(1)), ("l2", r.norm(dim=1))):
        for dim, zz in ((1, z), (0, z.t().contiguous())):  # (B, C), and classes first (C, B)
            got = residual_norm(zz.float(), y, CrossEntropy(), ord, class_dim=dim).double()
            assert float(((got - ref).abs() / ref).max()) <= 1e-5, (ord, dim)
            got64 = residual_norm(zz, y, CrossEntropy(), ord, class_dim=dim)
            assert float(((got64 - ref).abs() / ref).max()) <= 1e-12, (ord, dim)
    for zz, dim in ((z[:, :1], 1), (z[:, :1].t(), 0)):  # BCE: one logit, either layout
        yb = (y % 2).double()
        got = residual_norm(zz, yb, hessfree.tasks.BCEWithLogits(), "l2", class_dim=dim)
        assert torch.allclose(got, (torch.sigmoid(z[:, 0]) - yb).abs(), rtol=1e-14, atol=0)


def test_row_norm_of_a_tall_matrix_in_blocks(monkeypatch):
    """The L1 row norm forms |x| a block of rows at a time for tall x: the same values, bit for bit."""
    from hessfree.grads import closed_form

    monkeypatch.setattr(closed_form, "_ABS_BLOCK", 4)
    x = torch.randn(23, 5, dtype=torch.float64)
    assert torch.equal(closed_form.row_norm(x, "l1"), x.abs().sum(1))
    assert torch.equal(closed_form.row_norm(x[:8], "l1"), x[:8].abs().sum(1))  # short: in one go
    assert torch.equal(closed_form.row_norm(x, "l2"), torch.linalg.vector_norm(x, dim=1))


class _Bar:
    """Stands in for tqdm: records the total and every update."""

    made: list = []

    def __init__(self, total=None, **kw):
        self.total, self.n = total, 0
        _Bar.made.append(self)

    def update(self, k=1):
        self.n += k

    def reset(self, total=None):
        self.n = 0

    def close(self):
        pass


@pytest.mark.parametrize("wrap", ["bare", "sequential"])
@pytest.mark.parametrize("kind,bias", HEADS)
def test_a_linear_model_is_scored_many_batches_per_forward(monkeypatch, wrap, kind, bias):
    """A linear model (a bare nn.Linear or a Sequential holding only it) on a TensorDataset keeps
    no activations, so its closed-form L1 / L2 run many batches per forward pass (about one flush
    of logits, at most _STEP_BYTES of inputs, a multiple of batch_size): the autograd values, the
    progress bar counting batches of batch_size. A body, or the dense detector features, keep the
    batches at batch_size."""
    from hessfree.grads import closed_form
    from hessfree.methods import common

    monkeypatch.setattr(closed_form.HeadNorms, "_FLUSH_ELEMENTS", 50)
    monkeypatch.setattr(common, "tqdm", _Bar)
    g = torch.Generator().manual_seed(7)
    X = torch.randn(53, 6, generator=g)
    classes = 3 if kind == "ce" else 1
    y = torch.randint(0, 3, (53,), generator=g) if kind == "ce" else (torch.rand(53, generator=g) > 0.5).float()
    data = TensorDataset(X, y)
    torch.manual_seed(0)
    head = nn.Linear(6, classes, bias=bias)
    run = trained_run(head if wrap == "bare" else nn.Sequential(head), data,
                      loss="cross_entropy" if kind == "ce" else "bce")
    G = brute_grads(run, data, select_parameters(run.model, "last_layer"))[-1]
    sizes = []
    capture = closed_form.HeadCapture.capture
    monkeypatch.setattr(closed_form.HeadCapture, "capture",
                        lambda self, f, x, *a, **kw: (sizes.append(len(x)), capture(self, f, x, *a, **kw))[1])
    kw = dict(params="last_layer", gradient_path="closed_form", dtype=torch.float64, batch_size=4, progress=True)
    step = 20 if kind == "ce" else 52  # 50 logits a flush: 17 rows of 3 classes, 50 of one; up to multiples of 4
    for det, ref in (("l2", G.norm(dim=1)), ("l1", G.abs().sum(1))):
        sizes.clear()
        s = hessfree.outlier_scores(run, data, detector=det, **kw)
        assert s.meta["gradient_path"] == "closed_form"
        assert max_rel(s.values, ref) <= 1e-10, det
        assert sizes == [step] * (53 // step) + [53 % step], sizes
        assert (_Bar.made[-1].n, _Bar.made[-1].total) == (14, 14)  # ceil(53 / 4) batches, every one counted
    monkeypatch.setattr(closed_form.HeadNorms, "_STEP_BYTES", 8 * 6 * 8)  # 8 rows of 6 float64 inputs
    sizes.clear()
    assert max_rel(hessfree.outlier_scores(run, data, detector="l2", **kw).values, G.norm(dim=1)) <= 1e-10
    assert sizes == [8] * 6 + [5]
    sizes.clear()
    rec = Recorder()
    hessfree.outlier_scores(run, data, detector=rec, **kw)  # dense (B, P) features: batch_size rows a pass
    assert max_rel(rec.scored, G) <= 1e-10 and max(sizes) == 4
    body = nn.Sequential(nn.Identity(), nn.Linear(6, classes, bias=bias))
    run = hessfree.Run.from_checkpoints(body, [body.state_dict()], [1.0], loss=run.task)
    sizes.clear()
    hessfree.outlier_scores(run, data, detector="l2", **kw)  # a body (even an identity) keeps its batches
    assert max(sizes) == 4 and len(sizes) == 14


@pytest.mark.parametrize("kind,bias", HEADS)
@pytest.mark.parametrize("det", ["l1", "l2", "features"])
def test_closed_form_through_a_sequential_body_and_through_the_hook(monkeypatch, kind, bias, det):
    """A plain nn.Sequential ending in the head runs its body and the head's linear map directly;
    any other model has the head's call recorded by a hook. Both give the autograd values."""
    from hessfree.grads import closed_form

    run, data = head_case(kind, bias)
    names = select_parameters(run.model, "last_layer")
    G = brute_grads(run, data, names)[-1]
    ref = {"l1": G.abs().sum(1), "l2": G.norm(dim=1), "features": G}[det]
    seen = []
    body = closed_form.sequential_body
    for direct in (True, False):
        monkeypatch.setattr(closed_form, "sequential_body", lambda m, h: seen.append(b := body(m, h)) or (
            b if direct else None))
        if det == "features":
            from hessfree.methods import outlier
            captured = {}
            monkeypatch.setattr(outlier, "_detect", lambda name, d, values, *a: captured.setdefault("v", values)[:, 0])
            # a detector object gets the features in the dtype asked (iforest gets float32: feature_dtype)
            hessfree.outlier_scores(run, data, detector=Recorder(), params="last_layer", gradient_path="closed_form",
                                    dtype=torch.float64, batch_size=10, **Q)
            got = captured["v"]
        else:
            got = hessfree.outlier_scores(run, data, detector=det, params="last_layer", gradient_path="closed_form",
                                          dtype=torch.float64, batch_size=10, **Q).values
        assert max_rel(got, ref) <= 1e-10, direct
    assert seen[0] is not None and len(seen[0]) == len(run.model) - 1


@pytest.mark.parametrize("wrap", ["bare", "sequential"])
@pytest.mark.parametrize("hook", ["pre", "forward"])
def test_global_module_hooks_keep_the_closed_form_off(wrap, hook):
    """A global module hook runs on every module, the head included, and may change its input or
    output: the closed form (direct path or head hook) must not apply; auto gives the autograd values."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g))
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    model = head if wrap == "bare" else nn.Sequential(head)
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
    handle = (register_module_forward_pre_hook(lambda m, args: (3.0 * args[0],)) if hook == "pre" else
              register_module_forward_hook(lambda m, args, out: 2.0 * out))
    try:
        G = brute_grads(run, data, select_parameters(run.model, "last_layer"))[-1]
        s = hessfree.outlier_scores(run, data, detector="l2", params="last_layer", dtype=torch.float64,
                                    batch_size=8, **Q)
        assert s.meta["gradient_path"] != "closed_form"
        assert max_rel(s.values, G.norm(dim=1)) <= 1e-9
        with pytest.raises(InputError, match="closed_form"):
            hessfree.outlier_scores(run, data, detector="l2", gradient_path="closed_form", batch_size=8, **Q)
    finally:
        handle.remove()
    assert hessfree.outlier_scores(run, data, detector="l2", batch_size=8, **Q).meta["gradient_path"] == "closed_form"


def test_vmap_path_under_a_global_forward_hook_matches_autograd():
    """Under a global forward hook the vmap(grad) path differentiates the model as the user's own
    calls run it (the hook once per module, not once more on hessfree's wrapper)."""
    from torch.nn.modules.module import register_module_forward_hook

    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
    handle = register_module_forward_hook(lambda m, a, out: 2.0 * out)  # (a shift would not show: CE ignores one)
    try:
        G = brute_grads(run, data, select_parameters(run.model, "all"))[-1]
        s = hessfree.self_influence(run, data, ghost=False, dtype=torch.float64, batch_size=8, **Q)
        assert max_rel(s.values, G.pow(2).sum(1)) <= 1e-10
        o = hessfree.outlier_scores(run, data, detector="l2", params="all", gradient_path="vmap",
                                    dtype=torch.float64, batch_size=8, **Q)
        assert max_rel(o.values, G.norm(dim=1)) <= 1e-10
    finally:
        handle.remove()


def test_a_linear_model_on_inputs_of_more_dimensions_keeps_its_batches(monkeypatch):
    """A bare nn.Linear on (N, 1, d) inputs gives (B, 1, 1) logits, where the closed form does not
    apply: its batches stay at batch_size, so the engine taking over never sees a large one."""
    from hessfree.grads import closed_form, engine

    g = torch.Generator().manual_seed(4)
    data = TensorDataset(torch.randn(40, 1, 6, generator=g), (torch.rand(40, generator=g) > 0.5).float())
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="bce")
    sizes = []
    capture, batch_grads = closed_form.HeadCapture.capture, engine.GradientEngine.batch_grads
    monkeypatch.setattr(closed_form.HeadCapture, "capture",
                        lambda self, f, x, *a, **kw: (sizes.append(len(x)), capture(self, f, x, *a, **kw))[1])
    monkeypatch.setattr(engine.GradientEngine, "batch_grads",
                        lambda self, batch, *a, **kw: (sizes.append(len(batch[0])), batch_grads(self, batch, *a, **kw))[1])
    G = brute_grads(run, data, select_parameters(run.model, "last_layer_weight"))[-1]
    s = hessfree.outlier_scores(run, data, detector="l2", dtype=torch.float64, batch_size=8, **Q)
    assert s.meta["gradient_path"] != "closed_form" and max(sizes) == 8
    assert max_rel(s.values, G.norm(dim=1)) <= 1e-9


def test_a_hooked_head_is_not_taken_in_closed_form():
    """A forward hook that rescales the head's output changes the gradient: the closed form must
    not apply (auto falls back to the engine, which differentiates the hooked model)."""
    run, data = head_case("ce", True)
    run.model[2].register_forward_hook(lambda m, i, o: 2.0 * o)
    names = select_parameters(run.model, "last_layer_weight")
    G = brute_grads(run, data, names)[-1]
    s = hessfree.outlier_scores(run, data, detector="l2", dtype=torch.float64, batch_size=10, **Q)
    assert s.meta["gradient_path"] != "closed_form"
    assert max_rel(s.values, G.norm(dim=1)) <= 1e-9
    with pytest.raises(InputError, match="closed_form"):
        hessfree.outlier_scores(run, data, detector="l2", gradient_path="closed_form", batch_size=10, **Q)


def test_a_head_used_twice_is_not_taken_in_closed_form():
    """The head Linear also called inside the body: its gradient has two terms, so neither the
    direct path nor the hook may claim the closed form (review finding: 22% off before)."""
    torch.manual_seed(0)
    h = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), h, nn.Tanh(), h)
    data = TensorDataset(torch.randn(30, 6), torch.randint(0, 3, (30,)))
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
    names = select_parameters(run.model, "last_layer")
    G = brute_grads(run, data, names)[-1]
    s = hessfree.outlier_scores(run, data, detector="l2", params="last_layer", dtype=torch.float64, batch_size=8, **Q)
    assert s.meta["gradient_path"] != "closed_form"
    assert max_rel(s.values, G.norm(dim=1)) <= 1e-9
