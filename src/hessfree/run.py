"""The Run: a recorded training (checkpoints, learning rates, step log) that every method reads.

Two ways in: :func:`fit` trains a model with plain mini-batch SGD and records everything;
:meth:`Run.from_checkpoints` wraps checkpoints a user already has. :meth:`Run.load` restores a
saved Run from its directory.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hessfree.datasets import dataset_size, iter_batches, sample_ids as dataset_sample_ids
from hessfree.errors import CheckpointMismatchError, InputError, NonFiniteError, RunDirectoryError
from hessfree.io import write_json, write_npz, write_safetensors
from hessfree.tasks import Task, check_dataset_labels, resolve_task

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_FORMAT = "hessfree-run"
RUN_VERSION = 1
StateDict = dict[str, Tensor]


# ----------------------------------------------------------------------------- checkpoints
def _unwrap(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """A dict with a ``state_dict`` key (a training-loop checkpoint) holds the state dict there."""
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return obj["state_dict"]
    return obj


def _prefix_to_strip(keys: Sequence[str], model: nn.Module) -> str:
    """``"module."`` for a checkpoint saved from a DistributedDataParallel wrapper of ``model``."""
    model_keys = list(model.state_dict())
    if keys and all(k.startswith("module.") for k in keys) and not all(k.startswith("module.") for k in model_keys):
        return "module."
    return ""


_READ_WHOLE_BYTES = 1 << 24  # safetensors files up to this size are read in one go, larger ones memory-mapped


def _load_file(path: Path) -> Mapping[str, Tensor]:
    if path.suffix == ".safetensors":
        try:
            if path.stat().st_size <= _READ_WHOLE_BYTES:  # ~3× faster than load_file for small checkpoints
                return load(path.read_bytes())
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointMismatchError(f"cannot read the checkpoint {path}: {exc}; was it moved, truncated or "
                                          "rewritten after the Run was made?") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointMismatchError(
            f"{path} is not a plain state dict (torch.load with weights_only=True refused it: it likely holds a "
            "pickled model object); save model.state_dict() instead") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return _unwrap(obj)


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as fh:  # reads the header only
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except SafetensorError as exc:
            raise CheckpointMismatchError(f"{path} is not a readable safetensors file: {exc}") from exc
    return {k: tuple(v.shape) for k, v in _load_file(path).items()}


def _strip(mapping: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in mapping.items()} if prefix else dict(mapping)


def _check_matches(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], label: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{label} does not match the model: missing keys {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}; pass checkpoints saved "
            "from this model's architecture (model.state_dict())"
        )
    wrong = [(k, shapes[k], expected[k]) for k in expected if tuple(shapes[k]) != expected[k]]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointMismatchError(
            f"{label}: tensor {k!r} has shape {tuple(got)} but the model expects {want} "
            f"({len(wrong)} mismatched tensor(s)); was the checkpoint saved from a different architecture?"
        )


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that name one tensor of the model (a module registered twice, tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _check_aliases(model: nn.Module, state: Mapping[str, Tensor], label: str) -> None:
    """The keys of one model tensor must hold one value: hessfree would read the first of them and
    ``load_state_dict`` the last."""
    for names in _alias_groups(model):
        present = [n for n in names if n in state]
        for other in present[1:]:
            a, b = state[present[0]], state[other]
            if a is not b and (a.shape != b.shape or a.dtype != b.dtype
                               or not torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)):
                raise CheckpointMismatchError(
                    f"{label}: {present[0]!r} and {other!r} are one tensor in the model (a module registered twice, "
                    "or tied weights) but hold different values in the checkpoint; save it from this model "
                    "(model.state_dict()) or make the two entries equal")


@dataclass
class Checkpoint:
    """One checkpoint: where its weights are, the learning rate in force there, and its step."""

    source: Mapping[str, Tensor] | Path
    learning_rate: float
    step: int | None = None  # number of SGD steps taken when it was saved (None if unknown)
    prefix: str = ""  # key prefix to strip on loading ("module." for a DDP checkpoint)

    def state(self) -> StateDict:
        raw = self.source if isinstance(self.source, Mapping) else _load_file(self.source)
        return _strip(raw, self.prefix)


@dataclass
class StepLog:
    """Every SGD step of a recorded run: the dataset positions of its batch and its learning rate."""

    positions: list[np.ndarray]
    learning_rates: np.ndarray
    sample_ids: np.ndarray  # (N,) id of each dataset position

    def __len__(self) -> int:
        return len(self.positions)

    def batch_ids(self, step: int) -> np.ndarray:
        """Sample ids of the batch used at ``step`` (0-based), in order."""
        return self.sample_ids[self.positions[step]]


@dataclass
class Trajectory:
    """The parameter trajectory θ[t] of a recorded run (θ[t] = trainable parameters BEFORE step t).

    ``thetas[i]`` is θ[``steps[i]``], flattened over ``names`` (the trainable parameters, in
    ``model.named_parameters()`` order). With ``every = 1`` every step is stored; with ``every = K``
    steps 0, K, 2K, … and the final step T, and :func:`replay_states` rebuilds the steps between by
    deterministic forward replay (bit-for-bit on CPU). ``base`` is the initial full state dict
    (buffers and frozen parameters, which SGD does not change). ``l2`` is the explicit L2 term α of
    the training loss ``mean_i l_i + (α/2)||θ||²``.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    steps: np.ndarray
    thetas: Tensor  # (n_stored, P)
    every: int
    l2: float
    base: StateDict

    @property
    def n_steps(self) -> int:
        return int(self.steps[-1])

    def stored(self, t: int) -> Tensor | None:
        """θ[t] if it was stored, else None."""
        i = int(np.searchsorted(self.steps, t))
        return self.thetas[i] if i < len(self.steps) and int(self.steps[i]) == t else None


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(theta: Tensor, shapes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [part.reshape(s) for part, s in zip(theta.split(sizes), shapes)]


# ----------------------------------------------------------------------------- Run
@dataclass
class Run:
    """A recorded training: the model architecture, its checkpoints with learning rates, the loss.

    ``model`` is used as the architecture only: methods evaluate it with each checkpoint's
    weights through ``torch.func.functional_call`` and never change its parameters.
    """

    model: nn.Module
    checkpoints: list[Checkpoint]
    task: Task
    run_dir: Path | None = None
    step_log: StepLog | None = None
    manifest: dict = field(default_factory=dict)
    trajectory: Trajectory | None = None

    @property
    def learning_rates(self) -> list[float]:
        return [c.learning_rate for c in self.checkpoints]

    def __len__(self) -> int:
        return len(self.checkpoints)

    def checkpoint_state(self, k: int) -> StateDict:
        """Load checkpoint ``k`` (negative indices count from the end) as a state dict."""
        state = self.checkpoints[k].state()
        _check_aliases(self.model, state, f"checkpoint {k % len(self.checkpoints)}")
        return state

    def __repr__(self) -> str:
        where = f", run_dir={str(self.run_dir)!r}" if self.run_dir else ""
        return (f"Run({len(self.checkpoints)} checkpoints, loss={self.task.name!r}, "
                f"learning_rates={self.learning_rates}{where})")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, model: nn.Module, checkpoints: Sequence[Mapping[str, Tensor] | str | os.PathLike],
                         learning_rates: Sequence[float] | float, *, loss: str | Task = "cross_entropy") -> "Run":
        """Wrap checkpoints a user already has.

        ``checkpoints``: state dicts, ``.safetensors`` files, or torch files (read with
        ``torch.load(weights_only=True)``; a dict with a ``state_dict`` key is accepted).
        ``learning_rates``: one per checkpoint (or one float for all). Keys and shapes are checked
        against ``model`` before anything else happens.
        """
        task = resolve_task(loss)
        if isinstance(checkpoints, (Mapping, str, os.PathLike)):
            raise InputError("checkpoints must be a list (of state dicts or file paths), even for one checkpoint")
        checkpoints = list(checkpoints)
        if not checkpoints:
            raise InputError("no checkpoints given: pass at least one state dict or checkpoint file")
        if isinstance(learning_rates, (int, float)):
            learning_rates = [float(learning_rates)] * len(checkpoints)
        learning_rates = [float(x) for x in learning_rates]
        if len(learning_rates) != len(checkpoints):
            raise InputError(
                f"{len(learning_rates)} learning rates for {len(checkpoints)} checkpoints: give one learning "
                "rate per checkpoint (the rate in force when it was saved), or a single float for all"
            )
        _check_learning_rates(learning_rates)
        wrapped = []
        for k, (src, eta) in enumerate(zip(checkpoints, learning_rates)):
            if isinstance(src, Mapping):
                state = _unwrap(src)
                prefix = _prefix_to_strip(list(state), model)
                _check_matches(model, _strip({n: tuple(t.shape) for n, t in state.items()}, prefix), f"checkpoint {k}")
                _check_aliases(model, _strip(state, prefix), f"checkpoint {k}")
                # clone: a live model.state_dict() aliases the parameters and would change under training
                source: Mapping[str, Tensor] | Path = {n: t.detach().clone() for n, t in state.items()}
            else:
                path = Path(src)
                if not path.is_file():
                    raise InputError(f"checkpoint file {path} does not exist")
                shapes = _shapes(path)
                prefix = _prefix_to_strip(list(shapes), model)
                _check_matches(model, _strip(shapes, prefix), f"checkpoint {k} ({path})")
                source = path
            wrapped.append(Checkpoint(source, eta, prefix=prefix))
        return cls(model=model, checkpoints=wrapped, task=task)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, model: nn.Module, *, loss: str | Task | None = None) -> "Run":
        """Restore a Run saved by :func:`fit`. ``loss`` is needed only for a custom Task."""
        run_dir = Path(run_dir)
        manifest_path = run_dir / MANIFEST
        if not manifest_path.is_file():
            raise RunDirectoryError(f"{run_dir} holds no {MANIFEST}: not a hessfree run directory")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != RUN_FORMAT:
            raise RunDirectoryError(f"{manifest_path} is not a hessfree run manifest")
        if manifest.get("status") != "complete":
            raise RunDirectoryError(
                f"{run_dir} is an incomplete recording (status {manifest.get('status')!r}): the training "
                "that wrote it did not finish; record it again"
            )
        if loss is None:
            name = manifest["task"]["name"]
            if name == "custom" or name not in ("cross_entropy", "bce"):
                raise InputError(f"this run was trained with a custom Task {name!r}: pass it as loss=")
            loss = name
        task = resolve_task(loss)
        ckpts = []
        for k, c in enumerate(manifest["checkpoints"]):
            path = run_dir / c["file"]
            _check_matches(model, _shapes(path), f"checkpoint {k} ({path})")
            ckpts.append(Checkpoint(path, float(c["learning_rate"]), c.get("step")))
        step_log = None
        if manifest.get("steps"):
            with np.load(run_dir / manifest["steps"], allow_pickle=False) as z:
                offsets = z["offsets"]
                flat = z["positions"]
                step_log = StepLog([flat[offsets[t]:offsets[t + 1]] for t in range(len(offsets) - 1)],
                                   z["lr"], z["sample_ids"])
        trajectory = None
        rec = manifest.get("trajectory")
        if rec:
            z = load_file(str(run_dir / rec["file"]))
            base = load_file(str(run_dir / manifest["initial"]))
            trajectory = Trajectory(list(rec["names"]), [tuple(x) for x in rec["shapes"]], z["steps"].numpy(),
                                    z["thetas"], int(rec["every"]), float(rec["l2"]), base)
        return cls(model=model, checkpoints=ckpts, task=task, run_dir=run_dir, step_log=step_log,
                   manifest=manifest, trajectory=trajectory)


def _check_learning_rates(rates: Sequence[float]) -> None:
    for k, eta in enumerate(rates):
        if not math.isfinite(eta) or eta <= 0:
            raise InputError(f"learning rate {eta} of checkpoint {k} must be a finite positive number")


# ----------------------------------------------------------------------------- fit
def fit(model: nn.Module, train_dataset: Dataset, *, loss: str | Task = "cross_entropy",
        lr: float | Callable[[int], float] = 0.1, epochs: int = 1, batch_size: int = 32,
        checkpoint_every: int | None = None, seed: int = 0, run_dir: str | os.PathLike | None = None,
        overwrite: bool = False, progress: bool = True, record: str | int | None = None, l2: float = 0.0,
        optimizer: str = "sgd", momentum: float = 0.0, weight_decay: float = 0.0) -> Run:
    """Train ``model`` in place with plain mini-batch SGD and record the run.

    Each step takes the mean per-sample loss of a batch and updates ``θ ← θ − η_t ∇``; batches are
    drawn from a fresh permutation per epoch seeded by ``seed`` (initialisation is the caller's:
    seed it before building the model). ``lr`` is a float or a schedule ``lr(step) -> float`` of
    the 0-based step. A checkpoint is saved every ``checkpoint_every`` steps (default: one epoch)
    and after the last step, with the learning rate of the step that produced it.

    With ``run_dir`` the run is written there (safetensors checkpoints, ``steps.npz`` step log,
    ``manifest.json``); recording happens in a temporary sibling directory renamed into place only
    when training finishes, so an existing run is never lost and a crash leaves a directory whose
    manifest says ``"status": "recording"``. Without ``run_dir`` checkpoints stay in memory.

    ``record="every_step"`` (or an int K) also records the parameter trajectory θ[t] before every
    step (or every K steps, the rest rebuilt by deterministic replay) for the Dynamic Influence
    Tracker (:func:`hessfree.dit`). ``l2=α`` adds an explicit ``(α/2)||θ||²`` (trainable
    parameters) to the training loss. The step is plain SGD only: ``optimizer`` other than
    ``"sgd"``, ``momentum`` or ``weight_decay`` are refused (the estimators do not cover them), and
    with ``record`` so are active dropout and BatchNorm.
    """
    task = resolve_task(loss)
    n = dataset_size(train_dataset, "training dataset")
    _check_plain_sgd(optimizer, momentum, weight_decay)
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 < 0:
        raise InputError(f"l2 must be a finite non-negative number (the α of (α/2)||θ||²), got {l2!r}")
    l2 = float(l2)
    every = _record_every(record)
    if every:
        check_trajectory_model(model)
    if not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    steps_per_epoch = math.ceil(n / batch_size)
    n_steps = steps_per_epoch * epochs
    if checkpoint_every is None:
        checkpoint_every = steps_per_epoch
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise InputError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every!r}")
    lr_fn: Callable[[int], float] = lr if callable(lr) else (lambda t, _lr=float(lr): _lr)
    _check_learning_rates([float(lr_fn(0))])
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    tensors = [p for _, p in params]
    if not params:
        raise InputError("the model has no trainable parameters (all have requires_grad=False)")
    ids = dataset_sample_ids(train_dataset)

    final_dir = Path(run_dir) if run_dir is not None else None
    work_dir = None
    if final_dir is not None:
        if final_dir.exists() and not final_dir.is_dir():
            raise RunDirectoryError(f"run_dir {final_dir} is an existing file, not a directory; choose another path")
        if final_dir.exists() and any(final_dir.iterdir()) and not overwrite:
            raise RunDirectoryError(
                f"{final_dir} already exists and is not empty; choose a new run_dir or pass overwrite=True "
                "(the old run is replaced only once the new one is complete)"
            )
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.recording-", dir=final_dir.parent))

    manifest: dict[str, Any] = {
        "format": RUN_FORMAT, "version": RUN_VERSION, "status": "recording",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "task": task.to_dict(), "optimizer": "sgd",
        "n_samples": n, "epochs": epochs, "batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
        "n_steps": n_steps, "checkpoint_every": checkpoint_every, "seed": seed,
        "lr": float(lr) if not callable(lr) else "schedule", "checkpoints": [], "steps": None,
        "l2": l2, "record": record if isinstance(record, str) or record is None else every, "trajectory": None,
    }
    # a copy only when the trajectory needs it (buffers and frozen tensors at θ[0])
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if every else model.state_dict()
    if work_dir is not None:
        write_json(work_dir / MANIFEST, manifest)
        write_safetensors(work_dir / "checkpoints" / "init.safetensors", initial_state)
        manifest["initial"] = "checkpoints/init.safetensors"

    was_training = model.training
    model.eval()  # no BatchNorm statistics updated by the label check
    try:
        check_dataset_labels(task, lambda x: task.safe_forward(model, x), task.split, train_dataset, ids)
    finally:
        model.train(was_training)
    gen = torch.Generator().manual_seed(seed)
    traj_steps: list[int] = []
    traj_thetas: list[Tensor] = []
    positions: list[np.ndarray] = []
    step_lrs: list[float] = []
    checkpoints: list[Checkpoint] = []
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, desc="fit", disable=not progress, leave=False)
    step = 0
    try:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen).numpy()
            for pos, batch in iter_batches(train_dataset, batch_size, order):
                eta = float(lr_fn(step))
                if not math.isfinite(eta) or eta <= 0:
                    raise InputError(f"the learning-rate schedule returned {eta} at step {step}")
                if every and step % every == 0:
                    traj_steps.append(step)
                    traj_thetas.append(flatten(tensors).clone())

                def check(outputs, targets, losses, _pos=pos, _step=step):
                    task.validate(outputs, targets, ids[_pos])
                    if not bool(torch.isfinite(losses).all()):
                        bad = ids[_pos][~torch.isfinite(losses).detach().cpu().numpy()]
                        raise NonFiniteError(
                            f"non-finite training loss at step {_step} for sample id(s) {bad[:10].tolist()}; "
                            "check those samples' inputs and labels, or lower the learning rate")

                sgd_step(model, tensors, task, batch, eta, l2, check)
                positions.append(pos.copy())
                step_lrs.append(eta)
                step += 1
                bar.update(1)
                if step % checkpoint_every == 0 or step == n_steps:
                    checkpoints.append(_save_checkpoint(model, work_dir, step, eta, steps_per_epoch, manifest))
    finally:
        bar.close()
        model.train(was_training)
    train_s = time.perf_counter() - t0

    step_log = StepLog(positions, np.asarray(step_lrs, dtype=np.float64), ids)
    manifest["timing"] = {"train_s": train_s}
    trajectory = None
    if every:
        traj_steps.append(n_steps)
        traj_thetas.append(flatten(tensors).clone())
        trajectory = Trajectory([nm for nm, _ in params], [tuple(p.shape) for p in tensors],
                                np.asarray(traj_steps, dtype=np.int64), torch.stack(traj_thetas), every, l2,
                                initial_state)
    if work_dir is None:
        manifest["status"] = "complete"
        return Run(model=model, checkpoints=checkpoints, task=task, step_log=step_log, manifest=manifest,
                   trajectory=trajectory)
    if trajectory is not None:
        write_safetensors(work_dir / "trajectory.safetensors",
                          {"steps": torch.as_tensor(trajectory.steps), "thetas": trajectory.thetas})
        manifest["trajectory"] = {"file": "trajectory.safetensors", "every": every, "l2": l2,
                                  "names": trajectory.names, "shapes": [list(x) for x in trajectory.shapes]}

    offsets = np.cumsum([0] + [len(p) for p in positions]).astype(np.int64)
    write_npz(work_dir / "steps.npz", positions=np.concatenate(positions).astype(np.int64), offsets=offsets,
              lr=step_log.learning_rates, sample_ids=ids)
    manifest["steps"] = "steps.npz"
    manifest["status"] = "complete"
    write_json(work_dir / MANIFEST, manifest)
    _replace_dir(work_dir, final_dir)
    log.info("recorded %d steps and %d checkpoints into %s", n_steps, len(checkpoints), final_dir)
    return Run.load(final_dir, model, loss=task)


def sgd_step(model: nn.Module, params: list[Tensor], task: Task, batch: Any, eta: float, l2: float,
             check: Callable[[Tensor, Any, Tensor], None] | None = None) -> None:
    """One plain SGD step on a collated batch: θ ← θ − η ∇(mean_i l_i + (α/2)||θ||²), in place.

    :func:`fit` and :func:`replay_states` share this function, so replay repeats the same
    floating-point operations and reproduces the recorded trajectory bit for bit on CPU.
    """
    inputs, targets = task.split(batch)
    outputs = task.safe_forward(model, inputs)
    losses = task.per_sample_loss(outputs, targets)
    if check is not None:
        check(outputs, targets, losses)
    objective = losses.mean()
    if l2:
        objective = objective + 0.5 * l2 * sum(p.pow(2).sum() for p in params)
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(g, alpha=eta)


def replay_states(run: "Run", train_dataset: Dataset, start: int, stop: int) -> Tensor:
    """θ[start..stop] (inclusive) as a (stop − start + 1, P) tensor in the recorded dtype, replayed
    forward from the nearest stored step ≤ start with the recorded batches and learning rates."""
    traj, log_ = _require_trajectory(run), run.step_log
    if not 0 <= start <= stop <= traj.n_steps:
        raise InputError(f"steps [{start}, {stop}] are outside the run's 0..{traj.n_steps}")
    check_replay_dataset(run, train_dataset)
    i = int(np.searchsorted(traj.steps, start, side="right")) - 1
    t = int(traj.steps[i])
    model = copy.deepcopy(run.model)
    model.load_state_dict(traj.base)  # buffers and frozen tensors
    named = dict(model.named_parameters())
    params = [named[n] for n in traj.names]
    with torch.no_grad():  # through the parameters, so a tied alias follows its owner
        for p, v in zip(params, unflatten(traj.thetas[i], traj.shapes)):
            p.copy_(v)
    out = []
    model.train()
    while True:
        if t >= start:
            out.append(flatten(params).clone())
        if t == stop:
            break
        _, batch = next(iter_batches(train_dataset, len(log_.positions[t]), log_.positions[t]))
        sgd_step(model, params, run.task, batch, float(log_.learning_rates[t]), traj.l2)
        t += 1
    return torch.stack(out)


def _require_trajectory(run: "Run") -> Trajectory:
    if not isinstance(run, Run):
        raise InputError(f"expected a hessfree.Run, got {type(run).__name__}")
    if run.trajectory is None or run.step_log is None:
        raise InputError("this Run was recorded without a trajectory: record it with "
                         "hessfree.fit(..., record='every_step') (or record=K to store every K-th step)")
    return run.trajectory


def check_replay_dataset(run: "Run", dataset: Dataset) -> None:
    """The dataset must be the one the run was trained on (same size and sample ids)."""
    n = dataset_size(dataset, "training dataset")
    ids = dataset_sample_ids(dataset)
    if run.step_log is not None and (n != len(run.step_log.sample_ids)
                                     or not np.array_equal(ids, run.step_log.sample_ids)):
        raise InputError(f"this dataset ({n} samples) is not the one the run was trained on "
                         f"({len(run.step_log.sample_ids)} samples): pass the same training dataset")


def _record_every(record: Any) -> int:
    if record is None:
        return 0
    if record == "every_step":
        return 1
    if isinstance(record, (int, np.integer)) and not isinstance(record, bool) and record >= 1:
        return int(record)
    raise InputError(f"record must be None, 'every_step' or a positive number of steps K, got {record!r}")


def _check_plain_sgd(optimizer: Any, momentum: Any, weight_decay: Any) -> None:
    why = ("hessfree.fit trains with plain SGD, the only optimizer its influence estimators cover exactly "
           "(DIT and TracIn assume θ ← θ − η ∇l)")
    if optimizer != "sgd":
        name = optimizer if isinstance(optimizer, str) else type(optimizer).__name__
        raise InputError(f"optimizer {name!r} is not supported: {why}; momentum and adaptive methods such as Adam "
                         "change the update rule the estimators assume")
    if momentum:
        raise InputError(f"momentum={momentum} is not supported: {why}; momentum carries earlier gradients into "
                         "every step")
    if weight_decay:
        raise InputError(f"optimizer-level weight_decay={weight_decay} is not supported: {why}; use l2={weight_decay} "
                         "for an explicit (α/2)||θ||² term in the loss, which the estimators do cover")


def check_trajectory_model(model: nn.Module) -> None:
    """Refuse modules the trajectory estimators do not cover (active dropout, BatchNorm)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise InputError(f"module {name!r} is a {type(mod).__name__}: BatchNorm couples the samples of a batch, "
                             "so removing one changes every other sample's loss; the Dynamic Influence Tracker "
                             "does not cover it (use LayerNorm / GroupNorm, or no normalisation)")
        random = (isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0) or isinstance(mod, nn.RReLU) or (
            isinstance(mod, nn.MultiheadAttention) and mod.dropout > 0)
        if random:
            raise InputError(f"module {name!r} is a random {type(mod).__name__} (dropout or random slopes): it makes the "
                             "training steps irreproducible and the estimator does not cover them; set p=0 "
                             "(or remove it) for a run you want to explain with DIT")


def _save_checkpoint(model: nn.Module, work_dir: Path | None, step: int, eta: float, steps_per_epoch: int,
                     manifest: dict) -> Checkpoint:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if work_dir is None:
        return Checkpoint(state, eta, step)
    rel = f"checkpoints/step_{step:08d}.safetensors"
    write_safetensors(work_dir / rel, state)
    manifest["checkpoints"].append({"file": rel, "step": step, "epoch": step / steps_per_epoch,
                                    "learning_rate": eta})
    write_json(work_dir / MANIFEST, manifest)  # still "recording": a crash leaves it readable but incomplete
    return Checkpoint(work_dir / rel, eta, step)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished recording into place; an old run there is removed only after the move."""
    if dst.exists():
        backup = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, backup)
        os.replace(src, dst)
        shutil.rmtree(backup)
    else:
        os.replace(src, dst)
