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
- ``nn.MultiheadAttention`` as self-attention: its forward written out while the engine runs, the
  packed input projection a Linear (:class:`MultiheadAttentionRule`), ``out_proj`` its own Linear.
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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessfree.grads import cost
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
    memo: dict = field(default_factory=dict)  # kept per module across batches (e.g. its batch dimension)

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
    patches: bool = False  # True: the rule replaces the module's forward while the engine runs (patch)

    def applies(self, module: nn.Module) -> bool:
        return True

    def patch(self, module: nn.Module, capture: Callable[[str, Tensor, Tensor], Tensor]) -> Callable[..., Any]:
        """For a rule whose parameters act inside the module's forward (not on its input): a forward
        equal to the module's own that routes each inner linear operation through
        ``capture(tag, input, output)`` (which returns the output to go on with); :meth:`block`
        then gets (input, ∂Σl/∂output, tag) triples. Installed as an instance ``forward`` while
        the engine runs."""
        raise NotImplementedError

    def block(self, module: nn.Module, calls: Sequence[Call], sel: Selected) -> Block:
        raise NotImplementedError


# ----------------------------------------------------------------------------- linear layers
def batch_major(t: Tensor, B: int, memo: dict | None = None) -> Tensor:
    """``t`` with its batch dimension first. The first time a module is seen (``memo`` empty: the
    engine's checked first batch) the dimension is read from the shape: the first if it is B, else
    the second if that is (a sequence-first (T, B, …) input, as ``batch_first=False`` layers take),
    and remembered in ``memo`` for every later batch, whose length may equal its batch size (a later
    call whose shape rules the remembered layout out takes the other one). When T equals B on that
    first batch the shape cannot tell; the engine's check of single samples then finds a wrong
    guess and moves the layer to the fallback."""
    dim = memo.get("batch_dim") if memo is not None else None
    if dim is None:
        dim = 1 if t.dim() >= 2 and t.shape[0] != B and t.shape[1] == B else 0
        if memo is not None:
            memo["batch_dim"] = dim
    elif t.dim() <= dim or t.shape[dim] != B:  # a layout this call's shape rules out: the other one, if it fits
        other = 1 - dim
        if t.dim() <= other or t.shape[other] != B:
            raise ValueError(f"cannot find the batch dimension ({B} samples) of a layer input of shape "
                             f"{tuple(t.shape)}")
        dim = other
    return t if dim == 0 else t.transpose(0, 1)


def _dense_block(sel: Selected, columns: Sequence[tuple[str | None, Tensor | None, int]]) -> DenseBlock:
    """A :class:`DenseBlock` of the selected parameters among ``columns`` (name or None when not
    selected, the (B, numel) per-sample gradients or None for zeros, numel), in that order."""
    cols, names, sizes = [], [], []
    for name, v, numel in columns:
        if name is not None:
            cols.append(v if v is not None else torch.zeros(sel.B, numel, dtype=sel.dtype, device=sel.device))
            names.append(name)
            sizes.append(numel)
    return DenseBlock(cols[0] if len(cols) == 1 else torch.cat(cols, 1), names, sizes)


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

    transposed = False  # the weight is stored (d_in, d_out)

    def sizes(self, module: nn.Module) -> tuple[int, int]:
        """(d_in, d_out)."""
        return module.in_features, module.out_features

    def block(self, module, calls, sel):
        d_in, d_out = self.sizes(module)
        a = [batch_major(x, sel.B, sel.memo).reshape(sel.B, -1, d_in) for x, _ in calls]
        g = [batch_major(go, sel.B, sel.memo).reshape(sel.B, -1, d_out) for _, go in calls]
        return _linear_block(a, g, d_in, d_out, sel, transposed=self.transposed)


class TransposedLinearRule(LinearRule):
    """``y = x W + b`` with ``W`` stored (d_in, d_out), as Hugging Face's GPT-2 ``Conv1D``: the
    Linear rule with the weight's layout transposed. ``weight`` is read for its shape only."""

    transposed = True

    def sizes(self, module):
        return module.weight.shape[-2], module.weight.shape[-1]


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
        T = sum(go[0].numel() // d_out for _, go in calls) if calls else 1  # output positions per sample
        # a convolution's per-sample gradient (d_out × d_in) is usually small beside its T output
        # positions: then it is formed at once, and serves every product (see hessfree.grads.cost)
        dense = T > 1 and cost.linear_sq_norms(T, d_in + (sel.bias is not None), d_out) == "dense"
        if dense and calls and self._grouped(module, calls[0][0]):
            return self._grouped_block(module, calls, sel, pad)
        if self.dims == 1:  # a Conv2d of height 1
            unf = [F.unfold(x.unsqueeze(-2), (1, k[0]), dilation=(1, module.dilation[0]), padding=(0, pad[0]),
                            stride=(1, module.stride[0])) for x, _ in calls]
        else:
            unf = [F.unfold(x, k, dilation=module.dilation, padding=pad, stride=module.stride) for x, _ in calls]
        block = _linear_block([u.transpose(1, 2) for u in unf],
                              [go.reshape(sel.B, d_out, -1).transpose(1, 2) for _, go in calls], d_in, d_out, sel)
        return block.as_dense() if dense else block

    @staticmethod
    def _grouped(module: nn.Module, x: Tensor) -> bool:
        """Form the per-sample weight gradients as one grouped convolution's weight gradient (the
        batch as the groups) rather than by unfold + batched matrix product? On CPU (oneDNN) the
        grouped kernel, with the input channels zero-padded to a multiple of 8, was 1.3–6× faster
        on 8 of the 9 layer shapes of ``benchmarks/cost_model.py`` and 1.9× slower on one (3 input,
        64 output channels); on other devices unfold + bmm is kept."""
        return x.device.type == "cpu"

    def _grouped_block(self, module, calls, sel, pad) -> DenseBlock:
        """Per-sample weight gradients: the sample b's gradient is the weight gradient of group b of a
        convolution with the batch as its groups (input (1, B·C, …), output gradient (1, B·C_out, …)).
        C is the input channels padded with zero channels to a multiple of 8 (oneDNN's fast kernels
        want it); the padded channels' gradients are dropped."""
        B, d_out, c = sel.B, module.out_channels, module.in_channels
        c8 = c if c == 1 or c % 8 == 0 else -(-c // 8) * 8
        w = b = None
        for x, go in calls:
            if sel.weight is not None:
                if c8 != c:
                    x = F.pad(x, (0, 0) * self.dims + (0, c8 - c))
                part = torch.ops.aten.convolution_backward(
                    go.reshape(1, B * d_out, *go.shape[2:]), x.reshape(1, -1, *x.shape[2:]),
                    go.new_empty((B * d_out, c8, *module.kernel_size)), None, list(module.stride), list(pad),
                    list(module.dilation), False, [0] * self.dims, B, [False, True, False])[1]
                part = part.reshape(B, d_out, c8, -1)[:, :, :c].reshape(B, -1)
                w = part if w is None else w + part
            if sel.bias is not None:
                part = go.reshape(B, d_out, -1).sum(2)
                b = part if b is None else b + part
        return _dense_block(sel, ((sel.weight, w, d_out * c * math.prod(module.kernel_size)), (sel.bias, b, d_out)))


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
        ids = torch.cat([batch_major(x, sel.B, sel.memo).reshape(sel.B, -1) for x, _ in calls], 1)
        g = torch.cat([batch_major(go, sel.B, sel.memo).reshape(sel.B, -1, D) for _, go in calls], 1)
        if module.padding_idx is not None:
            g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
        return EmbeddingBlock(ids, g, sel.weight, module.num_embeddings)


# ----------------------------------------------------------------------------- normalisation layers
class _AffineRule(LayerRule):
    """``y = x̂ ⊙ w + b`` with the affine parameters broadcast over the positions: per sample,
    ``Σ_positions g ⊙ x̂`` (weight) and ``Σ_positions g`` (bias), materialised (B, numel)."""

    def normalised(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def layout(self, module: nn.Module, t: Tensor, B: int, memo: dict | None = None) -> Tensor:
        """``t`` (shaped like the output) as (B, positions, numel of the weight)."""
        raise NotImplementedError

    def block(self, module, calls, sel):
        numel = (module.weight if module.weight is not None else module.bias).numel()
        gw = gb = None
        for x, go in calls:
            g = self.layout(module, go, sel.B, sel.memo)
            if sel.weight is not None:
                part = (g * self.layout(module, self.normalised(module, x).to(g.dtype), sel.B, sel.memo)).sum(1)
                gw = part if gw is None else gw + part
            if sel.bias is not None:
                part = g.sum(1)
                gb = part if gb is None else gb + part
        return _dense_block(sel, ((sel.weight, gw, numel), (sel.bias, gb, numel)))


class LayerNormRule(_AffineRule):
    def applies(self, module):
        return module.elementwise_affine

    def normalised(self, module, x):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)

    def layout(self, module, t, B, memo=None):
        return batch_major(t, B, memo).reshape(B, -1, int(torch.tensor(module.normalized_shape).prod()))


class RMSNormRule(LayerNormRule):
    def normalised(self, module, x):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)


class _ChannelRule(_AffineRule):
    """Affine parameters per channel (dimension 1 of the input): GroupNorm, BatchNorm."""

    def layout(self, module, t, B, memo=None):
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


# ----------------------------------------------------------------------------- attention
class MultiheadAttentionRule(LayerRule):
    """``nn.MultiheadAttention`` used as self-attention (query, key and value one tensor), with one
    packed input projection and no ``bias_k`` / ``bias_v`` / ``add_zero_attn``.

    While the engine runs, the module's forward is replaced by the same computation written out:
    the packed projection ``qkv = x W_inᵀ + b_in`` as a Linear whose input and output gradient are
    captured (a :class:`~hessfree.grads.blocks.LinearBlock` for ``in_proj_weight`` /
    ``in_proj_bias``), scaled dot-product attention with the module's masks, then
    ``self.out_proj(…)`` called as a module, so that ``out_proj`` gets the Linear rule. Any other
    call (cross-attention, unbatched input) runs the module's own forward and raises, since its
    in-projection would then go uncaptured; such a model is scored with ``params`` leaving the
    attention's in-projection out, or through the fallback by unregistering this rule.
    """

    params = ("in_proj_weight", "in_proj_bias")
    patches = True

    def applies(self, module):
        return (module._qkv_same_embed_dim and module.in_proj_weight is not None and module.bias_k is None
                and module.bias_v is None and not module.add_zero_attn)

    def patch(self, module, capture):
        H, E = module.num_heads, module.embed_dim
        hd = E // H

        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            if not (query is key and key is value) or query.dim() != 3:
                raise NotImplementedError(
                    "hessfree's rule for nn.MultiheadAttention covers batched self-attention (query, key and value "
                    "one tensor); this call is cross-attention or unbatched. Leave in_proj_weight / in_proj_bias "
                    "out of params=, or hessfree.grads.rules.unregister_rule(nn.MultiheadAttention) for the exact "
                    "vmap fallback")
            x = query if module.batch_first else query.transpose(0, 1)  # (B, T, E)
            B, T, _ = x.shape
            qkv = capture("in_proj", x, F.linear(x, module.in_proj_weight, module.in_proj_bias))
            q, k, v = qkv.view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
            mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                     target_type=q.dtype, check_other=False)
            if mask is not None:
                mask = mask.view(1, 1, T, T) if mask.dim() == 2 else mask.view(B, H, T, T)
            kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                    other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                    target_type=q.dtype)
            if kpm is not None:
                kpm = kpm.view(B, 1, 1, T)
                mask = kpm if mask is None else mask + kpm
            scores = torch.matmul(q * hd ** -0.5, k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            w = torch.softmax(scores, dim=-1)
            o = torch.matmul(w, v).transpose(1, 2).reshape(B, T, E)
            out = module.out_proj(o)
            if not module.batch_first:
                out = out.transpose(0, 1)
            weights = (w.mean(1) if average_attn_weights else w) if need_weights else None
            return out, weights

        return forward

    def block(self, module, calls, sel):
        E = module.embed_dim
        a = [x.reshape(sel.B, -1, E) for x, _, tag in calls if tag == "in_proj"]
        g = [go.reshape(sel.B, -1, 3 * E) for _, go, tag in calls if tag == "in_proj"]
        names = Selected({"weight": sel.names.get("in_proj_weight"), "bias": sel.names.get("in_proj_bias")},
                         sel.B, (3 * E, E), sel.dtype, sel.device)
        return _linear_block(a, g, E, 3 * E, names)


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
    nn.MultiheadAttention: MultiheadAttentionRule(),
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


def unregister_rule(module_type: type) -> None:
    """Remove the rule of ``module_type``: its parameters then go through the vmap fallback."""
    _RULES.pop(module_type, None)


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
