"""Scores: the result of every method, with the ids of the samples they belong to.

Sign convention (one for the whole project): an **influence** score is the estimated increase of
the target if the sample is removed from training. For a loss target (``goal="minimize"``)
positive = helpful, negative = harmful. For a target to maximise (e.g. a class logit) positive =
the sample held the target down (harmful). **Outlier**-kind scores (self-influence, loss, GraNd,
EL2N, OGA) are higher = more suspicious. ``harmful(k)`` / ``helpful(k)`` apply this for you.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hessfree.errors import InputError
from hessfree.io import atomic_path

SIGN_CONVENTION = ("influence = estimated increase of the target if the sample is removed "
                   "(loss target: positive = helpful, negative = harmful); outlier scores: higher = more suspicious")


@dataclass
class Scores:
    """``values`` (N,) over training samples, or (M, N) for M test samples × N training samples.

    ``sample_ids`` (N,) name the training samples; ``test_ids`` (M,) the test samples of a
    pairwise matrix. ``meta`` holds the method, checkpoints, parameter selection, target, sign
    convention and timing; ``meta["kind"]`` is ``"influence"`` or ``"outlier"``.
    """

    values: np.ndarray
    sample_ids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    test_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values)
        self.sample_ids = np.asarray(self.sample_ids, dtype=np.int64)
        if self.values.shape[-1] != len(self.sample_ids):
            raise InputError(f"values of shape {self.values.shape} do not match {len(self.sample_ids)} sample ids")
        if self.test_ids is not None:
            self.test_ids = np.asarray(self.test_ids, dtype=np.int64)
            if self.values.ndim != 2 or len(self.test_ids) != self.values.shape[0]:
                raise InputError(f"{len(self.test_ids)} test ids for values of shape {self.values.shape}: a pairwise "
                                 "matrix has one row per test sample")
        self.meta = dict(self.meta)  # never modify the caller's dict
        self.meta.setdefault("kind", "influence")
        self.meta.setdefault("goal", "minimize")
        self.meta.setdefault("sign_convention", SIGN_CONVENTION)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def __repr__(self) -> str:
        return f"Scores(method={self.meta.get('method')!r}, shape={self.values.shape}, kind={self.meta['kind']!r})"

    def suspicion(self) -> np.ndarray:
        """Values turned so that higher = more harmful / suspicious (same shape as ``values``)."""
        if self.meta["kind"] == "outlier" or self.meta["goal"] == "maximize":
            return self.values
        return -self.values

    def _top(self, k: int | float, key: np.ndarray) -> np.ndarray:
        k = resolve_k(k, len(self.sample_ids))
        return self.sample_ids[_order(key)[..., :k]]

    def flag(self, k: int | float | None = None) -> np.ndarray:
        """Boolean mask (N,), aligned with ``sample_ids``, flagging exactly the k most suspicious.

        Ranks by the continuous score (never a detector's ±1 prediction), ties broken stably
        (the lower position first), so exactly k are flagged. ``k``: a count, a fraction of N in
        (0, 1), or None for the budget given to the method (``outlier_scores(..., k=...)``).
        """
        if self.values.ndim != 1:
            raise InputError("flag() needs one score per training sample; this is a matrix")
        if k is None:
            k = self.meta.get("flag_k")
            if k is None:
                raise InputError("give k (a count or a fraction of N): no flagging budget was set when scoring")
        k = resolve_k(k, len(self.sample_ids))
        mask = np.zeros(len(self.sample_ids), dtype=bool)
        mask[_order(self.suspicion())[:k]] = True
        return mask

    def harmful(self, k: int | float) -> np.ndarray:
        """Ids of the k most harmful / suspicious samples, most harmful first ((M, k) for a matrix)."""
        return self._top(k, self.suspicion())

    def helpful(self, k: int | float) -> np.ndarray:
        """Ids of the k most helpful (least suspicious) samples, most helpful first."""
        return self._top(k, -self.suspicion())

    def to_frame(self):
        """A pandas DataFrame: one row per training sample (columns = test ids for a matrix)."""
        import pandas as pd

        if self.values.ndim == 1:
            return pd.DataFrame({"sample_id": self.sample_ids, "score": self.values}).set_index("sample_id")
        cols = self.test_ids if self.test_ids is not None else np.arange(self.values.shape[0])
        frame = pd.DataFrame(self.values.T, index=pd.Index(self.sample_ids, name="sample_id"), columns=cols)
        frame.columns.name = "test_id"
        return frame

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (NumPy arrays + JSON metadata; no pickle), atomically.

        ``meta`` must be what JSON stores faithfully: strings, numbers, booleans, None, lists,
        tuples (read back as lists) and dicts with string keys; NumPy scalars are stored as
        numbers. Anything else (a tensor, an array, a function, an object) is refused with an
        InputError naming its key, before anything is written. A save that fails or is killed
        leaves the previous file at ``path`` as it was.
        """
        arrays = {"values": self.values, "sample_ids": self.sample_ids}
        if self.test_ids is not None:
            arrays["test_ids"] = self.test_ids
        return save_npz(path, arrays, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Scores":
        """Read a file written by :meth:`save`; anything else raises InputError saying what is wrong."""
        arrays, meta = load_npz(path, ("values", "sample_ids"), "hessfree scores file")
        return cls(arrays["values"], arrays["sample_ids"], meta, arrays.get("test_ids"))


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Numeric arrays and JSON metadata (:func:`_storable`) to ``path`` (``.npz`` added if missing),
    atomically, without pickle. Refuses non-numeric arrays and unfaithful metadata before writing."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    for name, a in arrays.items():
        if np.asarray(a).dtype.kind not in "biuf":
            raise InputError(f"cannot save {name}: it holds {np.asarray(a).dtype} values, not numbers")
    meta_json = json.dumps(_storable(meta, "meta"), allow_nan=True)
    arrays = {**arrays, "meta_json": np.frombuffer(meta_json.encode(), dtype=np.uint8)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return path


def load_npz(path: str | os.PathLike, required: tuple[str, ...], what: str
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of a file written by :func:`save_npz`, the ``required`` arrays
    present and numeric; anything else raises InputError naming ``what`` was expected."""
    path = Path(path)
    if not path.exists() and path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")  # the name save() was given
    if not path.is_file():
        raise InputError(f"no {what} at {path}")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"it holds one {type(z).__name__}, not the arrays of an .npz")
        with z:
            missing = [k for k in (*required, "meta_json") if k not in z.files]
            if missing:
                raise InputError(f"{path} is not a {what}: it has no {', '.join(missing)}")
            try:
                meta = json.loads(z["meta_json"].tobytes().decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"{path}: its metadata (meta_json) is not valid JSON ({exc}); was it written by "
                                 "hessfree and copied whole?") from exc
            arrays = {k: z[k] for k in z.files if k != "meta_json"}
    except InputError:
        raise
    except (OSError, ValueError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        # ValueError covers a pickled (object) array, which is never loaded
        raise InputError(f"{path} cannot be read as a {what} ({type(exc).__name__}: {exc}); was it written by "
                         "hessfree and copied whole?") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{path}: its metadata is not a JSON object")
    for k in required:
        if arrays[k].dtype.kind not in "biuf":
            raise InputError(f"{path}: its {k} are of dtype {arrays[k].dtype}, not numbers")
    return arrays, meta


def _storable(obj: Any, where: str) -> Any:
    """``obj`` as JSON stores it faithfully, or InputError naming the first thing it cannot store."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return obj.item()
    if isinstance(obj, (list, tuple)):
        return [_storable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise InputError(f"Scores.save cannot store {where}: key {k!r} is not a string (JSON keys are strings)")
            out[k] = _storable(v, f"{where}[{k!r}]")
        return out
    raise InputError(f"Scores.save cannot store {where} faithfully: it is a {type(obj).__name__} (JSON holds strings, "
                     "numbers, booleans, None, lists and dicts); convert it (e.g. .tolist() for an array) or leave it "
                     "out of meta")


def resolve_k(k: Any, n: int) -> int:
    """A budget as a count in [1, n]: an int, or a fraction 0 < k < 1 of n (rounded, at least 1).

    The one rule for every ``k`` in hessfree (``Scores.harmful`` / ``helpful`` / ``flag``, the
    metrics' ``@k``, ``outlier_scores(k=)``); a bad value raises InputError (a ValueError).
    """
    if isinstance(k, (bool, np.bool_)):
        raise InputError(f"k must be an int (1 <= k <= {n}) or a fraction 0 < k < 1, not a bool")
    if isinstance(k, (int, np.integer)):
        if not 1 <= int(k) <= n:
            raise InputError(f"k must be an int with 1 <= k <= {n} (the number of points) or a fraction "
                             f"0 < k < 1, got k={int(k)}")
        return int(k)
    if isinstance(k, (float, np.floating)):
        if not 0.0 < float(k) < 1.0:
            raise InputError(f"k must be a fraction 0 < k < 1 when it is a float, got k={float(k)}; pass an int "
                             f"for an absolute count (1 <= k <= {n})")
        return max(1, min(n, int(round(float(k) * n))))
    raise InputError(f"k must be an int (1 <= k <= {n}) or a fraction 0 < k < 1; got {type(k).__name__}")


def _order(key: np.ndarray) -> np.ndarray:
    """Positions from highest to lowest key along the last axis; ties keep the lower position first."""
    return np.argsort(-key, axis=-1, kind="stable")
