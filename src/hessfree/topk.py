"""Streaming top-k of a pairwise influence: per test sample, the k most helpful and the k most
harmful training samples, without the n_test × N matrix.

:class:`TopInfluence` is what ``pairwise_influence(..., top_k=k)`` returns; :class:`TopKAccumulator`
merges blocks of the matrix (test rows × a batch of training columns, in increasing training
position) into running buffers of k entries per row.

Order (the same as ``Scores.helpful`` / ``Scores.harmful`` on the dense matrix): helpful = largest
values first, harmful = smallest first, ties between equal values broken by the lower training
position first. Sign convention as everywhere (a loss target: positive = helpful).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessfree.errors import InputError
from hessfree.io import atomic_path
from hessfree.scores import SIGN_CONVENTION, _jsonable, resolve_k

_ARRAYS = ("test_ids", "helpful_ids", "helpful_values", "harmful_ids", "harmful_values")


@dataclass
class TopInfluence:
    """The k most helpful and k most harmful training samples of each test sample.

    ``test_ids`` (M,) name the test samples; ``helpful_ids`` / ``harmful_ids`` (M, k) are training
    sample ids (not positions), most helpful / most harmful first; ``helpful_values`` /
    ``harmful_values`` (M, k) float64 are their pairwise influence values. ``meta`` as in
    :class:`hessfree.Scores` (method, checkpoints, parameter selection, sign convention, timing,
    ``top_k``).
    """

    test_ids: np.ndarray
    helpful_ids: np.ndarray
    helpful_values: np.ndarray
    harmful_ids: np.ndarray
    harmful_values: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.test_ids = np.asarray(self.test_ids, dtype=np.int64).reshape(-1)
        for name in ("helpful_ids", "harmful_ids"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        for name in ("helpful_values", "harmful_values"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        shape = self.helpful_ids.shape
        if len(shape) != 2 or shape[0] != len(self.test_ids) or any(
                getattr(self, a).shape != shape for a in _ARRAYS[2:]):
            raise InputError(f"a TopInfluence holds (M, k) ids and values for M = {len(self.test_ids)} test ids; got "
                             + ", ".join(f"{a} {getattr(self, a).shape}" for a in _ARRAYS[1:]))
        self.meta = dict(self.meta)  # never modify the caller's dict
        self.meta.setdefault("kind", "influence")
        self.meta.setdefault("goal", "minimize")
        self.meta.setdefault("sign_convention", SIGN_CONVENTION)

    @property
    def k(self) -> int:
        return self.helpful_ids.shape[1]

    def __len__(self) -> int:
        return len(self.test_ids)

    def __repr__(self) -> str:
        return f"TopInfluence(method={self.meta.get('method')!r}, n_test={len(self.test_ids)}, k={self.k})"

    def _first(self, k: int | float | None) -> int:
        return self.k if k is None else resolve_k(k, self.k)

    def helpful(self, k: int | float | None = None) -> np.ndarray:
        """(M, k) ids of the k most helpful training samples of each test sample (default: all kept)."""
        return self.helpful_ids[:, :self._first(k)]

    def harmful(self, k: int | float | None = None) -> np.ndarray:
        """(M, k) ids of the k most harmful training samples of each test sample (default: all kept)."""
        return self.harmful_ids[:, :self._first(k)]

    def to_frame(self):
        """A long pandas DataFrame: one row per (test sample, list, rank) with columns ``test_id``,
        ``kind`` (``"helpful"`` / ``"harmful"``), ``rank`` (0 = most), ``sample_id``, ``value``."""
        import pandas as pd

        m, k = self.helpful_ids.shape
        frames = []
        for kind in ("helpful", "harmful"):
            frames.append(pd.DataFrame({
                "test_id": np.repeat(self.test_ids, k), "kind": kind, "rank": np.tile(np.arange(k), m),
                "sample_id": getattr(self, f"{kind}_ids").reshape(-1),
                "value": getattr(self, f"{kind}_values").reshape(-1)}))
        return pd.concat(frames, ignore_index=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (NumPy arrays + JSON metadata; no pickle), atomically."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = {a: getattr(self, a) for a in _ARRAYS}
        arrays["meta_json"] = np.frombuffer(json.dumps(self.meta, default=_jsonable).encode(), dtype=np.uint8)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TopInfluence":
        path = Path(path)
        if not path.exists() and path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")  # the name save() was given
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in (*_ARRAYS, "meta_json") if a not in z.files]
            if missing:
                raise InputError(f"{path} is not a saved TopInfluence (it lacks {', '.join(missing)})")
            meta = json.loads(z["meta_json"].tobytes().decode())
            return cls(*(z[a] for a in _ARRAYS), meta=meta)


class TopKAccumulator:
    """Running top-k per row over blocks of columns that arrive in increasing column position.

    Keeps (M, k) values and positions for the largest (helpful) and the smallest (harmful)
    entries of each row: memory O(M × k), plus O(rows × (k + block columns)) per merge. Each merge
    sorts [current k, new block] with a stable sort, so that among equal values the entry seen
    first, i.e. the lower position, comes first (``torch.topk`` leaves the order of ties open).
    Unfilled slots hold ∓inf at position ``-1``; they sort behind every finite value and are gone
    once k columns have been merged.
    """

    def __init__(self, n_rows: int, k: int, device: Any = None):
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        self.k = k
        kw = dict(dtype=torch.float64, device=device)
        self.top_v = torch.full((n_rows, k), -torch.inf, **kw)
        self.low_v = torch.full((n_rows, k), torch.inf, **kw)
        self.top_p = torch.full((n_rows, k), -1, dtype=torch.int64, device=device)
        self.low_p = torch.full((n_rows, k), -1, dtype=torch.int64, device=device)

    def add(self, rows: slice | Tensor, positions: Tensor, block: Tensor) -> None:
        """Merge ``block`` (R, B), float64, the values of ``rows`` (a slice or (R,) index) at the
        column ``positions`` (B,), which must all exceed the positions merged before into these rows."""
        pos = positions.to(self.top_p.device, torch.int64).expand(block.shape[0], -1)
        block = block.to(self.top_v.device, torch.float64)
        for vals, poss, descending in ((self.top_v, self.top_p, True), (self.low_v, self.low_p, False)):
            cand_v = torch.cat([vals[rows], block], 1)
            cand_p = torch.cat([poss[rows], pos], 1)
            order = torch.sort(cand_v, dim=1, descending=descending, stable=True).indices[:, :self.k]
            vals[rows] = cand_v.gather(1, order)
            poss[rows] = cand_p.gather(1, order)

    def positions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(helpful positions, helpful values, harmful positions, harmful values), each (M, k)."""
        if bool((self.top_p < 0).any()) or bool((self.low_p < 0).any()):
            raise RuntimeError("internal error: fewer than k columns were merged into a row")
        return (self.top_p.cpu().numpy(), self.top_v.cpu().numpy(), self.low_p.cpu().numpy(),
                self.low_v.cpu().numpy())
