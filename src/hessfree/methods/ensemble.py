"""The perturbation ensemble (spec tracin.md §7): score the same trained model several times
under small fixed perturbations and combine.

Member 0 is the unperturbed model. Members 1..M−1 perturb either the inputs of every Linear /
Conv2d layer with a fixed dropout mask (rate drawn from U(0, rate), inverted-dropout scaling) or
every floating parameter of every checkpoint with fixed Gaussian noise N(0, σ²). A member's
perturbation is drawn once and is the same for every checkpoint, every batch, the target and the
training gradients. BatchNorm stays in eval mode (the engine scores in eval mode). The combined
score is the mean of the members (same ranking as the paper's sum) or the mean of per-member
z-scores; ``harmful(k)`` and the metrics always use the combined score.
"""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from hessfree.errors import InputError
from hessfree.run import Checkpoint, Run
from hessfree.scores import Scores

ScoreFn = Callable[..., Scores]


class _NoisyCheckpoint(Checkpoint):
    """A checkpoint whose floating parameters get a fixed additive noise on loading."""

    def __init__(self, base: Checkpoint, noise: dict[str, torch.Tensor]):
        super().__init__(base.source, base.learning_rate, base.step, base.prefix)
        self.noise = noise

    def state(self):
        state = super().state()
        return {k: (v + self.noise[k].to(v.dtype) if k in self.noise else v) for k, v in state.items()}


def _gaussian_run(run: Run, sigma: float, gen: torch.Generator) -> Run:
    drawn: dict[int, torch.Tensor] = {}  # one draw per tensor, shared by its aliases (tied weights)
    noise = {}
    for n, p in run.model.named_parameters(remove_duplicate=False):
        if p.requires_grad and p.dtype.is_floating_point:
            if id(p) not in drawn:
                drawn[id(p)] = torch.randn(p.shape, generator=gen, dtype=torch.float64) * sigma
            noise[n] = drawn[id(p)]
    return replace(run, checkpoints=[_NoisyCheckpoint(c, noise) for c in run.checkpoints])


class _InputDropout:
    """Forward pre-hooks that multiply each Linear / Conv2d input by a fixed mask / (1 − rate)."""

    def __init__(self, model: nn.Module, rate: float, gen: torch.Generator):
        self.handles = []
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                width = m.in_features if isinstance(m, nn.Linear) else m.in_channels
                keep = (torch.rand(width, generator=gen, dtype=torch.float64) >= rate).double() / (1 - rate)
                self.handles.append(m.register_forward_pre_hook(functools.partial(self._apply, keep=keep,
                                                                                  conv=isinstance(m, nn.Conv2d))))

    @staticmethod
    def _apply(module: nn.Module, args: tuple, keep: torch.Tensor, conv: bool):
        x = args[0]
        mask = keep.to(x.device, x.dtype)
        return (x * (mask[:, None, None] if conv else mask),) + tuple(args[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def ensemble(score_fn: ScoreFn, *, members: int = 5, perturbation: str = "dropout", rate: float = 0.01,
             sigma: float = 0.01, combine: str = "mean", seed: int = 0) -> ScoreFn:
    """Wrap a score function (``self_influence``, ``influence``, ``pairwise_influence``, …) into its
    perturbation ensemble; call the result with the same arguments as ``score_fn``.

    ``perturbation="dropout"``: member m > 0 drops inputs of every Linear / Conv2d with rate drawn
    from U(0, ``rate``); ``"gaussian"``: adds N(0, ``sigma``²) to every parameter. ``combine``:
    ``"mean"`` or ``"zscore"`` (each member standardised over all its entries first). With
    ``members=1`` the base scores are returned unchanged. Reruns with one ``seed`` are bit-identical.
    """
    if not callable(score_fn):
        raise InputError(f"score_fn must be a callable score function such as hessfree.self_influence, got "
                         f"{type(score_fn).__name__}")
    if isinstance(members, (bool, np.bool_)) or not isinstance(members, (int, np.integer)) or members < 1:
        raise InputError(f"members must be a positive integer, got {members!r}")
    if perturbation not in ("dropout", "gaussian"):
        raise InputError(f"perturbation must be 'dropout' or 'gaussian', got {perturbation!r}")
    if combine not in ("mean", "zscore"):
        raise InputError(f"combine must be 'mean' or 'zscore', got {combine!r}")
    for name, v in (("rate", rate), ("sigma", sigma)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise InputError(f"{name} must be a number, got {v!r}")
    if perturbation == "dropout" and not 0 < rate < 1:
        raise InputError(f"dropout rate must be in (0, 1), got {rate}")
    if perturbation == "gaussian" and not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    members = int(members)

    @functools.wraps(score_fn)
    def scored(run: Run, *args: Any, **kwargs: Any) -> Scores:
        if not isinstance(run, Run):
            raise InputError(f"the first argument must be a hessfree.Run, got {type(run).__name__}")
        t0 = time.perf_counter()
        streams = np.random.SeedSequence(seed).spawn(members)
        results, details = [], []
        for m in range(members):
            gen = torch.Generator().manual_seed(int(streams[m].generate_state(1)[0]))
            hooks = None
            member_run = run
            detail: dict[str, Any] = {"member": m}
            if m > 0 and perturbation == "gaussian":
                member_run = _gaussian_run(run, sigma, gen)
                detail["sigma"] = sigma
            elif m > 0:
                r = float(torch.rand((), generator=gen, dtype=torch.float64)) * rate
                detail["rate"] = r
                hooks = _InputDropout(run.model, r, gen)
            try:
                results.append(score_fn(member_run, *args, **kwargs))
            finally:
                if hooks is not None:
                    hooks.remove()
            details.append(detail)
        base = results[0]
        if members == 1:
            return base
        values = np.stack([r.values for r in results])
        if combine == "zscore":
            mu = values.reshape(members, -1).mean(1).reshape((members,) + (1,) * (values.ndim - 1))
            sd = values.reshape(members, -1).std(1).reshape(mu.shape)
            values = (values - mu) / np.where(sd > 0, sd, 1.0)
        meta = copy.deepcopy(base.meta)
        meta.update({"method": f"ensemble({base.meta.get('method')})", "base_method": base.meta.get("method"),
                     "ensemble": {"members": members, "perturbation": perturbation, "combine": combine, "seed": seed,
                                  "rate_max": rate if perturbation == "dropout" else None,
                                  "member_details": details}})
        meta["timing"] = {"total_s": time.perf_counter() - t0}
        return Scores(values.mean(0), base.sample_ids, meta, base.test_ids)

    return scored
