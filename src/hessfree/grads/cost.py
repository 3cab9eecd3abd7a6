"""The per-layer cost model: which exact form a block uses for each product, from the shapes alone.

Every form here gives the same numbers up to rounding; the model only decides which is cheapest.
Costs are counted in multiply-adds of a dense matrix product (``GEMM``); an element written or
read by any other operation (an elementwise product, a reduction, a gather, a zero fill) costs
``MEMORY_OP`` of them. On one core of the development machine those memory-bound operations cost
20 (a scatter) to 150 (a gather) multiply-adds per element, hence 50; run
``benchmarks/cost_model.py`` to see the ratios on another machine. A wrong constant costs time,
never accuracy.

Shapes: ``B`` and ``M`` samples on the two sides, ``T`` and ``S`` their positions per sample
(sequence length, or output pixels for a convolution), ``d_in`` / ``d_out`` a linear map's sizes
(the bias counted as one more input), ``V`` × ``D`` an embedding table.

Dot products with one parameter-shaped vector (a target's gradient) need no choice: applying the
vector to every input position costs B·T·d_in·d_out + B·T·d_out, forming the gradients first
costs the same plus B·d_in·d_out, so the blocks always take the factorised form (an embedding
reads the vector's rows at its ids, B·T·D).

A side marked ``kept`` is reused against many others (the test side of a train × test matrix,
bound once per checkpoint): its materialisation is paid once and counted as free here, provided
it fits :data:`MAX_DENSE`.
"""
from __future__ import annotations

GEMM = 1.0
MEMORY_OP = 50.0
# Largest materialised per-sample gradient tensor (elements) a block forms: 128 MB in float32.
MAX_DENSE = 1 << 25


def linear_sq_norms(T: int, d_in: int, d_out: int) -> str:
    """'factorised' (Σ_{t,s}(a_t·a_s)(g_t·g_s): T²(d_in + d_out) + T² element ops per sample) or
    'dense' (form Σ_t g_t a_tᵀ: T·d_in·d_out, then square and sum d_in·d_out)."""
    factorised = T * T * (d_in + d_out) * GEMM + 2 * T * T * MEMORY_OP
    dense = T * d_in * d_out * GEMM + 2 * d_in * d_out * MEMORY_OP
    return "factorised" if factorised <= dense else "dense"


def linear_gram(B: int, M: int, T: int, S: int, d_in: int, d_out: int, *, kept: tuple[bool, bool] = (False, False)
                ) -> str:
    """'factorised' or 'dense' for the (B, M) inner products of two linear blocks.

    factorised: (a·a') and (g·g') for every pair of positions, B·M·T·S·(d_in + d_out), then their
    product summed over the positions (3 element ops per entry of the (B, M, T, S) temporary);
    dense: each side's per-sample gradients formed (B·T·d_in·d_out, written once), then one
    B·M·d_in·d_out product. A ``kept`` side that fits is formed once for all the products it enters.
    """
    P = d_in * d_out
    factorised = B * M * T * S * (d_in + d_out) * GEMM + 3 * B * M * T * S * MEMORY_OP
    dense = B * M * P * GEMM
    for (rows, pos), keep in zip(((B, T), (M, S)), kept):
        if rows * P > MAX_DENSE:
            return "factorised"
        if not keep:
            dense += rows * pos * P * GEMM + rows * P * MEMORY_OP
    return "factorised" if factorised <= dense else "dense"


def embedding_gram(B: int, M: int, T: int, S: int, V: int, D: int, *, kept: tuple[bool, bool] = (False, False)
                   ) -> str:
    """'factorised', 'read' or 'dense' for the (B, M) inner products of two embedding blocks.

    factorised: Σ_{t,s}[id_t = id'_s](g_t·g'_s), B·M·T·S·D multiply-adds and 3 element ops per
    entry of the (B, M, T, S) temporary; read: the first side's per-sample gradient rows
    (kept, B × V × D) read at the other side's ids, B·M·S·D gathered elements; dense: both sides
    formed (a zero fill of rows × V × D and a scatter of their rows × positions × D gradients),
    then one B·M·V·D product.
    """
    factorised = B * M * T * S * D * GEMM + 3 * B * M * T * S * MEMORY_OP
    best, cost = "factorised", factorised
    fits = [rows * V * D <= MAX_DENSE for rows in (B, M)]
    if kept[0] and fits[0]:
        read = 2 * B * M * S * D * MEMORY_OP
        if read < cost:
            best, cost = "read", read
    if all(fits):
        dense = B * M * V * D * GEMM
        for (rows, pos), keep in zip(((B, T), (M, S)), kept):
            if not keep:
                dense += (rows * V * D + rows * pos * D) * MEMORY_OP
        if dense < cost:
            best = "dense"
    return best
