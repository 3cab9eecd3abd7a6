"""Queries of the Dynamic Influence Tracker: the scalar F(θ) whose change a removal causes (dit.md §6).

A query is evaluated on the run's model with the parameters θ[t] of some step swapped in; its
gradient q(t) = ∇F(θ[t]) is taken in float64 by plain autograd (so a query may itself use
autograd, as :class:`Saliency` does).

| query | F(θ) | goal |
|---|---|---|
| ``ValLoss(val_dataset)`` | mean loss of the run's Task over the dataset (no L2 term) | minimize |
| ``Prediction(inputs, index)`` | mean output ``index`` (a logit) over ``inputs`` | maximize |
| ``Saliency(x, y, coordinate)`` | ∂l(x, y; θ)/∂x_k for one input coordinate k (flat index) | maximize |
| ``Custom(fn)`` or a bare callable | ``fn(model) -> scalar`` | ``goal=`` |
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from hessfree.datasets import dataset_size, iter_batches, sample_ids, to_device
from hessfree.errors import InputError, LabelError
from hessfree.tasks import Task, check_model_on, first_batch_of


def _outputs(model: nn.Module, task: Task, inputs: Any, what: str) -> Tensor:
    """The model's outputs on ``inputs`` (cast to its dtype and device), in eval mode and without
    gradients, changing nothing; a model that fails on them raises InputError naming ``what``."""
    dtype = next((p.dtype for p in model.parameters()), None)
    device = next((p.device for p in model.parameters()), None)
    x = to_device(inputs, device, dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), first_batch_of(what, x):
            return task.safe_forward(model, x)
    finally:
        model.train(was_training)


class Query:
    """Subclass: implement ``value(model, task) -> scalar``; ``prepare`` casts held data once."""

    goal = "minimize"

    def prepare(self, dtype: torch.dtype, device: Any) -> None:
        """Cast held data to ``dtype`` on ``device`` (called once before a sweep or replay)."""

    def value(self, model: nn.Module, task: Task) -> Tensor:
        raise NotImplementedError

    def validate(self) -> None:
        """Cheap checks before any expensive work."""

    def check(self, model: nn.Module, task: Task) -> None:
        """Checks against the run's model and loss, before any expensive work (one small forward)."""

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "goal": self.goal}


class ValLoss(Query):
    """Mean per-sample loss (the run's Task, without the L2 term) over a validation dataset."""

    goal = "minimize"

    def __init__(self, dataset: Dataset, batch_size: int = 4096):
        self.dataset, self.batch_size = dataset, batch_size
        self._batches: list[Any] = []

    def validate(self) -> None:
        dataset_size(self.dataset, "validation dataset of the query")

    def check(self, model: nn.Module, task: Task) -> None:
        """The labels against the run's loss (all of them for a TensorDataset, else the first batch)."""
        try:  # one forward, changing nothing (eval mode: no BatchNorm statistics, no dropout draw)
            check_model_on(model, task, self.dataset, sample_ids(self.dataset), "validation dataset of the query")
        except LabelError as e:
            raise LabelError(f"the query's validation dataset: {e}") from e

    def prepare(self, dtype: torch.dtype, device: Any) -> None:
        self._n = dataset_size(self.dataset, "validation dataset of the query")
        self._batches = [to_device(b, device, dtype) for _, b in iter_batches(self.dataset, self.batch_size)]

    def value(self, model: nn.Module, task: Task) -> Tensor:
        total = 0.0
        for batch in self._batches:
            x, y = task.split(batch)
            total = total + task.per_sample_loss(task.safe_forward(model, x), y).sum()
        return total / self._n

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n": dataset_size(self.dataset)}


class Prediction(Query):
    """Mean of output column ``index`` (e.g. a class logit) over ``inputs`` (a batch tensor)."""

    goal = "maximize"

    def __init__(self, inputs: Tensor, index: int = 0):
        self.inputs, self.index = inputs, index
        self._x: Tensor | None = None

    def validate(self) -> None:
        if not isinstance(self.inputs, Tensor) or self.inputs.ndim < 1 or len(self.inputs) == 0:
            raise InputError("Prediction needs a non-empty batch tensor of inputs (first dimension = samples)")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise InputError(f"Prediction index must be a non-negative int, got {self.index!r}")

    def check(self, model: nn.Module, task: Task) -> None:
        """The model runs on the inputs (its first 8) and has an output ``index``."""
        out = _outputs(model, task, self.inputs[:8], "Prediction query's inputs")
        width = out.reshape(out.shape[0], -1).shape[1] if out.ndim else 0
        if self.index >= width:
            raise InputError(f"Prediction index {self.index} is outside the model's {width} outputs")

    def prepare(self, dtype: torch.dtype, device: Any) -> None:
        self._x = to_device(self.inputs, device, dtype)

    def value(self, model: nn.Module, task: Task) -> Tensor:
        out = task.safe_forward(model, self._x)
        out = out.reshape(out.shape[0], -1)
        if self.index >= out.shape[1]:
            raise InputError(f"Prediction index {self.index} is outside the model's {out.shape[1]} outputs")
        return out[:, self.index].mean()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "index": self.index, "n": int(len(self.inputs))}


class Saliency(Query):
    """∂l(x, y; θ)/∂x_k: the input gradient of one sample's loss at coordinate k of the flattened
    input. Its θ-gradient needs double backprop, which plain autograd gives."""

    goal = "maximize"

    def __init__(self, x: Tensor, y: Any, coordinate: int):
        self.x, self.y, self.coordinate = x, y, coordinate
        self._x: Tensor | None = None
        self._y: Any = None

    def validate(self) -> None:
        if not isinstance(self.x, Tensor) or not self.x.dtype.is_floating_point:
            raise InputError("Saliency needs one floating-point input tensor x (without a batch dimension)")
        if isinstance(self.coordinate, bool) or not isinstance(self.coordinate, int) or \
                not 0 <= self.coordinate < self.x.numel():
            raise InputError(f"Saliency coordinate must be an int in [0, {self.x.numel()}), got {self.coordinate!r}")

    def check(self, model: nn.Module, task: Task) -> None:
        """The model runs on x (as a batch of one) and y suits the loss."""
        out = _outputs(model, task, self.x[None], "Saliency query's input")
        y = torch.as_tensor(self.y)
        try:
            task.validate(out, y.reshape(1, *y.shape))
        except LabelError as e:
            raise LabelError(f"the Saliency query's label: {e}") from e

    def prepare(self, dtype: torch.dtype, device: Any) -> None:
        self._x = to_device(self.x, device, dtype)
        self._y = to_device(torch.as_tensor(self.y), device, dtype)

    def value(self, model: nn.Module, task: Task) -> Tensor:
        x = self._x.detach().clone().requires_grad_(True)
        loss = task.per_sample_loss(task.safe_forward(model, x[None]), self._y.reshape(1, *self._y.shape)).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        return gx.reshape(-1)[self.coordinate]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "coordinate": self.coordinate}


class Custom(Query):
    """Any differentiable ``fn(model) -> scalar`` (the model holds the step's parameters).

    The model runs in the sweep's dtype (float64 for ``dit``): tensors the function uses must be
    of that dtype. Pass them as ``data=`` (any nested tensors) and the function is called as
    ``fn(model, data)`` with ``data`` cast to the model's dtype and device, as
    ``targets.Custom`` does.
    """

    def __init__(self, fn: Callable[..., Tensor], goal: str = "minimize", *, data: Any = None):
        self.fn, self.goal, self.data = fn, goal, data
        self._data: Any = None

    def prepare(self, dtype: torch.dtype, device: Any) -> None:
        self._data = to_device(self.data, device, dtype) if self.data is not None else None

    def value(self, model: nn.Module, task: Task) -> Tensor:
        try:
            return self.fn(model) if self.data is None else self.fn(model, self._data)
        except RuntimeError as e:
            dtype = next((p.dtype for p in model.parameters()), None)
            if self.data is None and ("dtype" in str(e) or "Double" in str(e)):  # torch's wording
                raise InputError(f"the Custom query failed with the model in {dtype} ({e}); pass the tensors the "
                                 "function uses as Custom(fn, data=...) and take them as fn(model, data): "
                                 "hessfree casts them to the model's dtype") from e
            raise

    def validate(self) -> None:
        if not callable(self.fn):
            raise InputError("Custom query needs a callable fn(model) -> scalar tensor")
        if self.goal not in ("minimize", "maximize"):
            raise InputError(f"goal must be 'minimize' or 'maximize', got {self.goal!r}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fn": getattr(self.fn, "__name__", type(self.fn).__name__)}


def resolve_query(query: Any) -> Query:
    """A Query; a bare dataset means ``ValLoss(dataset)``, a bare callable ``Custom(fn)``."""
    if query is None:
        raise InputError("give a query: queries.ValLoss(val_dataset) (the usual choice), queries.Prediction, "
                         "queries.Saliency, or a callable fn(model) -> scalar")
    if isinstance(query, Query):
        q = query
    elif isinstance(query, Dataset):
        q = ValLoss(query)
    elif callable(query):
        q = Custom(query)
    else:
        raise InputError(f"cannot use a {type(query).__name__} as a query")
    q.validate()
    return q
