"""The model/loss contract.

A :class:`Task` says how to run the model on a batch and how to turn its output into one loss
per sample (mean-reduced over that one sample, so a sample's gradient never depends on the batch
it is computed in). Built-ins: ``"cross_entropy"`` (integer class labels) and ``"bce"`` (one
logit, float 0/1 labels). Subclass :class:`Task` for anything else.
"""
from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch.utils.data import Dataset

from hessfree.datasets import iter_batches, leaves_in, map_tensors, tensor_rows, tensors_in, to_device
from hessfree.errors import HessfreeError, InputError, LabelError

log = logging.getLogger(__name__)

# Per model (by identity, not by a class's own __eq__) and mode (train / eval, grad on / off):
# whether it writes into its input tensors (True: it gets a copy on every call). An entry goes
# with its model.
_WRITES_INPUTS: dict[int, tuple[weakref.ref, dict[tuple[bool, bool], bool]]] = {}


def _verdicts(model: nn.Module) -> dict[tuple[bool, bool], bool]:
    key = id(model)
    entry = _WRITES_INPUTS.get(key)
    if entry is None or entry[0]() is not model:
        def forget(ref: weakref.ref, key: int = key) -> None:
            if key in _WRITES_INPUTS and _WRITES_INPUTS[key][0] is ref:
                del _WRITES_INPUTS[key]
        entry = _WRITES_INPUTS[key] = (weakref.ref(model, forget), {})
    return entry[1]


def _versions(obj: Any) -> list[int | None]:
    out = []
    for t in tensors_in(obj):
        try:
            out.append(t._version)
        except RuntimeError:  # inference tensors keep no version counter
            out.append(None)
    return out


def _clone(obj: Any) -> Any:
    return map_tensors(lambda t: t.clone(), obj)


def safe_call(model: nn.Module, fn: Callable[[Any], Any], inputs: Any) -> Any:
    """``fn(inputs)``, a forward pass of ``model`` (possibly under ``vmap``), such that a model
    writing into its inputs in place (``x /= 255``, a first ``ReLU(inplace=True)``, a first
    ``Dropout(inplace=True)`` in training) never changes the caller's tensors: hessfree hands
    models views of the user's dataset, and runs several passes over one batch.

    The first call for a model in each mode (train / eval, gradients on / off) runs on a copy and
    notes whether the model wrote into it. A model that did gets a fresh copy on every call in
    that mode (and a log message); any other runs on the inputs themselves, and if it writes into
    them after all (a data-dependent write), :class:`InputError` is raised. Inference tensors keep
    no version counter: they are always copied."""
    mode = (model.training, torch.is_grad_enabled())
    seen = _verdicts(model)
    writes = seen.get(mode)
    if writes:
        return fn(_clone(inputs))
    before = _versions(inputs)
    if None in before:  # inference tensors: a write into them could not be seen, so never pass them
        return fn(_clone(inputs))
    if writes is None:
        trial = _clone(inputs)
        before = _versions(trial)
        out = fn(trial)
        seen[mode] = _versions(trial) != before
        if seen[mode]:
            log.info("%s writes into its input tensors in place (%s mode): hessfree passes it a copy of every batch",
                     type(model).__name__, "train" if mode[0] else "eval")
        return out
    out = fn(inputs)
    if _versions(inputs) != before:
        raise InputError(
            f"{type(model).__name__} wrote into its input tensors in place on a later batch, after leaving the "
            "first one unchanged: those samples of your dataset may have been changed. Make the in-place "
            "operation out of place (x = x / 255 instead of x /= 255, ReLU() instead of ReLU(inplace=True))")
    return out


class Task:
    """Subclass and override :meth:`per_sample_loss` (and :meth:`validate`) for a custom loss.

    ``forward`` runs the model on the inputs of a batch; ``per_sample_loss`` maps the model
    output and the targets of a batch of B samples to a tensor of shape (B,).
    """

    name: str = "custom"

    def split(self, batch: Any) -> tuple[Any, Any]:
        """Split a collated batch into (inputs, targets). Default: a (x, y) pair."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise InputError(
            "a dataset item must be an (input, target) pair; for any other layout subclass "
            "hessfree.Task and override split()"
        )

    def forward(self, model: nn.Module, inputs: Any) -> Tensor:
        return model(inputs)

    def safe_forward(self, model: nn.Module, inputs: Any) -> Tensor:
        """:meth:`forward` through :func:`safe_call`: the inputs are never written into. hessfree
        calls this; override :meth:`forward`, not this."""
        return safe_call(model, lambda x: self.forward(model, x), inputs)

    def per_sample_loss(self, outputs: Tensor, targets: Any) -> Tensor:
        raise NotImplementedError("a Task subclass must implement per_sample_loss(outputs, targets) -> (B,)")

    def validate(self, outputs: Tensor, targets: Any, sample_ids: Any = None) -> None:
        """Raise :class:`LabelError` if the targets cannot be used with this loss."""

    def loss_and_output_grad(self, outputs: Tensor, targets: Any) -> tuple[Tensor, Tensor] | None:
        """(per-sample losses, ∂Σᵢ lᵢ / ∂outputs), both detached, in closed form; or None (the
        default): the engine differentiates :meth:`per_sample_loss` with autograd."""
        return None

    def to_dict(self) -> dict:
        return {"name": self.name}


def softmax_residual(z: Tensor, y: Tensor, class_dim: int = 1) -> tuple[Tensor, Tensor]:
    """(r, s) for logits ``z`` and integer labels ``y``: r = softmax(z) − e_y, and s = Σ exp(z − max z).

    The label's entry p_y − 1 is formed as −(the probability off the label), which does not cancel
    when p_y is close to 1: for logits (20, 0, 0) in float32, ||r|| is 5.05e-9 (p_y − 1 formed
    directly rounds to 2.9e-9 or 0). ``class_dim``: 1 for (B, C) logits, 0 for classes first (C, B).
    One exp of the logits; ``z`` is not modified.
    """
    e = (z - z.amax(class_dim, keepdim=True)).exp_()
    s = e.sum(class_dim, keepdim=True)
    r = e.div_(s)
    label = y.long().reshape((1, -1) if class_dim == 0 else (-1, 1))
    return r.scatter_(class_dim, label, -r.scatter(class_dim, label, 0.0).sum(class_dim, keepdim=True)), s


def sigmoid_residual(z: Tensor, y: Tensor) -> Tensor:
    """σ(z) − y for one logit per sample and labels y in [0, 1], as (1 − y)·σ(z) − y·σ(−z), which
    does not cancel for a confident logit (σ(20) − 1 = −2.06e-9 in float32, not 0)."""
    y = y.to(z.dtype).reshape(z.shape)
    return torch.sigmoid(z).mul_(1 - y).sub_(torch.sigmoid(-z).mul_(y))


def output_residual(z: Tensor, targets: Tensor, task: "Task", class_dim: int = 1) -> Tensor:
    """r = ∂l/∂z of a built-in loss: softmax(z) − e_y (cross-entropy) or σ(z) − y (BCE, z of one
    logit per sample, any shape holding B numbers). The one implementation every closed form uses
    (the engine's backward start, OGA's final-layer closed form, EL2N)."""
    with torch.no_grad():
        if isinstance(task, CrossEntropy):
            return softmax_residual(z, targets, class_dim)[0]
        return sigmoid_residual(z, targets)


class CrossEntropy(Task):
    """Softmax cross-entropy; outputs (B, C) logits, targets (B,) integer class indices."""

    name = "cross_entropy"

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def loss_and_output_grad(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor] | None:
        """l = logsumexp(z) − z_y and ∂l/∂z = softmax(z) − e_y, from one exp of the logits, with
        no autograd graph for the loss (on CPU, log_softmax and its backward over 10 classes took
        about 1.3× as long)."""
        if (type(self).per_sample_loss is not CrossEntropy.per_sample_loss
                or type(self).validate is not CrossEntropy.validate  # e.g. soft or ignored labels allowed
                or outputs.ndim != 2 or not isinstance(targets, Tensor) or targets.dtype != torch.long
                or targets.shape != outputs.shape[:1]):
            return None  # autograd through F.cross_entropy, with its own handling and errors
        with torch.no_grad():
            z = outputs.detach()
            r, s = softmax_residual(z, targets)
            y = targets.reshape(-1, 1)
            losses = (s.log() + z.amax(1, keepdim=True) - z.gather(1, y)).reshape(-1)
            return losses, r

    def validate(self, outputs: Tensor, targets: Any, sample_ids: Any = None) -> None:
        if not isinstance(targets, Tensor):
            raise LabelError(f"cross_entropy needs integer label tensors, got {type(targets).__name__}")
        if targets.dtype not in (torch.long, torch.uint8):
            raise LabelError(
                f"cross_entropy needs integer class labels (torch.long), got {targets.dtype}; "
                "convert with y.long(), or use loss='bce' for float 0/1 labels with one logit"
            )
        if outputs.ndim != 2:
            raise LabelError(f"cross_entropy needs model outputs of shape (batch, classes), got {tuple(outputs.shape)}")
        if targets.shape != outputs.shape[:1]:
            raise LabelError(f"cross_entropy needs one class label per sample, shape ({outputs.shape[0]},), got "
                             f"labels of shape {tuple(targets.shape)}; flatten them with y.reshape(-1)")
        n_classes = outputs.shape[1]
        bad = (targets < 0) | (targets >= n_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            sid = sample_ids[i] if sample_ids is not None else i
            raise LabelError(
                f"label {int(targets[i])} of sample id {int(sid)} is outside [0, {n_classes}) for a model "
                f"with {n_classes} outputs; relabel classes as 0..{n_classes - 1}"
            )


class BCEWithLogits(Task):
    """Binary cross-entropy on one logit; outputs (B,) or (B, 1), targets (B,) floats in [0, 1]."""

    name = "bce"

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits = outputs.reshape(outputs.shape[0])
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype).reshape(-1), reduction="none")

    def loss_and_output_grad(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor] | None:
        """l = BCE-with-logits and ∂l/∂z = σ(z) − y."""
        if (type(self).per_sample_loss is not BCEWithLogits.per_sample_loss or not isinstance(targets, Tensor)
                or targets.numel() != outputs.shape[0] or outputs.numel() != outputs.shape[0]):
            return None
        with torch.no_grad():
            z = outputs.detach()
            y = targets.to(z.dtype).reshape(z.shape)
            losses = F.binary_cross_entropy_with_logits(z, y, reduction="none").reshape(-1)
            return losses, sigmoid_residual(z, y)

    def validate(self, outputs: Tensor, targets: Any, sample_ids: Any = None) -> None:
        if not isinstance(targets, Tensor) or not targets.dtype.is_floating_point:
            got = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
            raise LabelError(f"bce needs float 0/1 labels, got {got}; convert with y.float()")
        if outputs.numel() != outputs.shape[0]:
            raise LabelError(
                f"bce needs one logit per sample (output shape (batch,) or (batch, 1)), got {tuple(outputs.shape)}; "
                "use loss='cross_entropy' for several classes"
            )
        bad = ~((targets >= 0) & (targets <= 1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            sid = sample_ids[i] if sample_ids is not None else i
            raise LabelError(f"label {float(targets[i])} of sample id {int(sid)} is outside [0, 1] for bce")


_BUILTIN = {"cross_entropy": CrossEntropy, "bce": BCEWithLogits}


def resolve_task(loss: str | Task) -> Task:
    """Turn ``"cross_entropy"`` / ``"bce"`` / a :class:`Task` into a Task instance."""
    if isinstance(loss, Task):
        return loss
    if isinstance(loss, str) and loss in _BUILTIN:
        return _BUILTIN[loss]()
    raise InputError(f"unknown loss {loss!r}: use one of {sorted(_BUILTIN)} or a hessfree.Task subclass instance")


def input_shapes(inputs: Any) -> str:
    """The shapes of a batch's inputs, for messages: ``(8, 7)``, or ``x: (8, 7), mask: (8,)``."""
    if isinstance(inputs, Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, dict):
        return ", ".join(f"{k}: {input_shapes(v)}" for k, v in inputs.items())
    leaves = leaves_in(inputs)
    if not leaves:
        return f"an empty {type(inputs).__name__}"
    return ", ".join(str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__ for t in leaves)


@contextmanager
def first_batch_of(what: str, inputs: Any) -> Iterator[None]:
    """Run the first forward pass of the model on a dataset (or a target's inputs) inside this: an
    error the model raises there (a RuntimeError such as "mat1 and mat2 shapes cannot be
    multiplied", a TypeError, an IndexError of an embedding, a ValueError) becomes an
    :class:`InputError` that names ``what`` ("training dataset", "test dataset", ...), the batch's
    input shapes and the original message, chained with ``from``.

    Only the first batch: an error the model raises later is not a question of the data's shape
    and surfaces as it is. Out-of-memory errors, NotImplementedError (a model without a forward)
    and hessfree's own errors are never converted."""
    try:
        yield
    except (HessfreeError, torch.OutOfMemoryError, NotImplementedError):
        raise
    except (RuntimeError, TypeError, IndexError, ValueError) as exc:
        raise InputError(
            f"the model failed on the first batch of the {what}, inputs of shape {input_shapes(inputs)}: "
            f"{type(exc).__name__}: {exc}. Check that the {what} holds inputs of the shape and dtype the model "
            "expects (e.g. as many features as its first layer takes)") from exc


def first_outputs(forward: Callable[[Any], Tensor], prepare: Callable[[Any], tuple[Any, Any]], dataset: Dataset,
                  what: str, rows: int = 8) -> tuple[Tensor, Any]:
    """(outputs, targets) of the model on the first ``rows`` samples of ``dataset``, without
    gradients; a failure of the model there raises :class:`InputError` naming ``what`` (see
    :func:`first_batch_of`)."""
    _, first = next(iter_batches(dataset, rows))
    inputs, targets = prepare(first)
    with torch.no_grad(), first_batch_of(what, inputs):
        outputs = forward(inputs)
    return outputs, targets


def check_dataset_labels(task: Task, forward: Callable[[Any], Tensor], prepare: Callable[[Any], tuple[Any, Any]],
                         dataset: Dataset, ids: Any, what: str = "training dataset") -> bool:
    """Validate a dataset's labels against the loss before any expensive loop starts.

    One small forward pass gives the output shape (a model that fails on it raises
    :class:`InputError` naming ``what`` and the inputs' shapes); a ``TensorDataset`` of (x, y), or
    a chain of Subsets over one, then has ALL its labels checked at once, other datasets their
    first batch (later batches are checked as they come).
    """
    outputs, targets = first_outputs(forward, prepare, dataset, what)
    return validate_labels(task, outputs, targets, dataset, ids)


def validate_labels(task: Task, outputs: Tensor, targets: Any, dataset: Dataset, ids: Any) -> bool:
    """Validate the labels of ``dataset`` against the loss, given the model's ``outputs`` and the
    ``targets`` of its first batch: those, and for a TensorDataset (or a Subset chain over one)
    ALL its labels at once. Returns True when every label was checked."""
    task.validate(outputs, targets, ids[: len(outputs)])
    rows = tensor_rows(dataset, np.arange(len(ids)))  # a TensorDataset, or a Subset chain over one
    if rows is not None and len(rows[0].tensors) == 2:
        base, idx = rows
        labels = base.tensors[1] if base is dataset else base.tensors[1][torch.as_tensor(idx)]
        task.validate(outputs[:1].expand(len(labels), *outputs.shape[1:]), labels, ids)
        return True
    return False


def check_model_on(model: nn.Module, task: Task, dataset: Dataset, ids: Any, what: str) -> bool:
    """:func:`check_dataset_labels` for a bare model (in its own dtype and device), changing nothing:
    the model runs in eval mode (no BatchNorm statistics, no dropout draw) and is put back."""
    dtype = next((p.dtype for p in model.parameters()), None)
    device = next((p.device for p in model.parameters()), None)
    was_training = model.training
    model.eval()
    try:
        return check_dataset_labels(task, lambda x: task.safe_forward(model, x),
                                    lambda b: task.split(to_device(b, device, dtype)), dataset, ids, what)
    finally:
        model.train(was_training)
