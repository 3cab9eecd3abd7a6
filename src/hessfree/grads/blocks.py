"""Per-sample gradients of one parameter group, held in the cheapest exact form.

Every block answers three questions for a batch of B samples without ever forming more than it
must: squared norms (B,), inner products with another batch's block of the same group (B, M),
and inner products with one dense parameter-shaped vector (B,).

- :class:`LinearBlock` — a weight (and/or bias) used as ``y_t = W a_t + b`` at positions t:
  per-sample gradient ``G_i = Σ_t g_it a_itᵀ`` kept as the factors ``a`` (B, T, d_in) and
  ``g`` (B, T, d_out). nn.Linear (any leading dims) and nn.Conv1d/2d (via unfold) land here.
  The bias acts as a weight on a constant input 1 (it adds 1 to every input inner product, so
  no ones column is ever concatenated to the activations).
  For T = 1 the inner product of two samples is ``(a·a' + 1)(g·g')``; for T > 1 the cost model
  (:mod:`hessfree.grads.cost`) picks the factorised form ``Σ_{t,s}(a_t·a'_s)(g_t·g'_s)`` or the
  materialised ``d_out×d_in`` gradient for each product.
- :class:`EmbeddingBlock` — gradient rows at the looked-up ids: ``Σ_{t,s}[id_t = id'_s](g_t·g'_s)``,
  or, as the cost model picks, one side's materialised rows read at the other's ids, or both
  sides materialised and one matrix product.
- :class:`DenseBlock` — materialised per-sample gradients (B, P): the ``vmap(grad)`` fallback, and
  layers whose per-sample gradients are small beside their activations (the norm layers; a
  convolution over many output positions, as the cost model decides).

A block that is reused against many others (the test side of a train × test matrix) keeps what it
materialises; ``kept=(True, False)`` in ``gram`` tells the cost model so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hessfree.grads import cost

# Upper bound on elements of a temporary (rows, M, T, S) tensor in factorised sequence products.
_MAX_TEMP = 1 << 24


def _row_chunk(rows: int, per_row: int) -> int:
    """Rows per chunk so that a (rows, per_row) temporary stays under _MAX_TEMP elements."""
    return max(1, _MAX_TEMP // max(1, per_row))


def _sq_rows(x: Tensor) -> Tensor:
    """(B,) squared L2 norm of each row of (B, d): one fused reduction (vecdot(x, x) forms x*x
    first, 1.3–3× slower on CPU for d ≥ 64). Half precision keeps vecdot: rounding the norm
    before squaring it would cost a further ~1e-3."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vecdot(x, x)
    return torch.linalg.vector_norm(x, dim=1).square_()


@dataclass
class LinearBlock:
    a: Tensor | None  # (B, T, d_in) layer inputs; None when only the bias is selected
    g: Tensor  # (B, T, d_out) gradients of the summed per-sample loss w.r.t. the layer output
    weight: str | None  # parameter names (None when not selected)
    bias: str | None
    weight_shape: tuple[int, ...] | None = None
    transposed: bool = False  # the weight is stored (d_in, d_out), as y = x W + b (e.g. GPT-2's Conv1D)
    _dense: Tensor | None = field(default=None, repr=False)

    @property
    def _one(self) -> float:
        return 1.0 if self.bias is not None else 0.0

    @property
    def d_in(self) -> int:
        return (self.a.shape[2] if self.a is not None else 0) + (self.bias is not None)

    def _input_products(self, other: "LinearBlock", pattern: str) -> Tensor | float:
        if self.a is None or other.a is None:
            return self._one
        prod = torch.einsum(pattern, self.a, other.a)
        return prod + 1.0 if self.bias is not None else prod

    def materialise(self, keep: bool = False) -> Tensor:
        """(B, d_out, d_in') per-sample gradients, the bias as the last column; ``keep``: store them
        with the block for later products (a block reused against many others)."""
        if self._dense is not None:
            return self._dense
        # the bias column is Σ_t g_t: appended to the (B, d_out, d_in) product, never as a column of
        # ones on the (B, T, d_in) inputs (a copy of every input position)
        bias = self.g.sum(1).unsqueeze(2) if self.bias is not None else None
        if self.a is None:
            dense = bias
        else:
            dense = torch.bmm(self.g.transpose(1, 2), self.a)
            if bias is not None:
                dense = torch.cat([dense, bias], 2)
        if keep:
            self._dense = dense
        return dense

    def sq_norms(self) -> Tensor:
        g = self.g
        T, d_out = g.shape[1], g.shape[2]
        if T == 1:  # (|a|² + [bias]) |g|², in three ops
            g2 = g.view(g.shape[0], d_out)
            gg = _sq_rows(g2)
            if self.a is None:
                return gg
            a2 = self.a.view(self.a.shape[0], self.a.shape[2])
            aa = _sq_rows(a2)
            return torch.addcmul(gg, aa, gg) if self.bias is not None else aa * gg
        if self._dense is None and cost.linear_sq_norms(T, self.d_in, d_out) == "factorised":
            aa = self._input_products(self, "btd,bsd->bts")
            return (aa * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return self.materialise().pow(2).sum((1, 2))

    def gram(self, other: "LinearBlock", kept: tuple[bool, bool] = (False, False)) -> Tensor:
        """(B, M) inner products with ``other``'s per-sample gradients; ``kept``: which sides are
        reused against many others (their materialised gradients are kept; see :mod:`cost`)."""
        g, g2 = self.g, other.g
        T, S, d_out = g.shape[1], g2.shape[1], g.shape[2]
        if T == 1 and S == 1:
            aa = (self.a[:, 0] @ other.a[:, 0].T + self._one
                  if self.a is not None and other.a is not None else self._one)
            return aa * (g[:, 0] @ g2[:, 0].T)
        kept = (kept[0] or self._dense is not None, kept[1] or other._dense is not None)
        if cost.linear_gram(g.shape[0], g2.shape[0], T, S, self.d_in, d_out, kept=kept) == "factorised":
            out = g.new_empty(g.shape[0], g2.shape[0])
            step = _row_chunk(g.shape[0], g2.shape[0] * T * S)
            for i in range(0, g.shape[0], step):
                sl = slice(i, i + step)
                part = self.select(sl)
                aa = part._input_products(other, "itd,jsd->ijts")
                out[sl] = (aa * torch.einsum("itd,jsd->ijts", g[sl], g2)).sum((2, 3))
            return out
        return self.materialise(kept[0]).flatten(1) @ other.materialise(kept[1]).flatten(1).T

    def dot(self, q: dict[str, Tensor]) -> Tensor:
        d_out = self.g.shape[2]
        val: Tensor | float = 0.0
        if self.weight is not None:
            w = q[self.weight]
            val = self.a @ (w.reshape(-1, d_out) if self.transposed else w.reshape(d_out, -1).T)  # type: ignore[operator]
        if self.bias is not None:
            val = val + q[self.bias].reshape(d_out)
        return (val * self.g).sum((1, 2))

    def per_param(self) -> dict[str, Tensor]:
        """Materialised per-sample gradients: parameter name -> (B, numel), in the parameter's own
        (row-major) layout."""
        out: dict[str, Tensor] = {}
        if self.weight is not None:
            if self.transposed:
                out[self.weight] = torch.bmm(self.a.transpose(1, 2), self.g).flatten(1)  # type: ignore[union-attr]
            else:
                out[self.weight] = torch.bmm(self.g.transpose(1, 2), self.a).flatten(1)  # type: ignore[arg-type]
        if self.bias is not None:
            out[self.bias] = self.g.sum(1)
        return out

    def as_dense(self) -> "DenseBlock":
        """The same per-sample gradients materialised, as a :class:`DenseBlock`."""
        parts = self.per_param()
        names = [n for n in (self.weight, self.bias) if n is not None]
        return DenseBlock(torch.cat([parts[n] for n in names], 1), names, [parts[n].shape[1] for n in names])

    def total(self) -> dict[str, Tensor]:
        """Σ over the samples of each parameter's gradient, flattened in the parameter's layout."""
        g = self.g.flatten(0, 1)
        out: dict[str, Tensor] = {}
        if self.weight is not None:
            a = self.a.flatten(0, 1)  # type: ignore[union-attr]
            out[self.weight] = (a.T @ g if self.transposed else g.T @ a).reshape(-1)
        if self.bias is not None:
            out[self.bias] = g.sum(0)
        return out

    def select(self, rows: Tensor | slice) -> "LinearBlock":
        return LinearBlock(self.a[rows] if self.a is not None else None, self.g[rows], self.weight, self.bias,
                           self.weight_shape, self.transposed, None if self._dense is None else self._dense[rows])


@dataclass
class EmbeddingBlock:
    ids: Tensor  # (B, T) looked-up row ids
    g: Tensor  # (B, T, D) output gradients (zero at padding_idx positions)
    weight: str
    vocab: int = 0  # rows of the embedding table (needed only to materialise)
    _dense: Tensor | None = field(default=None, repr=False)  # (B, V, D) per-sample gradients, once formed

    def _form_dense(self, keep: bool) -> Tensor:
        """(B, V, D) per-sample gradients; ``keep``: store them with the block for later products."""
        if self._dense is not None:
            return self._dense
        B, T, D = self.g.shape
        dense = self.per_param()[self.weight].view(B, self.vocab, D)
        if keep:
            self._dense = dense
        return dense

    def sq_norms(self) -> Tensor:
        same = (self.ids[:, :, None] == self.ids[:, None, :]).to(self.g.dtype)
        return (same * torch.bmm(self.g, self.g.transpose(1, 2))).sum((1, 2))

    def gram(self, other: "EmbeddingBlock", kept: tuple[bool, bool] = (False, False)) -> Tensor:
        """(B, M) inner products with ``other``'s per-sample gradients; ``kept``: which sides are
        reused against many others (their materialised rows are kept; see :mod:`cost`)."""
        B, T = self.ids.shape
        M, S = other.ids.shape
        D = self.g.shape[2]
        V = self.vocab if self.vocab >= 1 and other.vocab >= 1 else 0
        kept = (kept[0] or self._dense is not None, kept[1] or other._dense is not None)
        form = cost.embedding_gram(B, M, T, S, V, D, kept=kept) if V else "factorised"
        if form == "read":
            return self._read(other, B, M, S, D)
        if form == "dense":
            return self._form_dense(kept[0]).reshape(B, -1) @ other._form_dense(kept[1]).reshape(M, -1).T
        out = self.g.new_empty(B, M)
        step = _row_chunk(B, M * T * S)
        for i in range(0, B, step):
            sl = slice(i, i + step)
            same = (self.ids[sl, None, :, None] == other.ids[None, :, None, :]).to(self.g.dtype)
            gg = torch.einsum("itd,jsd->ijts", self.g[sl], other.g)
            out[sl] = (same * gg).sum((2, 3))
        return out

    def _read(self, other: "EmbeddingBlock", B: int, M: int, S: int, D: int) -> Tensor:
        """Σ_s dense_i[id'_s]·g'_s: this side's per-sample gradient rows read at ``other``'s ids."""
        dense = self._form_dense(True)
        out = self.g.new_empty(B, M)
        step = _row_chunk(B, M * S * D)
        flat_ids, flat_g = other.ids.reshape(-1), other.g.reshape(M * S, D)
        for i in range(0, B, step):
            rows = dense[i:i + step, flat_ids]  # (rows, M·S, D)
            out[i:i + step] = (rows * flat_g).sum(2).view(-1, M, S).sum(2)
        return out

    def dot(self, q: dict[str, Tensor]) -> Tensor:
        return (q[self.weight][self.ids] * self.g).sum((1, 2))

    def per_param(self) -> dict[str, Tensor]:
        B, T, D = self.g.shape
        V = self.vocab
        if V < 1:
            raise ValueError("this EmbeddingBlock was built without its vocabulary size")
        dense = self.g.new_zeros(B, V, D)
        flat = dense.view(B * V, D)
        rows = (self.ids + torch.arange(B, device=self.ids.device)[:, None] * V).reshape(-1)
        flat.index_add_(0, rows, self.g.reshape(B * T, D))
        return {self.weight: dense.flatten(1)}

    def total(self) -> dict[str, Tensor]:
        D = self.g.shape[2]
        W = self.g.new_zeros(max(self.vocab, int(self.ids.max()) + 1 if self.ids.numel() else 1), D)
        W.index_add_(0, self.ids.reshape(-1), self.g.reshape(-1, D))
        return {self.weight: W.reshape(-1)}

    def select(self, rows: Tensor | slice) -> "EmbeddingBlock":
        return EmbeddingBlock(self.ids[rows], self.g[rows], self.weight, self.vocab,
                              None if self._dense is None else self._dense[rows])


@dataclass
class DenseBlock:
    G: Tensor  # (B, P) flattened per-sample gradients of the parameters in ``names`` order
    names: list[str]
    sizes: list[int] | None = None  # numel of each parameter in ``names`` (needed only to split G)

    def sq_norms(self) -> Tensor:
        return self.G.pow(2).sum(1)

    def gram(self, other: "DenseBlock", kept: tuple[bool, bool] = (False, False)) -> Tensor:
        return self.G @ other.G.T

    def dot(self, q: dict[str, Tensor]) -> Tensor:
        return self.G @ torch.cat([q[n].reshape(-1) for n in self.names])

    def per_param(self) -> dict[str, Tensor]:
        if self.sizes is None:
            raise ValueError("this DenseBlock was built without its parameter sizes")
        return dict(zip(self.names, self.G.split(self.sizes, 1)))

    def total(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.G.sum(0).split(self.sizes))) if self.sizes else {}

    def select(self, rows: Tensor | slice) -> "DenseBlock":
        return DenseBlock(self.G[rows], self.names, self.sizes)


Block = LinearBlock | EmbeddingBlock | DenseBlock


@dataclass
class BatchGrads:
    """Per-sample gradients of one batch over all selected parameters, as a list of blocks.

    Blocks of two BatchGrads from the same engine line up one to one, so inner products are
    sums of block-wise products. ``group`` > 1: the rows hold the batch at ``group`` checkpoints,
    checkpoint-major (rows k·B … (k+1)·B − 1 are checkpoint k; see :mod:`hessfree.grads.stacked`).
    """

    blocks: list[Block]
    losses: Tensor  # (group·B,) per-sample losses (detached)
    group: int = 1
    _slabs: dict[int, "BatchGrads"] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.losses.shape[0]

    def slab(self, k: int) -> "BatchGrads":
        """The rows of the group's k-th checkpoint, as a one-checkpoint BatchGrads (the same object
        on every call, so what its blocks materialise is kept with it)."""
        if self.group == 1:
            return self
        if k not in self._slabs:
            b = len(self) // self.group
            rows = slice(k * b, (k + 1) * b)
            self._slabs[k] = BatchGrads([blk.select(rows) for blk in self.blocks], self.losses[rows])
        return self._slabs[k]

    def weighted_gram(self, other: "BatchGrads", weights: Tensor, keep_other: bool = False) -> Tensor:
        """(B, M) float64 Σ_k weights[k] · (this batch at checkpoint k)·(``other`` at checkpoint k),
        for two BatchGrads of the same checkpoint group. This side is the one reused against many
        others (what it materialises is kept); ``keep_other``: ``other`` is reused too (against
        several chunks of this side's kind)."""
        K = self.group
        if other.group != K or len(weights) != K:
            raise ValueError("weighted_gram needs two BatchGrads of the same checkpoint group")
        B, M = len(self) // K, len(other) // K
        per_k: Tensor | None = None  # (K, B, M): Σ over blocks, in the gradients' dtype
        mine, theirs = [self.slab(k) for k in range(K)], [other.slab(k) for k in range(K)]
        for j, (b, o) in enumerate(zip(self.blocks, other.blocks)):
            if isinstance(b, LinearBlock) and isinstance(o, LinearBlock) and b.g.shape[1] == o.g.shape[1] == 1:
                # all K checkpoints in two batched products: (a·a' + [1]) (g·g')
                part = torch.bmm(b.g.reshape(K, B, -1), o.g.reshape(K, M, -1).transpose(1, 2))
                if b.a is not None and o.a is not None:
                    aa = torch.bmm(b.a.reshape(K, B, -1), o.a.reshape(K, M, -1).transpose(1, 2))
                    part = torch.addcmul(part, part, aa) if b.bias is not None else part * aa
            else:  # this side is reused against every batch of the other: what it materialises is kept
                part = torch.stack([mk.blocks[j].gram(tk.blocks[j], kept=(True, keep_other))  # type: ignore[arg-type]
                                    for mk, tk in zip(mine, theirs)])
            per_k = part if per_k is None else per_k.add_(part)
        assert per_k is not None
        if K == 1:
            return per_k[0].double().mul_(float(weights[0]))
        return torch.einsum("k,kbm->bm", weights.to(torch.float64), per_k.double())

    def sq_norms(self) -> Tensor:
        total = self.blocks[0].sq_norms()
        for b in self.blocks[1:]:
            total = total + b.sq_norms()
        return total

    def gram(self, other: "BatchGrads") -> Tensor:
        """(B, M) inner products between this batch's samples and ``other``'s."""
        return sum(b.gram(o) for b, o in zip(self.blocks, other.blocks))  # type: ignore[arg-type,return-value]

    def dense(self, names: list[str]) -> Tensor:
        """(B, P) materialised per-sample gradients, parameters in ``names`` order, each flattened
        row-major (the layout of ``torch.cat([p.flatten() for p in params])``)."""
        parts: dict[str, Tensor] = {}
        for b in self.blocks:
            parts.update(b.per_param())
        return torch.cat([parts[n] for n in names], 1)

    def dot(self, q: dict[str, Tensor]) -> Tensor:
        """(B,) inner products with one dense gradient ``q`` (parameter name -> tensor)."""
        return sum(b.dot(q) for b in self.blocks)  # type: ignore[return-value]


def concat(parts: list[BatchGrads]) -> BatchGrads | None:
    """One BatchGrads holding the samples of ``parts`` (in order), or None if their shapes differ
    (e.g. sequences of different lengths). Parts of one checkpoint group stay checkpoint-major."""
    if len(parts) == 1:
        return parts[0]
    K = parts[0].group
    if K > 1:
        if any(p.group != K for p in parts):
            return None
        joined = concat([p.slab(k) for k in range(K) for p in parts])
        return None if joined is None else BatchGrads(joined.blocks, joined.losses, group=K)
    blocks: list[Block] = []
    for group in zip(*(p.blocks for p in parts)):
        first = group[0]
        if isinstance(first, LinearBlock):
            if len({b.g.shape[1] for b in group}) != 1:  # type: ignore[union-attr]
                return None
            a = None if first.a is None else torch.cat([b.a for b in group])  # type: ignore[union-attr,misc]
            blocks.append(LinearBlock(a, torch.cat([b.g for b in group]), first.weight, first.bias,
                                      first.weight_shape, first.transposed))
        elif isinstance(first, EmbeddingBlock):
            if len({b.ids.shape[1] for b in group}) != 1:  # type: ignore[union-attr]
                return None
            blocks.append(EmbeddingBlock(torch.cat([b.ids for b in group]),  # type: ignore[union-attr]
                                         torch.cat([b.g for b in group]), first.weight, first.vocab))
        else:
            blocks.append(DenseBlock(torch.cat([b.G for b in group]), first.names, first.sizes))  # type: ignore[union-attr]
    return BatchGrads(blocks, torch.cat([p.losses for p in parts]))
