"""Ground-truth oracles for the Dynamic Influence Tracker (dit.md §7), exported as ``hessfree.oracle``.

- :func:`loo_replay` — exact leave-one-out replay with identical randomness: SGD is rerun over the
  recorded batches and learning rates with sample j skipped (the denominator stays |S_t|), and
  F is measured at the window ends. ``mode="delta"``: j is removed from the whole run (replay from
  θ[0]); ``mode="window_removal"``: only for steps t1 ≤ t < t2 (replay from the recorded θ[t1]).
- :func:`finite_difference` — j's loss weighted by 1 ± ε in the same steps; the central difference
  of the window quantity, negated. DIT is the exact first-order quantity of this, so in float64
  the two agree to many digits on smooth models.

Both return the same quantity as :func:`hessfree.dit`: score = F(removed) − F(original). Replays
of many samples run side by side (``torch.func.vmap`` over parameter vectors, ``chunk`` at a time).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hessfree.errors import InputError
from hessfree.methods.dit import FunctionalRun, ThetaCache, _checked, resolve_window
from hessfree.queries import Query
from hessfree.run import Run


def _positions(run: Run, sample_ids: Sequence[int]) -> np.ndarray:
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    if len(ids) == 0:
        raise InputError("give at least one sample id")
    where = {int(s): p for p, s in enumerate(run.step_log.sample_ids)}
    missing = [int(s) for s in ids if int(s) not in where]
    if missing:
        raise InputError(f"sample id(s) {missing[:10]} are not in the run's training data")
    return np.array([where[int(s)] for s in ids], dtype=np.int64)


def _replay(fr: FunctionalRun, theta0: Tensor, t_from: int, t_to: int, weights: Tensor, marks: Sequence[int],
            bar) -> dict[int, Tensor]:
    """Replay SGD from θ[t_from] = theta0 (m copies) to t_to with per-sample loss weights
    ``weights`` (m, N) in steps t_from ≤ t < t_to; returns {t: (m, P)} for t in ``marks``."""
    l2 = fr.l2
    m = weights.shape[0]
    Theta = theta0.expand(m, -1).clone()
    out = {t: Theta.clone() for t in marks if t == t_from}

    def step_grad(th: Tensor, w: Tensor, x: Any, y: Any) -> Tensor:
        def objective(v: Tensor) -> Tensor:
            per = fr.losses(v, x, y)
            if l2:
                per = per + 0.5 * l2 * (v * v).sum()
            return (w * per).sum() / len(w)
        return grad(objective)(th)

    for t in range(t_from, t_to):
        x, y, pos = fr.batch(t)
        w = weights[:, torch.as_tensor(pos, device=weights.device)]
        G = vmap(step_grad, in_dims=(0, 0, None, None))(Theta, w, x, y)
        Theta = Theta - float(fr.log.learning_rates[t]) * G
        if t + 1 in marks:
            out[t + 1] = Theta.clone()
        bar.update(m)
    return out


def _window_quantity(run: Run, train_dataset: Dataset, sample_ids: Sequence[int], query: Any, window: Any,
                     mode: str, dtype: torch.dtype, chunk: int, progress: bool, weight_of_j: Sequence[float]
                     ) -> list[np.ndarray]:
    """For each weight w in ``weight_of_j``: the (n_ids,) window quantity G_j(w) − G(1) where
    G = F(t2) − F(t1) (delta) or F(t2) (window_removal) with sample j's loss weighted by w."""
    q, fr = _checked(run, train_dataset, query, mode, dtype)
    if not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be a positive integer, got {chunk!r}")
    t1, t2 = resolve_window(run, window)
    pos = _positions(run, sample_ids)
    q.prepare(fr.dtype, fr.device)
    n = len(run.step_log.sample_ids)
    if mode == "delta":
        t_from, marks = 0, sorted({t1, t2})
        theta0 = ThetaCache(fr)(0)
    else:
        t_from, marks = t1, [t2]
        theta0 = ThetaCache(fr)(t1)

    def quantity(states: dict[int, Tensor]) -> np.ndarray:
        vals = []
        for i in range(states[t2].shape[0]):  # no torch.no_grad(): a query may use autograd (Saliency)
            v = fr.query_value(q, states[t2][i])
            if mode == "delta" and t1 > 0:
                v = v - fr.query_value(q, states[t1][i])
            vals.append(float(v.detach()))
        return np.array(vals)

    n_chunks = -(-len(pos) // chunk)
    bar = tqdm(total=(len(pos) + n_chunks) * len(weight_of_j) * (t2 - t_from), desc="oracle replay",
               disable=not progress, leave=False)
    results = []
    for wj in weight_of_j:
        vals = []
        for c in range(0, len(pos), chunk):
            part = pos[c:c + chunk]
            # row 0 replays the original run in the same batched computation, so the difference
            # carries no rounding from a differently shaped replay
            W = torch.ones(len(part) + 1, n, dtype=fr.dtype, device=fr.device)
            W[torch.arange(1, len(part) + 1), torch.as_tensor(part)] = float(wj)
            g = quantity(_replay(fr, theta0, t_from, t2, W, marks, bar))
            vals.append(g[1:] - g[0])
        results.append(np.concatenate(vals))
    bar.close()
    return results


def loo_replay(run: Run, train_dataset: Dataset, sample_ids: Sequence[int], query: Query | Any, *,
               window: Any = "all", mode: str = "delta", dtype: torch.dtype = torch.float64, chunk: int = 64,
               progress: bool = True) -> np.ndarray:
    """Exact leave-one-out effect on the window quantity for each id: (len(sample_ids),) array of
    F(removed) − F(original), the quantity :func:`hessfree.dit` estimates. ``dtype``: replay precision
    (float32 replay noise can swamp the tiny true effect of a late window: prefer float64)."""
    return _window_quantity(run, train_dataset, sample_ids, query, window, mode, dtype, chunk, progress, [0.0])[0]


def finite_difference(run: Run, train_dataset: Dataset, sample_ids: Sequence[int], query: Query | Any, *,
                      window: Any = "all", mode: str = "delta", eps: float = 1e-4, chunk: int = 64,
                      progress: bool = True) -> np.ndarray:
    """−d(window quantity)/d(weight of sample j) by a float64 central difference with step ``eps``:
    the first-order effect of removing j, which DIT computes exactly."""
    if not 0 < eps < 1:
        raise InputError(f"eps must be in (0, 1), got {eps!r}")
    plus, minus = _window_quantity(run, train_dataset, sample_ids, query, window, mode, torch.float64, chunk,
                                   progress, [1 + eps, 1 - eps])
    return -(plus - minus) / (2 * eps)
