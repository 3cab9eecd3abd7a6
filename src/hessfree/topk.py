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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessfree.errors import InputError
from hessfree.scores import SIGN_CONVENTION, Scores, load_npz, resolve_k, save_npz

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
    aggregate: Scores | None = None  # one score per training sample across the queries (topk_influence)

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
        """Write an ``.npz`` (NumPy arrays + JSON metadata; no pickle), atomically; ``meta`` must be
        what JSON stores faithfully (see :meth:`hessfree.Scores.save`)."""
        arrays = {a: getattr(self, a) for a in _ARRAYS}
        meta = self.meta
        if self.aggregate is not None:
            arrays.update(aggregate_values=self.aggregate.values, aggregate_ids=self.aggregate.sample_ids)
            meta = {**meta, "aggregate_meta": self.aggregate.meta}
        return save_npz(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TopInfluence":
        arrays, meta = load_npz(path, _ARRAYS, "saved TopInfluence")
        aggregate = None
        if "aggregate_meta" in meta:
            if "aggregate_values" not in arrays or "aggregate_ids" not in arrays:
                raise InputError(f"{path}: the saved TopInfluence names an aggregate but lacks its arrays")
            aggregate = Scores(arrays["aggregate_values"], arrays["aggregate_ids"], meta.pop("aggregate_meta"))
        return cls(*(arrays[a] for a in _ARRAYS), meta=meta, aggregate=aggregate)


class TopKAccumulator:
    """Running top-k per row over blocks of columns that arrive in increasing column position.

    Keeps (M, k) values and positions for the largest (helpful) and the smallest (harmful)
    entries of each row: memory O(M × k), plus O(rows × (k + block columns)) per merge. Order:
    by value, ties by the lower position (``torch.topk`` alone leaves the order of ties open, so
    each merge takes the k-th value with ``torch.topk``, keeps every entry beyond it and, of the
    entries equal to it, those of the lowest positions, then sorts the k kept stably by value:
    the kept entries, in that order, precede the block, whose positions are higher and ascending).
    Rows where no new entry beats the k-th kept value are left alone. Unfilled slots hold ∓inf at
    distinct negative positions; they are gone once k columns have been merged.
    """

    def __init__(self, n_rows: int, k: int, device: Any = None):
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        self.k = k
        kw = dict(dtype=torch.float64, device=device)
        self.top_v = torch.full((n_rows, k), -torch.inf, **kw)
        self.low_v = torch.full((n_rows, k), torch.inf, **kw)
        empty = torch.arange(-k, 0, device=device).expand(n_rows, k)  # distinct: ties among them stay k
        self.top_p, self.low_p = empty.clone(), empty.clone()

    def add(self, rows: slice | Tensor, positions: Tensor, block: Tensor) -> None:
        """Merge ``block`` (R, B), float64, the values of ``rows`` (a slice or (R,) index) at the
        column ``positions`` (B,), which must all exceed the positions merged before into these
        rows (so that a block entry equal to the k-th kept value ranks after it)."""
        device = self.top_v.device
        block = block.to(device, torch.float64)
        rows = torch.arange(self.top_v.shape[0], device=device)[rows] if isinstance(rows, slice) else rows.to(device)
        pos = positions.to(device, torch.int64)
        for vals, poss, largest in ((self.top_v, self.top_p, True), (self.low_v, self.low_p, False)):
            kth = vals[rows, -1:]  # the k-th kept value of each row (∓inf while fewer than k were seen)
            # only rows where some new entry beats it change (equal entries come later: they lose)
            beats = ((block > kth) if largest else (block < kth)).any(1)
            if not bool(beats.any()):
                continue
            active, sub = (rows, block) if bool(beats.all()) else (rows[beats], block[beats])
            cand_v = torch.cat([vals[active], sub], 1)
            cand_p = torch.cat([poss[active], pos.expand(len(active), -1)], 1)
            cols = top_columns(cand_v, cand_p, self.k, largest, ordered=True)  # the kept ones, then the block
            vals[active] = cand_v.gather(1, cols)
            poss[active] = cand_p.gather(1, cols)

    def positions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(helpful positions, helpful values, harmful positions, harmful values), each (M, k)."""
        if bool((self.top_p < 0).any()) or bool((self.low_p < 0).any()):
            raise RuntimeError("internal error: fewer than k columns were merged into a row")
        return (self.top_p.cpu().numpy(), self.top_v.cpu().numpy(), self.low_p.cpu().numpy(),
                self.low_v.cpu().numpy())


def top_columns(values: Tensor, positions: Tensor, k: int, largest: bool = True, ordered: bool = False) -> Tensor:
    """(R, k) column indices of the k largest (``largest``) or smallest entries of each row of
    ``values`` (R, n), ordered by value, ties by the lower ``positions`` (R, n; distinct within a
    row) first: the order of ``np.argsort(∓values, kind="stable")`` over columns in position order.
    ``ordered``: the caller guarantees that entries of equal value already stand in position
    order along each row (as in :meth:`TopKAccumulator.add`), which saves a sort.

    O(n) per row (``torch.topk``, and one more over the rows with several entries equal to the
    k-th value) plus sorting the k chosen, instead of sorting all n.
    """
    v = values if largest else -values  # exact; -0.0 and 0.0 compare equal either way
    if k >= v.shape[1]:
        chosen = torch.arange(v.shape[1], device=v.device).expand_as(v)
    else:
        kth = torch.topk(v, k, dim=1, sorted=False).values.amin(1, keepdim=True)  # the k-th largest value
        keep = v >= kth  # k entries per row, or more where several equal the k-th value
        extra = keep.sum(1) > k
        if bool(extra.any()):  # of the entries equal to the k-th value, keep those of the lowest positions
            r = extra.nonzero()[:, 0]
            tied = v[r] == kth[r]
            need = k - (v[r] > kth[r]).sum(1, keepdim=True)  # at least 1
            tied_pos = torch.where(tied, positions[r], torch.iinfo(torch.int64).max)
            cut = torch.topk(tied_pos, k, dim=1, largest=False, sorted=True).values.gather(1, need - 1)
            keep[r] = (v[r] > kth[r]) | (tied & (positions[r] <= cut))
        chosen = keep.nonzero()[:, 1].view(v.shape[0], k)  # exactly k per row
    if not ordered:
        chosen = chosen.gather(1, positions.gather(1, chosen).argsort(dim=1))  # distinct positions: no ties
    by_value = v.gather(1, chosen).argsort(dim=1, descending=True, stable=True)  # ties keep position order
    return chosen.gather(1, by_value)
