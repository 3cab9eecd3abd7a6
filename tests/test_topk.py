"""pairwise_influence(..., top_k=k): the k most helpful and harmful training samples of each test
sample, streamed, against the top-k of the dense matrix (ids and values, ties included), and the
TopInfluence result type."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import hessfree
from hessfree.errors import InputError
from hessfree.methods import common, tracin
from hessfree.topk import TopInfluence, TopKAccumulator, top_columns
from helpers import SmallCNN, mlp, tabular, images, trained_run

Q = dict(progress=False, dtype=torch.float64)


def dense_top(dense: hessfree.Scores, k: int):
    """(helpful ids, values, harmful ids, values) of the dense matrix, by Scores' own ordering."""
    hi = np.argsort(-dense.values, axis=1, kind="stable")[:, :k]
    lo = np.argsort(dense.values, axis=1, kind="stable")[:, :k]
    return (dense.helpful(k), np.take_along_axis(dense.values, hi, 1), dense.harmful(k),
            np.take_along_axis(dense.values, lo, 1))


def assert_same_top(top: TopInfluence, dense: hessfree.Scores, k: int) -> None:
    hid, hv, lid, lv = dense_top(dense, k)
    assert top.k == k and top.helpful_ids.shape == (len(dense.test_ids), k)
    np.testing.assert_array_equal(top.test_ids, dense.test_ids)
    np.testing.assert_array_equal(top.helpful_ids, hid)
    np.testing.assert_array_equal(top.harmful_ids, lid)
    scale = float(np.abs(dense.values).max())
    np.testing.assert_allclose(top.helpful_values, hv, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(top.harmful_values, lv, rtol=0, atol=1e-12 * scale)


@pytest.fixture(scope="module")
def mlp_case():
    train, test = tabular(n=45, seed=0), tabular(n=11, seed=4)
    run = trained_run(mlp(0), train)
    assert len(run.checkpoints) >= 4
    return run, train, test


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("window", ["whole", "one_batch"])
def test_top_k_equals_the_dense_top_k(monkeypatch, mlp_case, stack, window):
    run, train, test = mlp_case
    if window == "one_batch":  # a window of one batch: a merge per batch, each group bound again per window
        monkeypatch.setattr(tracin, "_TOPK_WINDOW_BYTES", 1)
    dense = hessfree.pairwise_influence(run, train, test, batch_size=8, stack=stack, **Q)
    for k in (1, 3, 20, len(train)):
        top = hessfree.pairwise_influence(run, train, test, batch_size=8, stack=stack, top_k=k, **Q)
        assert_same_top(top, dense, k)
        assert top.meta["checkpoints_per_pass"] == (len(run.checkpoints) if stack else 1)
        assert top.meta["passes"] == (1 if stack else len(run.checkpoints))
        assert top.meta["window"] == (8 if window == "one_batch" else len(train))
        assert top.meta["top_k"] == k and top.meta["method"] == "pairwise_influence"


def test_several_stacked_groups_and_float32(monkeypatch, mlp_case):
    run, train, test = mlp_case
    monkeypatch.setattr(common, "_STACK_SAMPLES", 2 * 8)  # groups of 2 checkpoints
    monkeypatch.setattr(tracin, "_TOPK_WINDOW_BYTES", 8 * len(test) * 16)  # windows of two batches
    for dtype in (torch.float64, torch.float32):
        kw = dict(batch_size=8, dtype=dtype, progress=False)
        dense = hessfree.pairwise_influence(run, train, test, **kw)
        top = hessfree.pairwise_influence(run, train, test, top_k=5, **kw)
        assert top.meta["checkpoints_per_pass"] == 2 and top.meta["passes"] == -(-len(run.checkpoints) // 2)
        assert top.meta["window"] == 16
        assert_same_top(top, dense, 5)


def test_a_model_that_cannot_stack_and_shuffled_subsets():
    """A CNN (conv weights differ between checkpoints: one checkpoint per pass); training and test
    sets are shuffled Subsets, so ids differ from positions."""
    data = images(36)
    torch.manual_seed(0)
    run = trained_run(SmallCNN(), data)
    g = torch.Generator().manual_seed(1)
    train = Subset(data, torch.randperm(36, generator=g)[:30].tolist())
    test = Subset(data, [33, 2, 17, 5, 30])
    dense = hessfree.pairwise_influence(run, train, test, batch_size=7, **Q)
    assert dense.meta["checkpoints_per_pass"] == 1
    for k in (1, 4, 30):
        top = hessfree.pairwise_influence(run, train, test, batch_size=7, top_k=k, **Q)
        assert_same_top(top, dense, k)
    assert set(top.helpful_ids[0]) == set(train.indices)  # ids, not positions


def tied_case():
    """A bias-free linear model: samples with x = 0 have exactly zero gradients, and duplicated
    samples equal gradients, so rows of the matrix hold exact ties (zeros, duplicates)."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    X[[1, 6, 7, 15, 22]] = 0.0
    X[[10, 19]], y[[10, 19]] = X[3].clone(), y[3].clone()  # duplicates of sample 3, in other batches
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False).double()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.5], loss="cross_entropy")
    return run, TensorDataset(X, y), TensorDataset(X[[3, 1, 8]], y[[3, 1, 8]])


@pytest.mark.parametrize("window", ["whole", "one_batch"])
def test_ties_break_by_the_lower_training_position(monkeypatch, window):
    if window == "one_batch":
        monkeypatch.setattr(tracin, "_TOPK_WINDOW_BYTES", 1)
    run, train, test = tied_case()
    dense = hessfree.pairwise_influence(run, train, test, batch_size=5, **Q)
    v = dense.values
    assert (v == 0).sum(1).min() >= 5  # the zero-gradient samples tie in every row
    assert v[0, 3] == v[0, 10] == v[0, 19]  # and the duplicates
    for k in range(1, len(train) + 1):
        assert_same_top(hessfree.pairwise_influence(run, train, test, batch_size=5, top_k=k, **Q), dense, k)


def test_accumulator_against_a_stable_sort():
    g = np.random.default_rng(0)
    M, N = 6, 40
    vals = g.integers(-3, 4, size=(M, N)).astype(np.float64)  # many ties
    vals[0] = 0.0
    vals[1, ::2] = -0.0  # -0.0 and 0.0 are equal
    for k in (1, 7, N):
        for cut in (1, 3, 16, N):
            acc = TopKAccumulator(M, k)
            for a in range(0, N, cut):
                acc.add(slice(0, M), torch.arange(a, min(N, a + cut)), torch.from_numpy(vals[:, a:a + cut]))
            hp, hv, lp, lv = acc.positions()
            np.testing.assert_array_equal(hp, np.argsort(-vals, axis=1, kind="stable")[:, :k])
            np.testing.assert_array_equal(lp, np.argsort(vals, axis=1, kind="stable")[:, :k])
            np.testing.assert_array_equal(hv, np.take_along_axis(vals, hp, 1))
    # top_columns alone, columns not in position order
    perm = np.stack([g.permutation(N) for _ in range(M)])
    shuffled = np.take_along_axis(vals, perm, 1)
    for k in (1, 5, N):
        for largest in (True, False):
            cols = top_columns(torch.from_numpy(shuffled), torch.from_numpy(perm), k, largest).numpy()
            want = np.argsort(-vals if largest else vals, axis=1, kind="stable")[:, :k]
            np.testing.assert_array_equal(np.take_along_axis(perm, cols, 1), want)
    acc = TopKAccumulator(2, 3)
    acc.add(slice(0, 2), torch.arange(2), torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="fewer than k"):
        acc.positions()


def test_memory_never_holds_n_test_by_n(monkeypatch, mlp_case):
    run, train, test = mlp_case
    monkeypatch.setattr(tracin, "_TOPK_WINDOW_BYTES", 8 * len(test) * 8 * 2)  # two batches of 8
    widths = []
    merge = tracin._merge_window
    monkeypatch.setattr(tracin, "_merge_window", lambda acc, partial, *a: (widths.append(partial.shape), merge(
        acc, partial, *a))[1])
    top = hessfree.pairwise_influence(run, train, test, batch_size=8, top_k=3, **Q)
    assert widths == [(len(test), 16)] * 2 + [(len(test), len(train) - 32)]
    assert top.helpful_ids.shape == (len(test), 3)


def test_bad_k_refused_before_any_gradient_work(monkeypatch, mlp_case):
    run, train, test = mlp_case

    def boom(*a, **k):
        raise AssertionError("scoring started before k was checked")

    monkeypatch.setattr(tracin, "Scorer", boom)
    for k in (0, -1, len(train) + 1, 1.0, 0.0, True, "3", 2.5):
        with pytest.raises(InputError, match="k must be"):
            hessfree.pairwise_influence(run, train, test, top_k=k, **Q)


def test_a_fraction_of_n(mlp_case):
    run, train, test = mlp_case
    top = hessfree.pairwise_influence(run, train, test, batch_size=8, top_k=0.1, **Q)
    assert top.k == round(0.1 * len(train))


def test_top_influence_frame_save_load(tmp_path, mlp_case):
    run, train, test = mlp_case
    top = hessfree.pairwise_influence(run, train, test, batch_size=8, top_k=4, **Q)
    assert repr(top) == f"TopInfluence(method='pairwise_influence', n_test={len(test)}, k=4)"
    np.testing.assert_array_equal(top.helpful(2), top.helpful_ids[:, :2])
    np.testing.assert_array_equal(top.harmful(), top.harmful_ids)
    with pytest.raises(InputError):
        top.helpful(5)
    frame = top.to_frame()
    assert len(frame) == 2 * len(test) * 4 and list(frame.columns) == ["test_id", "kind", "rank", "sample_id", "value"]
    row = frame[(frame.test_id == top.test_ids[2]) & (frame.kind == "harmful") & (frame["rank"] == 1)]
    assert int(row.sample_id.iloc[0]) == top.harmful_ids[2, 1] and float(row.value.iloc[0]) == top.harmful_values[2, 1]
    path = top.save(tmp_path / "top")
    assert path.name == "top.npz" and not list(tmp_path.glob(".*tmp"))
    back = TopInfluence.load(tmp_path / "top")
    for a in ("test_ids", "helpful_ids", "helpful_values", "harmful_ids", "harmful_values"):
        np.testing.assert_array_equal(getattr(back, a), getattr(top, a))
    assert back.meta["top_k"] == 4 and back.meta["sign_convention"] == top.meta["sign_convention"]
    with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickle
        assert set(z.files) == {"test_ids", "helpful_ids", "helpful_values", "harmful_ids", "harmful_values",
                                "meta_json"}
    hessfree.Scores(np.zeros(3), np.arange(3)).save(tmp_path / "scores")
    with pytest.raises(InputError, match="not a saved TopInfluence"):
        TopInfluence.load(tmp_path / "scores.npz")
    with pytest.raises(InputError, match="TopInfluence holds"):
        TopInfluence([1, 2], np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((2, 3)))
