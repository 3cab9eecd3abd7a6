"""Influence patterns over time (dit.md §8), from the per-epoch window scores M[e, j] of
:func:`hessfree.dit_epochs`.

Each epoch's row is z-scored across samples; per sample, a least-squares slope of its z-scores
over the epochs (with a two-sided t-test p-value) and the share of sign flips between consecutive
epochs are computed. Rules (defaults configurable):

- at least ``min_epochs`` epochs and flip ratio ≥ ``flip_ratio`` → ``"fluctuating"``;
- else slope significant (p < ``alpha``): negative → ``"early"`` (its relative influence fades),
  positive → ``"late"`` (a late bloomer);
- else ``"stable"``.

Also the Kendall τ between the first and the last epoch's scores (the paper finds it weak).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from hessfree.errors import InputError
from hessfree.scores import Scores

LABELS = ("stable", "early", "late", "fluctuating")


@dataclass
class Patterns:
    labels: np.ndarray  # (N,) one of LABELS
    slopes: np.ndarray  # (N,) slope of the z-scores per epoch
    p_values: np.ndarray  # (N,)
    flip_ratio: np.ndarray  # (N,) sign flips / (epochs − 1)
    shares: dict[str, float] = field(default_factory=dict)
    kendall_early_late: float = float("nan")
    sample_ids: np.ndarray | None = None

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"pattern": self.labels, "slope": self.slopes, "p_value": self.p_values,
                             "flip_ratio": self.flip_ratio},
                            index=pd.Index(self.sample_ids, name="sample_id") if self.sample_ids is not None else None)


def influence_patterns(epoch_scores: Scores | Any, *, min_epochs: int = 3, flip_ratio: float = 0.5,
                       alpha: float = 0.05) -> Patterns:
    """Classify every sample's influence trajectory; ``epoch_scores``: Scores or array (epochs, N)."""
    ids = epoch_scores.sample_ids if isinstance(epoch_scores, Scores) else None
    M = np.asarray(epoch_scores.values if isinstance(epoch_scores, Scores) else epoch_scores, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] < 2 or M.shape[1] < 2:
        raise InputError(f"need a (epochs ≥ 2, samples ≥ 2) matrix of per-epoch scores, got shape {M.shape}")
    if not np.isfinite(M).all():
        raise InputError("the per-epoch scores contain non-finite values")
    if not 0 < alpha < 1 or not 0 <= flip_ratio <= 1 or min_epochs < 2:
        raise InputError("need 0 < alpha < 1, 0 <= flip_ratio <= 1 and min_epochs >= 2")
    E, N = M.shape
    sd = M.std(1, keepdims=True)
    Z = (M - M.mean(1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
    e = np.arange(E, dtype=np.float64) - (E - 1) / 2
    slopes = (e[:, None] * Z).sum(0) / (e * e).sum()
    if E > 2:
        resid = Z - Z.mean(0) - slopes * e[:, None]
        se = np.sqrt((resid ** 2).sum(0) / (E - 2) / (e * e).sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            tstat = np.where(se > 0, slopes / se, np.where(slopes != 0, np.inf, 0.0))
        p = 2 * stats.t.sf(np.abs(tstat), E - 2)
    else:
        p = np.ones(N)
    signs = np.sign(Z)
    flips = ((signs[1:] * signs[:-1]) < 0).sum(0) / (E - 1)
    labels = np.full(N, "stable", dtype=object)
    sig = p < alpha
    labels[sig & (slopes < 0)] = "early"
    labels[sig & (slopes > 0)] = "late"
    if E >= min_epochs:
        labels[flips >= flip_ratio] = "fluctuating"
    labels = labels.astype(str)
    shares = {lab: float(np.mean(labels == lab)) for lab in LABELS}
    tau = float(stats.kendalltau(M[0], M[-1]).statistic)
    return Patterns(labels, slopes, p, flips, shares, tau, ids)
