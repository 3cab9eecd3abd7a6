"""A sweep of bad inputs over every public entry point: each must reach the user as a subclass of
``hessfree.HessfreeError`` whose message names what is wrong (a key word is asserted), and, where
that is cheap to check, before any expensive work: no SGD step (``fit``), no per-sample gradient
batch and no target gradient (the scoring calls, OGA, the baselines), no Hessian-vector product
(DIT) and no replay (the oracles).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import hessfree
from hessfree import HessfreeError, Scores, metrics, queries, targets
from hessfree.grads.engine import GradientEngine
from hessfree.methods.dit import FunctionalRun

Q = dict(progress=False)
N, D_IN, WIDE, CLASSES = 12, 5, 7, 3


# ----------------------------------------------------------------------------- data and models
def model_5(seed: int = 0) -> nn.Module:
    """nn.Linear expects 5 input features; the 'wide' datasets give 7."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def linear_bce() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(D_IN, 1)


def xy(n: int = N, d: int = D_IN, seed: int = 0, labels: Any = None) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.arange(n) % CLASSES if labels is None else labels
    return TensorDataset(x, y)


def with_x(fill: float, pos: int = 5) -> TensorDataset:
    x, y = xy().tensors
    x = x.clone()
    x[pos] = fill
    return TensorDataset(x, y)


class Pairs(Dataset):
    """A plain (non-Tensor) map-style dataset over given items."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class NoFitDetector:
    def score_samples(self, X):
        return np.zeros(len(X))


class ShortDetector:
    def fit(self, X):
        return self

    def score_samples(self, X):
        return np.zeros(len(X) - 1)


@dataclass
class Ctx:
    run: hessfree.Run  # recorded with record="every_step" (TracIn, OGA, DIT, oracle)
    run_dir: Path  # a complete saved run (copied before corrupting)
    tmp: Path
    good: TensorDataset
    wide: TensorDataset
    scores: Scores

    def bare_run(self, model: nn.Module | None = None, loss: str = "cross_entropy") -> hessfree.Run:
        model = model if model is not None else model_5()
        return hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss=loss)

    def corrupt_run(self, edit: Callable[[Path], None]) -> Path:
        where = self.tmp / "run"
        shutil.copytree(self.run_dir, where)
        edit(where)
        return where


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    good = xy()
    run = hessfree.fit(model_5(), good, epochs=2, batch_size=4, seed=0, record="every_step", **Q)
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    hessfree.fit(model_5(), good, epochs=1, batch_size=4, seed=0, record="every_step", run_dir=run_dir, **Q)
    scores = Scores(np.arange(N, dtype=float), np.arange(N), {"kind": "outlier"})
    return run, run_dir, good, scores


@pytest.fixture
def ctx(shared, tmp_path):
    run, run_dir, good, scores = shared
    return Ctx(run, run_dir, tmp_path, good, xy(d=WIDE), scores)


@pytest.fixture
def work(monkeypatch):
    """Counts of the expensive operations, by name; a check that fires before expensive work leaves
    every count at 0."""
    counts = {"sgd_step": 0, "batch_grads": 0, "dense_grad": 0, "hvp": 0, "replay": 0}

    def spy(owner, attr, key):
        orig = getattr(owner, attr)

        def wrapped(*a, **k):
            counts[key] += 1
            return orig(*a, **k)
        monkeypatch.setattr(owner, attr, wrapped)

    import hessfree.evaluate.replay as replay_mod
    import hessfree.run as run_mod
    spy(run_mod, "sgd_step", "sgd_step")  # fit's training step
    spy(GradientEngine, "batch_grads", "batch_grads")
    spy(GradientEngine, "dense_grad", "dense_grad")  # target gradients
    spy(FunctionalRun, "hvp_and_dots", "hvp")
    spy(replay_mod, "_replay", "replay")
    return counts


# ----------------------------------------------------------------------------- the cases
CASES: list = []


def case(name: str, match: str, call: Callable[[Ctx], Any], *, cheap: bool = True):
    """``match``: a regex the message must contain (re.search, case-insensitive). ``cheap``: the
    refusal must come before any expensive work."""
    CASES.append(pytest.param(call, match, cheap, id=name))


WIDE_SHAPE = r"\(\d+, 7\)"  # the batch's input shape, as the error must print it

# --- hessfree.fit
case("fit/wide-inputs", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.fit(model_5(), c.wide, batch_size=4, **Q))
case("fit/empty-dataset", "empty", lambda c: hessfree.fit(model_5(), xy(n=0), **Q))
case("fit/dataset-none", "map-style", lambda c: hessfree.fit(model_5(), None, **Q))
case("fit/dataset-int", "map-style", lambda c: hessfree.fit(model_5(), 42, **Q))
case("fit/dataset-set", "map-style", lambda c: hessfree.fit(model_5(), {1, 2, 3}, **Q))
case("fit/float-labels", r"y\.long\(\)", lambda c: hessfree.fit(model_5(), xy(labels=torch.zeros(N)), **Q))
case("fit/column-labels", "one class label per sample",
     lambda c: hessfree.fit(model_5(), xy(labels=torch.zeros(N, 1, dtype=torch.long)), **Q))
case("fit/label-out-of-range", r"outside \[0, 3\)",
     lambda c: hessfree.fit(model_5(), xy(labels=torch.full((N,), 3)), **Q))
case("fit/bce-int-labels", r"y\.float\(\)",
     lambda c: hessfree.fit(linear_bce(), xy(labels=torch.zeros(N, dtype=torch.long)), loss="bce", **Q))
case("fit/batch-size-0", "batch_size", lambda c: hessfree.fit(model_5(), c.good, batch_size=0, **Q))
case("fit/batch-size-negative", "batch_size", lambda c: hessfree.fit(model_5(), c.good, batch_size=-1, **Q))
case("fit/batch-size-float", "batch_size", lambda c: hessfree.fit(model_5(), c.good, batch_size=1.5, **Q))
case("fit/batch-size-bool", "batch_size", lambda c: hessfree.fit(model_5(), c.good, batch_size=True, **Q))
case("fit/no-parameters", "no trainable parameters", lambda c: hessfree.fit(nn.Flatten(), c.good, **Q))
case("fit/nan-inputs", r"non-finite.*sample id", lambda c: hessfree.fit(model_5(), with_x(float("nan")), **Q),
     cheap=False)
case("fit/unknown-loss", "unknown loss", lambda c: hessfree.fit(model_5(), c.good, loss="mse", **Q))
case("fit/items-not-pairs", r"\(input, target\) pair",
     lambda c: hessfree.fit(model_5(), TensorDataset(torch.randn(N, D_IN)), **Q))
case("fit/lr-string", "lr", lambda c: hessfree.fit(model_5(), c.good, lr="fast", **Q))
case("fit/model-not-module", "Module", lambda c: hessfree.fit("model", c.good, **Q))

# --- self_influence
case("self_influence/wide-inputs", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.self_influence(c.run, c.wide, **Q))
case("self_influence/empty-dataset", "training dataset is empty",
     lambda c: hessfree.self_influence(c.run, xy(n=0), **Q))
case("self_influence/dataset-none", "map-style", lambda c: hessfree.self_influence(c.run, None, **Q))
case("self_influence/not-a-run", "hessfree.Run", lambda c: hessfree.self_influence(model_5(), c.good, **Q))
case("self_influence/dtype-int32", "dtype", lambda c: hessfree.self_influence(c.run, c.good, dtype=torch.int32, **Q))
case("self_influence/dtype-int64", "dtype", lambda c: hessfree.self_influence(c.run, c.good, dtype=torch.int64, **Q))
case("self_influence/dtype-string", "dtype", lambda c: hessfree.self_influence(c.run, c.good, dtype="float64", **Q))
case("self_influence/device-cuda-unavailable", "cuda",
     lambda c: (pytest.skip("CUDA is available here") if torch.cuda.is_available()
                else hessfree.self_influence(c.run, c.good, device="cuda", **Q)))
case("self_influence/device-nonsense", "device", lambda c: hessfree.self_influence(c.run, c.good, device="nonsense", **Q))
case("self_influence/device-int", "device", lambda c: hessfree.self_influence(c.run, c.good, device=3.5, **Q))
case("self_influence/batch-size-0", "batch_size", lambda c: hessfree.self_influence(c.run, c.good, batch_size=0, **Q))
case("self_influence/batch-size-negative", "batch_size",
     lambda c: hessfree.self_influence(c.run, c.good, batch_size=-1, **Q))
case("self_influence/batch-size-float", "batch_size",
     lambda c: hessfree.self_influence(c.run, c.good, batch_size=1.5, **Q))
case("self_influence/batch-size-bool", "batch_size",
     lambda c: hessfree.self_influence(c.run, c.good, batch_size=True, **Q))
case("self_influence/unknown-param", "unknown parameter",
     lambda c: hessfree.self_influence(c.run, c.good, params=["9.weight"], **Q))
case("self_influence/checkpoint-out-of-range", "outside the run",
     lambda c: hessfree.self_influence(c.run, c.good, checkpoints=[7], **Q))
case("self_influence/model-without-parameters", "no trainable parameters",
     lambda c: hessfree.self_influence(hessfree.Run.from_checkpoints(nn.Flatten(), [{}], [1.0]), c.good, **Q))
case("self_influence/inf-inputs", r"non-finite.*sample id", lambda c: hessfree.self_influence(c.run, with_x(float("inf")), **Q),
     cheap=False)
case("self_influence/label-out-of-range", r"outside \[0, 3\)",
     lambda c: hessfree.self_influence(c.run, xy(labels=torch.full((N,), 5)), **Q))
case("self_influence/stack-not-bool", "stack", lambda c: hessfree.self_influence(c.run, c.good, stack="yes", **Q))


def frozen_run() -> hessfree.Run:
    model = model_5()
    model[0].weight.requires_grad_(False)
    return hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0])


case("self_influence/frozen-param", "frozen",
     lambda c: hessfree.self_influence(frozen_run(), c.good, params=["0.weight"], **Q))

# --- influence and the targets
case("influence/wide-training-inputs", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.influence(c.run, c.wide, targets.Loss(c.good), **Q))
case("influence/target-not-a-dataset", "map-style", lambda c: hessfree.influence(c.run, c.good, 5, **Q))
case("targets.Loss/wide-inputs", rf"target dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.influence(c.run, c.good, targets.Loss(c.wide), **Q))
case("targets.Loss/bare-wide-dataset", rf"target dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.influence(c.run, c.good, c.wide, **Q))
case("targets.Loss/label-out-of-range", r"outside \[0, 3\)",
     lambda c: hessfree.influence(c.run, c.good, targets.Loss(xy(labels=torch.full((N,), 9))), **Q))
case("targets.Loss/batch-size-float", "batch_size",
     lambda c: hessfree.influence(c.run, c.good, targets.Loss(c.good, batch_size=2.5), **Q))
case("targets.Loss/nan-inputs", r"non-finite.*sample id\(s\) \[5\]",
     lambda c: hessfree.influence(c.run, c.good, targets.Loss(with_x(float("nan"))), **Q), cheap=False)
case("targets.DemographicParity/inf-inputs", r"non-finite.*sample id\(s\) \[5\]",
     lambda c: hessfree.influence(c.run, c.good, targets.DemographicParity(with_x(float("inf")), torch.arange(N) % 2),
                                  **Q), cheap=False)
case("targets.Robustness/nan-inputs", r"non-finite.*sample id\(s\) \[5\]",
     lambda c: hessfree.influence(c.run, c.good, targets.Robustness(with_x(float("nan")), targets.FGSM(0.1)), **Q),
     cheap=False)
case("targets.Prediction/wide-inputs", rf"Prediction.*{WIDE_SHAPE}",
     lambda c: hessfree.influence(c.run, c.good, targets.Prediction(torch.randn(3, WIDE), 0), **Q))
case("targets.Prediction/inputs-none", "inputs",
     lambda c: hessfree.influence(c.run, c.good, targets.Prediction(None, 0), **Q))
case("targets.Prediction/class-index-float", "class_index",
     lambda c: hessfree.influence(c.run, c.good, targets.Prediction(torch.randn(3, D_IN), 1.5), **Q))
case("targets.Prediction/class-out-of-range", "class_index",
     lambda c: hessfree.influence(c.run, c.good, targets.Prediction(torch.randn(3, D_IN), 7), **Q))
case("targets.DemographicParity/wide-inputs", rf"target dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.influence(c.run, c.good, targets.DemographicParity(c.wide, torch.arange(N) % 2), **Q))
case("targets.DemographicParity/sensitive-wrong-length", "sensitive",
     lambda c: hessfree.influence(c.run, c.good, targets.DemographicParity(c.good, [0, 1]), **Q))
case("targets.DemographicParity/sensitive-not-binary", "binary",
     lambda c: hessfree.influence(c.run, c.good, targets.DemographicParity(c.good, torch.arange(N)), **Q))
case("targets.DemographicParity/positive-class-out-of-range", "positive_class",
     lambda c: hessfree.influence(c.run, c.good, targets.DemographicParity(c.good, torch.arange(N) % 2,
                                                                           positive_class=5), **Q))
case("targets.EqualOpportunity/wide-inputs", rf"target dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.influence(c.run, c.good, targets.EqualOpportunity(c.wide, torch.arange(N) % 2), **Q))
case("targets.EqualOpportunity/bad-form", "form",
     lambda c: hessfree.influence(c.run, c.good, targets.EqualOpportunity(c.good, torch.arange(N) % 2, form="gap"), **Q))
case("targets.EqualOpportunity/label-out-of-range", r"outside \[0, 3\)",
     lambda c: hessfree.influence(c.run, c.good, targets.EqualOpportunity(
         xy(labels=torch.tensor([1, 1, 4, 1, 0, 0, 1, 1, 0, 0, 2, 2])), torch.arange(N) % 2), **Q))
case("targets.Robustness/wide-inputs", rf"target dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.influence(c.run, c.good, targets.Robustness(c.wide, targets.FGSM(0.1)), **Q))
case("targets.Robustness/attack-string", "attack",
     lambda c: hessfree.influence(c.run, c.good, targets.Robustness(c.good, "fgsm"), **Q))
case("targets.Robustness/negative-eps", "eps", lambda c: targets.FGSM(-0.1))
case("targets.Robustness/pgd-zero-steps", "steps", lambda c: targets.PGD(0.1, steps=0))
case("targets.Robustness/boundary-on-mlp", "linear model",
     lambda c: hessfree.influence(c.run, c.good, targets.Robustness(c.good, targets.Boundary()), **Q))
case("targets.Robustness/label-out-of-range", r"outside \[0, 3\)",
     lambda c: hessfree.influence(c.run, c.good, targets.Robustness(xy(labels=torch.full((N,), 3)),
                                                                    targets.PGD(0.1, steps=2)), **Q))
case("influence/dtype-int32", "dtype",
     lambda c: hessfree.influence(c.run, c.good, c.good, dtype=torch.int32, **Q))

# --- pairwise_influence
case("pairwise_influence/wide-test-inputs", rf"test dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.pairwise_influence(c.run, c.good, c.wide, **Q))
case("pairwise_influence/wide-training-inputs", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.pairwise_influence(c.run, c.wide, c.good, **Q))
case("pairwise_influence/test-dataset-none", "map-style",
     lambda c: hessfree.pairwise_influence(c.run, c.good, None, **Q))
case("pairwise_influence/test-label-out-of-range", r"outside \[0, 3\)",
     lambda c: hessfree.pairwise_influence(c.run, c.good, xy(labels=torch.full((N,), -1)), **Q))
case("pairwise_influence/device-nonsense", "device",
     lambda c: hessfree.pairwise_influence(c.run, c.good, c.good, device="gpu0", **Q))

# --- outlier_scores (OGA)
case("outlier_scores/wide-training-inputs", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.outlier_scores(c.run, c.wide, **Q))
case("outlier_scores/wide-training-inputs-l2", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.outlier_scores(model_5(), c.wide, detector="l2", **Q))
case("outlier_scores/wide-reference-inputs", "reference",
     lambda c: hessfree.outlier_scores(c.run, c.good, reference=c.wide, **Q))
case("outlier_scores/wide-train-and-reference", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.outlier_scores(c.run, c.wide, reference=xy(d=WIDE, seed=1), **Q))
case("outlier_scores/reference-label-out-of-range", r"outside \[0, 3\)",
     lambda c: hessfree.outlier_scores(c.run, c.good, reference=xy(labels=torch.full((N,), 3)), **Q))
case("outlier_scores/empty-reference", "reference dataset is empty",
     lambda c: hessfree.outlier_scores(c.run, c.good, reference=xy(n=0), **Q))
case("outlier_scores/unknown-detector", "unknown detector",
     lambda c: hessfree.outlier_scores(c.run, c.good, detector="forest", **Q))
case("outlier_scores/ocsvm-without-reference", "reference",
     lambda c: hessfree.outlier_scores(c.run, c.good, detector="ocsvm", **Q))
case("outlier_scores/detector-option-unknown", "detector_options",
     lambda c: hessfree.outlier_scores(c.run, c.good, detector_options={"bogus": 1}, **Q))
case("outlier_scores/detector-option-bad-value", "detector_options",
     lambda c: hessfree.outlier_scores(c.run, c.good, detector_options={"n_estimators": -3}, **Q))
case("outlier_scores/detector-options-not-dict", "detector_options",
     lambda c: hessfree.outlier_scores(c.run, c.good, detector_options=[("n_estimators", 5)], **Q))
case("outlier_scores/detector-without-fit", "fit",
     lambda c: hessfree.outlier_scores(c.run, c.good, detector=NoFitDetector(), **Q))
case("outlier_scores/detector-short-output", "score_samples",
     lambda c: hessfree.outlier_scores(c.run, c.good, detector=ShortDetector(), **Q), cheap=False)
case("outlier_scores/k-zero", "k", lambda c: hessfree.outlier_scores(c.run, c.good, k=0, **Q))
case("outlier_scores/k-too-large", "k", lambda c: hessfree.outlier_scores(c.run, c.good, k=N + 1, **Q))
case("outlier_scores/k-float-one", "fraction", lambda c: hessfree.outlier_scores(c.run, c.good, k=1.5, **Q))
case("outlier_scores/gradient-path", "gradient_path",
     lambda c: hessfree.outlier_scores(c.run, c.good, gradient_path="fast", **Q))
case("outlier_scores/projection-zero", "projection",
     lambda c: hessfree.outlier_scores(c.run, c.good, projection=0, **Q))
case("outlier_scores/random-state-negative", "random_state",
     lambda c: hessfree.outlier_scores(c.run, c.good, random_state=-1, **Q))
case("outlier_scores/unknown-param", "unknown parameter",
     lambda c: hessfree.outlier_scores(c.run, c.good, params=["head.weight"], **Q))
case("outlier_scores/loss-with-run", "loss=", lambda c: hessfree.outlier_scores(c.run, c.good, loss="bce", **Q))
case("outlier_scores/not-a-model", "nn.Module", lambda c: hessfree.outlier_scores("model", c.good, **Q))
case("outlier_scores/dtype-int64", "dtype",
     lambda c: hessfree.outlier_scores(c.run, c.good, dtype=torch.int64, **Q))
case("outlier_scores/device-cuda-unavailable", "cuda",
     lambda c: (pytest.skip("CUDA is available here") if torch.cuda.is_available()
                else hessfree.outlier_scores(c.run, c.good, device="cuda", **Q)))
case("outlier_scores/batch-size-bool", "batch_size",
     lambda c: hessfree.outlier_scores(c.run, c.good, batch_size=False, **Q))
case("outlier_scores/nan-inputs", r"non-finite.*sample id",
     lambda c: hessfree.outlier_scores(c.run, with_x(float("nan")), detector="l2", **Q), cheap=False)
case("outlier_scores/flag-k-too-large", "k", lambda c: c.scores.flag(N + 5))

# --- baselines
case("baselines.loss/wide-inputs", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.baselines.loss(c.run, c.wide, **Q))
case("baselines.loss/checkpoint-out-of-range", "outside the run",
     lambda c: hessfree.baselines.loss(c.run, c.good, checkpoints=[5], **Q))
case("baselines.loss/dtype-string", "dtype", lambda c: hessfree.baselines.loss(c.run, c.good, dtype="half", **Q))
case("baselines.grand/wide-inputs", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.baselines.grand(c.run, c.wide, **Q))
case("baselines.grand/batch-size-float", "batch_size",
     lambda c: hessfree.baselines.grand(c.run, c.good, batch_size=2.0, **Q))
case("baselines.el2n/wide-inputs", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.baselines.el2n(c.run, c.wide, **Q))
case("baselines.el2n/label-out-of-range", r"outside \[0, 3\)",
     lambda c: hessfree.baselines.el2n(c.run, xy(labels=torch.full((N,), 4)), **Q))
case("baselines.el2n/device-nonsense", "device",
     lambda c: hessfree.baselines.el2n(c.run, c.good, device="nonsense", **Q))

# --- dit / dit_epochs
case("dit/wide-training-inputs", "not the one the run was trained on.*other content",
     lambda c: hessfree.dit(c.run, c.wide, queries.ValLoss(c.good), **Q))
case("dit/wide-validation-inputs", rf"validation dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.dit(c.run, c.good, queries.ValLoss(c.wide), **Q))
case("dit/prediction-query-wide-inputs", rf"Prediction.*{WIDE_SHAPE}",
     lambda c: hessfree.dit(c.run, c.good, queries.Prediction(torch.randn(3, WIDE), 0), **Q))
case("dit/prediction-query-index-out-of-range", "index",
     lambda c: hessfree.dit(c.run, c.good, queries.Prediction(torch.randn(3, D_IN), 9), **Q))
case("dit/saliency-query-wide-input", rf"Saliency.*\(1, 7\)",
     lambda c: hessfree.dit(c.run, c.good, queries.Saliency(torch.randn(WIDE), torch.tensor(0), 0), **Q))
case("dit/validation-label-out-of-range", r"outside \[0, 3\)",
     lambda c: hessfree.dit(c.run, c.good, queries.ValLoss(xy(labels=torch.full((N,), 3))), **Q))
case("dit/bad-mode", "mode", lambda c: hessfree.dit(c.run, c.good, c.good, mode="forward", **Q))
case("dit/window-epoch-out-of-range", "epoch", lambda c: hessfree.dit(c.run, c.good, c.good, window="epoch:9", **Q))
case("dit/window-epoch-not-int", "epoch", lambda c: hessfree.dit(c.run, c.good, c.good, window="epoch:x", **Q))
case("dit/window-reversed", "window", lambda c: hessfree.dit(c.run, c.good, c.good, window=(4, 2), **Q))
case("dit/window-past-end", "window", lambda c: hessfree.dit(c.run, c.good, c.good, window=(0, 99), **Q))
case("dit/window-string", "window", lambda c: hessfree.dit(c.run, c.good, c.good, window="last", **Q))
case("dit/query-none", "query", lambda c: hessfree.dit(c.run, c.good, None, **Q))
case("dit/query-int", "query", lambda c: hessfree.dit(c.run, c.good, 5, **Q))
case("dit/run-without-trajectory", "record",
     lambda c: hessfree.dit(c.bare_run(), c.good, c.good, **Q))
case("dit/other-dataset-size", "not the one the run was trained on",
     lambda c: hessfree.dit(c.run, xy(n=N - 2), c.good, **Q))
case("dit/nan-training-inputs", "not the one the run was trained on.*other content",
     lambda c: hessfree.dit(c.run, with_x(float("nan")), c.good, **Q), cheap=False)
case("dit/nan-validation-inputs", "non-finite",
     lambda c: hessfree.dit(c.run, c.good, queries.ValLoss(with_x(float("nan"))), **Q))
case("dit_epochs/bad-mode", "mode", lambda c: hessfree.dit_epochs(c.run, c.good, c.good, mode="both", **Q))
case("dit_epochs/wide-training-inputs", "not the one the run was trained on.*other content",
     lambda c: hessfree.dit_epochs(c.run, c.wide, c.good, **Q))

# --- hessfree.oracle
case("oracle.loo_replay/unknown-sample-id", "not in the run",
     lambda c: hessfree.oracle.loo_replay(c.run, c.good, [99], c.good, **Q))
case("oracle.loo_replay/no-sample-ids", "at least one sample id",
     lambda c: hessfree.oracle.loo_replay(c.run, c.good, [], c.good, **Q))
case("oracle.loo_replay/chunk-zero", "chunk",
     lambda c: hessfree.oracle.loo_replay(c.run, c.good, [0], c.good, chunk=0, **Q))
case("oracle.loo_replay/dtype-int32", "dtype",
     lambda c: hessfree.oracle.loo_replay(c.run, c.good, [0], c.good, dtype=torch.int32, **Q))
case("oracle.loo_replay/wide-training-inputs", "not the one the run was trained on.*other content",
     lambda c: hessfree.oracle.loo_replay(c.run, c.wide, [0], c.good, **Q))
case("oracle.loo_replay/bad-window", "window",
     lambda c: hessfree.oracle.loo_replay(c.run, c.good, [0], c.good, window=(3, 3), **Q))
case("oracle.finite_difference/eps-zero", "eps",
     lambda c: hessfree.oracle.finite_difference(c.run, c.good, [0], c.good, eps=0, **Q))
case("oracle.finite_difference/bad-mode", "mode",
     lambda c: hessfree.oracle.finite_difference(c.run, c.good, [0], c.good, mode="loo", **Q))

# --- metrics
TRUTH = np.arange(N) < 3
case("metrics.auroc/truth-wrong-length", "aligned", lambda c: metrics.auroc(c.scores, TRUTH[:5]))
case("metrics.auroc/truth-one-class", "at least one corrupted and one clean",
     lambda c: metrics.auroc(c.scores, np.zeros(N, bool)))
case("metrics.auroc/truth-not-binary", "0/1 mask", lambda c: metrics.auroc(c.scores, np.arange(N)))
case("metrics.average_precision/scores-2d", "1-D", lambda c: metrics.average_precision(np.zeros((N, 2)), TRUTH))
case("metrics.average_precision/scores-nan", "NaN", lambda c: metrics.average_precision(np.full(N, np.nan), TRUTH))
case("metrics.precision_at_k/k-zero", "k", lambda c: metrics.precision_at_k(c.scores, TRUTH, 0))
case("metrics.precision_at_k/k-too-large", "k", lambda c: metrics.precision_at_k(c.scores, TRUTH, N + 1))
case("metrics.recall_at_k/k-string", "k", lambda c: metrics.recall_at_k(c.scores, TRUTH, "3"))
case("metrics.recall_at_k/no-positives", "at least one corrupted",
     lambda c: metrics.recall_at_k(c.scores, np.zeros(N, bool), 3))
case("metrics.detection_accuracy/truth-wrong-length", "aligned",
     lambda c: metrics.detection_accuracy(c.scores, TRUTH[:-1], 3))
case("metrics.detection_accuracy/k-bool", "bool", lambda c: metrics.detection_accuracy(c.scores, TRUTH, True))
case("metrics.detection_curve/scores-strings", "real numbers",
     lambda c: metrics.detection_curve(np.array(["a"] * N), TRUTH))
case("metrics.pearson/lengths-differ", "aligned", lambda c: metrics.pearson(np.arange(5.0), np.arange(6.0)))
case("metrics.spearman/constant", "constant", lambda c: metrics.spearman(np.ones(5), np.arange(5.0)))
case("metrics.kendall/scores-vs-array", "explicitly", lambda c: metrics.kendall(c.scores, np.arange(N)))
case("metrics.topk_jaccard/k-too-large", "k", lambda c: metrics.topk_jaccard(np.arange(5.0), np.arange(5.0), 9))

# --- ensemble
case("ensemble/members-zero", "members", lambda c: hessfree.ensemble(hessfree.self_influence, members=0))
case("ensemble/members-bool", "members", lambda c: hessfree.ensemble(hessfree.self_influence, members=True))
case("ensemble/rate-string", "rate", lambda c: hessfree.ensemble(hessfree.self_influence, rate="high"))
case("ensemble/score-fn-not-callable", "callable", lambda c: hessfree.ensemble("self_influence"))
case("ensemble/wide-inputs", rf"training dataset.*{WIDE_SHAPE}",
     lambda c: hessfree.ensemble(hessfree.self_influence, members=2)(c.run, c.wide, **Q))

# --- Run.from_checkpoints
case("Run.from_checkpoints/wrong-shapes", "shape",
     lambda c: hessfree.Run.from_checkpoints(
         model_5(), [nn.Sequential(nn.Linear(WIDE, 8), nn.Tanh(), nn.Linear(8, CLASSES)).state_dict()], [0.1]))
case("Run.from_checkpoints/rates-wrong-length", "learning rate",
     lambda c: hessfree.Run.from_checkpoints(model_5(), [model_5().state_dict()], [0.1, 0.2]))
case("Run.from_checkpoints/rate-negative", "finite positive",
     lambda c: hessfree.Run.from_checkpoints(model_5(), [model_5().state_dict()], [-0.1]))
case("Run.from_checkpoints/missing-file", "does not exist",
     lambda c: hessfree.Run.from_checkpoints(model_5(), [c.tmp / "nope.safetensors"], [0.1]))
case("Run.from_checkpoints/unknown-loss", "unknown loss",
     lambda c: hessfree.Run.from_checkpoints(model_5(), [model_5().state_dict()], [0.1], loss="l1"))


def _junk_checkpoint(c: Ctx, suffix: str) -> Path:
    path = c.tmp / f"junk{suffix}"
    path.write_bytes(b"this is not a checkpoint at all")
    return path


case("Run.from_checkpoints/junk-safetensors", "safetensors",
     lambda c: hessfree.Run.from_checkpoints(model_5(), [_junk_checkpoint(c, ".safetensors")], [0.1]))
case("Run.from_checkpoints/junk-pt", "checkpoint",
     lambda c: hessfree.Run.from_checkpoints(model_5(), [_junk_checkpoint(c, ".pt")], [0.1]))
case("Run.from_checkpoints/rate-string", "learning rate",
     lambda c: hessfree.Run.from_checkpoints(model_5(), [model_5().state_dict()], ["fast"]))
case("Run.from_checkpoints/rates-none", "learning rate",
     lambda c: hessfree.Run.from_checkpoints(model_5(), [model_5().state_dict()], None))
case("Run.from_checkpoints/checkpoint-int", "checkpoint",
     lambda c: hessfree.Run.from_checkpoints(model_5(), [5], [0.1]))


# --- Run.load (corrupt run folders)
def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _edit_manifest(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        m = _manifest(path)
        edit(m)
        (path / "manifest.json").write_text(json.dumps(m))
    return apply


def _truncate(name: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        f = path / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return apply


def _first_checkpoint(path: Path) -> str:
    return _manifest(path)["checkpoints"][0]["file"]


def load_corrupt(edit: Callable[[Path], None]) -> Callable[[Ctx], Any]:
    return lambda c: hessfree.Run.load(c.corrupt_run(edit), model_5())


case("Run.load/missing-directory", "manifest", lambda c: hessfree.Run.load(c.tmp / "nowhere", model_5()))
case("Run.load/incomplete", "incomplete", load_corrupt(_edit_manifest(lambda m: m.update(status="recording"))))
case("Run.load/other-architecture", "architecture",
     lambda c: hessfree.Run.load(c.run_dir, nn.Sequential(nn.Linear(D_IN, 4), nn.Tanh(), nn.Linear(4, CLASSES))))
case("Run.load/manifest-invalid-json", "manifest",
     load_corrupt(lambda p: (p / "manifest.json").write_text("{not json")))
case("Run.load/manifest-not-an-object", "manifest",
     load_corrupt(lambda p: (p / "manifest.json").write_text("[1, 2]")))
case("Run.load/manifest-missing-task", "task", load_corrupt(_edit_manifest(lambda m: m.pop("task"))))
case("Run.load/manifest-missing-checkpoints", "checkpoints",
     load_corrupt(_edit_manifest(lambda m: m.pop("checkpoints"))))
case("Run.load/checkpoint-entry-missing-file", "file",
     load_corrupt(_edit_manifest(lambda m: m["checkpoints"][0].pop("file"))))
case("Run.load/checkpoint-learning-rate-string", "learning",
     load_corrupt(_edit_manifest(lambda m: m["checkpoints"][0].update(learning_rate="fast"))))
case("Run.load/checkpoint-file-missing", "checkpoint",
     load_corrupt(lambda p: (p / _first_checkpoint(p)).unlink()))
case("Run.load/checkpoint-file-truncated", "checkpoint",
     load_corrupt(lambda p: _truncate(_first_checkpoint(p))(p)))
case("Run.load/steps-truncated", "steps", load_corrupt(lambda p: _truncate(_manifest(p)["steps"])(p)))
case("Run.load/steps-missing", "steps", load_corrupt(lambda p: (p / _manifest(p)["steps"]).unlink()))
case("Run.load/steps-missing-array", "steps",
     load_corrupt(lambda p: np.savez(p / _manifest(p)["steps"], positions=np.arange(3))))
case("Run.load/trajectory-truncated", "trajectory",
     load_corrupt(lambda p: _truncate(_manifest(p)["trajectory"]["file"])(p)))
case("Run.load/initial-state-missing", "init",
     load_corrupt(lambda p: (p / _manifest(p)["initial"]).unlink()))


# --- Scores.load
def _scores_file(c: Ctx, **arrays: Any) -> Path:
    path = c.tmp / "s.npz"
    np.savez(path, **arrays)
    return path


META = np.frombuffer(json.dumps({"kind": "outlier"}).encode(), dtype=np.uint8)

case("Scores.load/values-ids-mismatch", "sample ids",
     lambda c: Scores.load(_scores_file(c, values=np.zeros(3), sample_ids=np.arange(4), meta_json=META)))
case("Scores.load/not-an-npz", "npz",
     lambda c: Scores.load((c.tmp / "s.npz").write_text("hello") and c.tmp / "s.npz"))
case("Scores.load/missing-file", "s.npz", lambda c: Scores.load(c.tmp / "s.npz"))
case("Scores.load/missing-values", "values",
     lambda c: Scores.load(_scores_file(c, sample_ids=np.arange(3), meta_json=META)))
case("Scores.load/missing-meta", "meta",
     lambda c: Scores.load(_scores_file(c, values=np.zeros(3), sample_ids=np.arange(3))))
case("Scores.load/bad-meta-json", "meta",
     lambda c: Scores.load(_scores_file(c, values=np.zeros(3), sample_ids=np.arange(3),
                                        meta_json=np.frombuffer(b"{oops", dtype=np.uint8))))
case("Scores.load/pickled-object-array", "pickle",
     lambda c: Scores.load(_scores_file(c, values=np.array([{"a": 1}, None, 3], dtype=object),
                                        sample_ids=np.arange(3), meta_json=META)))
case("Scores.load/truncated", "npz",
     lambda c: Scores.load((lambda p: (p.write_bytes(p.read_bytes()[:40]), p)[1])(
         c.scores.save(c.tmp / "s.npz"))))


# ----------------------------------------------------------------------------- the sweep
def test_enough_cases():
    assert len(CASES) >= 70
    assert len({p.id for p in CASES}) == len(CASES)


@pytest.mark.parametrize("call,match,cheap", CASES)
def test_bad_input_raises_hessfree_error(call, match, cheap, ctx, work):
    with pytest.raises(HessfreeError) as ei:
        call(ctx)
    assert re.search(match, str(ei.value), re.IGNORECASE | re.DOTALL), str(ei.value)
    if cheap:
        assert not any(work.values()), f"refused only after expensive work: {work}"


def test_the_spies_see_expensive_work(ctx, work):
    """The counters behind ``cheap`` do count: a valid call of each kind moves its counter."""
    hessfree.fit(model_5(), ctx.good, batch_size=6, **Q)
    hessfree.influence(ctx.run, ctx.good, ctx.good, checkpoints="last", **Q)
    hessfree.oracle.loo_replay(ctx.run, ctx.good, [0], ctx.good, window=(5, 6), **Q)
    hessfree.dit(ctx.run, ctx.good, ctx.good, window=(5, 6), **Q)
    assert all(work.values()), work


# ----------------------------------------------------------------------------- what must NOT become an input error
class FailsLater(nn.Module):
    """Runs on its first batches (the checks), then fails: a genuine bug of the model, raised later."""

    def __init__(self, exc: BaseException, after: int):
        super().__init__()
        self.net, self.exc, self.after, self.calls = model_5(), exc, after, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise self.exc
        return self.net(x)


@pytest.mark.parametrize("exc", [RuntimeError("a bug in the model"), torch.OutOfMemoryError("out of memory")],
                         ids=["RuntimeError", "OutOfMemoryError"])
def test_later_model_errors_keep_their_type(exc, ctx):
    model = FailsLater(exc, after=3)
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0])
    with pytest.raises(type(exc)) as ei:
        hessfree.self_influence(run, ctx.good, batch_size=4, **Q)
    assert not isinstance(ei.value, HessfreeError)


def test_out_of_memory_on_the_first_forward_keeps_its_type(ctx):
    model = FailsLater(torch.OutOfMemoryError("out of memory"), after=0)
    with pytest.raises(torch.OutOfMemoryError) as ei:
        hessfree.fit(model, ctx.good, **Q)
    assert not isinstance(ei.value, HessfreeError)


def test_first_forward_error_is_chained(ctx):
    with pytest.raises(hessfree.InputError) as ei:
        hessfree.self_influence(ctx.run, ctx.wide, **Q)
    assert isinstance(ei.value.__cause__, RuntimeError)
    assert str(ei.value.__cause__) in str(ei.value)  # the original message is kept
