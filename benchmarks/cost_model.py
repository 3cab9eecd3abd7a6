"""The constants behind hessfree's per-layer cost model, measured on this machine.

1. ``MEMORY_OP``: how many multiply-adds of a dense matrix product cost as much as one element of a
   memory-bound operation (an elementwise product and reduction, a gather, a zero fill, a scatter).
   ``hessfree.grads.cost`` uses 50; a wrong value costs time, never accuracy.
2. The two routes to a convolution's per-sample weight gradients: unfold + batched matrix product,
   and one grouped convolution's weight gradient with the batch as the groups (input channels
   zero-padded to a multiple of 8), on the layer shapes listed; the rule in
   ``hessfree.grads.rules.ConvRule`` takes the grouped route on CPU.

Each time is the median of 7 calls after a warm-up, ``torch.set_num_threads(--threads)``.

Usage::

    .venv/bin/python benchmarks/cost_model.py              # prints both tables
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def median_time(f: Callable[[], object], repeats: int = 7) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_op_ratio() -> None:
    A = torch.randn(512, 512)
    mac = median_time(lambda: A @ A) / 512 ** 3
    x, y = torch.randn(64, 128, 32, 32), torch.randn(64, 128, 32, 32)
    table = torch.randn(128 * 1100, 64)
    ids = torch.randint(0, len(table), (256 * 32 * 8,))
    src, rows = torch.randn(256 * 32, 64), torch.randint(0, 256 * 1100, (256 * 32,))
    zeros = torch.zeros(256 * 1100, 64)
    ops = {
        "elementwise product + reduction": (lambda: (x * y).sum((2, 3)), x.numel()),
        "gather of rows": (lambda: table[ids], ids.numel() * 64),
        "zero fill of a new tensor": (lambda: torch.zeros(256 * 1100, 64), zeros.numel()),
        "scatter (index_add_)": (lambda: zeros.index_add_(0, rows, src), src.numel()),
    }
    print(f"matrix product: {mac * 1e9:.3f} ns per multiply-add")
    for name, (f, n) in ops.items():
        per = median_time(f) / n
        print(f"{name:34s} {per * 1e9:6.2f} ns per element = {per / mac:6.0f} multiply-adds")


def conv_routes() -> None:
    print("\nB, C_in, H=W, C_out, k | unfold + bmm ms | grouped (padded to 8) ms | grouped / unfold")
    for B, c, H, c_out, k in [(256, 1, 28, 32, 5), (256, 3, 32, 16, 3), (256, 4, 32, 16, 3), (256, 3, 32, 64, 3),
                              (256, 5, 16, 32, 3), (256, 8, 32, 16, 3), (256, 16, 16, 32, 3), (256, 32, 8, 32, 3),
                              (256, 64, 8, 64, 3)]:
        x, g, p = torch.randn(B, c, H, H), torch.randn(B, c_out, H, H), k // 2
        c8 = c if c == 1 or c % 8 == 0 else -(-c // 8) * 8
        w = torch.empty(B * c_out, c8, k, k)

        def unfold() -> torch.Tensor:
            a = F.unfold(x, k, padding=p).transpose(1, 2)
            return torch.bmm(g.view(B, c_out, -1), a).reshape(B, -1)

        def grouped() -> torch.Tensor:
            xp = F.pad(x, (0, 0, 0, 0, 0, c8 - c)) if c8 != c else x
            r = torch.ops.aten.convolution_backward(g.reshape(1, B * c_out, H, H), xp.reshape(1, B * c8, H, H), w,
                                                    None, [1, 1], [p, p], [1, 1], False, [0, 0], B,
                                                    [False, True, False])[1]
            return r.view(B, c_out, c8, k * k)[:, :, :c].reshape(B, -1)

        t_u, t_g = median_time(unfold), median_time(grouped)
        print(f"{B}, {c}, {H}, {c_out}, {k} | {t_u * 1e3:.1f} | {t_g * 1e3:.1f} | {t_g / t_u:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    memory_op_ratio()
    conv_routes()


if __name__ == "__main__":
    main()
