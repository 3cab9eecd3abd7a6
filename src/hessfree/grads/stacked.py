"""Several checkpoints in one forward and backward: the batch repeated K times, weights stacked.

Scoring K checkpoints one at a time costs K forwards and K backwards per batch; at the batch
sizes influence is computed with, most of that time is per-operation overhead, not arithmetic.
Here the batch is repeated K times along its first dimension (rows k-major: checkpoint k owns
rows k·B … (k+1)·B − 1) and every nn.Linear / nn.Embedding whose weights differ between the K
checkpoints runs a batched forward with its (K, …) stacked weights: ``bmm`` for Linear, offset
row ids into the stacked table for Embedding. Every other module sees an ordinary batch of K·B
samples, which is exact because per-sample losses in eval mode do not mix samples, provided the
model keeps rows in place (a model that sorts or permutes its batch, e.g. by sequence length,
must be scored with ``stack=False``). The engine's hooks then capture the layer inputs and
output gradients of all K·B rows in one backward, and the factorised blocks need no change.

A state tensor that differs between the checkpoints anywhere else (a Conv2d or LayerNorm
weight, a BatchNorm running mean) makes the group unstackable (:class:`NotStackable`), and the
caller scores those checkpoints one at a time. The caller also checks every group, on samples
spread over the dataset, against the unstacked result of its first and last checkpoints before
relying on it (a layer fed a (T, K·B, …) sequence-first input, or a weight read outside its
layer, would otherwise mix checkpoints), unless :func:`rowwise_by_construction` shows that the
model cannot do either.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessfree.datasets import map_tensors
from hessfree.errors import HessfreeError


class NotStackable(Exception):
    """These checkpoints cannot share one forward pass; score them one at a time."""


@contextmanager
def stacking_failures(group: int) -> Iterator[None]:
    """While several checkpoints share a pass (``group`` > 1): running out of memory means the pass
    failed (NotStackable, chained, for the caller to score the checkpoints one at a time), as does
    a failure inside a stacked layer (raised as NotStackable there). Any other error, the user's
    own included, surfaces at once and unchanged, with a note saying that checkpoints shared the
    pass (a model that assumes its batch size would fail so: pass stack=False)."""
    if group < 2:
        yield
        return
    try:
        yield
    except (NotStackable, HessfreeError):
        raise
    except torch.OutOfMemoryError as exc:
        raise NotStackable(f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        exc.add_note(f"(hessfree: {group} checkpoints shared this forward pass, the batch repeated once per "
                     "checkpoint; if the model assumes a batch size or reorders its batch, pass stack=False)")
        raise


def stackable_kind(module: nn.Module) -> str | None:
    """The batched forward available for a module type (exact types only), or None.

    nn.Conv2d is not stacked: as one grouped convolution over K checkpoints it ran about 2×
    slower than K separate convolutions on CPU (a small CNN, batch 256), so a model whose
    convolution weights differ between checkpoints scores them one at a time."""
    t = type(module)
    if t is nn.Linear:
        return "linear"
    if t is nn.Embedding and module.max_norm is None:
        return "embedding"
    return None


# Modules that map each row of a batch on its own and hold no tensors.
_ELEMENTWISE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                nn.Tanhshrink)
_WHITELIST = (nn.Sequential, nn.Linear, nn.Embedding, nn.Flatten, nn.Dropout, *_ELEMENTWISE)
# Each type's own forward and call path as PyTorch ships them: a class-level patch is not trusted.
_STOCK = {t: t.forward for t in _WHITELIST}
_STOCK_CALL = (nn.Module._call_impl, nn.Module._wrapped_call_impl)


def plain_calls() -> bool:
    """No global module hooks, and nn.Module's call path is PyTorch's own."""
    from torch.nn.modules import module as _module

    if any(getattr(_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                      "_global_backward_hooks", "_global_backward_pre_hooks")):
        return False
    return (nn.Module._call_impl, nn.Module._wrapped_call_impl) == _STOCK_CALL


def plain_module(m: nn.Module) -> bool:
    """``m`` is of a type in the whitelist whose class ``forward`` is PyTorch's own, and carries no
    hooks, no instance ``forward`` / ``_call_impl`` and no compiled call: calling it runs exactly
    that stock forward."""
    own = vars(m)
    if ("forward" in own or "_call_impl" in own or "_wrapped_call_impl" in own
            or getattr(m, "_compiled_call_impl", None) is not None
            or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)):
        return False
    t = type(m)
    return t in _STOCK and t.forward is _STOCK[t]


def rowwise_by_construction(model: nn.Module) -> bool:
    """Is ``model`` (in eval mode) row-wise by construction, with each weight read only by its own layer?

    True for an nn.Sequential (nested ones too) of nn.Linear, nn.Embedding (no ``max_norm``),
    ``nn.Flatten(start_dim >= 1)``, eval-mode nn.Dropout and element-wise activations, with no
    tensor registered twice, no hooks, no instance ``forward`` / ``_call_impl``, no compiled call and
    no patched class ``forward`` anywhere. The stock
    Sequential forward applies its children in order; every child maps row i to row i using its
    own tensors only. So the factorised per-sample gradients of its layers are exact and K
    checkpoints stacked along the rows reproduce each checkpoint alone, up to rounding: the
    engine's first-batch sum check and the per-group stacking check cannot fail, and are skipped.
    nn.PReLU holds a weight, but read only by its own element-wise forward.
    Anything else (a custom Module, Conv2d, BatchNorm, LayerNorm, attention) keeps the checks.
    """
    if type(model) is not nn.Sequential or not plain_calls():
        return False
    seen: set[int] = set()
    for m in model.modules():
        if not plain_module(m):
            return False
        t = type(m)
        ok = (t in (nn.Sequential, nn.Linear) or t in _ELEMENTWISE
              or (t is nn.Embedding and m.max_norm is None)
              or (t is nn.Flatten and m.start_dim >= 1)
              or (t is nn.Dropout and not m.training))
        if not ok:
            return False
        for tensor in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if id(tensor) in seen:
                return False
            seen.add(id(tensor))
    return True


def owners(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Canonical state-dict name (the first name of a tied tensor) -> every (module, local name)
    registering it."""
    out: dict[str, list[tuple[nn.Module, str]]] = {}
    canonical: dict[int, str] = {}
    for items in (model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        for name, t in items:
            mod_name, _, local = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            out.setdefault(canonical.setdefault(id(t), name), []).append((mod, local))
    return out


def repeat_batch(obj: Any, k: int, b: int) -> Any:
    """Repeat every tensor of a (nested) batch ``k`` times along its first dimension (k-major)."""
    def repeat(t: Tensor) -> Tensor:
        if t.dim() == 0 or t.shape[0] != b:
            raise NotStackable(f"a batch tensor of shape {tuple(t.shape)} has no leading batch dimension of {b}")
        return torch.cat([t] * k)  # same as t.repeat(k, 1, …); 2–5× cheaper on CPU for small batches
    return map_tensors(repeat, obj)


def _check_rows(x: Tensor, k: int, rows: int, module: nn.Module) -> None:
    if x.dim() == 0 or x.shape[0] != k * rows:
        raise NotStackable(f"{type(module).__name__} got an input of shape {tuple(x.shape)} whose first dimension "
                           f"is not the stacked batch of {k}×{rows} rows")


def stacked_forward(module: nn.Module, kind: str, k: int, batch_rows: Callable[[], int]):
    """A forward for ``module`` whose (possibly stacked) weights hold ``k`` checkpoints.

    A weight or bias that is stacked has shape (k, *original); one that is shared keeps its
    original shape. The input has k·B rows, k-major, with B = ``batch_rows()`` (the batch
    being evaluated); any other first dimension raises NotStackable.
    """
    def stack(t: Tensor | None, ndim: int) -> Tensor | None:
        if t is None or t.dim() == ndim + 1:
            return t
        return t.unsqueeze(0).expand(k, *t.shape)

    def ours(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:  # a failure in here is the stacked pass's, not the user's
            try:
                return fn(x)
            except (RuntimeError, ValueError, IndexError) as exc:
                raise NotStackable(f"stacked {type(module).__name__}: {type(exc).__name__}: {exc}") from exc
        return forward

    if kind == "linear":
        def linear(x: Tensor) -> Tensor:
            rows = batch_rows()
            _check_rows(x, k, rows, module)
            W, b = stack(module.weight, 2), stack(module.bias, 1)
            xs = x.reshape(k, -1, x.shape[-1])
            y = torch.bmm(xs, W.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), xs, W.transpose(1, 2))
            return y.reshape(*x.shape[:-1], W.shape[1])
        return ours(linear)
    if kind == "embedding":
        def embedding(ids: Tensor) -> Tensor:
            rows = batch_rows()
            _check_rows(ids, k, rows, module)
            W = stack(module.weight, 2)
            V = W.shape[1]
            offset = (torch.arange(k, device=ids.device) * V).view(k, *([1] * ids.dim()))
            flat = (ids.reshape(k, rows, *ids.shape[1:]) + offset).reshape(ids.shape)
            return F.embedding(flat, W.reshape(k * V, -1))
        return ours(embedding)
    raise ValueError(f"no stacked forward for {kind!r}")
