"""Sample ids and batching over any map-style dataset.

Sample ids are positions in the dataset the user passed; for a ``torch.utils.data.Subset`` (or a
chain of them) they are the indices into the underlying dataset, so users never re-index.
"""
from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from hessfree.errors import InputError


def dataset_size(dataset: Dataset, what: str = "dataset") -> int:
    """The number of samples of a map-style dataset; InputError (naming ``what``) for anything else
    or an empty one."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InputError(f"the {what} must be a map-style dataset with __len__ and __getitem__, got a "
                         f"{type(dataset).__name__}") from exc
    if not callable(getattr(dataset, "__getitem__", None)):
        raise InputError(f"the {what} must be a map-style dataset with __len__ and __getitem__, got a "
                         f"{type(dataset).__name__}, which cannot be indexed; wrap its samples in a "
                         "torch.utils.data.TensorDataset or a list of (input, target) pairs")
    if n == 0:
        raise InputError(f"the {what} is empty: pass at least one sample")
    return n


def sample_ids(dataset: Dataset) -> np.ndarray:
    """Ids of the samples of ``dataset``, shape (N,), int64."""
    n = dataset_size(dataset)
    ids = np.arange(n, dtype=np.int64)
    while isinstance(dataset, Subset):
        ids = np.asarray(dataset.indices, dtype=np.int64)[ids]
        dataset = dataset.dataset
    return ids


def as_index(positions: np.ndarray) -> slice | np.ndarray:
    """A slice when ``positions`` is a contiguous ascending run (cheap views), else the array."""
    if len(positions) and positions[-1] - positions[0] + 1 == len(positions) and (
            len(positions) == 1 or bool(np.all(np.diff(positions) == 1))):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def is_plain_tensor_dataset(dataset: Any) -> bool:
    """A TensorDataset whose items are its tensors' rows (no ``__getitem__`` of a subclass, such
    as a transform, that indexing the tensors directly would skip)."""
    return isinstance(dataset, TensorDataset) and type(dataset).__getitem__ is TensorDataset.__getitem__


def _plain_subset(dataset: Any) -> bool:
    """A Subset whose items are its dataset's items (no ``__getitem__`` / ``__getitems__`` of a
    subclass, such as a transform on a split, that looking through it would skip)."""
    t = type(dataset)
    return (isinstance(dataset, Subset) and t.__getitem__ is Subset.__getitem__
            and getattr(t, "__getitems__", None) is getattr(Subset, "__getitems__", None))


def _through_subsets(dataset: Dataset, positions: np.ndarray) -> tuple[Dataset, np.ndarray]:
    """(the dataset under a chain of plain Subsets, the positions in it); only the batch's indices
    are looked up, so a long ``indices`` list is never converted as a whole."""
    idx = positions
    while _plain_subset(dataset):
        ind = dataset.indices
        if isinstance(ind, Tensor):
            if ind.dtype.is_floating_point or ind.dtype.is_complex or ind.dtype == torch.bool:
                raise InputError(f"Subset indices must be integers, got a {ind.dtype} tensor")
            idx = ind[torch.as_tensor(idx, device=ind.device)].cpu().numpy().astype(np.int64)
        elif isinstance(ind, np.ndarray):
            if not np.issubdtype(ind.dtype, np.integer):
                raise InputError(f"Subset indices must be integers, got an array of {ind.dtype}")
            idx = ind[idx].astype(np.int64)
        else:
            try:
                idx = np.fromiter((operator.index(ind[int(i)]) for i in idx), dtype=np.int64, count=len(idx))
            except TypeError as exc:
                raise InputError(f"Subset indices must be integers: {exc}") from exc
        dataset = dataset.dataset
    return dataset, idx


def tensor_rows(dataset: Dataset, positions: np.ndarray) -> tuple[TensorDataset, np.ndarray] | None:
    """(the plain TensorDataset under ``dataset``, the rows of ``positions`` in it), through a
    chain of plain Subsets; None when items must be read one at a time. Out-of-range indices
    raise as indexing item by item would; negative ones are made explicit."""
    base, idx = dataset, np.asarray(positions, dtype=np.int64)
    if _plain_subset(dataset):
        base, idx = _through_subsets(dataset, idx)
    if not is_plain_tensor_dataset(base):
        return None
    if base is not dataset and len(idx):
        n = len(base)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -n or hi >= n:  # (a slice over a contiguous run would cut it short instead)
            raise IndexError(f"Subset index {lo if lo < -n else hi} is out of range for its TensorDataset of "
                             f"{n} samples")
        if lo < 0:  # Python's negative indices, made explicit so that a run of them is no slice
            idx = np.where(idx < 0, idx + n, idx)
    return base, idx


def _fetch(dataset: Dataset, positions: np.ndarray, contiguous: bool = False) -> Any:
    rows = tensor_rows(dataset, positions)  # a Subset chain (e.g. random_split): its rows, not item by item
    if rows is None:
        return default_collate([dataset[int(i)] for i in positions])
    base, idx = rows
    whole_run = contiguous and base is dataset
    index = slice(int(idx[0]), int(idx[-1]) + 1) if whole_run else as_index(idx)
    if isinstance(index, np.ndarray):
        index = torch.as_tensor(index)
    return tuple(t[index] for t in base.tensors)


def check_batch_size(batch_size: Any, what: str = "batch_size") -> int:
    """``batch_size`` as an int >= 1; InputError for anything else (0, -1, 1.5, True, "8")."""
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"{what} must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def iter_batches(dataset: Dataset, batch_size: int, order: np.ndarray | None = None
                 ) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield (positions, collated batch) over ``dataset`` in ``order`` (default: 0..N-1)."""
    batch_size = check_batch_size(batch_size)
    n = dataset_size(dataset)
    contiguous = order is None  # 0..N-1: every batch is a slice
    order = np.arange(n, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    for start in range(0, len(order), batch_size):
        pos = order[start:start + batch_size]
        yield pos, _fetch(dataset, pos, contiguous)


def map_tensors(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it, each container rebuilt with its own type:
    dicts and other Mappings (UserDict, a tokenizer's BatchEncoding), namedtuples, lists, tuples.
    Anything else is returned as it is."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        items = {k: map_tensors(fn, v) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        try:
            return type(obj)(items)
        except TypeError:  # a Mapping that cannot be built from a dict
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


def leaves_in(obj: Any) -> list[Any]:
    """Everything in a (nested) batch that is not one of the containers :func:`map_tensors`
    walks (tensors, and anything else: numbers, strings, None), in the order it visits them, no
    container rebuilt."""
    if isinstance(obj, Mapping):
        obj = obj.values()
    elif not isinstance(obj, (list, tuple)):
        return [obj]
    return [t for v in obj for t in leaves_in(v)]


def tensors_in(obj: Any) -> list[Tensor]:
    """Every tensor in a (nested) batch, in :func:`map_tensors` order."""
    return [t for t in leaves_in(obj) if isinstance(t, Tensor)]


def with_tensors(template: Any, tensors: list[Any]) -> Any:
    """``template`` with its tensors replaced, in :func:`tensors_in` order, by ``tensors`` (its
    containers rebuilt by :func:`map_tensors`): how a batch in a container that ``torch.func``
    cannot map over (a UserDict, a tokenizer's BatchEncoding) goes through ``vmap`` as a list."""
    it = iter(tensors)
    return map_tensors(lambda _t: next(it), template)


def to_device(obj: Any, device: torch.device | str | None, dtype: torch.dtype | None) -> Any:
    """Move tensors in a (nested) batch to ``device``; floating tensors are cast to ``dtype``."""
    def move(t: Tensor) -> Tensor:
        if dtype is not None and t.dtype.is_floating_point:
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)
    return map_tensors(move, obj)


def batch_len(obj: Any) -> int:
    """Number of samples in a collated batch (size of the first tensor's leading dimension)."""
    if isinstance(obj, Tensor):
        return obj.shape[0]
    if isinstance(obj, Mapping):
        return batch_len(next(iter(obj.values())))
    if isinstance(obj, (list, tuple)):
        return batch_len(obj[0])
    raise InputError(f"cannot find the batch dimension of a {type(obj).__name__}")


FINGERPRINT_SAMPLES = 64  # samples whose content enters a dataset's fingerprint


def fingerprint(dataset: Dataset, ids: np.ndarray | None = None) -> dict[str, Any]:
    """A cheap identity of a dataset: its size, a SHA-256 of its sample ids, and a SHA-256 of the
    content of up to :data:`FINGERPRINT_SAMPLES` samples spread evenly over it (first and last
    included: every tensor's dtype, shape and bytes; other values by ``repr``).

    Two datasets of the same size and ids but other data differ in it unless they agree on every
    sample looked at; it is a check against passing the wrong dataset, not a proof of identity.
    """
    import hashlib

    n = dataset_size(dataset)
    ids = sample_ids(dataset) if ids is None else ids
    id_hash = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()
    h = hashlib.sha256()
    pos = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLES)).round().astype(np.int64))
    for _, batch in iter_batches(dataset, len(pos), order=pos):
        for leaf in leaves_in(batch):
            if isinstance(leaf, Tensor):
                t = leaf.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(leaf).encode())
    return {"n": int(n), "ids_sha256": id_hash, "content_sha256": h.hexdigest(), "content_samples": int(len(pos))}
