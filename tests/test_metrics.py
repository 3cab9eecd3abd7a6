"""Tests for hessfree.evaluate.metrics against brute-force pure-Python references."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from hessfree.evaluate import metrics as M
from hessfree.evaluate import (
    auroc,
    average_precision,
    detection_accuracy,
    detection_curve,
    kendall,
    pearson,
    precision_at_k,
    recall_at_k,
    spearman,
    topk_jaccard,
)


# --------------------------------------------------------------------------- #
# brute-force references (pure Python, no NumPy/SciPy/sklearn)
# --------------------------------------------------------------------------- #
def ref_auroc(s, y):
    pos = [v for v, t in zip(s, y) if t]
    neg = [v for v, t in zip(s, y) if not t]
    total = 0.0
    for p in pos:
        for q in neg:
            total += 1.0 if p > q else (0.5 if p == q else 0.0)
    return total / (len(pos) * len(neg))


def ref_ap(s, y):
    n_pos = sum(y)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        flagged = [yy for ss, yy in zip(s, y) if ss >= t]
        tp = sum(flagged)
        precision, recall = tp / len(flagged), tp / n_pos
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def ref_topk(s, k):
    # sort by descending score, then ascending index: the stable tie rule.
    return sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]


def ref_precision(s, y, k):
    return sum(y[i] for i in ref_topk(s, k)) / k


def ref_recall(s, y, k):
    return sum(y[i] for i in ref_topk(s, k)) / sum(y)


def ref_accuracy(s, y, k):
    top = set(ref_topk(s, k))
    return sum((i in top) == bool(y[i]) for i in range(len(s))) / len(s)


def ref_pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (z - mb) for x, z in zip(a, b))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((z - mb) ** 2 for z in b)
    return cov / math.sqrt(va * vb)


def ref_ranks(a):
    ranks = [0.0] * len(a)
    for i, x in enumerate(a):
        less = sum(1 for z in a if z < x)
        equal = sum(1 for z in a if z == x)
        ranks[i] = less + (equal + 1) / 2.0  # average rank of the tie group
    return ranks


def ref_spearman(a, b):
    return ref_pearson(ref_ranks(a), ref_ranks(b))


def ref_kendall_b(a, b):
    c = d = ta = tb = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ta += 1
        elif db == 0:
            tb += 1
        elif (da > 0) == (db > 0):
            c += 1
        else:
            d += 1
    return (c - d) / math.sqrt((c + d + ta) * (c + d + tb))


def ref_jaccard(a, b, k):
    sa, sb = set(ref_topk(a, k)), set(ref_topk(b, k))
    return len(sa & sb) / len(sa | sb)


def random_case(rng: random.Random, n: int, tie_heavy: bool):
    if tie_heavy:
        s = [float(rng.randint(0, 4)) for _ in range(n)]
    else:
        s = [rng.gauss(0.0, 1.0) for _ in range(n)]
    y = [rng.random() < 0.3 for _ in range(n)]
    pos, neg = rng.sample(range(n), 2)  # guarantee both classes
    y[pos], y[neg] = True, False
    return s, y


CASES = [random_case(random.Random(seed), n, tie)
         for seed, (n, tie) in enumerate(
             [(n, t) for n in (5, 17, 40) for t in (False, True)] * 3)]


class Suspicious:
    """Stand-in for hessfree.scores.Scores: only offers suspicion()."""

    def __init__(self, values):
        self._values = np.asarray(values, dtype=float)
        self.calls = 0

    def suspicion(self):
        self.calls += 1
        return self._values.copy()


# --------------------------------------------------------------------------- #
# correctness against the references
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("case", range(len(CASES)))
def test_detection_metrics_match_brute_force(case):
    s, y = CASES[case]
    n = len(s)
    assert 0 < sum(y) < n
    assert auroc(np.array(s), np.array(y)) == pytest.approx(ref_auroc(s, y), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(ref_ap(s, y), abs=1e-12)
    for k in range(1, n + 1):
        assert precision_at_k(s, y, k) == pytest.approx(ref_precision(s, y, k), abs=1e-12)
        assert recall_at_k(s, y, k) == pytest.approx(ref_recall(s, y, k), abs=1e-12)
        assert detection_accuracy(s, y, k) == pytest.approx(ref_accuracy(s, y, k), abs=1e-12)
    curve = detection_curve(s, y)
    expected_found = [0.0] + [ref_recall(s, y, k) for k in range(1, n + 1)]
    np.testing.assert_allclose(curve["fraction_found"], expected_found, atol=1e-12)
    np.testing.assert_allclose(curve["fraction_inspected"], [k / n for k in range(n + 1)])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_correlations_match_brute_force(case):
    rng = random.Random(1000 + case)
    a, _ = CASES[case]
    tie_heavy = case % 2 == 1
    b = [float(rng.randint(0, 3)) if tie_heavy else x + rng.gauss(0, 1.5) for x in a]
    if len(set(b)) == 1:
        b[0] += 1.0
    assert pearson(a, b) == pytest.approx(ref_pearson(a, b), abs=1e-10)
    assert spearman(a, b) == pytest.approx(ref_spearman(a, b), abs=1e-10)
    assert kendall(a, b) == pytest.approx(ref_kendall_b(a, b), abs=1e-10)
    for k in range(1, len(a) + 1):
        assert topk_jaccard(a, b, k) == pytest.approx(ref_jaccard(a, b, k), abs=1e-12)


def test_hand_computed_values():
    s = [0.9, 0.8, 0.7, 0.1]
    y = [True, False, True, False]
    # pairs (pos, neg): (.9,.8) (.9,.1) (.7,.8) (.7,.1) -> 3 of 4 won.
    assert auroc(s, y) == 0.75
    # thresholds .9 -> P=1,R=.5 ; .8 -> P=.5 ; .7 -> P=2/3,R=1.
    assert average_precision(s, y) == pytest.approx(0.5 * 1 + 0.5 * (2 / 3))
    assert precision_at_k(s, y, 2) == 0.5
    assert recall_at_k(s, y, 3) == 1.0
    assert detection_accuracy(s, y, 2) == 0.5  # flagged [1,1,0,0] vs [1,0,1,0]
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(ref_pearson([1, 2, 3], [2, 4, 7]))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert kendall([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert topk_jaccard([4, 3, 2, 1], [1, 3, 2, 4], 2) == pytest.approx(1 / 3)


def test_return_types():
    s, y = CASES[3]
    for value in (auroc(s, y), average_precision(s, y), precision_at_k(s, y, 2),
                  recall_at_k(s, y, 2), detection_accuracy(s, y, 2),
                  pearson(s, s[::-1]), spearman(s, s[::-1]), kendall(s, s[::-1]),
                  topk_jaccard(s, s[::-1], 2)):
        assert type(value) is float
    curve = detection_curve(s, y)
    assert set(curve) == {"fraction_inspected", "fraction_found"}
    assert all(isinstance(v, np.ndarray) for v in curve.values())


# --------------------------------------------------------------------------- #
# ranking convention: higher = more suspicious, stable ties
# --------------------------------------------------------------------------- #
def test_higher_means_more_suspicious():
    y = [False, False, True, True]
    assert auroc([0.0, 1.0, 2.0, 3.0], y) == 1.0
    assert auroc([3.0, 2.0, 1.0, 0.0], y) == 0.0
    assert precision_at_k([0.0, 1.0, 2.0, 3.0], y, 2) == 1.0


def test_stable_tie_breaking_prefers_lower_index():
    s = [1.0, 1.0, 1.0, 1.0]
    # top-2 must be indices {0, 1} exactly.
    assert precision_at_k(s, [True, True, False, False], 2) == 1.0
    assert precision_at_k(s, [False, False, True, True], 2) == 0.0
    assert recall_at_k(s, [False, True, False, True], 1) == 0.0
    assert recall_at_k(s, [True, False, False, True], 1) == 0.5
    assert detection_accuracy(s, [True, True, False, False], 2) == 1.0
    np.testing.assert_allclose(
        detection_curve(s, [False, False, True, True])["fraction_found"],
        [0, 0, 0, 0.5, 1.0])
    # ties below a distinct maximum: index 3 first, then 0 and 1 (lower index first)
    t = [0.5, 0.5, 0.5, 2.0]
    assert topk_jaccard(t, [9.0, 8.0, 0.0, 7.0], 3) == 1.0
    assert topk_jaccard(t, [0.0, 0.0, 0.0, 0.0], 2) == pytest.approx(1 / 3)


def test_detection_curve_endpoints():
    s, y = CASES[5]
    curve = detection_curve(s, y)
    n = len(s)
    for key in ("fraction_inspected", "fraction_found"):
        assert curve[key].shape == (n + 1,)
        assert curve[key][0] == 0.0
        assert curve[key][-1] == 1.0
    assert np.all(np.diff(curve["fraction_found"]) >= 0)


def test_fractional_k():
    s = list(range(10, 0, -1))  # index 0 most suspicious
    y = [True] * 3 + [False] * 7
    assert precision_at_k(s, y, 0.3) == 1.0  # round(3.0) = 3
    assert precision_at_k(s, y, 0.4) == 0.75  # 4 points
    assert precision_at_k(s, y, 0.37) == 0.75  # round(3.7) = 4, not truncated to 3
    assert precision_at_k(s, y, 0.34) == 1.0  # round(3.4) = 3
    assert recall_at_k(s, y, 0.01) == pytest.approx(1 / 3)  # at least 1 point
    assert detection_accuracy(s, y, np.float64(0.2)) == pytest.approx(0.9)
    assert precision_at_k(s, y, np.int64(3)) == 1.0


# --------------------------------------------------------------------------- #
# input types
# --------------------------------------------------------------------------- #
def test_object_with_suspicion_is_accepted():
    s, y = CASES[2]
    obj = Suspicious(s)
    assert auroc(obj, y) == pytest.approx(ref_auroc(s, y))
    assert obj.calls == 1
    assert precision_at_k(obj, y, 3) == pytest.approx(ref_precision(s, y, 3))
    assert detection_curve(obj, y)["fraction_found"][-1] == 1.0
    # the values come from suspicion(), not from some other attribute
    flipped = Suspicious([-v for v in s])
    assert auroc(flipped, y) == pytest.approx(1.0 - ref_auroc(s, y))
    b = [x * 2.0 + 1.0 for x in s]
    assert pearson(obj, Suspicious(b)) == pytest.approx(1.0)
    assert topk_jaccard(obj, Suspicious(b), 4) == 1.0
    with pytest.raises(ValueError, match="explicitly"):  # a Scores object against a plain array is ambiguous
        pearson(obj, b)


def test_torch_tensors_work():
    s, y = CASES[4]
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    yt = torch.tensor(y)
    assert auroc(st, yt) == pytest.approx(ref_auroc(s, y))
    assert average_precision(st, yt.int()) == pytest.approx(ref_ap(s, y))
    assert recall_at_k(st, yt, 5) == pytest.approx(ref_recall(s, y, 5))
    assert spearman(st, torch.tensor(s[::-1], dtype=torch.float64)) == pytest.approx(
        ref_spearman(s, s[::-1]))
    assert precision_at_k(st.to(torch.bfloat16), yt, 3) == pytest.approx(
        ref_precision([float(torch.tensor(v).to(torch.bfloat16)) for v in s], y, 3))


def test_zero_one_float_truth_accepted():
    s, y = CASES[1]
    yf = [1.0 if t else 0.0 for t in y]
    assert auroc(s, yf) == pytest.approx(ref_auroc(s, y))


# --------------------------------------------------------------------------- #
# validation errors
# --------------------------------------------------------------------------- #
DETECTION = [auroc, average_precision, detection_curve]
AT_K = [precision_at_k, recall_at_k, detection_accuracy]


@pytest.mark.parametrize("fn", DETECTION + AT_K)
def test_length_mismatch(fn):
    args = (3,) if fn in AT_K else ()
    with pytest.raises(ValueError, match="aligned"):
        fn([0.1, 0.2, 0.3, 0.4], [True, False, True], *args)


@pytest.mark.parametrize("fn", DETECTION + AT_K)
def test_not_1d(fn):
    args = (1,) if fn in AT_K else ()
    with pytest.raises(ValueError, match="1-D"):
        fn(np.zeros((2, 2)), [True, False, True, False], *args)
    with pytest.raises(ValueError, match="1-D"):
        fn([0.1, 0.2], [[True], [False]], *args)


@pytest.mark.parametrize("fn", DETECTION + AT_K)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores(fn, bad):
    args = (1,) if fn in AT_K else ()
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn([0.1, bad, 0.3], [True, False, False], *args)


@pytest.mark.parametrize("fn", [auroc, average_precision])
def test_auroc_ap_need_both_classes(fn):
    with pytest.raises(ValueError, match="at least one corrupted and one clean"):
        fn([0.1, 0.2, 0.3], [True, True, True])
    with pytest.raises(ValueError, match="at least one corrupted and one clean"):
        fn([0.1, 0.2, 0.3], [False, False, False])


def test_recall_and_curve_need_a_positive():
    with pytest.raises(ValueError, match="at least one corrupted"):
        recall_at_k([0.1, 0.2], [False, False], 1)
    with pytest.raises(ValueError, match="at least one corrupted"):
        detection_curve([0.1, 0.2], [False, False])
    # precision / accuracy are defined without positives
    assert precision_at_k([0.1, 0.2], [False, False], 1) == 0.0
    assert detection_accuracy([0.1, 0.2], [False, False], 1) == 0.5


def test_truth_must_be_a_mask():
    with pytest.raises(ValueError, match="0/1 mask"):
        auroc([0.1, 0.2, 0.3], [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="0/1 mask"):
        precision_at_k([0.1, 0.2, 0.3], [0, 2, 1], 1)


@pytest.mark.parametrize("fn", AT_K)
@pytest.mark.parametrize("k", [0, -1, 5, 1.0, 0.0, 1.5, -0.2, True, "2", None])
def test_bad_k(fn, k):
    with pytest.raises(ValueError, match="k"):
        fn([0.4, 0.3, 0.2, 0.1], [True, False, True, False], k)


@pytest.mark.parametrize("k", [0, 4, 1.0, "1"])
def test_bad_k_jaccard(k):
    with pytest.raises(ValueError, match="k"):
        topk_jaccard([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], k)


@pytest.mark.parametrize("fn", [pearson, spearman, kendall])
def test_correlation_validation(fn):
    with pytest.raises(ValueError, match="constant"):
        fn([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="constant"):
        fn([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    with pytest.raises(ValueError, match="aligned"):
        fn([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="1-D"):
        fn(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        fn([1.0], [2.0])


def test_jaccard_validation():
    with pytest.raises(ValueError, match="aligned"):
        topk_jaccard([1.0, 2.0, 3.0], [1.0, 2.0], 1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        topk_jaccard([1.0, 2.0, np.inf], [1.0, 2.0, 3.0], 1)


def test_non_numeric_and_empty_scores():
    with pytest.raises(ValueError, match="real numbers"):
        auroc(["a", "b"], [True, False])
    with pytest.raises(ValueError, match="empty"):
        precision_at_k([], [], 1)


def test_public_api():
    assert set(M.__all__) == {
        "auroc", "average_precision", "precision_at_k", "recall_at_k",
        "detection_curve", "detection_accuracy", "pearson", "spearman",
        "kendall", "topk_jaccard"}
    import hessfree.evaluate as E
    for name in M.__all__:
        assert getattr(E, name) is getattr(M, name)
