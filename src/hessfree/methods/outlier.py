"""Outlier Gradient Analysis (spec outlier_gradient.md): detrimental training samples are outliers
among the per-sample gradients at the trained model.

    outlier_scores(z_i) = detector score of g_i = ∇_θ l(z_i; θ_final)      higher = more outlying

Why it can work: the influence of removing z_i on any target is −⟨u, g_i⟩ with one vector u shared
by every sample, so only g_i varies, and detrimental samples are a small minority — outliers in
gradient space. This is a hypothesis with strong empirical support (Chhabra et al., ICML 2025),
not a theorem: check it on your data (``hessfree.metrics``, ``trim_and_retrain``).

Gradients are taken at the final checkpoint with the model in eval mode. For a final linear layer
under the built-in losses the closed form of :mod:`hessfree.grads.closed_form` is used (no
per-sample backward; L1 / L2 without even the outer product); otherwise the gradient engine
(factorised Linear / Conv2d / Embedding blocks, ``vmap(grad)`` for the rest).
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from hessfree.datasets import dataset_size, iter_batches, sample_ids
from hessfree.errors import InputError
from hessfree.grads.closed_form import HeadCapture, HeadNorms, head_module
from hessfree.grads.engine import _check_finite
from hessfree.grads.projection import SparseProjection
from hessfree.grads.select import ParamSpec
from hessfree.methods.common import Scorer, check_labels
from hessfree.run import Run
from hessfree.scores import Scores, resolve_k

log = logging.getLogger(__name__)

DETECTORS = ("iforest", "l1", "l2", "ocsvm", "lof")
GRADIENT_PATHS = ("auto", "closed_form", "engine", "vmap")
_FEATURE_WARN_BYTES = 2 << 30  # warn when the feature array(s) and the detector's own needs exceed this
# Beyond the features: a detector's per-sample vectors (labels, weights, depths, scores) and the batches' temporaries;
# an upper estimate (70–124 B per sample measured for the iforest at N = 50k–200k, benchmarks/oga_memory.py).
_PER_SAMPLE_BYTES = 128


def outlier_scores(run_or_model: Run | nn.Module, train_dataset: Dataset, *, detector: Any = "iforest",
                   params: ParamSpec = "last_layer_weight", projection: int | None = None,
                   reference: Dataset | None = None, random_state: int = 0, loss: Any = None,
                   k: int | float | None = None, detector_options: dict | None = None,
                   gradient_path: str = "auto", batch_size: int = 256, dtype: torch.dtype = torch.float32,
                   device: Any = None, progress: bool = True) -> Scores:
    """Score every training sample by how outlying its gradient is: Scores (N,), higher = more outlying.

    Args:
        run_or_model: a :class:`hessfree.Run` (its last checkpoint is used), a trained
            ``nn.Module`` (its current weights; then ``loss`` names the loss, default
            ``"cross_entropy"``), or a gradient store (:mod:`hessfree.store`; its last checkpoint's
            rows are the features, ``l2`` comes from its exact squared norms; ``train_dataset``
            may be None; a ``reference`` needs the store opened with its run).
        detector: ``"iforest"`` (−IsolationForest.score_samples; 100 trees, max_samples =
            min(256, N), ``random_state``), ``"l1"`` (Σ|g|), ``"l2"`` (‖g‖₂, the square root of
            one-checkpoint self-influence with η = 1), ``"ocsvm"`` (−OneClassSVM.decision_function fitted on
            the ``reference`` gradients as inliers; needs ``reference``), ``"lof"`` (local outlier
            factor), or any object with scikit-learn's ``fit`` / ``score_samples`` (higher =
            more normal, as in scikit-learn; the score is its negation).
        params: ``"last_layer_weight"`` (default: the final layer's weight, bias excluded),
            ``"last_layer"``, ``"all"`` or a list of parameter / module names.
        projection: None (exact gradients) or k: a seeded sparse Johnson–Lindenstrauss projection
            to k dimensions (:class:`hessfree.grads.projection.SparseProjection`, seed
            ``random_state``) before the detector.
        reference: a dataset of trusted samples (e.g. validation, never the test set). The
            detector is fitted on their gradients and scores the training gradients; without it
            the detector is fitted on the training gradients themselves. ``l1`` / ``l2`` ignore it.
        k: optional flagging budget (count, or fraction of N), checked now and used by
            ``scores.flag()``.
        detector_options: keyword arguments for the scikit-learn detector named by ``detector``.
        gradient_path: ``"auto"`` (closed form when it applies, else the engine),
            ``"closed_form"`` (refuse if it does not apply), ``"engine"``, or ``"vmap"`` (the
            ``torch.func`` reference path).
        batch_size: samples per forward (and backward) pass. A linear model (a bare ``nn.Linear``
            or an ``nn.Sequential`` holding only it) on a ``TensorDataset`` takes its closed-form
            L1 / L2 many batches per pass (about 64 MB of inputs at most): it keeps nothing per
            sample but the logits.

    Memory: a detector on features (``iforest``, ``ocsvm``, ``lof``, your own object) gets one
    (N, width) array, plus one for ``reference``, written batch by batch where it was allocated
    and handed over without a copy, in the dtype the detector works in
    (:func:`feature_dtype`: float32 for ``iforest``, float64 for ``ocsvm``, else ``dtype``). A
    warning is logged before it is allocated when that and the detector's estimated needs
    (:func:`memory_estimate`) exceed 2 GiB. ``l1`` / ``l2`` keep N norms (with ``projection``,
    each batch's projected gradients are reduced to their norms at once).
    """
    from hessfree.store import GradientStore

    if isinstance(run_or_model, GradientStore):
        from hessfree.methods.streaming import outlier_from

        return outlier_from(run_or_model, train_dataset, detector=detector, params=params, projection=projection,
                            reference=reference, random_state=random_state, k=k,
                            detector_options=detector_options, device=device, progress=progress)
    t0 = time.perf_counter()
    name, det = _check_detector(detector, reference, detector_options)
    if gradient_path not in GRADIENT_PATHS:
        raise InputError(f"gradient_path must be one of {GRADIENT_PATHS}, got {gradient_path!r}")
    run = _as_run(run_or_model, loss)
    n = dataset_size(train_dataset, "training dataset")
    if k is not None:
        resolve_k(k, n)
    if projection is not None and (isinstance(projection, bool) or not isinstance(projection, (int, np.integer))
                                   or projection < 1):
        raise InputError(f"projection must be None or a positive number of dimensions, got {projection!r}")
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or random_state < 0:
        raise InputError(f"random_state must be a non-negative integer, got {random_state!r}")
    if reference is not None:
        dataset_size(reference, "reference dataset")
        _check_same_features(run, train_dataset, reference)
        if name in ("l1", "l2"):
            log.warning("detector %r does not use the reference dataset; it is ignored", name)
    if name in ("iforest", "ocsvm", "lof"):  # options checked now, before any gradient work
        n_fit = dataset_size(reference) if reference is not None else n
        _sklearn_detector(name, detector_options or {}, int(random_state), n_fit, novelty=reference is not None)
    want = name if name in ("l1", "l2") and projection is None else "features"
    reduce = name if name in ("l1", "l2") and projection is not None else None  # norms of projected gradients

    scorer = Scorer(run, train_dataset, params=params, checkpoints="last", batch_size=batch_size, dtype=dtype,
                    device=device, progress=progress, method="outlier_gradient", ghost=gradient_path != "vmap")
    head = None
    if gradient_path in ("auto", "closed_form"):  # decided before the engine adds hooks of its own
        found = head_module(run.model, scorer.names, run.task)
        if found is None and gradient_path == "closed_form":
            raise InputError(_NO_CLOSED_FORM)
        if found is not None:
            head = HeadCapture(found[1], found[0], scorer.names, run.task, model=run.model)
    with scorer as sc:
        n_features = sum(sc.engine.model.get_parameter(nm).numel() for nm in sc.names)
        proj = (SparseProjection(n_features, int(projection), seed=int(random_state), device=sc.engine.device,
                                 dtype=dtype) if projection is not None else None)
        width = proj.n_components if proj is not None else n_features
        ref_n = dataset_size(reference) if reference is not None and want == "features" and reduce is None else 0
        store = feature_dtype(name, dtype) if want == "features" and reduce is None else None
        if store is not None:  # before any gradient work, and so before the arrays are allocated
            est = memory_estimate(name, n, ref_n, width, store, detector_options or {})
            if est > _FEATURE_WARN_BYTES:
                log.warning("outlier_scores will hold %d × %d gradient features as %s (%.2f GiB; about %.2f GiB in "
                            "all with what detector %r needs); pass projection= to reduce them", n + ref_n, width,
                            store.name, (n + ref_n) * width * store.itemsize / 2**30, est / 2**30, name)
        for _ in sc.checkpoints(extra_batches_per_checkpoint=-(-ref_n // batch_size)):
            ref_checked = check_labels(sc.engine, reference) if ref_n else False  # before any gradient work
            collector = _Collector(sc, head, proj, want, strict=gradient_path == "closed_form", store=store,
                                   width=width, reduce=reduce)
            values = collector.run(train_dataset, sc.ids, sc.labels_checked)
            ref_values = collector.run(reference, sample_ids(reference), ref_checked) if ref_n else None
        grad_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        scores = _detect(name, det, values, ref_values, int(random_state), detector_options or {})
        detect_s = time.perf_counter() - t1
        meta = sc.meta(kind="outlier", goal="minimize", detector=name, gradient_path=collector.path,
                       n_features=n_features, projection=proj.describe() if proj is not None else None,
                       n_reference=dataset_size(reference) if reference is not None else 0,
                       reference_used=ref_values is not None, random_state=int(random_state),
                       detector_options=detector_options or {}, flag_k=k)
    meta["timing"].update({"gradients_s": grad_s, "detector_s": detect_s})
    return Scores(scores, sc.ids, meta)


_NO_CLOSED_FORM = ("gradient_path='closed_form' needs the selected parameters to be the weight and/or bias of one "
                   "nn.Linear whose output is the model output, under loss 'cross_entropy' or 'bce', with no "
                   "global module hooks registered; use gradient_path='auto' to fall back to the gradient engine")


def feature_dtype(name: str, dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype the gradient features of detector ``name`` are stored in: the one the
    detector works in, so that it takes the array without a copy.

    scikit-learn's IsolationForest converts its input to float32 (``fit`` and ``score_samples``
    validate with ``dtype=np.float32``, its trees split and apply in float32) and OneClassSVM to
    float64 (libsvm; ``dtype=np.float64, order="C"``); converting each batch on the way in is the
    same rounding, so the scores are those of the conversion scikit-learn would make, without its
    second N × P array. LocalOutlierFactor and a detector object of your own get the ``dtype`` the
    gradients are computed in (bfloat16, which NumPy lacks, as float32: exact).
    """
    if name == "iforest":
        return np.dtype(np.float32)
    if name == "ocsvm":
        return np.dtype(np.float64)
    return np.dtype({torch.float64: np.float64, torch.float16: np.float16}.get(dtype, np.float32))


def memory_estimate(name: str, n: int, n_ref: int, width: int, store: np.dtype, opts: dict) -> int:
    """Bytes held while a features detector runs: the (n + n_ref) × width feature array(s) in
    ``store`` dtype, allocated once and handed to the detector as they are, plus the detector's own
    needs (estimated; for a detector object of yours, what it allocates is not counted)."""
    held = (n + n_ref) * (width * store.itemsize + _PER_SAMPLE_BYTES)
    if name == "ocsvm":  # libsvm's kernel cache
        held += int(float(opts.get("cache_size", 200)) * 2**20)
    elif name == "lof":  # neighbour distances and indices, and distance blocks of at most working_memory
        from sklearn import get_config

        k = int(opts.get("n_neighbors", 20)) + 1
        held += (n + n_ref) * k * 16 + min(int(get_config()["working_memory"]) * 2**20, n * (n_ref or n) * 8)
    return held


class _Collector:
    """Per-sample gradient features (N, width) or closed-form / engine norms (N,) of one dataset,
    written batch by batch into one array allocated up front: ``width`` features in ``store``
    dtype (see :func:`feature_dtype`) when ``store`` is given, else norms in float64.
    ``reduce``: ``"l1"`` / ``"l2"`` turns each batch of (projected) features into its norms at
    once, so that no features array is kept at all."""

    def __init__(self, sc: Scorer, head: HeadCapture | None, proj: SparseProjection | None, want: str, strict: bool,
                 store: np.dtype | None = None, width: int = 0, reduce: str | None = None):
        self.sc, self.head, self.proj, self.want, self.strict = sc, head, proj, want, strict
        self.store, self.width, self.reduce = store, width, reduce

    @property
    def path(self) -> str:
        """The gradient path in use (the closed form is dropped for the engine when it does not apply)."""
        return "closed_form" if self.head is not None else ("factorised" if self.sc.engine.rules else "vmap")

    def run(self, dataset: Dataset, ids: np.ndarray, labels_checked: bool) -> np.ndarray:
        sc, names = self.sc, self.sc.names
        n = dataset_size(dataset)
        if self.store is not None:
            out = np.empty((n, self.width), dtype=self.store)  # the one N × width array, C-contiguous
        else:
            out = np.empty(n, dtype=np.float64)
        sink = torch.from_numpy(out)  # shares out's memory: each batch is written in place
        filled = 0

        def put(v: Tensor, i: Any) -> None:
            nonlocal filled
            self._checked(v, i)
            if self.reduce is not None:  # row by row the same float64 arithmetic as on the whole matrix
                v = v.cpu().float() if v.dtype == torch.bfloat16 else v.cpu()  # NumPy has no bfloat16; exact
                x = v.numpy().astype(np.float64, order="C")  # C order, as the whole matrix was: the same sums
                v = torch.from_numpy(np.linalg.norm(x, axis=1) if self.reduce == "l2" else np.abs(x).sum(1))
            sink[filled:filled + len(v)].copy_(v)  # the dtype conversion, and the device-to-host copy
            filled += len(v)

        norms = HeadNorms(self.head, self.want) if self.head is not None and self.want in ("l1", "l2") else None
        with self.head if self.head is not None else nullcontext():
            step = norms.rows_per_step(dataset, sc.batch_size, sc.engine.dtype.itemsize) if norms else sc.batch_size
            for pos, batch in iter_batches(dataset, step):
                v = None
                if self.head is not None:
                    inputs, targets = sc.engine.prepare(batch)
                    check = None if labels_checked else (
                        lambda out, t=targets, i=ids[pos]: sc.engine.task.validate(out, t, i))
                    hz = self.head.capture(sc.engine.forward, inputs, check, classes_first=norms is not None)
                    if hz is None:
                        if self.strict:
                            raise InputError(_NO_CLOSED_FORM + " (the layer is not the model's last operation)")
                        log.info("the last layer is not the model's final operation: using the gradient engine")
                        self.head.__exit__()  # its hook would keep every later batch's tensors
                        self.head = None
                        if norms is not None:  # batches already seen: their norms are kept, in order
                            for done, i in norms.drain(flush=True):
                                put(done, i)
                            norms = None
                    elif norms is not None:  # L1 / L2: the residuals are formed many batches at a time
                        norms.add(hz[0], hz[1], targets, ids[pos])
                        for done, i in norms.drain():
                            put(done, i)
                        sc.bar.update(-(-len(pos) // sc.batch_size))  # the batches of batch_size it covered
                        continue
                    else:
                        v = self.head.factors(hz, targets).dense(names)
                if v is None:
                    grads = sc.engine.batch_grads(batch, ids[pos], validate=not labels_checked, check_loss=False)
                    if self.want == "l2":
                        v = grads.sq_norms().clamp_min(0).sqrt()
                    else:
                        G = grads.dense(names)
                        v = G.abs().sum(1) if self.want == "l1" else G
                v = v.detach()
                if self.proj is not None:
                    v = self.proj.project(v)
                put(v, ids[pos])
                sc.bar.update(1)
        if norms is not None:
            for done, i in norms.drain(flush=True):
                put(done, i)
        if filled != n:  # every row is written exactly once, in order
            raise RuntimeError(f"internal error: {filled} of {n} rows of gradient features were computed")
        return out

    @staticmethod
    def _checked(v: Tensor, ids: Any) -> Tensor:
        _check_finite(v if v.ndim == 1 else v.sum(1), ids, "loss or gradient")
        return v


def _as_run(run_or_model: Any, loss: Any) -> Run:
    if isinstance(run_or_model, Run):
        if loss is not None:
            raise InputError("a Run carries its own loss: pass loss= only with a bare model")
        return run_or_model
    if isinstance(run_or_model, nn.Module):
        state = {k: v.detach().clone() for k, v in run_or_model.state_dict().items()}
        return Run.from_checkpoints(run_or_model, [state], [1.0], loss=loss if loss is not None else "cross_entropy")
    raise InputError(f"expected a hessfree.Run or a trained torch.nn.Module, got {type(run_or_model).__name__}")


def _check_detector(detector: Any, reference: Dataset | None, options: dict | None) -> tuple[str, Any]:
    if options is not None and not isinstance(options, dict):
        raise InputError(f"detector_options must be a dict of keyword arguments, got {type(options).__name__}")
    if isinstance(detector, str):
        if detector not in DETECTORS:
            raise InputError(f"unknown detector {detector!r}: use one of {DETECTORS} or an object with "
                             "fit / score_samples")
        if detector == "ocsvm" and reference is None:
            raise InputError("detector 'ocsvm' is fitted on the gradients of trusted samples as inliers: pass "
                             "reference= (a validation dataset, never the test set)")
        if options and detector in ("l1", "l2"):
            raise InputError(f"detector {detector!r} takes no detector_options")
        return detector, None
    missing = [m for m in ("fit", "score_samples") if not callable(getattr(detector, m, None))]
    if missing:
        raise InputError(f"a detector object needs scikit-learn's fit() and score_samples() (higher = more normal); "
                         f"{type(detector).__name__} lacks {' and '.join(missing)}")
    if options:
        raise InputError("detector_options configure a named detector; configure your own detector object directly")
    return type(detector).__name__, detector


def _first_inputs(run: Run, dataset: Dataset) -> Any:
    _, batch = next(iter_batches(dataset, 1))
    return run.task.split(batch)[0]


def _shapes(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return tuple(obj.shape[1:])
    if isinstance(obj, Mapping):
        return {k: _shapes(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_shapes(v) for v in obj]
    return type(obj).__name__


def _check_same_features(run: Run, train: Dataset, reference: Dataset) -> None:
    a, b = _shapes(_first_inputs(run, train)), _shapes(_first_inputs(run, reference))
    if a != b:
        raise InputError(f"the reference samples have input shape {b} but the training samples {a}: the reference "
                         "must hold samples of the same kind (e.g. a validation split of the same data)")


def _sklearn_detector(name: str, opts: dict, random_state: int, n_fit: int, novelty: bool) -> Any:
    """The scikit-learn estimator of a named detector, its options checked (names and values)."""
    if name == "iforest":
        from sklearn.ensemble import IsolationForest as cls

        kw = {"n_estimators": 100, "max_samples": min(256, n_fit), "random_state": random_state, **opts}
    elif name == "ocsvm":
        from sklearn.svm import OneClassSVM as cls

        kw = dict(opts)
    else:
        from sklearn.neighbors import LocalOutlierFactor as cls

        if "novelty" in opts:
            raise InputError("lof's novelty is set by hessfree: True with reference=, False without")
        kw = {"n_neighbors": min(20, max(1, n_fit - 1)), **opts, "novelty": novelty}
    try:
        est = cls(**kw)
        if hasattr(est, "_validate_params"):  # scikit-learn >= 1.2 checks values only in fit; check them now
            est._validate_params()
    except (TypeError, ValueError) as exc:
        raise InputError(f"detector_options {opts} are not valid for {cls.__name__}: {exc}") from exc
    return est


def _detect(name: str, det: Any, X: np.ndarray, R: np.ndarray | None, random_state: int, opts: dict) -> np.ndarray:
    """Scores (N,) from the collector's arrays, which every detector takes as they are (no copy):
    norms (N,) are the scores; features (N, width) go to the detector, fitted on the reference
    features ``R`` when given."""
    if X.ndim == 1:  # closed-form / engine norms, or the norms of projected gradients: float64 already
        return X
    fit_on = R if R is not None else X
    if name in ("iforest", "ocsvm", "lof"):
        est = _sklearn_detector(name, opts, random_state, len(fit_on), novelty=R is not None)
        if name == "lof" and R is None:
            return -est.fit(X).negative_outlier_factor_
        est.fit(fit_on)
        return -(est.decision_function(X) if name == "ocsvm" else est.score_samples(X))
    det.fit(fit_on)
    s = np.asarray(det.score_samples(X), dtype=np.float64).reshape(-1)
    if s.shape != (len(X),):
        raise InputError(f"{name}.score_samples returned {s.shape[0]} values for {len(X)} samples")
    return -s
