"""hessfree: which training samples helped or hurt a PyTorch model, without inverting a Hessian.

Public API (re-exported here):

- recording: :func:`fit`, :class:`Run` (``Run.from_checkpoints``, ``Run.load``)
- the loss contract: :class:`Task` (built-ins ``"cross_entropy"``, ``"bce"``)
- methods: :func:`self_influence`, :func:`influence`, :func:`pairwise_influence`,
  :func:`topk_influence`, :func:`ensemble`, :func:`outlier_scores` (Outlier Gradient Analysis), :func:`dit` /
  :func:`dit_epochs` (Dynamic Influence Tracker, queries in :mod:`hessfree.queries`, patterns by
  :func:`influence_patterns`, ground truth in :mod:`hessfree.oracle`), :mod:`hessfree.baselines`
- targets: :mod:`hessfree.targets` (``Loss``, ``Prediction``)
- results: :class:`Scores`, :class:`TopInfluence`; evaluation: :mod:`hessfree.metrics`
- scale: :mod:`hessfree.store` (``build_store``, ``open_store``: per-sample gradients on disk)

Sign convention: an influence score is the estimated increase of the target if the sample is
removed (loss target: positive = helpful, negative = harmful); self-influence and other
outlier-kind scores: higher = more suspicious.
"""
from hessfree import baselines, data, metrics, queries, targets
from hessfree.evaluate.retrain import TrimResult, evaluate_model, trim_and_retrain
from hessfree.errors import (CheckpointMismatchError, HessfreeError, InputError, LabelError, NonFiniteError,
                             ParameterSelectionError, RunDirectoryError)
from hessfree.evaluate.patterns import Patterns, influence_patterns
from hessfree.methods.dit import dit, dit_epochs
from hessfree.methods.ensemble import ensemble
from hessfree.methods.outlier import outlier_scores
from hessfree.methods.tracin import influence, pairwise_influence, self_influence
from hessfree.methods.streaming import topk_influence
from hessfree.run import Run, fit
from hessfree.scores import Scores
from hessfree.topk import TopInfluence
from hessfree.tasks import BCEWithLogits, CrossEntropy, Task
from hessfree import oracle, store  # noqa: E402  (after the methods they wrap)

__version__ = "0.1.0"

__all__ = [
    "fit", "Run", "Task", "CrossEntropy", "BCEWithLogits", "Scores", "targets", "baselines", "data", "metrics",
    "self_influence", "influence", "pairwise_influence", "ensemble", "outlier_scores", "dit", "dit_epochs", "queries", "oracle",
    "influence_patterns", "Patterns", "trim_and_retrain", "evaluate_model",
    "TrimResult", "TopInfluence", "topk_influence", "store",
    "HessfreeError", "InputError", "CheckpointMismatchError", "ParameterSelectionError", "LabelError",
    "NonFiniteError", "RunDirectoryError",
]
