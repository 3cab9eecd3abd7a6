"""What every score function shares: argument checks, the checkpoint loop, metadata."""
from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hessfree.datasets import as_index, check_batch_size, dataset_size, iter_batches, sample_ids
from hessfree.tasks import check_dataset_labels
from hessfree.errors import InputError
from hessfree.grads.engine import GradientEngine
from hessfree.grads.rules import LinearRule
from hessfree.grads.stacked import NotStackable, stacking_failures
from hessfree.grads.select import ParamSpec, select_parameters
from hessfree.run import Run
from hessfree.scores import SIGN_CONVENTION

log = logging.getLogger(__name__)


def checkpoint_indices(run: Run, checkpoints: Sequence[int] | str | None) -> list[int]:
    """Resolve ``None`` (all), ``"last"`` or a list of (possibly negative) indices."""
    if not isinstance(run, Run):
        raise InputError(f"expected a hessfree.Run, got {type(run).__name__}; record one with hessfree.fit "
                         "or wrap checkpoints with hessfree.Run.from_checkpoints")
    n = len(run.checkpoints)
    if n == 0:
        raise InputError("the run has no checkpoints")
    if checkpoints is None:
        return list(range(n))
    if checkpoints == "last":
        return [n - 1]
    if isinstance(checkpoints, (int, np.integer)) and not isinstance(checkpoints, bool):
        checkpoints = [checkpoints]
    if isinstance(checkpoints, str):
        raise InputError(f"checkpoints must be None, 'last' or a list of indices, got {checkpoints!r}")
    out = []
    for k in checkpoints:
        if not isinstance(k, (int, np.integer)) or not -n <= k < n:
            raise InputError(f"checkpoint index {k!r} is outside the run's {n} checkpoints")
        out.append(int(k) % n)
    if not out:
        raise InputError("the checkpoint selection is empty")
    return out


# What a method's second dataset is called in messages (its first is the training dataset).
_SECOND_DATASET = {"pairwise_influence": "test dataset", "outlier_gradient": "reference dataset"}
_ROLES: "weakref.WeakKeyDictionary[GradientEngine, tuple[Dataset, str]]" = weakref.WeakKeyDictionary()


def check_labels(engine: GradientEngine, dataset: Dataset, what: str | None = None) -> bool:
    """Validate labels against the loss before the expensive loop (all of them for a TensorDataset),
    and that the model runs on the dataset's first batch (else InputError naming the dataset and its
    input shapes). ``what``: the dataset's name in messages; by default "training dataset" for the
    dataset of the engine's :class:`Scorer` and the method's other dataset ("test dataset",
    "reference dataset") for any other.

    Returns True when every label was checked (per-batch checks can then be skipped)."""
    if what is None:
        train, other = _ROLES.get(engine, (None, "dataset"))
        what = "training dataset" if dataset is train else other
    return check_dataset_labels(engine.task, engine.forward, engine.prepare, dataset, sample_ids(dataset), what)


_STACK_BYTES = 1 << 28  # stacked weights of one checkpoint group
_STACK_SAMPLES = 4096  # rows of one stacked batch (group size × batch size)
_CHECK_SAMPLES = 16  # samples on which stacking is checked against one checkpoint at a time


def group_size(engine: GradientEngine, run: Run, ks: list[int], batch_size: int, products: bool = False) -> int:
    """How many checkpoints share one pass: bounded by _STACK_BYTES of stacked weights and
    _STACK_SAMPLES rows per stacked batch (activation memory grows with both).

    Sharing a pass saves per-operation overhead, which is what a small model's pass mostly is;
    it saves no arithmetic. ``products``: the caller forms train × test products, which for any
    layer but nn.Linear (an embedding's are matrix products over its materialised rows) dominate
    the time: stacking then measured no faster, and up to 1.3× slower with more memory
    (``benchmarks/engine_shapes.py``, the Embedding + per-token MLP model), so those checkpoints
    go one at a time."""
    if len(ks) < 2 or not engine.rules or engine.fallback:
        return 1
    if products and any(type(e["rule"]) is not LinearRule for e in engine.rules.values()):
        return 1
    state_bytes = sum(p.numel() for p in run.model.parameters()) * engine.dtype.itemsize
    return max(1, min(len(ks), _STACK_BYTES // max(1, state_bytes), _STACK_SAMPLES // batch_size))


class Scorer:
    """Context for one scoring call: validated inputs, the engine, the progress bar, timing."""

    def __init__(self, run: Run, train_dataset: Dataset, *, params: ParamSpec, checkpoints: Any, batch_size: int,
                 dtype: torch.dtype, device: Any, progress: bool, method: str, ghost: bool = True,
                 stack: bool = True):
        self.t0 = time.perf_counter()
        self.ks = checkpoint_indices(run, checkpoints)
        self.n = dataset_size(train_dataset, "training dataset")
        batch_size = check_batch_size(batch_size)
        self.run, self.dataset, self.batch_size = run, train_dataset, batch_size
        self.ids = sample_ids(train_dataset)
        self.names = select_parameters(run.model, params)
        self.engine = GradientEngine(run.model, run.task, self.names, device=device, dtype=dtype, ghost=ghost)
        _ROLES[self.engine] = (train_dataset, _SECOND_DATASET.get(method, "dataset"))
        self.method = method
        self.params_spec = params if isinstance(params, str) else list(params)
        self.progress = progress
        self.labels_checked = False
        self.checkpoints_per_pass = 1  # largest checkpoint group scored in one pass (checkpoint_groups)
        self._redo = False  # set by redo_alone: the current stacked group is to be scored one at a time
        if not isinstance(stack, bool):
            raise InputError(f"stack must be True or False, got {stack!r}")
        self.stack = stack

    def __enter__(self) -> "Scorer":
        self.engine.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.engine.__exit__(*exc)

    def checkpoints(self, extra_batches_per_checkpoint: int = 0):
        """Yield (k, η_k) with the engine bound to checkpoint k; each checkpoint loads once."""
        for ks, etas in self.checkpoint_groups(extra_batches_per_checkpoint, stack=False):
            yield ks[0], etas[0]

    def checkpoint_groups(self, extra_batches_per_checkpoint: int = 0, stack: bool | None = None,
                          products: bool = False):
        """Yield (checkpoint indices, their η) with the engine bound to all of them at once.

        Groups of up to :func:`group_size` checkpoints share one forward and backward per batch
        (:mod:`hessfree.grads.stacked`); ``train_batches`` then yields gradients whose rows are the
        batch at each checkpoint of the group, checkpoint-major. Where the checkpoints cannot share
        a pass (``stack=False``, parameters on the vmap fallback, other differing weights, or a
        stacked check that does not reproduce the one-checkpoint result) the groups are single
        checkpoints. Each checkpoint is loaded once. ``stack``: None means the Scorer's setting;
        ``extra_batches_per_checkpoint``: batches beyond the training data the caller reports to
        the progress bar for each checkpoint; ``products``: the caller forms train × test products
        (see :func:`group_size`).
        """
        per_checkpoint = -(-self.n // self.batch_size) + extra_batches_per_checkpoint
        bar = tqdm(total=len(self.ks) * per_checkpoint, desc=self.method, disable=not self.progress, leave=False)
        self.bar = bar
        stack = self.stack if stack is None else stack
        size = group_size(self.engine, self.run, self.ks, self.batch_size, products) if stack else 1
        start = 0
        try:
            while start < len(self.ks):
                ks = self.ks[start:start + size]
                states = [self.run.checkpoint_state(k) for k in ks]
                etas = [self.run.checkpoints[k].learning_rate for k in ks]
                if start == 0:
                    self.engine.bind(states[0])
                    self.labels_checked = check_labels(self.engine, self.dataset)
                stacked = len(ks) > 1 and self._bind_group(states)
                if stacked:
                    self._redo = False
                    yield ks, etas
                    if not self._redo:
                        self.checkpoints_per_pass = max(self.checkpoints_per_pass, len(ks))
                if stacked and self._redo:  # the caller discarded the group: one at a time after all,
                    size = 1  # and for the groups after it (they would fail the same way)
                    self.bar.reset(total=self.bar.total)  # batches of the failed pass were counted
                    self.bar.update(start * per_checkpoint)
                if not stacked or self._redo:
                    for i, (k, state, eta) in enumerate(zip(ks, states, etas)):
                        if start > 0 or i > 0 or len(ks) > 1:  # else still bound from the first bind above
                            self.engine.bind(state)
                        yield [k], [eta]
                start += len(ks)
        finally:
            bar.close()

    def redo_alone(self, error: Exception) -> None:
        """Called by a caller whose stacked group failed part-way (its partial sums discarded):
        the generator then yields that group's checkpoints one at a time."""
        log.warning("a stacked pass failed part-way (%s); scoring those checkpoints one at a time", error)
        self._redo = True

    def _check_batch(self) -> tuple[np.ndarray, Any]:
        """Up to _CHECK_SAMPLES samples spread evenly over the training data (positions, batch)."""
        pos = np.unique(np.linspace(0, self.n - 1, min(self.n, _CHECK_SAMPLES)).round().astype(np.int64))
        return pos, next(iter_batches(self.dataset, len(pos), order=pos))[1]

    def _bind_group(self, states: list[dict[str, Any]]) -> bool:
        """Bind ``states`` stacked, if allowed; else leave the group to be scored one at a time and
        return False.

        For every group (a check passed on one group says little about a later one whose
        checkpoints differ more), the stacked per-sample squared gradient norms,
        on samples spread over the dataset, must reproduce those of the group's first and last
        checkpoints evaluated alone. Those two suffice for a weight read outside its layer: code
        that indexes the (K, …) stacked tensor as if it were one checkpoint's reads one and the
        same checkpoint's values for every row, which cannot be right for both the first and the
        last checkpoint, and a reduction over it mixes all of them. A model that is row-wise by
        construction (the engine's ``exact_by_construction``) is bound without the check.
        """
        checked = not self.engine.exact_by_construction  # else nothing the check could catch
        alone: dict[int, Tensor] = {}
        if checked:
            pos, batch = self._check_batch()
            ids = self.ids[pos]
            if not self.engine.can_stack:  # the engine's one-time layer check runs on its first batch
                self.engine.bind(states[0])
                alone[0] = self.engine.batch_grads(batch, ids, validate=not self.labels_checked).sq_norms().double()
                if not self.engine.can_stack:
                    return False
        try:
            self.engine.bind_stacked(states)
        except NotStackable as e:
            log.info("checkpoints one at a time: %s", e)
            return False
        if not checked:
            return True
        K = len(states)
        try:
            together = self.engine.batch_grads(batch, ids, validate=False).sq_norms().double().view(K, -1)
        except (NotStackable, RuntimeError) as e:  # the check batch failed stacked: one at a time
            log.info("checkpoints one at a time: %s", e)
            self.engine.bind(states[0])
            return False
        for k in sorted({0, K - 1} - set(alone)):
            self.engine.bind(states[k])
            alone[k] = self.engine.batch_grads(batch, ids, validate=not self.labels_checked).sq_norms().double()
        tol = {torch.float64: 1e-10, torch.float16: 1e-3, torch.bfloat16: 1e-3}.get(self.engine.dtype, 1e-5)
        for k, ref in alone.items():
            if float((together[k] - ref).abs().max()) > tol * (float(ref.abs().max()) or 1.0):
                log.warning("stacked checkpoints did not reproduce the one-checkpoint gradients; scoring "
                            "checkpoints one at a time (stack=False skips the attempt)")
                return False
        self.engine.bind_stacked(states)
        return True

    def train_batches(self, grads: bool = True):
        """Yield (positions, batch, per-sample gradients or None) over the training data."""
        for pos, batch in iter_batches(self.dataset, self.batch_size):  # the user's dataset: errors as they are
            # every caller checks its per-sample scores for non-finite values (naming the sample ids)
            with self.stacking_failures():
                g = (self.engine.batch_grads(batch, self.ids[pos], validate=not self.labels_checked,
                                             check_loss=False) if grads else None)
            yield pos, batch, g
            self.bar.update(self.engine.stack)

    def stacking_failures(self):
        """Context: while several checkpoints are bound, running out of memory or a failure inside a
        stacked layer means the stacked pass failed (NotStackable); any other error gets a note
        (:func:`hessfree.grads.stacked.stacking_failures`)."""
        return stacking_failures(self.engine.stack)

    def add(self, out: torch.Tensor, pos: np.ndarray, values: torch.Tensor, scale: float) -> None:
        """out[pos] += scale * values (float64 accumulation; a slice when pos is contiguous)."""
        idx = as_index(pos)
        if isinstance(idx, slice):
            out[idx].add_(values.detach(), alpha=scale)
        else:
            out[torch.as_tensor(idx, device=out.device)] += scale * values.detach().double()

    def meta(self, **extra: Any) -> dict[str, Any]:
        meta = {
            "method": self.method,
            "kind": "influence",
            "checkpoints": self.ks,
            "checkpoint_steps": [self.run.checkpoints[k].step for k in self.ks],
            "learning_rates": [self.run.checkpoints[k].learning_rate for k in self.ks],
            "params": self.params_spec,
            "param_names": self.names,
            "fallback_params": list(self.engine.fallback),
            "checkpoints_per_pass": self.checkpoints_per_pass,
            "loss": self.run.task.name,
            "dtype": str(self.engine.dtype).replace("torch.", ""),
            "device": str(self.engine.device),
            "n_train": self.n,
            "sign_convention": SIGN_CONVENTION,
        }
        meta.update(extra)
        meta["timing"] = {"total_s": time.perf_counter() - self.t0}
        return meta
