"""Loaders for the real data the project reads by path (never copies): UCI Adult and the
fairness-poisoning sets. Location: an explicit ``data_dir``, else ``$HESSFREE_DATA``, else
``../shared/data`` (from the working directory, then from the repository root)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from hessfree.errors import InputError


class DataNotFoundError(InputError, FileNotFoundError):
    """The shared data folder (or a file in it) is missing."""


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the shared data folder; raise DataNotFoundError saying where it looked."""
    if data_dir is not None:
        candidates = [Path(data_dir)]
    elif os.environ.get("HESSFREE_DATA"):
        candidates = [Path(os.environ["HESSFREE_DATA"])]
    else:
        candidates = [Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[3] / ".." / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise DataNotFoundError(
        f"shared data not found (looked in {', '.join(str(c) for c in candidates)}); pass data_dir=... or set "
        "HESSFREE_DATA to the folder holding adult/ and fairness_poisoning/")


@dataclass
class TabularData:
    """Features, labels and a binary sensitive attribute for a train and a test split (NumPy)."""

    X_train: np.ndarray
    y_train: np.ndarray
    s_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    s_test: np.ndarray
    feature_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def dataset(self, split: str = "train", label_dtype: torch.dtype = torch.float32) -> TensorDataset:
        """A TensorDataset (float32 features, labels as ``label_dtype``: float for bce, long for cross-entropy)."""
        X, y = (self.X_train, self.y_train) if split == "train" else (self.X_test, self.y_test)
        return TensorDataset(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y).to(label_dtype))


def _read_adult_csv(path: Path, columns: list[str]):
    import pandas as pd

    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing")
    # comment="|": test.csv opens with a junk line "|1x3 Cross validator"; blank lines are skipped.
    frame = pd.read_csv(path, header=None, names=columns, sep=",", skipinitialspace=True, na_values="?",
                        comment="|", skip_blank_lines=True, dtype=str)
    frame = frame.dropna(how="all")
    return frame.apply(lambda col: col.str.strip().str.rstrip("."))  # test labels end with "." (">50K.")


def adult(data_dir: str | os.PathLike | None = None, *, drop_missing: bool = True) -> TabularData:
    """UCI Adult as the fairness literature sets it up.

    Rows with a missing value (``?``) dropped (30,162 train / 15,060 test rows); ``fnlwgt`` dropped;
    label ``income >50K`` = 1; sensitive attribute ``sex`` (Male = 1, also kept as a feature);
    categorical columns one-hot encoded with the training categories; every feature column
    standardised with the training mean and standard deviation. ``meta`` carries ``l2_reg``.
    """
    root = data_root(data_dir) / "adult"
    meta = json.loads((root / "meta.json").read_text()) if (root / "meta.json").is_file() else None
    if meta is None:
        raise DataNotFoundError(f"{root / 'meta.json'} is missing")
    columns = meta["column_names"].split(",")
    train, test = _read_adult_csv(root / "train.csv", columns), _read_adult_csv(root / "test.csv", columns)
    if drop_missing:
        train, test = train.dropna(), test.dropna()
    categorical = [c for c in meta["categorical_feat"].split(",") if c != meta["target_feat"]]
    drop = set(meta["drop_feat"].split(",")) | {meta["target_feat"]}
    numeric = [c for c in columns if c not in categorical and c not in drop]
    target, sensitive = meta["target_feat"], meta["sensitive_feat"]
    label_map, sens_map = meta["label_mapping"][target], meta["label_mapping"][sensitive]

    def encode(frame):
        parts, names = [frame[numeric].astype(float).to_numpy()], list(numeric)
        for c in categorical:
            levels = sorted(train[c].dropna().unique())
            parts.append(np.stack([(frame[c] == v).to_numpy(dtype=float) for v in levels], 1))
            names += [f"{c}={v}" for v in levels]
        return np.concatenate(parts, 1), names

    Xtr, names = encode(train)
    Xte, _ = encode(test)
    mean, std = Xtr.mean(0), Xtr.std(0)
    std[std == 0] = 1.0
    Xtr, Xte = (Xtr - mean) / std, (Xte - mean) / std
    ytr, yte = (train[target].map(label_map).to_numpy(dtype=np.int64), test[target].map(label_map).to_numpy(np.int64))
    str_, ste = (train[sensitive].map(sens_map).to_numpy(dtype=np.int64),
                 test[sensitive].map(sens_map).to_numpy(dtype=np.int64))
    return TabularData(Xtr.astype(np.float32), ytr, str_, Xte.astype(np.float32), yte, ste, names,
                       {"l2_reg": meta.get("l2_reg"), "source": str(root)})


POISONING = ("german_raa", "german_nraa", "drug_raa", "drug_nraa")


def fairness_poisoning(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """One fairness-poisoning set (``german_raa``, ``german_nraa``, ``drug_raa``, ``drug_nraa``):
    the POISONED training set ``X_train, y_train, s_train`` with ``is_poisoned``, the clean training
    set (``*_clean``) and the clean test set. Arrays as stored (see the data README)."""
    key = name.lower().replace("-", "_")
    if key not in POISONING:
        raise InputError(f"unknown fairness_poisoning set {name!r}; use one of {list(POISONING)}")
    path = data_root(data_dir) / "fairness_poisoning" / f"{key}.npz"
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
