"""Loaders for the shared real data (skipped with a reason when it is absent) and label noise."""
from __future__ import annotations

import numpy as np
import pytest

from hessfree import data
from hessfree.errors import InputError

try:
    ROOT = data.data_root()
except data.DataNotFoundError as exc:  # pragma: no cover - depends on the machine
    ROOT = None
    REASON = str(exc)
needs_data = pytest.mark.skipif(ROOT is None, reason="shared data absent: " + (REASON if ROOT is None else ""))


@needs_data
def test_adult_quirks_and_shapes():
    d = data.adult()
    # rows with a missing value dropped; test.csv's junk line, blank lines and trailing dots handled
    assert d.X_train.shape[0] == 30162 and d.X_test.shape[0] == 15060
    assert d.X_train.shape[1] == d.X_test.shape[1] == len(d.feature_names)
    assert np.isfinite(d.X_train).all() and np.isfinite(d.X_test).all()
    assert set(np.unique(d.y_test)) == {0, 1} and set(np.unique(d.s_train)) == {0, 1}
    assert 0.2 < d.y_test.mean() < 0.3  # >50K. (with the dot) was mapped, not dropped
    assert np.abs(d.X_train.mean(0)).max() < 1e-4  # standardised on train
    assert "sex=Male" in d.feature_names and "fnlwgt" not in d.feature_names
    assert d.meta["l2_reg"] == pytest.approx(2.2622)
    ds = d.dataset("test")
    assert len(ds) == 15060


@needs_data
def test_adult_keeps_missing_rows_when_asked():
    assert data.adult(drop_missing=False).X_train.shape[0] == 32561


@needs_data
@pytest.mark.parametrize("name", data.shared.POISONING)
def test_fairness_poisoning(name):
    z = data.fairness_poisoning(name)
    assert len(z["X_train"]) == len(z["y_train"]) == len(z["is_poisoned"]) == len(z["s_train"])
    assert 0 < z["is_poisoned"].sum() < len(z["is_poisoned"])


def test_data_location_errors(tmp_path, monkeypatch):
    with pytest.raises(data.DataNotFoundError, match="HESSFREE_DATA"):
        data.data_root(tmp_path / "nowhere")
    monkeypatch.setenv("HESSFREE_DATA", str(tmp_path))
    assert data.data_root() == tmp_path.resolve()
    with pytest.raises(data.DataNotFoundError, match="missing"):
        data.fairness_poisoning("german_raa")
    with pytest.raises(InputError, match="unknown fairness_poisoning"):
        data.fairness_poisoning("mnist")


def test_uniform_flips():
    y = np.repeat(np.arange(5), 40)
    noisy, mask = data.flip_labels(y, 0.2, seed=3)
    assert mask.sum() == 40 and (noisy[mask] != y[mask]).all() and (noisy[~mask] == y[~mask]).all()
    again, _ = data.flip_labels(y, 0.2, seed=3)
    assert np.array_equal(noisy, again)


def test_class_dependent_flips():
    y = np.repeat(np.arange(3), 2000)
    noisy, mask = data.flip_labels_class_dependent(y, {0: (1, 0.3)}, seed=0)
    assert (noisy[y != 0] == y[y != 0]).all()  # only class 0 flips ...
    assert set(noisy[mask]) == {1}  # ... and only to class 1
    assert abs(mask[y == 0].mean() - 0.3) < 0.05
    T = np.full((3, 3), 0.1) + np.eye(3) * 0.7
    n2, m2 = data.flip_labels_class_dependent(y, T, seed=1)
    assert abs(m2.mean() - 0.2) < 0.03
    assert np.array_equal(n2, data.flip_labels_class_dependent(y, T, seed=1)[0])
    with pytest.raises(InputError, match="row-stochastic"):
        data.flip_labels_class_dependent(y, np.ones((3, 3)))
