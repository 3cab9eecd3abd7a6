"""Metrics for judging training-data attribution scores.

Conventions
-----------
* ``scores`` is a 1-D array-like of shape ``(N,)`` (NumPy array, list, torch
  tensor, pandas Series, ...) with one entry per training point, where
  **higher = more suspicious** (more likely mislabelled / corrupted / harmful).
  A library ``Scores`` object is accepted too: anything with a callable
  ``suspicion()`` method is asked for it, and the result (a 1-D array, higher =
  more suspicious) is used.
* ``truth`` is a boolean / 0-1 mask of shape ``(N,)`` for the detection metrics
  (``True`` = the point really is corrupted), aligned with ``scores``.
* Rankings use stable tie-breaking: among points with equal scores the one with
  the lower index is ranked first (``np.argsort(-s, kind="stable")``).
* ``k`` is either an int with ``1 <= k <= N`` or a fraction ``0 < k < 1``,
  meaning ``max(1, round(k * N))`` points (Python ``round``: halves go to the
  even neighbour).

Every metric returns a Python ``float`` except :func:`detection_curve`, which
returns a dict of NumPy arrays. Invalid input raises ``hessfree.InputError``
(a ``ValueError``) with a message saying how to fix it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from hessfree.errors import InputError
from hessfree.scores import resolve_k

__all__ = [
    "auroc",
    "average_precision",
    "precision_at_k",
    "recall_at_k",
    "detection_curve",
    "detection_accuracy",
    "pearson",
    "spearman",
    "kendall",
    "topk_jaccard",
]


# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #
def _to_numpy(x: Any) -> np.ndarray:
    """Array-like or torch tensor -> NumPy array (no dtype forced)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, duck-typed
        t = x.detach().cpu()
        try:
            return t.numpy()
        except (TypeError, RuntimeError):  # e.g. bfloat16 has no NumPy dtype
            return t.double().numpy()
    return np.asarray(x)


def _as_vector(x: Any, name: str) -> np.ndarray:
    """Real-valued 1-D float64 vector; ``Scores``-like objects give ``suspicion()``."""
    suspicion = getattr(x, "suspicion", None)
    if callable(suspicion):
        x = suspicion()
    arr = _to_numpy(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    ):
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise InputError(
                f"{name} must be a 1-D array of real numbers (NumPy array, list, "
                f"torch tensor or a Scores object); got dtype {arr.dtype}."
            ) from None
    if np.iscomplexobj(arr):
        raise InputError(f"{name} must be real-valued; pass the real part explicitly.")
    arr = arr.astype(np.float64)
    if arr.ndim != 1:
        raise InputError(
            f"{name} must be 1-D with one entry per training point; got shape "
            f"{arr.shape}. Flatten it (e.g. .ravel()) or pick the column you mean."
        )
    if arr.size == 0:
        raise InputError(f"{name} is empty; pass at least one entry per training point.")
    if not np.all(np.isfinite(arr)):
        n_bad = int(np.sum(~np.isfinite(arr)))
        raise InputError(
            f"{name} contains {n_bad} NaN or infinite value(s); replace or drop them "
            f"(e.g. np.nan_to_num) before computing metrics."
        )
    return arr


def _as_mask(truth: Any, n: int) -> np.ndarray:
    """Boolean mask of shape ``(n,)`` from a bool / 0-1 array-like."""
    arr = _to_numpy(truth)
    if arr.ndim != 1:
        raise InputError(
            f"truth must be a 1-D boolean/0-1 mask with one entry per training point; "
            f"got shape {arr.shape}."
        )
    if arr.shape[0] != n:
        raise InputError(
            f"scores has {n} entries but truth has {arr.shape[0]}; they must be "
            f"aligned, one entry per training point."
        )
    if arr.dtype == np.bool_:
        return arr.copy()
    try:
        num = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise InputError(
            f"truth must be a boolean or 0/1 mask; got dtype {arr.dtype}."
        ) from None
    if not np.all((num == 0) | (num == 1)):
        raise InputError(
            "truth must be a boolean or 0/1 mask (True/1 = corrupted); it contains "
            "other values. Threshold real-valued labels first, or use pearson/"
            "spearman/kendall for real-valued targets."
        )
    return num == 1


def _detection_inputs(scores: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _as_vector(scores, "scores")
    y = _as_mask(truth, s.shape[0])
    return s, y


def _require_both_classes(y: np.ndarray, metric: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        which = "no corrupted (True)" if n_pos == 0 else "no clean (False)"
        raise InputError(
            f"{metric} needs at least one corrupted and one clean point, but truth has "
            f"{which} points; check the mask or use a metric such as precision_at_k."
        )


def _require_positive(y: np.ndarray, metric: str) -> None:
    if not y.any():
        raise InputError(
            f"{metric} needs at least one corrupted (True) point in truth, since it "
            f"divides by the number of corrupted points; check the mask."
        )


def _ranking(s: np.ndarray) -> np.ndarray:
    """Indices from most to least suspicious; ties keep the lower index first."""
    return np.argsort(-s, kind="stable")


def _top_k(s: np.ndarray, k: int) -> np.ndarray:
    return _ranking(s)[:k]


# --------------------------------------------------------------------------- #
# detection metrics: scores (higher = more suspicious) vs a boolean mask
# --------------------------------------------------------------------------- #
def auroc(scores: Any, truth: Any) -> float:
    """Area under the ROC curve for separating corrupted from clean points.

    Args:
        scores: shape ``(N,)``, higher = more suspicious; or a ``Scores`` object.
        truth: boolean / 0-1 mask of shape ``(N,)``, True = corrupted. Must
            contain at least one corrupted and one clean point.

    Returns:
        The probability that a random corrupted point outscores a random clean
        one (ties count 1/2): 1.0 is perfect, 0.5 is chance.
    """
    s, y = _detection_inputs(scores, truth)
    _require_both_classes(y, "auroc")
    return float(roc_auc_score(y, s))


def average_precision(scores: Any, truth: Any) -> float:
    """Average precision (area under the precision-recall curve, step-wise).

    Args:
        scores: shape ``(N,)``, higher = more suspicious; or a ``Scores`` object.
        truth: boolean / 0-1 mask of shape ``(N,)``, True = corrupted. Must
            contain at least one corrupted and one clean point.

    Returns:
        ``sum_t (R_t - R_{t-1}) * P_t`` over the distinct score thresholds, as
        in ``sklearn.metrics.average_precision_score``; the fraction of
        corrupted points is the chance level.
    """
    s, y = _detection_inputs(scores, truth)
    _require_both_classes(y, "average_precision")
    return float(average_precision_score(y, s))


def precision_at_k(scores: Any, truth: Any, k: int | float) -> float:
    """Fraction of the ``k`` most suspicious points that really are corrupted.

    Args:
        scores: shape ``(N,)``, higher = more suspicious; or a ``Scores`` object.
        truth: boolean / 0-1 mask of shape ``(N,)``, True = corrupted.
        k: int ``1 <= k <= N``, or a fraction ``0 < k < 1`` of ``N``.

    Returns:
        ``(# corrupted among the top k) / k``; ties in ``scores`` are broken
        in favour of the lower index.
    """
    s, y = _detection_inputs(scores, truth)
    kk = resolve_k(k, s.shape[0])
    return float(y[_top_k(s, kk)].sum() / kk)


def recall_at_k(scores: Any, truth: Any, k: int | float) -> float:
    """Fraction of all corrupted points found among the ``k`` most suspicious.

    Args:
        scores: shape ``(N,)``, higher = more suspicious; or a ``Scores`` object.
        truth: boolean / 0-1 mask of shape ``(N,)``, True = corrupted; must
            contain at least one corrupted point.
        k: int ``1 <= k <= N``, or a fraction ``0 < k < 1`` of ``N``.

    Returns:
        ``(# corrupted among the top k) / (# corrupted)``; ties in ``scores``
        are broken in favour of the lower index.
    """
    s, y = _detection_inputs(scores, truth)
    _require_positive(y, "recall_at_k")
    kk = resolve_k(k, s.shape[0])
    return float(y[_top_k(s, kk)].sum() / y.sum())


def detection_curve(scores: Any, truth: Any) -> dict[str, np.ndarray]:
    """Corrupted points found as a function of points inspected, most suspicious first.

    Args:
        scores: shape ``(N,)``, higher = more suspicious; or a ``Scores`` object.
        truth: boolean / 0-1 mask of shape ``(N,)``, True = corrupted; must
            contain at least one corrupted point.

    Returns:
        ``{"fraction_inspected": array (N+1,), "fraction_found": array (N+1,)}``
        where entry ``k`` (``k = 0..N``) is ``k / N`` and ``(# corrupted in the
        top k) / (# corrupted)``. The curve starts at (0, 0) and ends at (1, 1).
        Ties in ``scores`` are broken in favour of the lower index.
    """
    s, y = _detection_inputs(scores, truth)
    _require_positive(y, "detection_curve")
    n = s.shape[0]
    found = np.concatenate([[0.0], np.cumsum(y[_ranking(s)], dtype=np.float64)])
    return {
        "fraction_inspected": np.arange(n + 1, dtype=np.float64) / n,
        "fraction_found": found / found[-1],
    }


def detection_accuracy(scores: Any, truth: Any, k: int | float) -> float:
    """Accuracy of flagging exactly the ``k`` most suspicious points as corrupted.

    Args:
        scores: shape ``(N,)``, higher = more suspicious; or a ``Scores`` object.
        truth: boolean / 0-1 mask of shape ``(N,)``, True = corrupted.
        k: int ``1 <= k <= N``, or a fraction ``0 < k < 1`` of ``N``.

    Returns:
        ``mean(flagged == truth)`` over all ``N`` points, where ``flagged`` is
        True for the top ``k`` (ties broken in favour of the lower index).
    """
    s, y = _detection_inputs(scores, truth)
    kk = resolve_k(k, s.shape[0])
    flagged = np.zeros(s.shape[0], dtype=bool)
    flagged[_top_k(s, kk)] = True
    return float(np.mean(flagged == y))


# --------------------------------------------------------------------------- #
# agreement between two real-valued score vectors
# --------------------------------------------------------------------------- #
def _pair(a: Any, b: Any, metric: str, need_variation: bool = True) -> tuple[np.ndarray, np.ndarray]:
    scores_like = [callable(getattr(v, "suspicion", None)) for v in (a, b)]
    if scores_like[0] != scores_like[1]:
        # a Scores object is read as suspicion() (higher = more harmful), which for an influence score
        # is −values: compared with a plain array (e.g. an oracle's F(removed) − F(original)) that
        # silently flips the sign of the correlation
        raise InputError(
            f"{metric}: one argument is a Scores object and the other a plain array; pass "
            "scores.values (raw values, the sign of an oracle's F(removed) - F(original)) or "
            "scores.suspicion() (higher = more harmful) explicitly.")
    x = _as_vector(a, "a")
    y = _as_vector(b, "b")
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"a has {x.shape[0]} entries but b has {y.shape[0]}; {metric} needs two "
            f"vectors aligned on the same training points."
        )
    if need_variation:
        if x.shape[0] < 2:
            raise InputError(f"{metric} needs at least 2 points; got {x.shape[0]}.")
        for name, v in (("a", x), ("b", y)):
            if np.ptp(v) == 0:
                raise InputError(
                    f"{name} is constant, so {metric} is undefined; check that the "
                    f"scores were computed (not all zeros) before comparing them."
                )
    return x, y


def pearson(a: Any, b: Any) -> float:
    """Pearson (linear) correlation between two score vectors of shape ``(N,)``.

    ``a`` and ``b`` are real-valued (lists, arrays, tensors, or two ``Scores``
    objects, both read via ``suspicion()``; a ``Scores`` object with a plain
    array is refused as ambiguous); neither may be constant.
    """
    x, y = _pair(a, b, "pearson")
    return float(stats.pearsonr(x, y)[0])


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation between two score vectors of shape ``(N,)``.

    Ties get average ranks. Neither vector may be constant.
    """
    x, y = _pair(a, b, "spearman")
    return float(stats.spearmanr(x, y)[0])


def kendall(a: Any, b: Any) -> float:
    """Kendall rank correlation (tau-b, tie-corrected) between two vectors of shape ``(N,)``.

    Neither vector may be constant.
    """
    x, y = _pair(a, b, "kendall")
    return float(stats.kendalltau(x, y)[0])


def topk_jaccard(a: Any, b: Any, k: int | float) -> float:
    """Jaccard index of the top-``k`` index sets of two score vectors of shape ``(N,)``.

    Args:
        a, b: real-valued vectors (or two ``Scores`` objects; one of each is refused), higher = more
            suspicious; the ``k`` highest entries of each are taken, ties
            broken in favour of the lower index.
        k: int ``1 <= k <= N``, or a fraction ``0 < k < 1`` of ``N``.

    Returns:
        ``|A & B| / |A | B|`` in ``[0, 1]``; 1.0 means the same top-k set.
    """
    x, y = _pair(a, b, "topk_jaccard", need_variation=False)
    kk = resolve_k(k, x.shape[0])
    sa = set(_top_k(x, kk).tolist())
    sb = set(_top_k(y, kk).tolist())
    return float(len(sa & sb) / len(sa | sb))
