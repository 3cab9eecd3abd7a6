"""A gradient stream: the training set's per-sample gradients, chunk by chunk, at every checkpoint.

A chunk is a fixed range of training rows ``[start, stop)`` (chunk ``c`` starts at
``c · chunk_rows``); for it the stream yields, per checkpoint, the rows' flattened per-sample
gradients (exact, or their projection by a :mod:`hessfree.grads.projectors` projector) and their
exact squared norms (taken before any projection). Every chunk is computed in the same batches
(``batch_size`` rows from the chunk's start), one checkpoint at a time, so a chunk's values do not
depend on which other chunks are computed, in what order, or by which process: that is what makes
an on-disk store (:mod:`hessfree.store`, a recorded stream) resumable and identical for any number
of processes.

The query side (test sets, targets) is projected with the same projector
(:meth:`GradientStream.query_gradients`), so that products of the two are the TracIn products
(exactly, or as the projection preserves them).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hessfree.datasets import check_batch_size, dataset_size, iter_batches, sample_ids
from hessfree.errors import InputError
from hessfree.grads.blocks import BatchGrads, DenseBlock
from hessfree.grads.engine import GradientEngine, _check_finite
from hessfree.grads.select import ParamSpec, select_parameters
from hessfree.run import Run

_CHUNK_BYTES = 256 << 20  # default chunk: the (checkpoints, rows, dim) gradients within this many bytes
_STATE_CACHE_BYTES = 1 << 30  # checkpoints kept in memory between chunks when all of them fit


@dataclass
class Chunk:
    """One chunk of the stream: rows ``start`` … ``stop − 1`` of the training set."""

    index: int
    start: int
    stop: int
    ids: np.ndarray  # (rows,) sample ids
    grads: Tensor  # (checkpoints, rows, dim) per-sample gradients (or their projection)
    sq_norms: Tensor  # (checkpoints, rows) float64 squared norms of the exact gradients

    def __len__(self) -> int:
        return self.stop - self.start


def state_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checkpoint_indices(run: Run, checkpoints: Sequence[int] | str | None) -> list[int]:
    from hessfree.methods.common import checkpoint_indices  # the one rule for every method

    return checkpoint_indices(run, checkpoints)


class GradientStream:
    """Per-sample gradients of ``dataset`` under ``run``, a chunk of rows at a time.

    ``params``: as everywhere ("all", "last_layer", names); ``checkpoints``: None (all), "last" or
    indices; ``projection``: None (exact) or a projector spec (:func:`hessfree.grads.projectors.
    make_projector`); ``chunk_rows``: rows per chunk (default: as many whole batches as keep one
    chunk's gradients within 256 MiB); ``dtype``: the compute dtype of the gradients.

    Use as a context manager (it holds the gradient engine's hooks on the model).
    """

    def __init__(self, run: Run, dataset: Dataset, *, params: ParamSpec = "all",
                 checkpoints: Sequence[int] | str | None = None, projection: Any = None, batch_size: int = 256,
                 chunk_rows: int | None = None, dtype: torch.dtype = torch.float32, device: Any = None):
        self.ks = _checkpoint_indices(run, checkpoints)
        self.run, self.dataset = run, dataset
        self.n = dataset_size(dataset, "training dataset")
        self.batch_size = check_batch_size(batch_size)
        self.ids = sample_ids(dataset)
        self.names = select_parameters(run.model, params)
        state = dict(run.model.named_parameters())
        self.shapes = {n: tuple(state[n].shape) for n in self.names}
        self.etas = [float(run.checkpoints[k].learning_rate) for k in self.ks]
        self.dtype = dtype
        from hessfree.grads.projectors import make_projector

        self.projector = make_projector(projection, self.shapes, device=device)
        self.dim = self.projector.dim if self.projector is not None else sum(
            int(np.prod(s)) for s in self.shapes.values())
        if chunk_rows is None:
            per_row = len(self.ks) * self.dim * 4
            chunk_rows = max(1, _CHUNK_BYTES // max(1, per_row) // self.batch_size) * self.batch_size
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise InputError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        self.chunk_rows = int(chunk_rows)
        self.engine = GradientEngine(run.model, run.task, self.names, device=device, dtype=dtype)
        self._states: dict[int, dict[str, Tensor]] | None = None
        self._labels_checked: bool | None = None

    # -- context ------------------------------------------------------------------------
    def __enter__(self) -> "GradientStream":
        self.engine.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.engine.__exit__(*exc)

    # -- shape of the stream ------------------------------------------------------------
    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_rows)

    def bounds(self, c: int) -> tuple[int, int]:
        if not 0 <= c < self.n_chunks:
            raise IndexError(f"chunk {c} of {self.n_chunks}")
        return c * self.chunk_rows, min(self.n, (c + 1) * self.chunk_rows)

    def describe(self) -> dict[str, Any]:
        """What fixes the stream's values (for a store's manifest)."""
        return {"params": list(self.names), "param_shapes": {n: list(s) for n, s in self.shapes.items()},
                "checkpoints": list(self.ks), "learning_rates": list(self.etas),
                "projection": None if self.projector is None else self.projector.describe(), "dim": int(self.dim),
                "batch_size": self.batch_size, "chunk_rows": self.chunk_rows,
                "compute_dtype": str(self.dtype).replace("torch.", ""), "loss": self.run.task.name}

    # -- checkpoints --------------------------------------------------------------------
    def state(self, k: int) -> dict[str, Tensor]:
        """Checkpoint k's state (kept in memory between chunks when all checkpoints fit 1 GiB)."""
        if self._states is None:
            first = self.run.checkpoint_state(self.ks[0])
            size = sum(t.numel() * t.element_size() for t in first.values()) * len(set(self.ks))
            self._states = {} if size <= _STATE_CACHE_BYTES else None
            if self._states is not None:
                self._states[self.ks[0]] = first
            if k == self.ks[0]:
                return first
        if self._states is None:
            return self.run.checkpoint_state(k)
        if k not in self._states:
            self._states[k] = self.run.checkpoint_state(k)
        return self._states[k]

    def checkpoint_fingerprints(self) -> list[str]:
        return [state_sha256(self.state(k)) for k in self.ks]

    def check_training_data(self) -> None:
        """Check the training labels against the loss, and that the model runs on the first batch
        (once, before any gradient work; InputError naming the dataset otherwise)."""
        if self._labels_checked is None:
            from hessfree.methods.common import check_labels

            self._bind(self.ks[0])
            self._labels_checked = check_labels(self.engine, self.dataset, "training dataset")

    def _bind(self, k: int) -> None:
        self.engine.bind(self.state(k))

    # -- values -------------------------------------------------------------------------
    def _flatten(self, bg: BatchGrads) -> Tensor:
        if self.projector is not None:
            return self.projector.project(bg)
        return bg.dense(self.names)

    def gradients(self, dataset: Dataset, positions: np.ndarray, ids: np.ndarray, k: int, validate: bool
                  ) -> tuple[Tensor, Tensor]:
        """(rows, dim) gradients and (rows,) float64 exact squared norms of ``dataset`` at
        ``positions``, at checkpoint ``k`` (bound by the caller), in batches of ``batch_size``."""
        grads, norms = [], []
        for pos, batch in iter_batches(dataset, self.batch_size, order=positions):
            bg = self.engine.batch_grads(batch, ids[pos - positions[0]] if len(pos) else pos, validate=validate,
                                         check_loss=False)
            sq = bg.sq_norms().double()
            _check_finite(sq, ids[pos - positions[0]], "loss or gradient")
            grads.append(self._flatten(bg).detach())
            norms.append(sq.detach())
        return torch.cat(grads), torch.cat(norms)

    def chunk(self, c: int) -> Chunk:
        """Chunk ``c``, computed now (every checkpoint bound in turn)."""
        start, stop = self.bounds(c)
        positions = np.arange(start, stop)
        ids = self.ids[start:stop]
        grads, norms = [], []
        self.check_training_data()
        for k in self.ks:
            self._bind(k)
            g, sq = self.gradients(self.dataset, positions, ids, k, validate=not self._labels_checked)
            grads.append(g)
            norms.append(sq)
        return Chunk(c, start, stop, ids, torch.stack(grads), torch.stack(norms))

    def chunks(self, indices: Sequence[int] | None = None) -> Iterator[Chunk]:
        for c in (range(self.n_chunks) if indices is None else indices):
            yield self.chunk(c)

    def query_gradients(self, dataset: Dataset, what: str = "query dataset") -> tuple[Tensor, Tensor]:
        """(checkpoints, M, dim) gradients of a query set (its own labels) and (checkpoints, M)
        float64 exact squared norms, projected as the training rows are."""
        m = dataset_size(dataset, what)
        ids = sample_ids(dataset)
        from hessfree.methods.common import check_labels

        grads, norms = [], []
        checked = None
        for k in self.ks:
            self._bind(k)
            if checked is None:
                checked = check_labels(self.engine, dataset, what)
            g, sq = self.gradients(dataset, np.arange(m), ids, k, validate=not checked)
            grads.append(g)
            norms.append(sq)
        return torch.stack(grads), torch.stack(norms)

    def target_gradients(self, target: Any) -> Tensor:
        """(checkpoints, 1, dim) gradient of a :mod:`hessfree.targets` target at each checkpoint,
        projected as the training rows are."""
        out = []
        for k in self.ks:
            self._bind(k)
            q = {n: v.detach() for n, v in target.gradient(self.engine).items()}
            _check_finite(torch.stack([v.abs().sum() for v in q.values()]), None, "target gradient")
            dense = torch.cat([q[n].reshape(1, -1) for n in self.names], 1)
            bg = BatchGrads([DenseBlock(dense, list(self.names), [int(np.prod(self.shapes[n])) for n in self.names])],
                            torch.zeros(1, dtype=dense.dtype, device=dense.device))
            out.append(self._flatten(bg))
        return torch.stack(out)
