"""TracIn over checkpoints and IP (Hessian-free influence); spec tracin.md §3–4.

    TracInCP(z_i, z') = Σ_k η_k g_i(θ_k)·∇l(z'; θ_k)    pairwise_influence  (n_test, n_train)
    TracIn(z_i; f)    = Σ_k η_k g_i(θ_k)·∇f(θ_k)        influence           (n_train,)
    Self(z_i)         = Σ_k η_k ||g_i(θ_k)||²           self_influence      (n_train,)

IP is ``influence`` with one checkpoint (the final model) and η = 1: ``Run.from_checkpoints(model,
[final_state], [1.0])``. Sign: an influence score is the estimated increase of the target if the
sample is removed — for a loss target positive = helpful, negative = harmful. Self-influence is
an outlier-kind score: higher = more suspicious (e.g. mislabeled).

Each checkpoint is loaded once per call; target and test gradients are computed once per
checkpoint; training data streams in batches; only the returned scores are ever N-sized.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hessfree.datasets import as_index, dataset_size, iter_batches, sample_ids
from hessfree.grads.blocks import BatchGrads, concat
from hessfree.grads.engine import _check_finite
from hessfree.errors import InputError
from hessfree.grads.select import ParamSpec, frequency_scaled_layer, select_parameters
from hessfree.grads.stacked import NotStackable
from hessfree.methods.common import Scorer, check_labels
from hessfree.methods.streaming import influence_from, pairwise_from, self_influence_from
from hessfree.run import Run
from hessfree.scores import Scores, resolve_k
from hessfree.store import GradientStore
from hessfree.targets import Loss, Target
from hessfree.topk import TopInfluence, TopKAccumulator


def self_influence(run: Run, train_dataset: Dataset, *, params: ParamSpec = "all",
                   checkpoints: Sequence[int] | str | None = None, batch_size: int = 256,
                   dtype: torch.dtype = torch.float32, device: Any = None, progress: bool = True,
                   ghost: bool = True, stack: bool = True) -> Scores:
    """Σ_k η_k ||g_i(θ_k)||² for every training sample: Scores (N,), higher = more suspicious.

    ``params``: "all", "last_layer" or a list of parameter/module names. ``checkpoints``: None
    (all), "last" or indices. ``ghost=False`` forces the vmap(grad) path (reference).
    ``stack``: score several checkpoints in one pass per batch where that is possible and checked
    (:mod:`hessfree.grads.stacked`; memory grows with checkpoints × ``batch_size`` rows, at most
    4,096); ``False``: one checkpoint at a time (needed for a model that reorders its batch).

    ``run`` may be a gradient store (:mod:`hessfree.store`): the scores then come from its exact
    stored squared norms, and ``train_dataset`` may be None (or the store's dataset, checked).
    """
    if isinstance(run, GradientStore):
        _store_defaults(params=params, checkpoints=checkpoints)
        return self_influence_from(run, train_dataset)
    with Scorer(run, train_dataset, params=params, checkpoints=checkpoints, batch_size=batch_size, dtype=dtype,
                device=device, progress=progress, method="self_influence", ghost=ghost, stack=stack) as sc:
        out = torch.zeros(sc.n, dtype=torch.float64, device=sc.engine.device)
        for ks, etas in sc.checkpoint_groups():
            w = torch.tensor(etas, dtype=torch.float64, device=out.device)
            part = out if len(ks) == 1 else torch.zeros_like(out)  # a stacked group's sums, kept apart
            try:
                for pos, _, grads in sc.train_batches():
                    with sc.stacking_failures():
                        sq = grads.sq_norms().view(len(ks), -1)  # (checkpoints of the group, B)
                    _check_finite(sq.double().sum(0), sc.ids[pos], "loss or gradient")
                    sc.add(part, pos, w @ sq.double(), 1.0)
            except NotStackable as e:
                if part is out:
                    raise
                sc.redo_alone(e)  # this group again, one checkpoint at a time
                continue
            if part is not out:
                out += part
        meta = sc.meta(kind="outlier", goal="minimize")
    return Scores(out.cpu().numpy(), sc.ids, meta)


def influence(run: Run, train_dataset: Dataset, target: Target | Dataset, *, params: ParamSpec = "all",
              checkpoints: Sequence[int] | str | None = None, batch_size: int = 256,
              dtype: torch.dtype = torch.float32, device: Any = None, progress: bool = True,
              ghost: bool = True) -> Scores:
    """Σ_k η_k g_i(θ_k)·∇f(θ_k) for every training sample: Scores (N,).

    ``target``: a :mod:`hessfree.targets` object (``targets.Loss(val_dataset)``,
    ``targets.Prediction(inputs, class_index)``, …); a bare dataset means ``targets.Loss(dataset)``.
    Positive = removing the sample raises the target (for a loss target: helpful).

    ``run`` may be a gradient store opened with its run (:func:`hessfree.store.open_store`): the
    training gradients are then read from it.
    """
    if isinstance(run, GradientStore):
        _store_defaults(params=params, checkpoints=checkpoints)
        return influence_from(run, train_dataset, target, device=device, progress=progress)
    if not isinstance(target, Target):
        target = Loss(target)
    target.validate()
    target.check_model(run.model)
    _refuse_frequency_scaled_embeddings(run.model, params)
    with Scorer(run, train_dataset, params=params, checkpoints=checkpoints, batch_size=batch_size, dtype=dtype,
                device=device, progress=progress, method="influence", ghost=ghost) as sc:
        out = torch.zeros(sc.n, dtype=torch.float64, device=sc.engine.device)
        for _, eta in sc.checkpoints():
            q = {k: v.detach() for k, v in target.gradient(sc.engine).items()}
            _check_finite(torch.stack([v.abs().sum() for v in q.values()]), None, "target gradient")
            for pos, _, grads in sc.train_batches():
                s = grads.dot(q)
                _check_finite(s, sc.ids[pos], "loss or gradient")
                sc.add(out, pos, s, eta)
        meta = sc.meta(target=target.describe(), goal=target.goal)
    return Scores(out.cpu().numpy(), sc.ids, meta)


def _store_defaults(**given: Any) -> None:
    """A store fixes the parameter selection and the checkpoints: refuse other values for them."""
    defaults = {"params": "all", "checkpoints": None, "top_k": None}
    bad = [k for k, v in given.items() if v != defaults[k]]
    if bad:
        raise InputError(f"{', '.join(bad)} cannot be chosen when scoring from a gradient store (the store fixes "
                         "them; top-k from a store: hessfree.topk_influence)")


def _refuse_frequency_scaled_embeddings(model: nn.Module, params: ParamSpec) -> None:
    """A target's gradient is taken over whole batches; a frequency-scaled embedding would make it
    differ from the sum of the samples' own gradients, and the scores would be off (by ~1e-3
    relative in a test, 21% with a tied head)."""
    layer = frequency_scaled_layer(model, select_parameters(model, params))
    if layer is not None:
        raise InputError(
            f"influence against a target is not exact for embedding {layer!r} with scale_grad_by_freq=True: "
            "autograd divides its gradient by word counts within the batch, so the target's gradient is not the "
            "sum of its samples' gradients. Score a copy of the model with scale_grad_by_freq=False (the "
            "forward is the same), or leave this layer out of params=")


def pairwise_influence(run: Run, train_dataset: Dataset, test_dataset: Dataset, *, params: ParamSpec = "all",
                       checkpoints: Sequence[int] | str | None = None, batch_size: int = 256,
                       dtype: torch.dtype = torch.float32, device: Any = None, progress: bool = True,
                       ghost: bool = True, stack: bool = True, top_k: int | float | None = None
                       ) -> Scores | TopInfluence:
    """TracInCP matrix Σ_k η_k g_i(θ_k)·∇l(z'_j; θ_k): Scores (n_test, n_train).

    Test gradients use the test labels. Row j: positive entries are proponents of test sample j
    (removing them raises its loss), negative entries opponents. ``scores.helpful(k)`` gives the
    top proponents per test sample, ``scores.harmful(k)`` the top opponents. ``stack``: as in
    :func:`self_influence`.

    ``top_k``: instead of the matrix, a :class:`hessfree.TopInfluence` with, per test sample,
    the ``top_k`` most helpful (largest) and most harmful (smallest) entries and their training
    sample ids, merged block by block into running buffers (memory O(n_test × (top_k + a window
    of training columns)), never n_test × N; see :func:`_pairwise_top_k`). The same values and
    order as ``helpful`` / ``harmful`` of the matrix, ties by the lower training position.
    ``top_k`` follows :func:`hessfree.scores.resolve_k` (a count 1 ≤ k ≤ N or a fraction of N),
    checked before any gradient work.

    ``run`` may be a gradient store opened with its run (:func:`hessfree.store.open_store`): the
    training gradients are then read from it (``top_k`` there: use :func:`hessfree.topk_influence`).
    """
    if isinstance(run, GradientStore):
        _store_defaults(params=params, checkpoints=checkpoints, top_k=top_k)
        return pairwise_from(run, train_dataset, test_dataset, device=device, progress=progress)
    if top_k is not None:
        return _pairwise_top_k(run, train_dataset, test_dataset, top_k, params=params, checkpoints=checkpoints,
                               batch_size=batch_size, dtype=dtype, device=device, progress=progress, ghost=ghost,
                               stack=stack)
    m = dataset_size(test_dataset, "test dataset")
    test_ids = sample_ids(test_dataset)
    with Scorer(run, train_dataset, params=params, checkpoints=checkpoints, batch_size=batch_size, dtype=dtype,
                device=device, progress=progress, method="pairwise_influence", ghost=ghost, stack=stack) as sc:
        out = torch.zeros(m, sc.n, dtype=torch.float64, device=sc.engine.device)
        for ks, w, tests in _test_groups(sc, test_dataset, test_ids, batch_size):
            with _explained(len(ks)):
                for pos, _, tr in sc.train_batches():
                    with sc.stacking_failures():
                        _add_blocks(out, tests, tr, w, pos, sc.ids[pos])
        meta = sc.meta(n_test=m, goal="minimize")
    return Scores(out.cpu().numpy(), sc.ids, meta, test_ids=test_ids)


_TOPK_WINDOW_BYTES = 64 << 20  # float64 partial sums of n_test × (a window of training columns)


def _pairwise_top_k(run: Run, train_dataset: Dataset, test_dataset: Dataset, top_k: int | float, *,
                    params: ParamSpec, checkpoints: Sequence[int] | str | None, batch_size: int, dtype: torch.dtype,
                    device: Any, progress: bool, ghost: bool, stack: bool) -> TopInfluence:
    """``pairwise_influence(..., top_k=k)``: the k largest and k smallest entries of each row of the
    TracInCP matrix, without the matrix.

    The training data are taken a window of W columns at a time (W: whole batches, at least one,
    with the n_test × W float64 partial sums within _TOPK_WINDOW_BYTES). The window's blocks are
    summed over every checkpoint (group) in the same order as the dense path sums them, so every
    entry has the dense value bit for bit, then merged into running top-k buffers
    (:class:`hessfree.topk.TopKAccumulator`: stable sort of [current k, window], ties by the lower
    training position). Test gradients are computed once per checkpoint (group), as in the dense
    path; when the checkpoints take several passes (``stack=False``, layers that cannot be
    stacked, more checkpoints than one group holds) all their test gradients are kept, and each
    window binds each group again (reloading its checkpoints).
    """
    n = dataset_size(train_dataset, "training dataset")
    k = resolve_k(top_k, n)  # before any gradient work
    m = dataset_size(test_dataset, "test dataset")
    test_ids = sample_ids(test_dataset)
    with Scorer(run, train_dataset, params=params, checkpoints=checkpoints, batch_size=batch_size, dtype=dtype,
                device=device, progress=progress, method="pairwise_influence", ghost=ghost, stack=stack) as sc:
        acc = TopKAccumulator(m, k, device=sc.engine.device)
        groups = list(_test_groups(sc, test_dataset, test_ids, batch_size))  # one per pass
        window = min(n, max(1, _TOPK_WINDOW_BYTES // (8 * m * batch_size)) * batch_size)
        bar = tqdm(total=len(sc.ks) * -(-n // batch_size), desc="pairwise_influence top_k", disable=not progress,
                   leave=False)
        try:
            for start in range(0, n, window):
                stop = min(n, start + window)
                partial = torch.zeros(m, stop - start, dtype=torch.float64, device=sc.engine.device)
                for ks, w, tests in groups:
                    if len(groups) > 1:  # else still bound from checkpoint_groups
                        states = [sc.run.checkpoint_state(c) for c in ks]
                        if len(states) == 1:
                            sc.engine.bind(states[0])
                        else:
                            sc.engine.bind_stacked(states)
                    with _explained(len(ks)):
                        for pos, batch in iter_batches(sc.dataset, batch_size, order=np.arange(start, stop)):
                            tr = sc.engine.batch_grads(batch, sc.ids[pos], validate=not sc.labels_checked,
                                                       check_loss=False)
                            _add_blocks(partial, tests, tr, w, pos - start, sc.ids[pos])
                            bar.update(len(ks))
                _merge_window(acc, partial, start, k)
        finally:
            bar.close()
        meta = sc.meta(n_test=m, goal="minimize", top_k=k, window=window, passes=len(groups))
    hp, hv, lp, lv = acc.positions()
    return TopInfluence(test_ids, sc.ids[hp], hv, sc.ids[lp], lv, meta)


def _test_groups(sc: Scorer, test_dataset: Dataset, test_ids: np.ndarray, batch_size: int):
    """Yield, per pass over the checkpoints, (checkpoint indices, their η as a float64 tensor, the
    test gradients of :func:`_test_gradients`) with the engine bound to those checkpoints. A group
    whose test batches fail stacked is scored again one checkpoint at a time (nothing was added
    for it yet); NotStackable comes only from the stacked pass, never from the user's dataset or
    model."""
    checked = None
    for ks, etas in sc.checkpoint_groups(products=True):
        try:
            checked, tests = _test_gradients(sc, test_dataset, test_ids, batch_size, checked)
        except NotStackable as e:
            if len(ks) == 1:
                raise
            sc.redo_alone(e)
            continue
        yield ks, torch.tensor(etas, dtype=torch.float64, device=sc.engine.device), tests


def _test_gradients(sc: Scorer, test_dataset: Dataset, test_ids: np.ndarray, batch_size: int,
                    checked: bool | None) -> tuple[bool, list]:
    """The test set's per-sample gradients at the bound checkpoint(s), joined into chunks
    (:func:`_merged`) as (positions, index, BatchGrads); its labels checked on the first call.
    Returns (whether every label was checked, the chunks). Reading the test dataset stays outside
    :meth:`Scorer.stacking_failures`: the user's errors surface as they are."""
    if checked is None:
        checked = check_labels(sc.engine, test_dataset)
    grads = []
    for p, b in iter_batches(test_dataset, batch_size):
        with sc.stacking_failures():
            grads.append((p, sc.engine.batch_grads(b, test_ids[p], validate=not checked)))
    with sc.stacking_failures():
        return checked, [(p, as_index(p), g) for p, g in _merged(grads)]


def _add_blocks(out: torch.Tensor, tests: list, tr: BatchGrads, w: torch.Tensor, cols: np.ndarray,
                ids: np.ndarray) -> None:
    """out[test rows, cols] += Σ_k η_k ⟨test, train⟩ for every chunk of test gradients (as the dense path)."""
    c = as_index(cols)
    for rows, r, te in tests:
        # the training batch's materialised gradients are kept for the next test chunk, if any
        block = te.weighted_gram(tr, w, keep_other=len(tests) > 1).detach()  # (B_test, B_train) float64, Σ_k η_k
        _check_finite(block.sum(0), ids, "loss or gradient")
        if isinstance(r, slice) and isinstance(c, slice):
            out[r, c].add_(block)
        else:
            ri = torch.as_tensor(rows, device=out.device)
            ci = torch.as_tensor(cols, device=out.device)
            out[ri[:, None], ci[None, :]] += block


_TOPK_MERGE_BYTES = 8 << 20  # float64 candidates of one merge (a slab of rows × (k + window))


def _merge_window(acc: TopKAccumulator, partial: torch.Tensor, start: int, k: int) -> None:
    """Merge the window's columns (training positions start, start + 1, ...) a slab of rows at a time."""
    m, width = partial.shape
    cols = torch.arange(start, start + width, device=partial.device)
    step = max(1, _TOPK_MERGE_BYTES // (8 * (k + width)))
    for a in range(0, m, step):
        acc.add(slice(a, min(m, a + step)), cols, partial[a:a + step])


@contextmanager
def _explained(group: int):
    """A stacked pass of ``group`` checkpoints that fails part-way raises with the way out (the
    pairwise sums of a group cannot be taken back without a second n_test × N buffer)."""
    try:
        yield
    except NotStackable as e:
        msg = (f"scoring {group} checkpoints in one pass failed part-way; pass stack=False to score one "
               "checkpoint at a time")
        cause = e.__cause__
        if isinstance(cause, RuntimeError):  # torch's own error, e.g. torch.OutOfMemoryError, keeps its type
            cause.add_note(msg)
            raise cause from None
        raise RuntimeError(f"{msg} ({e})") from e  # internal: say what happened and what to do


_MERGE_SAMPLES = 4096


def _merged(tests: list[tuple[np.ndarray, BatchGrads]]) -> list[tuple[np.ndarray, BatchGrads]]:
    """Join consecutive test batches into chunks of up to _MERGE_SAMPLES samples: fewer, larger
    products per training batch (test gradients are factorised, so a chunk stays small)."""
    out: list[tuple[np.ndarray, BatchGrads]] = []
    group: list[tuple[np.ndarray, BatchGrads]] = []

    def flush() -> None:
        joined = concat([g for _, g in group]) if group else None
        if joined is not None:
            out.append((np.concatenate([p for p, _ in group]), joined))
        else:
            out.extend(group)
        group.clear()

    for item in tests:
        if group and sum(len(p) for p, _ in group) + len(item[0]) > _MERGE_SAMPLES // item[1].group:
            flush()
        group.append(item)
    flush()
    return out
