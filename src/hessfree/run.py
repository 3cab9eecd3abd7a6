"""The Run: a recorded training (checkpoints, learning rates, step log) that every method reads.

Two ways in: :func:`fit` trains a model with plain mini-batch SGD and records everything;
:meth:`Run.from_checkpoints` wraps checkpoints a user already has. :meth:`Run.load` restores a
saved Run from its directory.
"""
from __future__ import annotations

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
from safetensors import safe_open
from safetensors.torch import load_file
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


def _load_file(path: Path) -> Mapping[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
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
        with safe_open(str(path), framework="pt") as fh:  # reads the header only
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
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

    @property
    def learning_rates(self) -> list[float]:
        return [c.learning_rate for c in self.checkpoints]

    def __len__(self) -> int:
        return len(self.checkpoints)

    def checkpoint_state(self, k: int) -> StateDict:
        """Load checkpoint ``k`` (negative indices count from the end) as a state dict."""
        return self.checkpoints[k].state()

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
        return cls(model=model, checkpoints=ckpts, task=task, run_dir=run_dir, step_log=step_log,
                   manifest=manifest)


def _check_learning_rates(rates: Sequence[float]) -> None:
    for k, eta in enumerate(rates):
        if not math.isfinite(eta) or eta <= 0:
            raise InputError(f"learning rate {eta} of checkpoint {k} must be a finite positive number")


# ----------------------------------------------------------------------------- fit
def fit(model: nn.Module, train_dataset: Dataset, *, loss: str | Task = "cross_entropy",
        lr: float | Callable[[int], float] = 0.1, epochs: int = 1, batch_size: int = 32,
        checkpoint_every: int | None = None, seed: int = 0, run_dir: str | os.PathLike | None = None,
        overwrite: bool = False, progress: bool = True) -> Run:
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
    """
    task = resolve_task(loss)
    n = dataset_size(train_dataset, "training dataset")
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
    }
    if work_dir is not None:
        write_json(work_dir / MANIFEST, manifest)
        write_safetensors(work_dir / "checkpoints" / "init.safetensors", model.state_dict())
        manifest["initial"] = "checkpoints/init.safetensors"

    was_training = model.training
    model.eval()  # no BatchNorm statistics updated by the label check
    try:
        check_dataset_labels(task, lambda x: task.forward(model, x), task.split, train_dataset, ids)
    finally:
        model.train(was_training)
    gen = torch.Generator().manual_seed(seed)
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
                inputs, targets = task.split(batch)
                outputs = task.forward(model, inputs)
                task.validate(outputs, targets, ids[pos])
                losses = task.per_sample_loss(outputs, targets)
                if not bool(torch.isfinite(losses).all()):
                    bad = ids[pos][~torch.isfinite(losses).detach().cpu().numpy()]
                    raise NonFiniteError(
                        f"non-finite training loss at step {step} for sample id(s) {bad[:10].tolist()}; "
                        "check those samples' inputs and labels, or lower the learning rate")
                grads = torch.autograd.grad(losses.mean(), [p for _, p in params], allow_unused=True)
                with torch.no_grad():
                    for (_, p), g in zip(params, grads):
                        if g is not None:
                            p.sub_(g, alpha=eta)
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
    if work_dir is None:
        manifest["status"] = "complete"
        return Run(model=model, checkpoints=checkpoints, task=task, step_log=step_log, manifest=manifest)

    offsets = np.cumsum([0] + [len(p) for p in positions]).astype(np.int64)
    write_npz(work_dir / "steps.npz", positions=np.concatenate(positions).astype(np.int64), offsets=offsets,
              lr=step_log.learning_rates, sample_ids=ids)
    manifest["steps"] = "steps.npz"
    manifest["status"] = "complete"
    write_json(work_dir / MANIFEST, manifest)
    _replace_dir(work_dir, final_dir)
    log.info("recorded %d steps and %d checkpoints into %s", n_steps, len(checkpoints), final_dir)
    return Run.load(final_dir, model, loss=task)


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
