"""Label noise: seeded flips of a fraction of labels, for detection experiments."""
from __future__ import annotations

import numpy as np

from hessfree.errors import InputError


def flip_labels(labels, fraction: float, *, num_classes: int | None = None, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``round(fraction * N)`` labels, chosen uniformly, each to a uniformly drawn OTHER class.

    Returns ``(noisy_labels, flipped_mask)``, both (N,). The same seed gives the same flips.
    """
    y = np.asarray(labels).astype(np.int64).copy()
    if y.ndim != 1 or len(y) == 0:
        raise InputError("labels must be a non-empty 1-D array of class indices")
    if not 0 <= fraction <= 1:
        raise InputError(f"fraction must be in [0, 1], got {fraction}")
    k = int(num_classes if num_classes is not None else y.max() + 1)
    if k < 2 or y.min() < 0 or y.max() >= k:
        raise InputError(f"labels must lie in [0, {k}) with at least 2 classes")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
    y[idx] = (y[idx] + rng.integers(1, k, len(idx))) % k  # a shift of 1..k-1 never lands on the same class
    mask = np.zeros(len(y), dtype=bool)
    mask[idx] = True
    return y, mask


def flip_labels_class_dependent(labels, transition, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent ("asymmetric") noise: a sample of class i becomes class j with probability
    ``transition[i, j]`` (a row-stochastic (K, K) matrix; the diagonal is the keep probability).

    A dict ``{i: (j, rate)}`` is accepted as shorthand: class i flips to j with probability rate.
    Returns ``(noisy_labels, flipped_mask)``; the same seed gives the same flips.
    """
    y = np.asarray(labels).astype(np.int64).copy()
    if y.ndim != 1 or len(y) == 0 or y.min() < 0:
        raise InputError("labels must be a non-empty 1-D array of class indices")
    if isinstance(transition, dict):
        k = int(max(y.max(), *(max(i, j) for i, (j, _) in transition.items()))) + 1
        T = np.eye(k)
        for i, (j, rate) in transition.items():
            T[i, i], T[i, j] = 1 - rate, rate
    else:
        T = np.asarray(transition, dtype=float)
    k = T.shape[0]
    if T.ndim != 2 or T.shape != (k, k) or (T < 0).any() or not np.allclose(T.sum(1), 1) or y.max() >= k:
        raise InputError("transition must be a row-stochastic (K, K) matrix covering every label")
    rng = np.random.default_rng(seed)
    u = rng.random(len(y))
    new = (u[:, None] < np.cumsum(T[y], 1)).argmax(1)
    return new, new != y
