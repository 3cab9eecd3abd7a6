"""Layer rules: one place where a module type maps to the exact per-sample gradient of its parameters.

The engine puts a forward hook on every module whose type has a rule here, keeps what the module
was called with (its first input) and, after one backward, the gradient ``g`` of the summed
per-sample loss with respect to its output. A rule turns those calls into a block of
:mod:`hessfree.grads.blocks`, which answers squared norms, inner products between two batches and
dot products with a parameter-shaped vector:

- ``nn.Linear`` (and the identical ``NonDynamicallyQuantizableLinear``), ``nn.Conv1d`` and
  ``nn.Conv2d`` (through ``unfold``), and a transposed-weight linear layer such as Hugging Face's
  ``Conv1D`` (``y = x W + b`` with ``W`` of shape (d_in, d_out); :class:`TransposedLinearRule`,
  registered with :func:`register_rule` where that class exists): factorised
  :class:`~hessfree.grads.blocks.LinearBlock`.
- ``nn.Embedding``: :class:`~hessfree.grads.blocks.EmbeddingBlock` (rows at the looked-up ids).
- ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d`` in eval mode
  with running statistics: ``y = x̂ ⊙ w + b`` per element, so a sample's gradient is
  ``Σ_positions g ⊙ x̂`` for the weight and ``Σ_positions g`` for the bias, with ``x̂`` the
  normalised input recomputed from the captured input. These gradients are as small as the
  parameters (a few hundred numbers), so they are materialised: a
  :class:`~hessfree.grads.blocks.DenseBlock`.

Rules match exact types only (a subclass may override ``forward``). A module without a rule keeps
the ``vmap(grad)`` fallback (``meta["fallback_params"]``). Whatever a rule computes is checked on
the engine's first batch: the per-sample gradients must sum to the batch gradient from autograd,
or the layer goes to the fallback. A user adds a layer type with :func:`register_rule`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessfree.grads.blocks import Block, DenseBlock, EmbeddingBlock, LinearBlock

Call = tuple[Tensor, Tensor]  # (the module's first input, detached; ∂Σl/∂output)


@dataclass
class Selected:
    """What a rule builds a block for: the selected parameters' names (None: not selected), the
    batch size B, the weight's shape (one checkpoint's, also when several are stacked), dtype and
    device for empty blocks."""

    names: dict[str, str | None]  # local parameter name ("weight", "bias") -> full name or None
    B: int
    weight_shape: tuple[int, ...] | None
    dtype: torch.dtype
    device: torch.device

    @property
    def weight(self) -> str | None:
        return self.names.get("weight")

    @property
    def bias(self) -> str | None:
        return self.names.get("bias")


class LayerRule:
    """How per-sample gradients of one module type's parameters are formed.

    ``params``: the local parameter names the rule covers; a selected parameter with another name
    (or a module for which :meth:`applies` is False) goes to the vmap fallback. :meth:`block`
    gets every call of the module in the batch (a module called twice, e.g. applied at two
    places, gives two) and returns one block.
    """

    params: tuple[str, ...] = ("weight", "bias")
    needs_weight: bool = False  # True: a block of the bias alone is not formed (e.g. Embedding has none)

    def applies(self, module: nn.Module) -> bool:
        return True

    def block(self, module: nn.Module, calls: Sequence[Call], sel: Selected) -> Block:
        raise NotImplementedError


# ----------------------------------------------------------------------------- linear layers
def _linear_block(a_parts: list[Tensor], g_parts: list[Tensor], d_in: int, d_out: int, sel: Selected,
                  transposed: bool = False) -> LinearBlock:
    if not a_parts:
        a = torch.zeros(sel.B, 1, d_in, dtype=sel.dtype, device=sel.device)
        g = torch.zeros(sel.B, 1, d_out, dtype=sel.dtype, device=sel.device)
    else:
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, 1)
        g = g_parts[0] if len(g_parts) == 1 else torch.cat(g_parts, 1)
    return LinearBlock(a if sel.weight is not None else None, g, sel.weight, sel.bias, sel.weight_shape,
                       transposed=transposed)


class LinearRule(LayerRule):
    """``y_t = W a_t + b`` at every position t of any leading dimensions."""

    def block(self, module, calls, sel):
        d_in, d_out = module.in_features, module.out_features
        return _linear_block([x.reshape(sel.B, -1, d_in) for x, _ in calls],
                             [go.reshape(sel.B, -1, d_out) for _, go in calls], d_in, d_out, sel)


class TransposedLinearRule(LayerRule):
    """``y = x W + b`` with ``W`` stored (d_in, d_out), as Hugging Face's GPT-2 ``Conv1D``: the
    Linear rule with the weight's layout transposed. ``weight`` is read for its shape only."""

    def block(self, module, calls, sel):
        d_in, d_out = module.weight.shape[-2], module.weight.shape[-1]
        return _linear_block([x.reshape(sel.B, -1, d_in) for x, _ in calls],
                             [go.reshape(sel.B, -1, d_out) for _, go in calls], d_in, d_out, sel, transposed=True)


class ConvRule(LayerRule):
    """nn.Conv1d / nn.Conv2d as a Linear over the unfolded input patches (zero padding, one group)."""

    def __init__(self, dims: int):
        self.dims = dims

    def applies(self, module):
        return module.groups == 1 and module.padding_mode == "zeros" and (
            not isinstance(module.padding, str) or module.padding == "valid")

    def block(self, module, calls, sel):
        k = module.kernel_size
        d_in = module.in_channels * int(torch.tensor(k).prod())
        d_out = module.out_channels
        pad = (0,) * self.dims if module.padding == "valid" else module.padding
        if self.dims == 1:  # a Conv2d of height 1
            unf = [F.unfold(x.unsqueeze(-2), (1, k[0]), dilation=(1, module.dilation[0]), padding=(0, pad[0]),
                            stride=(1, module.stride[0])) for x, _ in calls]
        else:
            unf = [F.unfold(x, k, dilation=module.dilation, padding=pad, stride=module.stride) for x, _ in calls]
        return _linear_block([u.transpose(1, 2) for u in unf],
                             [go.reshape(sel.B, d_out, -1).transpose(1, 2) for _, go in calls], d_in, d_out, sel)


class EmbeddingRule(LayerRule):
    """Gradient rows at the looked-up ids (zero at ``padding_idx``)."""

    params = ("weight",)
    needs_weight = True

    def applies(self, module):
        return module.max_norm is None and not module.scale_grad_by_freq

    def block(self, module, calls, sel):
        D = module.embedding_dim
        if not calls:
            return EmbeddingBlock(torch.zeros(sel.B, 1, dtype=torch.long, device=sel.device),
                                  torch.zeros(sel.B, 1, D, dtype=sel.dtype, device=sel.device), sel.weight,
                                  module.num_embeddings)
        ids = torch.cat([x.reshape(sel.B, -1) for x, _ in calls], 1)
        g = torch.cat([go.reshape(sel.B, -1, D) for _, go in calls], 1)
        if module.padding_idx is not None:
            g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
        return EmbeddingBlock(ids, g, sel.weight, module.num_embeddings)


# ----------------------------------------------------------------------------- normalisation layers
class _AffineRule(LayerRule):
    """``y = x̂ ⊙ w + b`` with the affine parameters broadcast over the positions: per sample,
    ``Σ_positions g ⊙ x̂`` (weight) and ``Σ_positions g`` (bias), materialised (B, numel)."""

    def normalised(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def layout(self, module: nn.Module, t: Tensor, B: int) -> Tensor:
        """``t`` (shaped like the output) as (B, positions, numel of the weight)."""
        raise NotImplementedError

    def block(self, module, calls, sel):
        numel = (module.weight if module.weight is not None else module.bias).numel()
        gw = gb = None
        for x, go in calls:
            g = self.layout(module, go, sel.B)
            if sel.weight is not None:
                part = (g * self.layout(module, self.normalised(module, x).to(g.dtype), sel.B)).sum(1)
                gw = part if gw is None else gw + part
            if sel.bias is not None:
                part = g.sum(1)
                gb = part if gb is None else gb + part
        cols, names = [], []
        for name, v in ((sel.weight, gw), (sel.bias, gb)):
            if name is not None:
                cols.append(v if v is not None else torch.zeros(sel.B, numel, dtype=sel.dtype, device=sel.device))
                names.append(name)
        return DenseBlock(cols[0] if len(cols) == 1 else torch.cat(cols, 1), names, [numel] * len(names))


class LayerNormRule(_AffineRule):
    def applies(self, module):
        return module.elementwise_affine

    def normalised(self, module, x):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)

    def layout(self, module, t, B):
        return t.reshape(B, -1, int(torch.tensor(module.normalized_shape).prod()))


class RMSNormRule(LayerNormRule):
    def normalised(self, module, x):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)


class _ChannelRule(_AffineRule):
    """Affine parameters per channel (dimension 1 of the input): GroupNorm, BatchNorm."""

    def layout(self, module, t, B):
        C = t.shape[1]
        return t.reshape(B, C, -1).transpose(1, 2)


class GroupNormRule(_ChannelRule):
    def applies(self, module):
        return module.affine

    def normalised(self, module, x):
        return F.group_norm(x, module.num_groups, eps=module.eps)


class BatchNormRule(_ChannelRule):
    """Eval mode with running statistics only: then each sample is normalised on its own. (The
    engine scores in eval mode; without running statistics BatchNorm would mix the batch.)"""

    def applies(self, module):
        return module.affine and module.track_running_stats and module.running_mean is not None

    def normalised(self, module, x):
        return F.batch_norm(x, module.running_mean, module.running_var, training=False, eps=module.eps)


# ----------------------------------------------------------------------------- the registry
_RULES: dict[type, LayerRule] = {
    nn.Linear: LinearRule(),
    nn.modules.linear.NonDynamicallyQuantizableLinear: LinearRule(),
    nn.Conv1d: ConvRule(1),
    nn.Conv2d: ConvRule(2),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.RMSNorm: RMSNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.BatchNorm1d: BatchNormRule(),
    nn.BatchNorm2d: BatchNormRule(),
    nn.BatchNorm3d: BatchNormRule(),
}


def register_rule(module_type: type, rule: LayerRule) -> None:
    """Give ``module_type`` (matched exactly, not its subclasses) the per-sample gradient rule
    ``rule``; it replaces any rule the type had. The rule is checked like the built-in ones on
    the first batch of every scoring call (its per-sample gradients must sum to the batch
    gradient), and a layer that fails goes to the vmap fallback with a warning."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a hessfree.grads.rules.LayerRule, got {type(rule).__name__}")
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for this module (exact type, and the rule accepts its configuration), or None."""
    rule = _RULES.get(type(module))
    return rule if rule is not None and rule.applies(module) else None


def register_transformers_rules() -> bool:
    """Register :class:`TransposedLinearRule` for ``transformers.pytorch_utils.Conv1D`` (GPT-2) if
    transformers is installed; returns whether it was."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    register_rule(Conv1D, TransposedLinearRule())
    return True
