"""Seeded sparse Johnson–Lindenstrauss projection of per-sample gradients, built a chunk at a time.

``R`` (P × k) has i.i.d. entries ``+v`` or ``−v`` with probability ``density / 2`` each and ``0``
otherwise, ``v = 1 / sqrt(density · k)``, so ``E[(Rᵀx)·(Rᵀy)] = x·y`` (Achlioptas 2003; Li, Hastie
and Church 2006). The default ``density = 1 / sqrt(P)`` is scikit-learn's
``SparseRandomProjection(density="auto")``.

Rows of ``R`` are generated in chunks of ``chunk_rows(k)`` rows (a function of k alone, at most
2²² entries each); chunk ``c`` comes from NumPy's PCG64 seeded by ``SeedSequence([seed, c])``, so
the same ``(P, k, seed, density)`` gives the same matrix in any process, on any device, whatever
the batch size. Only one chunk is ever dense (while it is drawn); what is kept is the sparse
matrix (about ``k · sqrt(P)`` non-zeros).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from hessfree.errors import InputError

_CHUNK_ENTRIES = 1 << 22


def chunk_rows(n_components: int) -> int:
    """Rows of R drawn per chunk (depends on k only, so the matrix does not depend on anything else)."""
    return max(1, _CHUNK_ENTRIES // n_components)


class SparseProjection:
    """``project(G)`` maps (B, P) per-sample gradients to (B, k): ``G @ R``.

    ``R`` is stored transposed as a sparse COO (k × P) tensor on ``device`` in ``dtype``.
    """

    def __init__(self, n_features: int, n_components: int, seed: int = 0, density: float | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise InputError(f"projection must be a positive number of dimensions, got {n_components!r}")
        if n_features < 1:
            raise InputError("nothing to project: the gradient has no entries")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"the projection seed (random_state) must be a non-negative integer, got {seed!r}")
        density = 1.0 / math.sqrt(n_features) if density is None else float(density)
        if not 0.0 < density <= 1.0:
            raise InputError(f"projection density must be in (0, 1], got {density}")
        self.n_features, self.n_components, self.seed, self.density = int(n_features), int(n_components), int(seed), density
        self.dtype = dtype
        rows_all, cols_all, vals_all = [], [], []
        v = 1.0 / math.sqrt(density * self.n_components)
        step = chunk_rows(self.n_components)
        for c, start in enumerate(range(0, self.n_features, step)):
            rows = min(step, self.n_features - start)
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, c])))
            u = rng.random((rows, self.n_components))  # the one dense chunk
            r, col = np.nonzero(u < density)
            rows_all.append(r + start)
            cols_all.append(col)
            vals_all.append(np.where(u[r, col] < density / 2, -v, v))
        r = np.concatenate(rows_all)
        col = np.concatenate(cols_all)
        vals = np.concatenate(vals_all)
        # transposed (k × P), sorted by output component then feature (already coalesced order)
        order = np.lexsort((r, col))
        idx = torch.as_tensor(np.stack([col[order], r[order]]), dtype=torch.long)
        coo = torch.sparse_coo_tensor(idx, torch.as_tensor(vals[order], dtype=dtype),
                                      (self.n_components, self.n_features), check_invariants=False)
        self._rt = coo.coalesce().to(device) if device is not None else coo.coalesce()
        self.nnz = int(len(vals))

    def dense(self) -> Tensor:
        """The full (P × k) matrix (for tests and small problems only)."""
        return self._rt.to_dense().T

    def project(self, G: Tensor) -> Tensor:
        """(B, P) -> (B, k)."""
        if G.ndim != 2 or G.shape[1] != self.n_features:
            raise InputError(f"expected gradients of shape (B, {self.n_features}), got {tuple(G.shape)}")
        return torch.sparse.mm(self._rt, G.to(self.dtype).T).T

    def describe(self) -> dict:
        return {"kind": "sparse_jl", "n_features": self.n_features, "n_components": self.n_components,
                "seed": self.seed, "density": self.density, "nnz": self.nnz}
