"""Closed-form per-sample gradients of a final linear layer (spec outlier_gradient.md §4).

For logits ``z = W h + b`` fed straight into softmax cross-entropy (or BCE-with-logits on one
logit), the per-sample gradients are

    ∂l/∂W = r hᵀ,   ∂l/∂b = r,   r = softmax(z) − e_y   (BCE: r = σ(z) − y)

so one forward pass gives every sample's gradient as the pair ``(r, h)``, and

    ||∂l/∂(W, b)||₂ = ||r||₂ · sqrt(||h||₂² + [bias])
    Σ |∂l/∂(W, b)| = ||r||₁ · (||h||₁ + [bias])

need no backward pass and no outer product at all. :class:`HeadCapture` finds whether this
applies (the selected parameters belong to one ``nn.Linear`` called once on (B, d) inputs, whose
output *is* the model output, under the built-in ``cross_entropy`` / ``bce`` loss) and captures
``h`` and ``z``: directly for a plain nn.Sequential ending in the head, with a forward hook
otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessfree.datasets import is_plain_tensor_dataset
from hessfree.grads.stacked import plain_calls, plain_module
from hessfree.tasks import BCEWithLogits, CrossEntropy, Task, output_residual, safe_call, sigmoid_residual


_ABS_BLOCK = 4096  # rows of |x| formed at a time for the L1 norm of a tall x (one cache-sized temporary)


def row_norm(x: Tensor, ord: str) -> Tensor:
    """(B,) L2 or L1 norm of each row (``vector_norm(ord=1)`` is ~10× slower on CPU than abs-sum;
    for tall x, |x| is formed ``_ABS_BLOCK`` rows at a time, not all at once)."""
    if ord == "l2":
        return torch.linalg.vector_norm(x, dim=1)
    if x.ndim != 2 or len(x) <= 2 * _ABS_BLOCK or (x.requires_grad and torch.is_grad_enabled()):
        return x.abs().sum(1)
    out = x.new_empty(len(x))
    for s in range(0, len(x), _ABS_BLOCK):
        torch.sum(x[s:s + _ABS_BLOCK].abs(), 1, out=out[s:s + _ABS_BLOCK])
    return out


def gradient_norm(r_norm: Tensor, h_norm: Tensor | None, ord: str, bias: bool) -> Tensor:
    """The norm of r hᵀ (and r for the bias) from the row norms of r and h: ||r||·sqrt(||h||² + [bias])
    for L2, ||r||₁·(||h||₁ + [bias]) for L1; ``h_norm`` None: only the bias is selected."""
    if h_norm is None:
        return r_norm
    if bias:
        h_norm = h_norm.square().add_(1).sqrt_() if ord == "l2" else h_norm.add_(1)
    return r_norm * h_norm


def residual_norm(z: Tensor, targets: Tensor, task: Task, ord: str, class_dim: int = 1) -> Tensor:
    """(B,) L1 or L2 norm of r = ∂l/∂z without forming r; ``z`` is (B, C), or (C, B) with
    ``class_dim=0``.

    Cross-entropy, with e = exp(z − max z), s = Σ e and o = Σ_{c≠y} e_c (the mass off the label):
    ||p − e_y||₁ = 2 o / s and ||p − e_y||₂ = sqrt(Σ_{c≠y} e_c² + o²) / s, since 1 − p_y = o / s.
    Summing the off-label terms directly keeps 1 − p_y accurate when p_y is close to 1, where
    forming p_y − 1 would cancel. BCE on one logit: |σ(z) − y|.

    The classes-first layout (C, B) is the faster one on CPU for few classes: its reductions over
    the classes run along contiguous rows of B samples, vectorised, instead of over C-element
    rows one sample at a time.
    """
    if class_dim not in (0, 1):
        raise ValueError(f"class_dim must be 0 or 1, got {class_dim!r}")
    with torch.no_grad():
        if not isinstance(task, CrossEntropy):
            return sigmoid_residual(z.reshape(-1), targets).abs()
        e = (z - z.amax(class_dim, keepdim=True)).exp_()
        s = e.sum(class_dim)
        label = targets.long().reshape((1, -1) if class_dim == 0 else (-1, 1))
        off = e.scatter_(class_dim, label, 0.0)
        o = off.sum(class_dim)
        if ord == "l1":
            return o.div_(s).mul_(2)
        return off.square_().sum(class_dim).add_(o.square_()).sqrt_().div_(s)


@dataclass
class HeadGrads:
    """Per-sample gradients of a final linear layer as factors: r (B, C), h (B, d)."""

    r: Tensor
    h: Tensor
    weight: str | None
    bias: str | None

    def l2(self) -> Tensor:
        return self.norm("l2")

    def l1(self) -> Tensor:
        return self.norm("l1")

    def norm(self, ord: str) -> Tensor:
        """(B,) L1 or L2 norm of each sample's gradient over the selected parameters."""
        hn = row_norm(self.h, ord) if self.weight is not None else None
        return gradient_norm(row_norm(self.r, ord), hn, ord, self.bias is not None)

    def dense(self, names: list[str]) -> Tensor:
        """(B, P) gradients in ``names`` order, each parameter flattened row-major."""
        parts = {}
        if self.weight is not None:
            parts[self.weight] = (self.r[:, :, None] * self.h[:, None, :]).flatten(1)
        if self.bias is not None:
            parts[self.bias] = self.r
        return torch.cat([parts[n] for n in names], 1)


def head_module(model: nn.Module, names: list[str], task: Task) -> tuple[str, nn.Linear] | None:
    """The nn.Linear owning every selected parameter, if the closed form can apply (static part)."""
    if type(task) not in (CrossEntropy, BCEWithLogits):
        return None
    if not plain_calls():  # a global module hook (or a patched nn.Module call) may change z = W h + b
        return None
    owners = set()
    for n in names:
        mod_name, _, local = n.rpartition(".")
        if local not in ("weight", "bias"):
            return None
        owners.add(mod_name)
    if len(owners) != 1:
        return None
    mod_name = owners.pop()
    mod = model.get_submodule(mod_name) if mod_name else model
    if type(mod) is not nn.Linear or not plain_module(mod):  # a hook or patched forward may change z = W h + b
        return None
    if sum(m is mod for _, m in model.named_modules(remove_duplicate=False)) > 1:  # a head used twice
        return None
    shared = [p for m in model.modules() if m is not mod for p in m.parameters(recurse=False)
              if any(p is q for q in mod.parameters())]
    if shared:  # tied weights: the gradient has other paths
        return None
    return mod_name, mod


def sequential_body(model: nn.Module, head: nn.Module) -> list[nn.Module] | None:
    """The modules before ``head`` when ``model`` is a plain nn.Sequential ending in it, so that
    ``model(x)`` is ``head(body(x))`` by construction; ``[]`` when ``model`` is ``head`` itself (a
    linear model); else None.

    Plain (:func:`hessfree.grads.stacked.plain_module`): the Sequential and the head run
    PyTorch's own forward, with no hooks, patches or compiled calls. The body's own modules run
    as modules, hooks included."""
    if model is head:
        return [] if plain_calls() and plain_module(head) else None
    if type(model) is not nn.Sequential or len(model) == 0 or model[-1] is not head:
        return None
    if not (plain_calls() and plain_module(model) and plain_module(head)):
        return None
    return list(model)[:-1]


class HeadCapture:
    """Captures the head's input h and output z; :meth:`grads` turns one forward pass into
    :class:`HeadGrads`, or returns None when the head is not the last operation of the model
    (with the hook: checked every batch; the direct path holds by construction).

    For a plain nn.Sequential ending in the head (:func:`sequential_body`, pass ``model``), the
    body runs and the head's linear map is applied directly (no hook call per batch); otherwise a
    forward hook on the head records its call."""

    def __init__(self, module: nn.Linear, mod_name: str, names: list[str], task: Task,
                 model: nn.Module | None = None):
        self.module, self.task = module, task
        prefix = f"{mod_name}." if mod_name else ""
        self.weight = f"{prefix}weight" if f"{prefix}weight" in names else None
        self.bias = f"{prefix}bias" if f"{prefix}bias" in names else None
        self._body = sequential_body(model, module) if model is not None else None
        self._model = model
        self._calls: list[tuple[Tensor, Tensor]] = []
        self._handle: Any = None

    def __enter__(self) -> "HeadCapture":
        if self._body is None:
            self._handle = self.module.register_forward_hook(lambda m, i, o: self._calls.append((i[0], o)))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._calls.clear()

    def capture(self, forward, inputs: Any, validate=None, classes_first: bool = False
                ) -> tuple[Tensor, Tensor] | None:
        """(h, z) of one forward pass, or None when the head is not the model's last operation.
        ``validate(outputs)``, if given, checks the labels against the outputs first.

        ``classes_first``: on the direct path z is computed as zᵀ = W hᵀ (+ b), a contiguous
        (C, B) tensor, and returned as its (B, C) view ``zᵀ.t()``, so that ``z.t()`` needs no copy
        (:class:`HeadNorms` keeps the logits classes first)."""
        if self._body is not None:
            with torch.no_grad():
                h = safe_call(self._model, self._run_body, inputs)
                weight, bias = self.module.weight, self.module.bias
                if classes_first and isinstance(h, Tensor) and h.ndim == 2:
                    zt = torch.mm(weight, h.t()) if bias is None else torch.addmm(bias[:, None], weight, h.t())
                    outputs = zt.t()
                else:
                    outputs = F.linear(h, weight, bias)
            if validate is not None:
                validate(outputs)
            calls = [(h, outputs)]
        else:
            self._calls.clear()
            with torch.no_grad():
                outputs = forward(inputs)
            if validate is not None:
                validate(outputs)
            calls, self._calls = self._calls, []
        if len(calls) != 1 or calls[0][1] is not outputs or calls[0][0].ndim != 2:
            return None
        if isinstance(self.task, BCEWithLogits) and outputs.shape[1] != 1:
            return None
        return calls[0]

    @property
    def linear_model(self) -> bool:
        """The model is its head alone (a bare nn.Linear, or an nn.Sequential holding only it):
        h is the input itself, so a forward keeps nothing per sample beyond the logits."""
        return self._body == []

    def _run_body(self, h: Any) -> Any:
        for m in self._body:
            h = m(h)
        return h

    def residual(self, z: Tensor, targets: Tensor) -> Tensor:
        """r = ∂l/∂z: softmax(z) − e_y, or σ(z) − y for BCE (a new tensor; z is not modified).
        The label's entry p_y − 1 is formed as −(mass off the label), which does not cancel when
        p_y is close to 1."""
        return output_residual(z, targets, self.task)

    def grads(self, forward, inputs: Any, targets: Tensor, validate=None) -> HeadGrads | None:
        """One batch's per-sample gradients as factors, or None (see :meth:`capture`)."""
        hz = self.capture(forward, inputs, validate)
        return None if hz is None else self.factors(hz, targets)

    def factors(self, hz: tuple[Tensor, Tensor], targets: Tensor) -> HeadGrads:
        """The per-sample gradients of a captured (h, z) as factors."""
        h, z = hz
        return HeadGrads(self.residual(z, targets), h, self.weight, self.bias)


class HeadNorms:
    """Closed-form L1 or L2 gradient norms over many batches, computed in few large operations.

    Per batch only the logits z (classes first, (C, B)), the labels and one norm of h are kept
    (one reduction); the norm of r is formed for up to ``_FLUSH_ELEMENTS`` logits at a time
    (:func:`residual_norm`, without forming r). The values are those of :meth:`HeadGrads.norm` up
    to rounding, with far fewer tensor operations per batch, which is most of the cost when the
    head is small. Pass it logits from :meth:`HeadCapture.capture` with ``classes_first=True``
    (stored without a copy); any (B, C) logits work too, stored as transposed views (copied when a
    flush joins several of them).
    """

    _FLUSH_ELEMENTS = 1 << 19  # 2 MB of float32 logits: larger temporaries were page-faulted afresh each call
    _STEP_BYTES = 64 << 20  # inputs of one forward pass of a linear model (rows_per_step)

    def __init__(self, head: HeadCapture, ord: str):
        if ord not in ("l1", "l2"):
            raise ValueError(f"ord must be 'l1' or 'l2', got {ord!r}")
        self.head, self.ord = head, ord
        self._zt: list[Tensor] = []
        self._y: list[Tensor] = []
        self._hn: list[Tensor] = []
        self._ids: list[Any] = []
        self._rows = 0
        self.done: list[tuple[Tensor, Any]] = []  # (norms, ids) of flushed rows

    def rows_per_step(self, dataset: Any, batch_size: int, itemsize: int) -> int:
        """Rows to run per forward pass: ``batch_size``, or for a linear model on a TensorDataset
        the smallest multiple of it that fills a flush (``_FLUSH_ELEMENTS`` logits), or that
        holds ``_STEP_BYTES`` of inputs if that is fewer rows.

        A linear model's forward keeps no activations (h is a view of the inputs), so the batch
        size bounds nothing there, and per-batch dispatch was most of the closed form's cost for a
        small head (``benchmarks/oga_speed.py``). The values do not depend on the step: every
        operation is row by row."""
        mod = self.head.module
        if not (self.head.linear_model and is_plain_tensor_dataset(dataset) and len(dataset.tensors) == 2
                and dataset.tensors[0].ndim == 2 and (isinstance(self.head.task, CrossEntropy) or mod.out_features == 1)):
            return batch_size  # (and where the closed form may turn out not to apply, the engine's batch stays small)
        rows = min(-(-self._FLUSH_ELEMENTS // mod.out_features),
                   self._STEP_BYTES // max(1, mod.in_features * itemsize))
        return max(1, -(-rows // batch_size)) * batch_size

    def add(self, h: Tensor, z: Tensor, targets: Tensor, ids: Any) -> None:
        with torch.no_grad():
            if self.head.weight is not None:
                self._hn.append(row_norm(h, self.ord))
        self._zt.append(z.t())
        self._y.append(targets)
        self._ids.append(ids)
        self._rows += len(z)
        if self._rows * z.shape[1] >= self._FLUSH_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if not self._zt:
            return
        zt, y = _joined(self._zt, 1), _joined(self._y, 0)
        ids = np.concatenate([np.asarray(part) for part in self._ids])
        with torch.no_grad():
            hn = _joined(self._hn, 0) if self.head.weight is not None else None
            rn = residual_norm(zt, y, self.head.task, self.ord, class_dim=0)
            v = gradient_norm(rn, hn, self.ord, self.head.bias is not None)
        self.done.append((v, ids))
        self._zt, self._y, self._hn, self._ids, self._rows = [], [], [], [], 0

    def drain(self, flush: bool = False) -> list[tuple[Tensor, Any]]:
        """The (norms, ids) finished so far, in order, and forget them; ``flush``: the pending
        batches too."""
        if flush:
            self.flush()
        out, self.done = self.done, []
        return out


def _joined(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat(parts, dim)``, without the copy when there is one part (a step of a linear model
    fills a flush on its own)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
