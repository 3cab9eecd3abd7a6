"""Targets (utilities): the differentiable scalar f(θ) an influence score is measured against.

Only the target gradient ``q = ∇f`` differs between targets; the training side is shared. Each
target declares its ``goal``: ``"minimize"`` (a loss: removing a sample that raises it means the
sample was helpful) or ``"maximize"`` (a logit: raising it on removal means the sample hurt).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hessfree.datasets import dataset_size, iter_batches, sample_ids, to_device
from hessfree.errors import InputError

if TYPE_CHECKING:
    from hessfree.grads.engine import GradientEngine


class Target:
    """Subclass: set ``goal`` and implement ``value(engine)`` returning the scalar f(θ)."""

    goal = "minimize"

    def value(self, engine: "GradientEngine") -> Tensor:
        raise NotImplementedError

    def gradient(self, engine: "GradientEngine") -> dict[str, Tensor]:
        """q = ∇f at the engine's bound checkpoint: parameter name -> tensor."""
        return engine.dense_grad(self.value(engine))

    def validate(self) -> None:
        """Check inputs cheaply, before any expensive work."""

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "goal": self.goal}


class Loss(Target):
    """Mean per-sample training loss (the Run's loss) over ``dataset`` (e.g. a validation set)."""

    goal = "minimize"

    def __init__(self, dataset: Dataset, batch_size: int = 512):
        self.dataset = dataset
        self.batch_size = batch_size

    def validate(self) -> None:
        dataset_size(self.dataset, "target dataset")

    def gradient(self, engine: "GradientEngine") -> dict[str, Tensor]:
        # Accumulate batch by batch so the graph of one batch is freed before the next.
        n = dataset_size(self.dataset, "target dataset")
        total: dict[str, Tensor] | None = None
        ids = sample_ids(self.dataset)
        for pos, batch in iter_batches(self.dataset, self.batch_size):
            inputs, targets = engine.prepare(batch)
            outputs = engine.forward(inputs)
            engine.task.validate(outputs, targets, ids[pos])
            part = engine.dense_grad(engine.task.per_sample_loss(outputs, targets).sum() / n)
            total = part if total is None else {k: total[k] + part[k] for k in total}
        assert total is not None
        return total

    def describe(self) -> dict[str, Any]:
        return {"name": "Loss", "goal": self.goal, "n": dataset_size(self.dataset, "target dataset")}


class Prediction(Target):
    """Mean logit of ``class_index`` over ``inputs`` (one input or a batch with a leading dim).

    ``class_index``: an int, or a (B,) tensor of one class per input; ``None`` for a one-logit
    model. goal = "maximize": a positive score means removing the sample raises the logit, i.e.
    the sample was an opponent of this prediction; proponents have negative scores.
    """

    goal = "maximize"

    def __init__(self, inputs: Tensor, class_index: int | Tensor | None = None):
        self.inputs = inputs
        self.class_index = class_index

    def value(self, engine: "GradientEngine") -> Tensor:
        x = to_device(self.inputs, engine.device, engine.dtype)
        out = engine.forward(x)
        if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
            if self.class_index not in (None, 0):
                raise InputError("a one-logit model has no class_index other than 0/None")
            return out.reshape(-1).mean()
        if out.ndim != 2:
            raise InputError(f"Prediction needs outputs of shape (batch, classes), got {tuple(out.shape)}")
        if self.class_index is None:
            raise InputError("Prediction on a multi-class model needs class_index (an int or one per input)")
        idx = torch.as_tensor(self.class_index, device=out.device).long().reshape(-1)
        if bool(((idx < 0) | (idx >= out.shape[1])).any()):
            raise InputError(f"class_index {self.class_index} outside [0, {out.shape[1]})")
        idx = idx.expand(out.shape[0]) if idx.numel() == 1 else idx
        return out.gather(1, idx[:, None]).mean()

    def describe(self) -> dict[str, Any]:
        ci = self.class_index.tolist() if isinstance(self.class_index, Tensor) else self.class_index
        return {"name": "Prediction", "goal": self.goal, "class_index": ci}
