"""Dynamic Influence Tracker (spec dit.md): the influence of every training sample over any time
window of a recorded SGD run, by one backward (adjoint) sweep of exact Hessian-vector products.

Training: θ[t+1] = θ[t] − (η_t/|S_t|) Σ_{i∈S_t} ∇l_i(θ[t]), l_i including the run's explicit L2
term (α/2)||θ||². Removing sample j (same batches, same rates, denominator kept at |S_t|) moves
the trajectory by δ_j[t], to first order

    δ_j[0] = 0,   δ_j[t+1] = (I − η_t H[t]) δ_j[t] + 1[j∈S_t] (η_t/|S_t|) ∇l_j(θ[t])

with H[t] the Hessian of the batch-mean training loss at θ[t]. For a query F with q(t) = ∇F(θ[t]):

- ``mode="delta"`` (j removed from the whole run; the window picks when the change is measured):
  I_j[t1, t2] = ⟨q(t2), δ_j[t2]⟩ − ⟨q(t1), δ_j[t1]⟩ — windows telescope;
- ``mode="window_removal"`` (j removed only for steps t1 ≤ t < t2): I_j = ⟨q(t2), δ̃_j[t2]⟩.

Sign: score = F(removed) − F(original); for a loss query negative = harmful (the project's
convention). Because every H[t] is symmetric, the query is carried backwards (u ← u − η_t H[t] u)
instead of N deviations forwards, so one sweep scores all N samples: per step one batched
double-backprop pass gives H[t]u for every live adjoint and ⟨u, ∇l_j⟩ for every sample of the
batch (see :meth:`FunctionalRun.hvp_and_dots`). Everything is float64; H is never formed, inverted or damped.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hessfree.datasets import is_plain_tensor_dataset, iter_batches, to_device
from hessfree.errors import InputError, NonFiniteError
from hessfree.grads.engine import CallWrapper, _TaskModule, check_dtype_device
from hessfree.queries import Query, resolve_query
from hessfree.run import Run, _require_trajectory, check_replay_dataset, check_trajectory_model, replay_states, \
    unflatten
from hessfree.grads.select import frequency_scaled_layer
from hessfree.scores import SIGN_CONVENTION, Scores
from hessfree.tasks import check_model_on, safe_call

MODES = ("delta", "window_removal")


# ----------------------------------------------------------------------------- functional view
class _QueryModule(CallWrapper):
    def __init__(self, model: nn.Module, query: Query, task: Any):
        super().__init__()
        self.model, self.query, self.task = model, query, task

    def forward(self) -> Tensor:
        return self.query.value(self.model, self.task)


class FunctionalRun:
    """The run's model as functions of the flat trainable-parameter vector θ, in ``dtype``."""

    def __init__(self, run: Run, dataset: Dataset, dtype: torch.dtype = torch.float64, device: Any = None):
        traj = _require_trajectory(run)
        dtype, self.device = check_dtype_device(dtype, device, (torch.float64, torch.float32))
        self.run, self.traj, self.dataset, self.dtype = run, traj, dataset, dtype
        self.task, self.log, self.l2 = run.task, run.step_log, traj.l2
        model = copy.deepcopy(run.model)
        model.load_state_dict(traj.base)
        for mod in model.modules():  # a sparse gradient cannot flow back into the flat θ; the forward is the same
            if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
                mod.sparse = False
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self._task_module = _TaskModule(self.model, self.task)
        self.names, self.shapes = traj.names, traj.shapes
        self._tensors: list[Tensor] | None = None

    def params(self, theta: Tensor, prefix: str = "") -> dict[str, Tensor]:
        return {prefix + n: v for n, v in zip(self.names, unflatten(theta, self.shapes))}

    def batch(self, t: int) -> tuple[Any, Any, np.ndarray]:
        """(inputs, targets, dataset positions) of step t, cast to ``dtype``."""
        pos = self.log.positions[t]
        if self._tensors is None and is_plain_tensor_dataset(self.dataset):
            # one cast of the whole (small) tensor dataset instead of one per step
            self._tensors = [to_device(v, self.device, self.dtype) for v in self.dataset.tensors]
        if self._tensors is not None:
            b: Any = tuple(v[torch.as_tensor(pos, device=self.device)] for v in self._tensors)
        else:
            _, b = next(iter_batches(self.dataset, len(pos), pos))
            b = to_device(b, self.device, self.dtype)
        x, y = self.task.split(b)
        return x, y, pos

    def losses(self, theta: Tensor, x: Any, y: Any) -> Tensor:
        """(B,) per-sample losses WITHOUT the L2 term (through the Task's own forward, as in training)."""
        params = self.params(theta, "model.")
        out = safe_call(self.model, lambda xs: functional_call(self._task_module, params, (xs,)), x)
        return self.task.per_sample_loss(out, y)

    def query_value(self, query: Query, theta: Tensor) -> Tensor:
        return functional_call(_QueryModule(self.model, query, self.task), self.params(theta, "model."), ())

    def query_grad(self, query: Query, theta: Tensor) -> Tensor:
        th = theta.detach().to(self.device, self.dtype).requires_grad_(True)
        value = self.query_value(query, th)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise InputError(f"the query must return a scalar tensor, got {type(value).__name__}"
                             f"{tuple(value.shape) if isinstance(value, Tensor) else ''}")
        if not value.requires_grad:
            raise InputError("the query does not depend on the model's trainable parameters: its value has no "
                             "gradient, so every influence on it is zero; query something the model computes")
        (g,) = torch.autograd.grad(value.reshape(()), th, allow_unused=True)
        if g is None:
            raise InputError("the query does not depend on the model's trainable parameters")
        if not (math.isfinite(float(value.detach())) and math.isfinite(float(g.sum()))):
            raise NonFiniteError(f"non-finite query value ({float(value.detach())}) or gradient: check the query's data "
                                 "(inputs and labels) for NaN or infinite values")
        return g.detach()

    def hvp_and_dots(self, theta: Tensor, x: Any, y: Any, U: Tensor) -> tuple[Tensor, Tensor]:
        """For adjoints U (m, P): (H U (m, P), D (m, B)) with H the Hessian of the batch-mean loss
        incl. the L2 term at θ, and D[a, i] = ⟨U_a, ∇l_i(θ)⟩ with l_i incl. the L2 term.

        Double backprop with a per-sample weight vector w (= 1/B): h = ∇_θ Σ_i w_i l_i, and one more
        backward of ⟨h, u⟩ gives both ∂/∂θ = H_data u and ∂/∂w = (⟨∇l_i, u⟩)_i = J u — one forward,
        one backward and one double-backward per adjoint, nothing formed.
        """
        th = theta.detach().requires_grad_(True)
        losses = self.losses(th, x, y)
        B = losses.shape[0]
        w = torch.full((B,), 1.0 / B, dtype=losses.dtype, device=losses.device, requires_grad=True)
        (h,) = torch.autograd.grad(losses, th, grad_outputs=w, create_graph=True)
        m = U.shape[0]
        if m == 1:
            hu, dl = torch.autograd.grad(h, (th, w), grad_outputs=U[0])
            HU, D = hu[None], dl[None]
        else:
            HU, D = torch.autograd.grad(h, (th, w), grad_outputs=U, is_grads_batched=True)
        if self.l2:
            HU = HU + self.l2 * U
            D = D + self.l2 * (U @ theta)[:, None]
        return HU.detach(), D.detach()


class ThetaCache:
    """θ[t] in float64, read backwards: stored steps directly, the rest replayed a segment at a time
    (segments between stored steps, so at most K + 1 vectors are held)."""

    def __init__(self, fr: FunctionalRun):
        self.fr = fr
        self._lo, self._states = -1, None

    def __call__(self, t: int) -> Tensor:
        traj = self.fr.traj
        th = traj.stored(t)
        if th is None:
            if self._states is None or not self._lo <= t < self._lo + len(self._states):
                i = int(np.searchsorted(traj.steps, t, side="right")) - 1
                lo, hi = int(traj.steps[i]), int(traj.steps[i + 1])
                states = replay_states(self.fr.run, self.fr.dataset, lo, hi)
                if not torch.equal(states[-1], traj.thetas[i + 1]):
                    raise RuntimeError(
                        f"replaying steps {lo}..{hi} did not reproduce the recorded θ[{hi}] (max difference "
                        f"{float((states[-1] - traj.thetas[i + 1]).abs().max()):.3g}): the training is not "
                        "deterministic (a random module, another device or thread count?); record with "
                        "record='every_step' instead")
                self._states, self._lo = states, lo
            th = self._states[t - self._lo]
        return th.to(self.fr.device, self.fr.dtype)


# ----------------------------------------------------------------------------- windows
def steps_per_epoch(run: Run) -> int:
    spe = run.manifest.get("steps_per_epoch")
    if not spe:
        raise InputError("this run does not record its steps per epoch; give the window as (t1, t2) steps")
    return int(spe)


def resolve_window(run: Run, window: Any) -> tuple[int, int]:
    """``"all"`` → (0, T); ``"epoch:k"`` (0-based) → that epoch's steps; ``(t1, t2)`` with 0 ≤ t1 < t2 ≤ T."""
    T = _require_trajectory(run).n_steps
    if window == "all":
        return 0, T
    if isinstance(window, str) and window.startswith("epoch:"):
        try:
            k = int(window.split(":", 1)[1])
        except ValueError:
            raise InputError(f"window {window!r}: write 'epoch:k' with an integer epoch k (0-based)") from None
        spe = steps_per_epoch(run)
        epochs = -(-T // spe)
        if not 0 <= k < epochs:
            raise InputError(f"window {window!r} is outside the run: epochs are 0..{epochs - 1}")
        return k * spe, min(T, (k + 1) * spe)
    if isinstance(window, (tuple, list)) and len(window) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in window):
        t1, t2 = int(window[0]), int(window[1])
        if not 0 <= t1 < t2 <= T:
            raise InputError(f"window {tuple(window)} is outside the run: need 0 <= t1 < t2 <= {T} (steps)")
        return t1, t2
    raise InputError(f"window must be 'all', 'epoch:k' or a (t1, t2) pair of steps, got {window!r}")


def epoch_windows(run: Run) -> list[tuple[int, int]]:
    T, spe = _require_trajectory(run).n_steps, steps_per_epoch(run)
    return [(a, min(T, a + spe)) for a in range(0, T, spe)]


# ----------------------------------------------------------------------------- the sweep
@dataclass
class _Adjoint:
    start: int  # u = coef-scaled q(θ[start]) enters before step start − 1 is processed
    stop: int  # last step processed
    coef: np.ndarray  # (W,) weight of this adjoint's contributions in each window's row
    u: Tensor | None = None


def _plan(windows: list[tuple[int, int]], mode: str) -> list[_Adjoint]:
    W = len(windows)
    adj: dict[tuple[int, int], np.ndarray] = {}
    for w, (t1, t2) in enumerate(windows):
        pieces = [(t2, t1, 1.0)] if mode == "window_removal" else [(t2, 0, 1.0)] + ([(t1, 0, -1.0)] if t1 > 0 else [])
        for start, stop, sign in pieces:
            adj.setdefault((start, stop), np.zeros(W))[w] += sign
    return [_Adjoint(s, e, c) for (s, e), c in adj.items() if np.any(c != 0)]


def sweep(fr: FunctionalRun, query: Query, windows: list[tuple[int, int]], mode: str,
          progress: bool = True, theta_at: ThetaCache | None = None) -> np.ndarray:
    """(W, N) window scores by one backward sweep. Adjoints that stop at the same step and carry
    proportional window weights share one vector (the spec's ``u ← u − q(t1)``). ``theta_at``: a
    ThetaCache of ``fr`` to reuse (its replayed segment, if any, is not replayed again)."""
    n = len(fr.log.sample_ids)
    plan = _plan(windows, mode)
    theta_at = theta_at if theta_at is not None else ThetaCache(fr)
    query.prepare(fr.dtype, fr.device)
    scores = torch.zeros(len(windows), n, dtype=torch.float64, device=fr.device)
    top, bottom = max(a.start for a in plan), min(a.stop for a in plan)
    live: list[_Adjoint] = []
    pending = sorted(plan, key=lambda a: -a.start)
    bar = tqdm(total=top - bottom, desc="dit sweep", disable=not progress, leave=False)
    for t in range(top - 1, bottom - 1, -1):
        while pending and pending[0].start == t + 1:
            a = pending.pop(0)
            q = fr.query_grad(query, theta_at(t + 1))
            host = next((b for b in live if b.stop == a.stop and _ratio(a.coef, b.coef) is not None), None)
            if host is not None:
                host.u = host.u + _ratio(a.coef, host.coef) * q
            else:
                a.u = q
                live.append(a)
        if live:
            theta = theta_at(t)
            x, y, pos = fr.batch(t)
            U = torch.stack([a.u for a in live])
            HU, D = fr.hvp_and_dots(theta, x, y, U)
            _check_step(D, HU, fr.log.sample_ids[pos], t)
            C = torch.as_tensor(np.stack([a.coef for a in live]), dtype=torch.float64, device=fr.device)  # (m, W)
            eta = float(fr.log.learning_rates[t])
            scores[:, torch.as_tensor(pos, device=fr.device)] += (eta / len(pos)) * (C.T @ D.double())
            for a, hu in zip(live, HU):
                a.u = a.u - eta * hu
            live = [a for a in live if a.stop < t]
        bar.update(1)
    bar.close()
    return scores.cpu().numpy()


def _check_step(D: Tensor, HU: Tensor, ids: np.ndarray, t: int) -> None:
    """A step's contributions must be finite: a NaN or infinite training sample makes its own dot
    products non-finite at the first step (going backwards) that uses it, so it is named there."""
    if math.isfinite(float(D.sum())) and math.isfinite(float(HU.sum())):  # one reduction each, the usual case
        return
    bad = (~torch.isfinite(D)).any(0).nonzero().flatten().tolist()
    named = [int(ids[i]) for i in bad] if bad else [int(i) for i in ids]
    raise NonFiniteError(f"non-finite gradient or Hessian-vector product at step {t} for sample id(s) {named[:10]}; "
                         "check those samples' inputs and labels")


def _ratio(a: np.ndarray, b: np.ndarray) -> float | None:
    """λ with a = λ b, or None."""
    i = int(np.argmax(np.abs(b)))
    if b[i] == 0:
        return None
    lam = a[i] / b[i]
    return float(lam) if np.allclose(a, lam * b, rtol=0, atol=1e-12) else None


# ----------------------------------------------------------------------------- public API
def _checked(run: Run, train_dataset: Dataset, query: Any, mode: str,
             dtype: torch.dtype = torch.float64) -> tuple[Query, FunctionalRun]:
    _require_trajectory(run)
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    check_trajectory_model(run.model)
    bags = [n for n, m in run.model.named_modules() if isinstance(m, nn.EmbeddingBag)]
    if bags:
        raise InputError(f"dit needs Hessian-vector products, and PyTorch has no double backward for nn.EmbeddingBag "
                         f"({bags[0]!r}); use nn.Embedding and reduce its output (e.g. .mean(1)) instead")
    layer = frequency_scaled_layer(run.model)
    if layer is not None:
        raise InputError(
            f"dit is not exact for embedding {layer!r} with scale_grad_by_freq=True: autograd divides its gradient by "
            "word counts within the batch, so removing one sample changes the others' gradients and the query's "
            "gradient is not the sum of its samples'. Train with scale_grad_by_freq=False to use dit")
    check_replay_dataset(run, train_dataset)
    check_dtype_device(dtype, None, (torch.float64, torch.float32))
    # the model runs on the training data and its labels suit the loss (one small forward)
    check_model_on(run.model, run.task, train_dataset, run.step_log.sample_ids, "training dataset")
    q = resolve_query(query)
    q.check(run.model, run.task)
    return q, FunctionalRun(run, train_dataset, dtype=dtype)


def _depends(fr: FunctionalRun, q: Query, t_end: int) -> ThetaCache:
    """Refuse a query that does not depend on θ (at the sweep's first step) before the sweep starts;
    the returned cache is handed on to the sweep."""
    theta_at = ThetaCache(fr)
    q.prepare(fr.dtype, fr.device)
    fr.query_grad(q, theta_at(t_end))
    return theta_at


def dit(run: Run, train_dataset: Dataset, query: Any, *, window: Any = "all", mode: str = "delta",
        progress: bool = True) -> Scores:
    """Influence of every training sample on ``query`` over ``window``: Scores (N,).

    ``window``: ``"all"``, ``"epoch:k"`` (0-based) or ``(t1, t2)`` steps (θ[t] is the model before
    step t). ``mode``: ``"delta"`` or ``"window_removal"`` (module docstring). Score = F(removed)
    − F(original): for a loss query negative = harmful. Needs a run recorded with
    ``hessfree.fit(..., record="every_step" | K)``.
    """
    t0 = time.perf_counter()
    q, fr = _checked(run, train_dataset, query, mode)
    t1, t2 = resolve_window(run, window)
    values = sweep(fr, q, [(t1, t2)], mode, progress, _depends(fr, q, t2))[0]
    return Scores(values, run.step_log.sample_ids, _meta(run, q, mode, [(t1, t2)], t0, window=window))


def dit_epochs(run: Run, train_dataset: Dataset, query: Any, *, mode: str = "delta",
               progress: bool = True) -> Scores:
    """Per-epoch window scores in one sweep: Scores of shape (epochs, N); row e is the window of
    epoch e (0-based). In ``delta`` mode the rows sum to the whole-run scores."""
    t0 = time.perf_counter()
    q, fr = _checked(run, train_dataset, query, mode)
    windows = epoch_windows(run)
    values = sweep(fr, q, windows, mode, progress, _depends(fr, q, windows[-1][1]))
    return Scores(values, run.step_log.sample_ids, _meta(run, q, mode, windows, t0, window="epochs"))


def _meta(run: Run, q: Query, mode: str, windows: list[tuple[int, int]], t0: float, **extra: Any) -> dict:
    return {"method": "dit", "kind": "influence", "goal": q.goal, "mode": mode, "query": q.describe(),
            "windows": [list(w) for w in windows], "n_steps": run.trajectory.n_steps,
            "record_every": run.trajectory.every, "l2": run.trajectory.l2, "dtype": "float64",
            "score": "F(removed) - F(original)", "sign_convention": SIGN_CONVENTION,
            "timing": {"total_s": time.perf_counter() - t0}, **extra}
