"""Targets (utilities): the differentiable scalar f(θ) an influence score is measured against.

Only the target gradient ``q = ∇f`` differs between targets; the training side is shared. Each
target declares its ``goal``: ``"minimize"`` (a loss: removing a sample that raises it means the
sample was helpful) or ``"maximize"`` (a logit: raising it on removal means the sample hurt).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hessfree.datasets import check_batch_size, dataset_size, iter_batches, sample_ids, tensors_in, to_device
from hessfree.errors import InputError
from hessfree.grads.engine import _check_finite
from hessfree.tasks import first_batch_of, first_outputs, validate_labels

if TYPE_CHECKING:
    from hessfree.grads.engine import GradientEngine


def summed_gradient(engine: "GradientEngine", parts) -> dict[str, Tensor]:
    """∇ Σ_b part_b, one part (e.g. one batch's share of f) at a time, so only one batch's graph
    is alive at once. ``parts`` is an iterable of scalar tensors."""
    total: dict[str, Tensor] | None = None
    for part in parts:
        g = engine.dense_grad(part)
        total = g if total is None else {k: total[k] + g[k] for k in total}
    if total is None:
        raise InputError("the target has no data to differentiate")
    return total


def check_data(engine: "GradientEngine", dataset: Dataset, labels: bool = True, what: str = "target dataset") -> Tensor:
    """Before a target's gradient is formed: the model runs on the first batch of ``dataset``
    (else :class:`InputError` naming the dataset and its input shapes) and, with ``labels``, the
    labels suit the run's loss (all of them for a TensorDataset). Returns the first batch's
    outputs. One small forward without gradients."""
    outputs, targets = first_outputs(engine.forward, engine.prepare, dataset, what)
    if labels:
        validate_labels(engine.task, outputs, targets, dataset, sample_ids(dataset))
    return outputs


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

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model this target is not defined for (before any expensive work)."""

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
        check_batch_size(self.batch_size)

    def value(self, engine: "GradientEngine") -> Tensor:
        n = dataset_size(self.dataset, "target dataset")
        return torch.stack([engine.task.per_sample_loss(engine.forward(x), y).sum()
                            for x, y in (engine.prepare(b) for _, b in iter_batches(self.dataset, self.batch_size))]
                           ).sum() / n

    def gradient(self, engine: "GradientEngine") -> dict[str, Tensor]:
        n = dataset_size(self.dataset, "target dataset")
        ids = sample_ids(self.dataset)
        check_data(engine, self.dataset)

        def parts():
            for pos, batch in iter_batches(self.dataset, self.batch_size):
                inputs, targets = engine.prepare(batch)
                outputs = engine.forward(inputs)
                engine.task.validate(outputs, targets, ids[pos])
                losses = engine.task.per_sample_loss(outputs, targets)
                _check_finite(losses, ids[pos], "loss of target dataset")
                yield losses.sum() / n

        return summed_gradient(engine, parts())

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

    def validate(self) -> None:
        if not tensors_in(self.inputs) or any(t.ndim == 0 or len(t) == 0 for t in tensors_in(self.inputs)):
            raise InputError(f"Prediction needs inputs: a non-empty tensor (or nested tensors) of inputs for the "
                             f"model, got {type(self.inputs).__name__}")
        ci = self.class_index
        try:
            t = None if ci is None else torch.as_tensor(ci)
        except (TypeError, ValueError, RuntimeError):
            t = torch.zeros(0)  # refused below
        if t is not None and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.ndim > 1):
            raise InputError(f"class_index must be an int, a tensor of one class per input, or None, got {ci!r}")

    def value(self, engine: "GradientEngine") -> Tensor:
        x = to_device(self.inputs, engine.device, engine.dtype)
        with first_batch_of("Prediction target's inputs", x):
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


# ----------------------------------------------------------------------------- fairness
def _positive_probability(outputs: Tensor, positive_class: int) -> Tensor:
    """p(y = positive_class | x) per sample, for one-logit (sigmoid) or multi-class (softmax) outputs."""
    if outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1):
        p1 = torch.sigmoid(outputs.reshape(-1))
        return p1 if positive_class == 1 else 1 - p1
    return torch.softmax(outputs, 1)[:, positive_class]


def _binary_mask(values: Any, n: int, what: str) -> Tensor:
    t = torch.as_tensor(values).reshape(-1)
    if t.numel() != n:
        raise InputError(f"{what} has {t.numel()} entries for a dataset of {n} samples: give one per sample, "
                         "in dataset order")
    if not bool(((t == 0) | (t == 1)).all()):
        raise InputError(f"{what} must be binary (0/1 or bool)")
    return t.bool()


class _GroupGap(Target):
    """|f| for a signed gap f = Σ_i w_i φ_i(θ) over a dataset; ∇|f| = sign(f) ∇f.

    The weights put +1/n₁ on one group and −1/n₀ on the other, so f is a difference of group
    means. "Harmful" (negative influence) always means: the sample increases the absolute gap.
    """

    goal = "minimize"

    uses_labels = False  # does the gap use the run's loss on the labels (then they are checked against it)?

    def __init__(self, dataset: Dataset, sensitive: Any, positive_class: int = 1, batch_size: int = 512):
        self.dataset, self.sensitive, self.positive_class, self.batch_size = dataset, sensitive, positive_class, batch_size
        self._w: Tensor | None = None

    def _labels(self) -> Tensor:
        ys = [y for _, (_, y) in iter_batches(self.dataset, self.batch_size)]
        return torch.cat([torch.as_tensor(y).reshape(-1) for y in ys])

    def _group_weights(self, member: Tensor, s: Tensor, what: str) -> Tensor:
        """+1/n₁ on members with s = 1, −1/n₀ on members with s = 0, 0 elsewhere."""
        n1, n0 = int((member & s).sum()), int((member & ~s).sum())
        if n1 == 0 or n0 == 0:
            raise InputError(f"{type(self).__name__} needs {what} in both sensitive groups; found {n1} with s=1 "
                             f"and {n0} with s=0")
        w = torch.zeros(len(s), dtype=torch.float64)
        w[member & s] = 1.0 / n1
        w[member & ~s] = -1.0 / n0
        return w

    def weights(self) -> Tensor:
        raise NotImplementedError

    def validate(self) -> None:
        pc = self.positive_class
        if isinstance(pc, (bool, np.bool_)) or not isinstance(pc, (int, np.integer)) or pc < 0:
            raise InputError(f"positive_class must be a non-negative int (a class index), got {pc!r}")
        check_batch_size(self.batch_size)
        self._w = self.weights()  # checks the dataset, the sensitive mask and both groups

    def check_data(self, engine: "GradientEngine") -> None:
        """The model runs on the dataset, the labels suit the loss (if used) and positive_class is one
        of the model's classes, before any gradient is formed."""
        out = check_data(engine, self.dataset, labels=self.uses_labels)
        one_logit = out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)
        classes = 2 if one_logit else out.shape[-1]
        if self.positive_class >= classes:
            raise InputError(f"positive_class {self.positive_class} is not a class of the model: "
                             + ("a one-logit model has classes 0 and 1" if one_logit else
                                f"its {classes} outputs are classes 0..{classes - 1}"))

    def _phi(self, engine: "GradientEngine", outputs: Tensor, targets: Any) -> Tensor:
        return _positive_probability(outputs, self.positive_class)

    def _signed_parts(self, engine: "GradientEngine"):
        if self._w is None:
            self.validate()
        w = self._w.to(engine.device)  # type: ignore[union-attr]
        ids = sample_ids(self.dataset)
        for pos, batch in iter_batches(self.dataset, self.batch_size):
            inputs, targets = engine.prepare(batch)
            phi = self._phi(engine, engine.forward(inputs), targets)
            _check_finite(phi, ids[pos], "output of target dataset")
            yield (w[torch.as_tensor(pos, device=w.device)].to(phi.dtype) * phi).sum()

    def signed(self, engine: "GradientEngine") -> Tensor:
        """The signed gap f(θ) (differentiable)."""
        return torch.stack(list(self._signed_parts(engine))).sum()

    def value(self, engine: "GradientEngine") -> Tensor:
        return self.signed(engine).abs()

    def gradient(self, engine: "GradientEngine") -> dict[str, Tensor]:
        self.check_data(engine)
        with torch.no_grad():
            sign = 1.0 if float(self.signed(engine)) >= 0 else -1.0
        return summed_gradient(engine, (sign * part for part in self._signed_parts(engine)))

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "goal": self.goal, "positive_class": self.positive_class,
                "n": dataset_size(self.dataset, "target dataset")}


class DemographicParity(_GroupGap):
    """|mean_{s=1} p(y=c|x) − mean_{s=0} p(y=c|x)| over ``dataset`` with binary ``sensitive`` (c = positive_class)."""

    def weights(self) -> Tensor:
        s = _binary_mask(self.sensitive, dataset_size(self.dataset, "target dataset"), "sensitive")
        return self._group_weights(torch.ones_like(s), s, "samples")


class EqualOpportunity(_GroupGap):
    """Equal-opportunity gap over the positives (y = positive_class) of ``dataset``.

    ``form="loss"`` (the paper's surrogate): |mean loss on {s=0, y=1} − mean loss on {s=1, y=1}|;
    ``form="tpr"``: |mean_{s=1, y=1} p(y=1|x) − mean_{s=0, y=1} p(y=1|x)| (true-positive-rate gap with
    probabilities).
    """

    def __init__(self, dataset: Dataset, sensitive: Any, form: str = "loss", positive_class: int = 1,
                 batch_size: int = 512):
        if form not in ("loss", "tpr"):
            raise InputError(f"form must be 'loss' or 'tpr', got {form!r}")
        super().__init__(dataset, sensitive, positive_class, batch_size)
        self.form = form
        self.uses_labels = form == "loss"

    def weights(self) -> Tensor:
        s = _binary_mask(self.sensitive, dataset_size(self.dataset, "target dataset"), "sensitive")
        positive = self._labels().reshape(-1).round().long() == self.positive_class
        w = self._group_weights(positive, s, "positives (y = positive_class)")
        return -w if self.form == "loss" else w  # loss form: group s=0 minus group s=1, as in the paper

    def _phi(self, engine: "GradientEngine", outputs: Tensor, targets: Any) -> Tensor:
        if self.form == "loss":
            return engine.task.per_sample_loss(outputs, targets)
        return _positive_probability(outputs, self.positive_class)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "form": self.form}


# ----------------------------------------------------------------------------- robustness
class FGSM:
    """Fast gradient sign attack: x' = x + eps · sign(∇_x loss)."""

    def __init__(self, eps: float):
        if not eps > 0:
            raise InputError(f"eps must be positive, got {eps}")
        self.eps = eps

    def __call__(self, engine: "GradientEngine", x: Tensor, y: Any) -> Tensor:
        return PGD(self.eps, steps=1, step_size=self.eps)(engine, x, y)

    def describe(self) -> dict[str, Any]:
        return {"attack": "FGSM", "eps": self.eps}


class PGD:
    """Projected gradient (sign) ascent on the loss within an L∞ ball of radius eps around x."""

    def __init__(self, eps: float, steps: int = 10, step_size: float | None = None):
        if not eps > 0 or not isinstance(steps, int) or steps < 1:
            raise InputError(f"PGD needs eps > 0 and an integer steps >= 1, got eps={eps}, steps={steps}")
        self.eps, self.steps = eps, steps
        self.step_size = step_size if step_size is not None else 2.5 * eps / steps

    def __call__(self, engine: "GradientEngine", x: Tensor, y: Any) -> Tensor:
        if not x.dtype.is_floating_point:
            raise InputError("gradient attacks need floating-point inputs")
        x0, xa = x.detach(), x.detach().clone()
        for _ in range(self.steps):
            xa.requires_grad_(True)
            loss = engine.task.per_sample_loss(engine.forward(xa), y).sum()
            (gx,) = torch.autograd.grad(loss, xa)
            xa = torch.minimum(torch.maximum(xa.detach() + self.step_size * gx.sign(), x0 - self.eps), x0 + self.eps)
        return xa.detach()

    def describe(self) -> dict[str, Any]:
        return {"attack": "PGD", "eps": self.eps, "steps": self.steps, "step_size": self.step_size}


class Boundary:
    """The paper's attack on a linear model: x' = x − scale · (wᵀx + b) / (wᵀw) · w (crosses the boundary)."""

    def __init__(self, scale: float = 1.3):
        self.scale = scale

    @staticmethod
    def linear_layer(model: torch.nn.Module) -> torch.nn.Linear:
        owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        if len(owners) != 1 or type(owners[0]) is not torch.nn.Linear or owners[0].out_features != 1 or any(
                not isinstance(m, (torch.nn.Linear, torch.nn.Sequential, torch.nn.Flatten, torch.nn.Identity))
                for m in model.modules()):
            raise InputError("the Boundary attack is defined for a linear model with one logit (a single "
                             "nn.Linear(d, 1)); use FGSM(eps) or PGD(eps, steps) for other models")
        return owners[0]

    def __call__(self, engine: "GradientEngine", x: Tensor, y: Any) -> Tensor:
        lin = self.linear_layer(engine.model)
        w = lin.weight.detach().reshape(-1)
        b = lin.bias.detach().reshape(()) if lin.bias is not None else w.new_zeros(())
        flat = x.detach().reshape(x.shape[0], -1)
        margin = flat @ w + b
        return (flat - self.scale * (margin / (w @ w))[:, None] * w).reshape(x.shape)

    def describe(self) -> dict[str, Any]:
        return {"attack": "Boundary", "scale": self.scale}


class Robustness(Target):
    """Mean loss on adversarially perturbed inputs of ``dataset``, attacked at each checkpoint.

    The gradient is taken with the attacked inputs held fixed (the attack itself is not
    differentiated). ``attack``: ``FGSM(eps)``, ``PGD(eps, steps, step_size)`` or ``Boundary(1.3)``
    (linear one-logit models only).
    """

    goal = "minimize"

    def __init__(self, dataset: Dataset, attack: FGSM | PGD | Boundary, batch_size: int = 512):
        self.dataset, self.attack, self.batch_size = dataset, attack, batch_size

    def validate(self) -> None:
        dataset_size(self.dataset, "target dataset")
        check_batch_size(self.batch_size)
        if not isinstance(self.attack, (FGSM, PGD, Boundary)):
            raise InputError("attack must be hessfree.targets.FGSM, PGD or Boundary")

    def check_model(self, model: torch.nn.Module) -> None:
        if isinstance(self.attack, Boundary):
            Boundary.linear_layer(model)

    def attacked(self, engine: "GradientEngine") -> list[tuple[Tensor, Any]]:
        """The attacked inputs (and their labels) at the engine's bound checkpoint."""
        check_data(engine, self.dataset)  # the model runs on it, the labels suit the loss: before any attack
        out = []
        for _, batch in iter_batches(self.dataset, self.batch_size):
            x, y = engine.prepare(batch)
            out.append((self.attack(engine, x, y), y))
        return out

    def loss_on(self, engine: "GradientEngine", attacked: list[tuple[Tensor, Any]]) -> Tensor:
        n = sum(len(x) for x, _ in attacked)
        return torch.stack([engine.task.per_sample_loss(engine.forward(x), y).sum() for x, y in attacked]).sum() / n

    def value(self, engine: "GradientEngine") -> Tensor:
        return self.loss_on(engine, self.attacked(engine))

    def gradient(self, engine: "GradientEngine") -> dict[str, Tensor]:
        n = dataset_size(self.dataset, "target dataset")
        ids = sample_ids(self.dataset)

        def parts():
            start = 0
            for x, y in self.attacked(engine):
                losses = engine.task.per_sample_loss(engine.forward(x), y)
                _check_finite(losses, ids[start:start + len(losses)], "loss on attacked inputs of target dataset")
                start += len(losses)
                yield losses.sum() / n

        return summed_gradient(engine, parts())

    def describe(self) -> dict[str, Any]:
        return {"name": "Robustness", "goal": self.goal, **self.attack.describe()}


class Custom(Target):
    """Any differentiable ``fn(model, data) -> scalar``; the model holds each checkpoint's weights
    when ``fn`` is called. ``goal``: "minimize" (a loss-like target) or "maximize"."""

    def __init__(self, fn, data: Any = None, goal: str = "minimize"):
        if not callable(fn):
            raise InputError("Custom needs a callable fn(model, data) -> scalar tensor")
        if goal not in ("minimize", "maximize"):
            raise InputError(f"goal must be 'minimize' or 'maximize', got {goal!r}")
        self.fn, self.data, self.goal = fn, data, goal

    def value(self, engine: "GradientEngine") -> Tensor:
        data = to_device(self.data, engine.device, engine.dtype)
        out = self.fn(engine.model, data)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise InputError("Custom target fn must return a scalar tensor")
        return out.reshape(())

    def gradient(self, engine: "GradientEngine") -> dict[str, Tensor]:
        out = self.value(engine)
        if not out.requires_grad:
            raise InputError("Custom target fn returned a value that does not depend on the model's parameters")
        return engine.dense_grad(out)

    def describe(self) -> dict[str, Any]:
        return {"name": "Custom", "goal": self.goal, "fn": getattr(self.fn, "__name__", repr(self.fn))}
