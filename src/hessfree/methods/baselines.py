"""Baselines that need no influence machinery: per-sample loss, GraNd, EL2N.

All are outlier-kind scores (higher = more suspicious / harder), averaged over the selected
checkpoints (default: the last one for ``loss``, all for GraNd and EL2N).

- ``loss``: the per-sample training loss l(z_i; θ_k).
- ``grand``: the gradient norm ||g_i(θ_k)|| (Paul et al. 2021, "GraNd").
- ``el2n``: ||softmax(f(x_i)) − onehot(y_i)||₂ (Paul et al. 2021); for one-logit BCE |σ(f(x_i)) − y_i|.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from hessfree.errors import InputError
from hessfree.grads.engine import _check_finite
from hessfree.grads.select import ParamSpec
from hessfree.methods.common import Scorer
from hessfree.run import Run
from hessfree.scores import Scores
from hessfree.tasks import BCEWithLogits, CrossEntropy, output_residual


def _forward_score(run: Run, dataset: Dataset, fn, method: str, checkpoints: Any, batch_size: int,
                   dtype: torch.dtype, device: Any, progress: bool) -> Scores:
    with Scorer(run, dataset, params="all", checkpoints=checkpoints, batch_size=batch_size, dtype=dtype,
                device=device, progress=progress, method=method) as sc:
        out = torch.zeros(sc.n, dtype=torch.float64, device=sc.engine.device)
        for _ in sc.checkpoints():
            for pos, batch, _ in sc.train_batches(grads=False):
                with torch.no_grad():
                    inputs, targets = sc.engine.prepare(batch)
                    outputs = sc.engine.forward(inputs)
                    v = fn(run, outputs, targets)
                _check_finite(v, sc.ids[pos], method)
                sc.add(out, pos, v, 1 / len(sc.ks))
        meta = sc.meta(kind="outlier")
    return Scores(out.cpu().numpy(), sc.ids, meta)


def loss(run: Run, dataset: Dataset, *, checkpoints: Sequence[int] | str | None = "last", batch_size: int = 256,
         dtype: torch.dtype = torch.float32, device: Any = None, progress: bool = True) -> Scores:
    """Per-sample loss (mean over the selected checkpoints; default the last). Scores (N,)."""
    return _forward_score(run, dataset, lambda r, o, y: r.task.per_sample_loss(o, y), "loss", checkpoints,
                          batch_size, dtype, device, progress)


def _el2n(run: Run, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if isinstance(run.task, CrossEntropy):
        return torch.linalg.vector_norm(output_residual(outputs, targets, run.task), dim=1)
    if isinstance(run.task, BCEWithLogits):
        return output_residual(outputs.reshape(-1), targets, run.task).abs()
    raise InputError("el2n is defined for the built-in 'cross_entropy' and 'bce' losses only")


def el2n(run: Run, dataset: Dataset, *, checkpoints: Sequence[int] | str | None = None, batch_size: int = 256,
         dtype: torch.dtype = torch.float32, device: Any = None, progress: bool = True) -> Scores:
    """EL2N: error-vector norm, mean over the selected checkpoints (default all). Scores (N,)."""
    if not isinstance(run.task, (CrossEntropy, BCEWithLogits)):
        raise InputError("el2n is defined for the built-in 'cross_entropy' and 'bce' losses only")
    return _forward_score(run, dataset, _el2n, "el2n", checkpoints, batch_size, dtype, device, progress)


def grand(run: Run, dataset: Dataset, *, params: ParamSpec = "all", checkpoints: Sequence[int] | str | None = None,
          batch_size: int = 256, dtype: torch.dtype = torch.float32, device: Any = None,
          progress: bool = True) -> Scores:
    """GraNd: per-sample gradient norm ||g_i||, mean over the selected checkpoints. Scores (N,)."""
    with Scorer(run, dataset, params=params, checkpoints=checkpoints, batch_size=batch_size, dtype=dtype,
                device=device, progress=progress, method="grand") as sc:
        out = torch.zeros(sc.n, dtype=torch.float64, device=sc.engine.device)
        for _ in sc.checkpoints():
            for pos, _, grads in sc.train_batches():
                sq = grads.sq_norms().detach()
                _check_finite(sq, sc.ids[pos], "loss or gradient")
                sc.add(out, pos, sq.double().clamp_min(0).sqrt(), 1 / len(sc.ks))
        meta = sc.meta(kind="outlier")
    return Scores(out.cpu().numpy(), sc.ids, meta)
