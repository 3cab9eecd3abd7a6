"""Scores as reductions over a gradient stream: from a gradient store, or computed chunk by chunk.

    self-influence   Σ_k η_k ||g_i(θ_k)||²              from the stored exact squared norms
    influence        Σ_k η_k g_i(θ_k)·q(θ_k)             q: a target's gradient
    pairwise         Σ_k η_k g_i(θ_k)·g'_j(θ_k)          (n_test, N), only when asked for
    top-k            per query, the k largest and smallest of the pairwise row, never the matrix

Training gradients come from a :class:`hessfree.store.GradientStore` (read chunk by chunk,
memory-mapped) or from a live :class:`hessfree.grads.stream.GradientStream`; query gradients are
computed at each checkpoint and projected as the training rows are. Products are taken in float32
(float64 when the stream computes in float64) per checkpoint and summed over checkpoints in
float64. With a projection, products of projected gradients estimate the exact ones; squared norms
(self-influence) are always exact.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hessfree.datasets import dataset_size, sample_ids
from hessfree.errors import InputError
from hessfree.grads.select import ParamSpec
from hessfree.grads.stream import Chunk, GradientStream
from hessfree.run import Run
from hessfree.scores import SIGN_CONVENTION, Scores, resolve_k
from hessfree.store import GradientStore
from hessfree.targets import Loss, Target
from hessfree.topk import TopInfluence, TopKAccumulator, top_columns

NORMALIZE = (None, "cosine")
AGGREGATE = (None, "mean", "max")


class _Source:
    """Where the training gradients come from: a store (with the run it was opened with) or a live
    stream. ``chunks(indices)`` yields :class:`Chunk` objects; ``stream`` computes query sides."""

    def __init__(self, run_or_store: Run | GradientStore, train: Dataset | None, *, params: ParamSpec,
                 checkpoints: Sequence[int] | str | None, projection: Any, batch_size: int,
                 chunk_rows: int | None, dtype: torch.dtype, device: Any, progress: bool, what: str):
        self.progress, self.what = progress, what
        if isinstance(run_or_store, GradientStore):
            store = run_or_store
            if store.run is None:
                raise InputError("this GradientStore is not bound to a run; open it with hessfree.store.open_store("
                                 "path, run) so that query gradients can be computed at its checkpoints")
            if params != "all" or checkpoints is not None or projection is not None or chunk_rows is not None:
                raise InputError("a gradient store fixes params, checkpoints, projection and chunk_rows; leave them "
                                 "at their defaults when scoring from a store")
            store._require_complete()
            if train is not None:
                store.check(store.run, train)
            self.store: GradientStore | None = store
            self.stream = store.stream(store.run, device=device, checked=True)
            self.ids = store.sample_ids()
        elif isinstance(run_or_store, Run):
            if train is None:
                raise InputError(f"{what} from a run needs the training dataset")
            self.store = None
            self.stream = GradientStream(run_or_store, train, params=params, checkpoints=checkpoints,
                                         projection=projection, batch_size=batch_size, chunk_rows=chunk_rows,
                                         dtype=dtype, device=device)
            self.ids = self.stream.ids
        else:
            raise InputError(f"expected a hessfree.Run or a hessfree.store.GradientStore, got "
                             f"{type(run_or_store).__name__}")
        self.n = len(self.ids)
        self.etas = self.stream.etas
        self.t0 = time.perf_counter()

    def __enter__(self) -> "_Source":
        self.stream.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stream.__exit__(*exc)

    @property
    def n_chunks(self) -> int:
        return self.store.n_chunks if self.store is not None else self.stream.n_chunks

    def chunks(self, indices: Sequence[int]):
        bar = tqdm(indices, desc=self.what, disable=not self.progress, leave=False)
        for c in bar:
            yield self.store.read(c) if self.store is not None else self.stream.chunk(c)

    def meta(self, **extra: Any) -> dict[str, Any]:
        s = self.stream
        meta = {"method": self.what, "kind": "influence", "checkpoints": list(s.ks), "learning_rates": list(s.etas),
                "param_names": list(s.names), "projection": None if s.projector is None else s.projector.describe(),
                "dim": int(s.dim), "source": "store" if self.store is not None else "run",
                "store": None if self.store is None else str(self.store.path),
                "stored_dtype": None if self.store is None else self.store.manifest["dtype"],
                "loss": s.run.task.name, "n_train": self.n, "sign_convention": SIGN_CONVENTION}
        meta.update(extra)
        meta["timing"] = {"total_s": time.perf_counter() - self.t0}
        return meta


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _products(chunk: Chunk, queries: Tensor, etas: Sequence[float], q_norms: Tensor | None) -> Tensor:
    """(M, rows) float64 Σ_k η_k q_k·g_k over the chunk's rows; with ``q_norms`` (cosine), each
    checkpoint's product divided by both vectors' norms (0 where either is 0)."""
    out = None
    work = queries.dtype
    for k, eta in enumerate(etas):
        g = chunk.grads[k].to(work)
        part = (queries[k] @ g.T).double()
        if q_norms is not None:
            gn = g.double().norm(dim=1)
            denom = q_norms[k][:, None] * gn[None, :]
            part = torch.where(denom > 0, part / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        part.mul_(float(eta))
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


def _query_norms(queries: Tensor) -> Tensor:
    return queries.double().norm(dim=2)


def topk_influence(run_or_store: Run | GradientStore, train: Dataset | None, queries: Dataset, *, k: int | float = 10,
                   normalize: str | None = None, aggregate: str | None = None, params: ParamSpec = "all",
                   checkpoints: Sequence[int] | str | None = None, projection: Any = None, batch_size: int = 256,
                   chunk_rows: int | None = None, dtype: torch.dtype = torch.float32, device: Any = None,
                   progress: bool = True) -> TopInfluence:
    """Per query sample, the ``k`` strongest proponents (largest TracIn score) and opponents
    (smallest) among the training samples, without the n_queries × N matrix.

    ``run_or_store``: a :class:`hessfree.Run` (training gradients computed chunk by chunk, with
    ``params``, ``checkpoints``, ``projection``, ``chunk_rows``) or a gradient store opened with its
    run (:func:`hessfree.store.open_store`; ``train`` may then be None, or the training dataset,
    which is checked against the store). ``normalize="cosine"``: each checkpoint's product divided
    by the norms of both gradients (of the projected vectors when projected), which keeps
    high-loss training samples (often mislabelled) from dominating every query's proponents.
    ``aggregate``: ``"mean"`` or ``"max"`` over the queries of each training sample's score, kept
    as ``result.aggregate`` (:class:`hessfree.Scores`, N values).

    Memory: O(queries × (k + chunk rows)) plus one chunk. Order: by value, ties by the lower
    training position; any chunk order and any number of processes give the same answer.
    """
    if normalize not in NORMALIZE:
        raise InputError(f"normalize must be None or 'cosine', got {normalize!r}")
    if aggregate not in AGGREGATE:
        raise InputError(f"aggregate must be None, 'mean' or 'max', got {aggregate!r}")
    m = dataset_size(queries, "query dataset")
    with _Source(run_or_store, train, params=params, checkpoints=checkpoints, projection=projection,
                 batch_size=batch_size, chunk_rows=chunk_rows, dtype=dtype, device=device, progress=progress,
                 what="topk_influence") as src:
        kk = resolve_k(k, src.n)
        Q, _ = src.stream.query_gradients(queries)
        qn = _query_norms(Q) if normalize == "cosine" else None
        rank, world = _world()
        acc = TopKAccumulator(m, kk, device=Q.device)
        agg = torch.zeros(src.n, dtype=torch.float64) if aggregate else None
        for chunk in src.chunks([c for c in range(src.n_chunks) if c % world == rank]):
            block = _products(chunk, Q, src.etas, qn)
            acc.add(slice(None), torch.arange(chunk.start, chunk.stop), block)
            if agg is not None:
                agg[chunk.start:chunk.stop] = (block.mean(0) if aggregate == "mean" else block.amax(0)).cpu()
        hp, hv, lp, lv = _gather_topk(acc, kk, agg)
        meta = src.meta(n_test=m, goal="minimize", top_k=kk, normalize=normalize, aggregate=aggregate, world=world)
    result = TopInfluence(sample_ids(queries), src.ids[hp], hv, src.ids[lp], lv, meta)
    if agg is not None:
        result.aggregate = Scores(agg.numpy(), src.ids, {**meta, "method": f"topk_influence aggregate={aggregate}"})
    return result


def _gather_topk(acc: TopKAccumulator, k: int, agg: Tensor | None):
    """This process's top-k buffers, merged over all processes when several run (ties by position)."""
    rank, world = _world()
    if world == 1:
        return acc.positions()
    dist = torch.distributed
    parts = []
    for vals, poss in ((acc.top_v, acc.top_p), (acc.low_v, acc.low_p)):
        v_all = [torch.empty_like(vals) for _ in range(world)]
        p_all = [torch.empty_like(poss) for _ in range(world)]
        dist.all_gather(v_all, vals.contiguous())
        dist.all_gather(p_all, poss.contiguous())
        parts.append((torch.cat(v_all, 1), torch.cat(p_all, 1)))
    if agg is not None:
        dist.all_reduce(agg)  # each process filled its own chunks' columns; the rest are zeros
    out = []
    for (v, p), largest in zip(parts, (True, False)):
        # unfilled slots (a process with fewer than k rows) hold ∓inf at negative positions: never chosen
        cols = top_columns(v, p, k, largest=largest)
        out += [p.gather(1, cols).cpu().numpy(), v.gather(1, cols).cpu().numpy()]
    return tuple(out)


def self_influence_from(store: GradientStore, train: Dataset | None = None) -> Scores:
    """Σ_k η_k ||g_i(θ_k)||² from the store's exact squared norms: Scores (N,), higher = more suspicious."""
    t0 = time.perf_counter()
    if train is not None:
        if store.run is None:
            raise InputError("to check the training dataset against the store, open the store with its run")
        store.check(store.run, train)
    sq = store.sq_norms()
    w = np.asarray(store.learning_rates, dtype=np.float64)
    values = w @ sq
    meta = {"method": "self_influence", "kind": "outlier", "goal": "minimize", "source": "store",
            "store": str(store.path), "checkpoints": store.checkpoint_indices, "learning_rates": store.learning_rates,
            "param_names": list(store.manifest["params"]), "loss": store.manifest["loss"], "n_train": store.rows,
            "sign_convention": SIGN_CONVENTION, "timing": {"total_s": time.perf_counter() - t0}}
    return Scores(values, store.sample_ids(), meta)


def pairwise_from(store: GradientStore, train: Dataset | None, test: Dataset, *, device: Any = None,
                  progress: bool = True) -> Scores:
    """The (n_test, N) TracInCP matrix with the training gradients read from ``store``."""
    m = dataset_size(test, "test dataset")
    with _Source(store, train, params="all", checkpoints=None, projection=None, batch_size=256, chunk_rows=None,
                 dtype=torch.float32, device=device, progress=progress, what="pairwise_influence") as src:
        Q, _ = src.stream.query_gradients(test, "test dataset")
        out = torch.zeros(m, src.n, dtype=torch.float64)
        for chunk in src.chunks(range(src.n_chunks)):
            out[:, chunk.start:chunk.stop] = _products(chunk, Q, src.etas, None).cpu()
        meta = src.meta(n_test=m, goal="minimize")
    return Scores(out.numpy(), src.ids, meta, test_ids=sample_ids(test))


def influence_from(store: GradientStore, train: Dataset | None, target: Target | Dataset, *, device: Any = None,
                   progress: bool = True) -> Scores:
    """Σ_k η_k g_i(θ_k)·∇f(θ_k) with the training gradients read from ``store``: Scores (N,)."""
    if not isinstance(target, Target):
        target = Loss(target)
    target.validate()
    if store.run is None:
        raise InputError("open the store with its run (hessfree.store.open_store(path, run)) to score a target")
    target.check_model(store.run.model)
    with _Source(store, train, params="all", checkpoints=None, projection=None, batch_size=256, chunk_rows=None,
                 dtype=torch.float32, device=device, progress=progress, what="influence") as src:
        q = src.stream.target_gradients(target)  # (K, 1, dim)
        out = torch.zeros(src.n, dtype=torch.float64)
        for chunk in src.chunks(range(src.n_chunks)):
            out[chunk.start:chunk.stop] = _products(chunk, q, src.etas, None)[0].cpu()
        meta = src.meta(target=target.describe(), goal=target.goal)
    return Scores(out.numpy(), src.ids, meta)


def outlier_from(store: GradientStore, train: Dataset | None, *, detector: Any, params: Any, projection: Any,
                 reference: Dataset | None, random_state: int, k: Any, detector_options: dict | None,
                 device: Any = None, progress: bool = True) -> Scores:
    """Outlier Gradient Analysis on the gradients of a store (its last checkpoint): ``l2`` from the
    exact stored squared norms, ``l1`` from the stored rows, feature detectors on the stored rows
    (fitted on the ``reference`` gradients, projected as the rows are, when given)."""
    from hessfree.grads.select import select_parameters
    from hessfree.methods.outlier import _check_detector, _detect, _sklearn_detector, feature_dtype

    t0 = time.perf_counter()
    name, det = _check_detector(detector, reference, detector_options)
    if projection is not None:
        raise InputError("a gradient store fixes the projection; leave projection=None when scoring from one")
    if store.run is None and (reference is not None or train is not None or params != "last_layer_weight"):
        raise InputError("open the store with its run (hessfree.store.open_store(path, run)) to use a reference "
                         "dataset, check the training dataset or name parameters")
    if params != "last_layer_weight" and select_parameters(store.run.model, params) != store.manifest["params"]:
        raise InputError(f"params={params!r} is not the store's parameter selection ({store.manifest['params']}); "
                         "a store fixes it (leave params at its default)")
    store._require_complete()
    if train is not None:
        store.check(store.run, train)
    n = store.rows
    if k is not None:
        resolve_k(k, n)
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or random_state < 0:
        raise InputError(f"random_state must be a non-negative integer, got {random_state!r}")
    if name in ("iforest", "ocsvm", "lof"):
        n_fit = dataset_size(reference, "reference dataset") if reference is not None else n
        _sklearn_detector(name, detector_options or {}, int(random_state), n_fit, novelty=reference is not None)
    last = len(store.manifest["checkpoints"]) - 1
    ref_values = None
    if name == "l2":
        values = np.sqrt(np.clip(store.sq_norms()[last], 0, None))
    else:
        fdt = np.dtype(np.float64) if name == "l1" else feature_dtype(name, torch.float32)
        values = np.empty((n, store.dim), dtype=fdt)
        for chunk in store.chunks():
            values[chunk.start:chunk.stop] = chunk.grads[last].float().numpy()
        if name == "l1":
            values = np.abs(values).sum(1)
        elif reference is not None:
            stream = store.stream(store.run, device=device, checked=True)
            stream.ks, stream.etas = stream.ks[-1:], stream.etas[-1:]  # the last checkpoint only
            with stream:
                R, _ = stream.query_gradients(reference, "reference dataset")
            ref_values = R[0].cpu().numpy().astype(fdt)
    scores = _detect(name, det, values, ref_values, int(random_state), detector_options or {})
    meta = {"method": "outlier_gradient", "kind": "outlier", "goal": "minimize", "detector": name, "source": "store",
            "store": str(store.path), "checkpoints": store.checkpoint_indices[-1:],
            "param_names": list(store.manifest["params"]), "projection": store.manifest["projection"],
            "stored_dtype": store.manifest["dtype"], "n_reference": 0 if reference is None else len(reference),
            "reference_used": ref_values is not None, "random_state": int(random_state),
            "detector_options": detector_options or {}, "flag_k": k, "n_train": n,
            "sign_convention": SIGN_CONVENTION, "timing": {"total_s": time.perf_counter() - t0}}
    return Scores(scores, store.sample_ids(), meta)
