"""The Run: a recorded training (checkpoints, learning rates, step log) that every method reads.

Two ways in: :func:`fit` trains a model with plain mini-batch SGD and records everything;
:meth:`Run.from_checkpoints` wraps checkpoints a user already has. :meth:`Run.load` restores a
saved Run from its directory.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import time
import zipfile
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

from hessfree.datasets import (dataset_size, fingerprint, iter_batches, leaves_in,
                               sample_ids as dataset_sample_ids)
from hessfree.errors import (CheckpointMismatchError, DatasetMismatchError, InputError, NonFiniteError,
                             RunIntegrityError)
from hessfree.io import sha256_file, write_npz, write_safetensors
from hessfree.run_dir import RUN_FORMAT, Recording, positive_number, read_manifest, validate_manifest, verify_files
from hessfree.tasks import Task, check_dataset_labels, resolve_task

log = logging.getLogger(__name__)

RUN_VERSION = 2  # 2: recordings in data folders committed by the manifest, with checksums and a data fingerprint
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
    except (OSError, RuntimeError, EOFError, IndexError, KeyError, ValueError) as exc:  # not a torch file at all
        raise CheckpointMismatchError(f"cannot read the checkpoint {path} ({type(exc).__name__}: {exc}): it is not a "
                                      "torch or safetensors checkpoint file, or it is damaged") from exc
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
    sha256: str | None = None  # of a file recorded by fit, checked when the file changes on disk
    verified: tuple[int, int, int] | None = None  # (size, mtime_ns, inode) of the file when it was checked

    def state(self) -> StateDict:
        if not isinstance(self.source, Mapping) and self.sha256 is not None and self.verified is not None:
            self._recheck()
        raw = self.source if isinstance(self.source, Mapping) else _load_file(self.source)
        return _strip(raw, self.prefix)

    def _recheck(self) -> None:
        """A checkpoint file rewritten since it was verified must still match its checksum."""
        try:
            st = os.stat(self.source)
        except OSError as exc:
            raise RunIntegrityError(f"checkpoint {self.source} is gone ({exc}); was the run folder moved or "
                                    "replaced? load the run again") from exc
        now = (st.st_size, st.st_mtime_ns, st.st_ino)
        if now == self.verified:
            return
        if sha256_file(self.source) != self.sha256:
            raise RunIntegrityError(f"checkpoint {self.source} was rewritten after the run was loaded and no longer "
                                    "matches the checksum recorded with the run; load the run again (if it was "
                                    "replaced by a newer recording) or record it again")
        self.verified = now


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
        if _is_number(learning_rates):
            learning_rates = [float(learning_rates)] * len(checkpoints)
        if isinstance(learning_rates, (str, bytes)) or not hasattr(learning_rates, "__len__"):
            raise InputError(f"learning_rates must be a list of numbers (one learning rate per checkpoint) or one "
                             f"number, got {learning_rates!r}")
        learning_rates = list(learning_rates)
        _check_learning_rates(learning_rates)
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
                if not isinstance(src, (str, os.PathLike)):
                    raise InputError(f"checkpoint {k} is a {type(src).__name__}: pass a state dict or the path of a "
                                     ".safetensors / torch checkpoint file")
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
    def load(cls, run_dir: str | os.PathLike, model: nn.Module, *, loss: str | Task | None = None,
             verify: bool = True, _checksums: dict | None = None) -> "Run":
        """Restore a Run saved by :func:`fit`. ``loss`` is needed only for a custom Task.

        The manifest's values and paths are checked first (finite positive learning rates, every
        path inside the run folder); with ``verify=True`` (the default) every file is then checked
        against the size and SHA-256 recorded with the run, which reads each file once (pass
        ``verify=False`` to skip that for a very large run). A checkpoint file rewritten later is
        caught when it is next read. Raises RunDirectoryError / RunIntegrityError otherwise.
        """
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir)
        validate_manifest(manifest, run_dir)
        if not isinstance(verify, bool):
            raise InputError(f"verify must be True or False, got {verify!r}")
        if _checksums is not None:  # fit's own commit: the checksums were computed from the files just written
            checked = {rel: (e["sha256"], (run_dir / rel).stat()) for rel, e in _checksums.items()}
        else:
            checked = verify_files(manifest, run_dir) if verify else {}
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
            sha, st = checked.get(c["file"], (None, None))
            ckpts.append(Checkpoint(path, float(c["learning_rate"]), c.get("step"), sha256=sha,
                                    verified=(st.st_size, st.st_mtime_ns, st.st_ino) if st else None))
        step_log = _load_step_log(run_dir, manifest) if manifest.get("steps") else None
        trajectory = None
        rec = manifest.get("trajectory")
        if rec:
            try:
                z = load_file(str(run_dir / rec["file"]))
                base = load_file(str(run_dir / manifest["initial"]))
                trajectory = Trajectory(list(rec["names"]), [tuple(x) for x in rec["shapes"]], z["steps"].numpy(),
                                        z["thetas"], int(rec["every"]), float(rec["l2"]), base)
            except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
                raise RunIntegrityError(f"the trajectory of {run_dir} cannot be read ({type(exc).__name__}: {exc}); "
                                        "the run folder is damaged, record the run again") from exc
            if step_log is not None and trajectory.n_steps != len(step_log):
                raise RunIntegrityError(f"the trajectory of {run_dir} ends at step {trajectory.n_steps} but the step "
                                        f"log has {len(step_log)} steps; the run folder is damaged")
        return cls(model=model, checkpoints=ckpts, task=task, run_dir=run_dir, step_log=step_log,
                   manifest=manifest, trajectory=trajectory)


def _load_step_log(run_dir: Path, manifest: dict) -> StepLog:
    """The step log of a run folder, its values checked (finite positive rates, positions in range)."""
    path = run_dir / manifest["steps"]

    def bad(msg: str) -> RunIntegrityError:
        return RunIntegrityError(f"the step log {path} {msg}; the run folder is damaged, record the run again")

    try:
        with np.load(path, allow_pickle=False) as z:
            offsets, flat, lr, ids = z["offsets"], z["positions"], z["lr"], z["sample_ids"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise bad(f"cannot be read ({type(exc).__name__}: {exc})") from exc
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0) \
            or offsets[-1] != len(flat) or len(lr) != len(offsets) - 1:
        raise bad("has inconsistent offsets")
    if not (np.all(np.isfinite(lr)) and np.all(lr > 0)):
        raise bad("holds learning rates that are not finite positive numbers")
    if len(flat) and (flat.min() < 0 or flat.max() >= len(ids)):
        raise bad(f"names dataset positions outside 0..{len(ids) - 1}")
    n = manifest.get("n_samples")
    if n is not None and n != len(ids):
        raise bad(f"holds {len(ids)} sample ids for a run of {n} samples")
    return StepLog([flat[offsets[t]:offsets[t + 1]] for t in range(len(offsets) - 1)], lr, ids)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _check_learning_rates(rates: Sequence[Any]) -> None:
    for k, eta in enumerate(rates):
        if not positive_number(eta):
            shown = eta if _is_number(eta) else repr(eta)
            raise InputError(f"learning rate {shown} of checkpoint {k} must be a finite positive number")


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

    With ``run_dir`` the run is written there (``manifest.json``, and a ``data-…`` folder with the
    safetensors checkpoints and the ``steps.npz`` step log, every file's SHA-256 in the manifest).
    The folder must be new, empty, or a hessfree run (replaced only with ``overwrite=True``;
    anything else is refused before training, and files hessfree did not write are never
    touched). Recording happens in a hidden folder inside it; the new run becomes live in one
    atomic rename of ``manifest.json`` once it is complete, so at every moment the folder holds the
    old run or the new one, never nothing and never half of one. A failed ``fit`` removes its
    recording; what a killed one left is removed by the next ``fit`` into the same folder.
    Without ``run_dir`` checkpoints stay in memory.

    If ``fit`` fails (bad input found during training, a non-finite loss, a full disk, Ctrl-C),
    the model's parameters and buffers are put back to what they were before the call. A
    non-finite loss is traced to the sample that caused it where possible (its inputs, its loss,
    or the step at which the model started to diverge).

    ``record="every_step"`` (or an int K) also records the parameter trajectory θ[t] before every
    step (or every K steps, the rest rebuilt by deterministic replay) for the Dynamic Influence
    Tracker (:func:`hessfree.dit`). ``l2=α`` adds an explicit ``(α/2)||θ||²`` (trainable
    parameters) to the training loss. The step is plain SGD only: ``optimizer`` other than
    ``"sgd"``, ``momentum`` or ``weight_decay`` are refused (the estimators do not cover them), and
    with ``record`` so are active dropout and BatchNorm.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    task = resolve_task(loss)
    n = dataset_size(train_dataset, "training dataset")
    _check_plain_sgd(optimizer, momentum, weight_decay)
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 < 0:
        raise InputError(f"l2 must be a finite non-negative number (the α of (α/2)||θ||²), got {l2!r}")
    l2 = float(l2)
    every = _record_every(record)
    if every:
        check_trajectory_model(model)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    steps_per_epoch = math.ceil(n / batch_size)
    n_steps = steps_per_epoch * epochs
    if checkpoint_every is None:
        checkpoint_every = steps_per_epoch
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise InputError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every!r}")
    if not callable(lr) and not _is_number(lr):
        raise InputError(f"lr must be a positive number or a schedule lr(step) -> float, got {lr!r}")
    lr_fn: Callable[[int], float] = lr if callable(lr) else (lambda t, _lr=float(lr): _lr)
    first = lr_fn(0)
    if not _is_number(first):
        raise InputError(f"the learning-rate schedule returned {first!r} at step 0, not a number")
    _check_learning_rates([float(first)])
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters (all have requires_grad=False)")
    ids = dataset_sample_ids(train_dataset)
    if not isinstance(overwrite, bool):
        raise InputError(f"overwrite must be True or False, got {overwrite!r}")
    # put back if fit fails (a copy on the CPU: no accelerator memory is taken for it)
    before = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    # refused here, before any training, if run_dir may not receive a run; leftovers of killed writes cleaned
    recording = Recording.start(run_dir, overwrite) if run_dir is not None else None
    try:
        run, manifest = _record(model, train_dataset, task, ids, recording, before, lr_fn, lr, epochs, batch_size,
                                checkpoint_every, steps_per_epoch, n_steps, seed, every, record, l2, params,
                                progress)
        if recording is not None:
            recording.commit(manifest)  # once the manifest is renamed the new run is live: no putting back
    except BaseException:
        if recording is None or not recording.committed:
            _restore(model, before)
            if recording is not None:
                recording.abort()
        raise
    if recording is None:
        return run
    log.info("recorded %d steps and %d checkpoints into %s", n_steps, len(manifest["checkpoints"]), recording.root)
    return Run.load(recording.root, model, loss=task, _checksums=manifest["files"])


def _restore(model: nn.Module, state: StateDict) -> None:
    """Put every parameter and buffer back to ``state``, in place (bit for bit)."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in state:
                v.copy_(state[k])


def _record(model: nn.Module, train_dataset: Dataset, task: Task, ids: np.ndarray, recording: Recording | None,
            before: StateDict, lr_fn: Callable[[int], float], lr: Any, epochs: int, batch_size: int,
            checkpoint_every: int, steps_per_epoch: int, n_steps: int, seed: int, every: int, record: Any,
            l2: float, params: list[tuple[str, nn.Parameter]], progress: bool) -> tuple[Run | None, dict]:
    """The training loop of :func:`fit`, recording into ``recording`` (returns (None, its manifest,
    to be committed)) or memory (returns (the Run, its manifest))."""
    n = len(ids)
    tensors = [p for _, p in params]
    work_dir = recording.dir if recording is not None else None
    manifest: dict[str, Any] = {
        "format": RUN_FORMAT, "version": RUN_VERSION, "status": "recording",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "task": task.to_dict(), "optimizer": "sgd",
        "n_samples": n, "epochs": epochs, "batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
        "n_steps": n_steps, "checkpoint_every": checkpoint_every, "seed": seed,
        "lr": float(lr) if not callable(lr) else "schedule", "checkpoints": [], "steps": None,
        "l2": l2, "record": record if isinstance(record, str) or record is None else every, "trajectory": None,
    }
    initial_state = before if every else model.state_dict()  # buffers and frozen tensors at θ[0] (CPU copies)
    if work_dir is not None:
        write_safetensors(work_dir / "checkpoints" / "init.safetensors", initial_state)
        manifest["initial"] = "checkpoints/init.safetensors"

    was_training = model.training
    model.eval()  # no BatchNorm statistics updated by the label check
    try:
        check_dataset_labels(task, lambda x: task.safe_forward(model, x), task.split, train_dataset, ids)
    finally:
        model.train(was_training)
    manifest["data"] = fingerprint(train_dataset, ids)
    gen = torch.Generator().manual_seed(seed)
    traj_steps: list[int] = []
    traj_thetas: list[Tensor] = []
    positions: list[np.ndarray] = []
    step_lrs: list[float] = []
    checkpoints: list[Checkpoint] = []
    watch = _LossWatch(n_steps, ids, positions, batch_size)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, desc="fit", disable=not progress, leave=False)
    step = 0
    try:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen).numpy()
            for pos, batch in iter_batches(train_dataset, batch_size, order):
                eta = lr_fn(step)
                if not positive_number(eta):
                    raise InputError(f"the learning-rate schedule returned {eta!r} at step {step}")
                eta = float(eta)
                if every and step % every == 0:
                    traj_steps.append(step)
                    traj_thetas.append(flatten(tensors).clone())

                def check(outputs, targets, losses, _pos=pos, _step=step, _batch=batch):
                    if _step == 0 and (losses.dim() != 1 or losses.shape[0] != len(_pos)):
                        raise InputError(
                            f"the loss returned shape {tuple(losses.shape)} for a batch of {len(_pos)} samples: "
                            "Task.per_sample_loss must return one loss per sample (shape (B,)), not their mean")
                    task.validate(outputs, targets, ids[_pos])
                    watch(_step, _pos, losses, lambda: task.split(_batch))  # the batch is read only on failure

                sgd_step(model, tensors, task, batch, eta, l2, check)
                positions.append(pos.copy())
                step_lrs.append(eta)
                step += 1
                bar.update(1)
                if step % checkpoint_every == 0 or step == n_steps:
                    watch.check_parameters(step, params)
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
    if recording is None:
        manifest["status"] = "complete"
        return Run(model=model, checkpoints=checkpoints, task=task, step_log=step_log, manifest=manifest,
                   trajectory=trajectory), manifest
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
    return None, manifest


class _LossWatch:
    """Traces a non-finite training loss to the sample that caused it.

    Every step's per-sample losses are kept in a preallocated ring buffer (the last
    :data:`WINDOW_FLOATS` losses) and those of the first :data:`EARLY` steps in another (the
    usual loss level): one copy per step, no host sync. When a loss is not finite, the batch's
    inputs and targets are checked first; then, if the batch's finite losses are at the usual
    level, the non-finite ones are the samples' own and are named. Otherwise (every loss
    non-finite, or the finite ones far above the usual level) the model had diverged, and the
    buffer says where that began: at the first step whose largest loss stood :data:`JUMP` times
    above the usual level, either one sample alone (named) or the whole batch (a learning rate too
    high).
    """

    JUMP = 100.0
    EARLY = 64
    WINDOW_FLOATS = 1 << 22  # 16 MB of float32 losses

    def __init__(self, n_steps: int, ids: np.ndarray, positions: list[np.ndarray], batch_size: int):
        self.ids, self.positions, self.width = ids, positions, batch_size
        self.window = max(1, min(n_steps, self.WINDOW_FLOATS // max(1, batch_size)))
        self.buffer: Tensor | None = None
        self.early: Tensor | None = None
        self.seen = 0  # steps recorded

    def __call__(self, step: int, pos: np.ndarray, losses: Tensor, batch: Callable[[], tuple[Any, Any]]) -> None:
        lo = losses.detach().reshape(-1)
        if bool(torch.isfinite(lo).all()):
            if self.buffer is None:
                self.buffer = lo.new_full((self.window, self.width), float("nan"), dtype=torch.float32)
                self.early = lo.new_full((min(self.EARLY, self.window), self.width), float("nan"),
                                         dtype=torch.float32)
            row = self.buffer[step % self.window]
            if lo.numel() == self.width:
                row.copy_(lo)
            else:  # a short last batch: NaN beyond it
                row[:lo.numel()].copy_(lo)
                row[lo.numel():] = float("nan")
            if step < len(self.early):
                self.early[step].copy_(row)
            self.seen = step + 1
            return
        ids = self.ids[pos]
        inputs, targets = batch()
        for what, values in (("inputs", inputs), ("targets (labels)", targets)):
            bad = _nonfinite_rows(values, len(pos))
            if bad is not None and bad.any():
                raise NonFiniteError(f"non-finite training loss at step {step} for sample id(s) "
                                     f"{ids[bad][:10].tolist()}: their {what} hold NaN or inf values; clean those "
                                     "samples or leave them out")
        finite = torch.isfinite(lo).cpu().numpy()
        steps, h = self._history(step)
        s, level = self._first_jump(h)
        whole_batch_jumped = s < len(steps) and h[s, 2] > self.JUMP * level
        if finite.any() and not whole_batch_jumped and float(
                lo[torch.as_tensor(finite, device=lo.device)].max()) <= self.JUMP * level:
            earlier = "" if s == len(steps) else (
                f"; earlier, sample id {int(self.ids[self.positions[int(steps[s])][int(h[s, 1])]])} had a loss of "
                f"{h[s, 0]:.3g} at step {int(steps[s])} (usual level {level:.3g}): if the samples named look fine, "
                "that one may have thrown the weights off")
            raise NonFiniteError(f"non-finite training loss at step {step} for sample id(s) "
                                 f"{ids[~finite][:10].tolist()} while the other samples of the batch are at the usual "
                                 "level; check those samples' inputs and labels (a huge value can overflow the "
                                 f"loss){earlier}")
        raise NonFiniteError(f"non-finite training loss at step {step}: the model had already diverged. "
                             f"{self.diagnosis(step)}")

    @staticmethod
    def _stats(L: np.ndarray) -> np.ndarray:
        """Per step (row of per-sample losses, NaN-padded): largest, its position, second largest, median."""
        L = np.where(np.isnan(L), -np.inf, L.astype(np.float64))
        order = np.argsort(-L, axis=1, kind="stable")
        second = np.take_along_axis(L, order[:, 1:2], axis=1)[:, 0] if L.shape[1] > 1 else np.full(len(L), -np.inf)
        top = np.take_along_axis(L, order[:, :1], axis=1)[:, 0]
        med = np.nanmedian(np.where(np.isinf(L), np.nan, L), axis=1)
        return np.c_[top, order[:, 0], second, med]

    def _history(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps, their stats) for the recorded steps before ``step``: the first :data:`EARLY`
        steps and those still in the window, oldest first."""
        last = min(step, self.seen)
        if self.buffer is None or not last:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 4))
        window = np.arange(max(0, last - self.window), last)
        early = np.arange(min(last, len(self.early), int(window[0]) if len(window) else last))
        rows = [self.early[:len(early)].cpu().numpy(), self.buffer.cpu().numpy()[window % self.window]]
        return np.concatenate([early, window]), self._stats(np.concatenate(rows))

    def _first_jump(self, h: np.ndarray) -> tuple[int, float]:
        """(index of the first step whose largest loss stood JUMP times above the median of the
        batch medians before it, or len(h); that usual level)."""
        for s in range(1, len(h)):
            base = max(float(np.median(h[:s, 3])), 1e-6)
            if h[s, 0] > self.JUMP * base:
                return s, base
        return len(h), max(float(np.median(h[:, 3])), 1e-6) if len(h) else 1e-6

    def diagnosis(self, step: int) -> str:
        """Where the divergence began, from the losses of the steps before ``step``."""
        steps, h = self._history(step)
        if not len(steps):
            return "It did so at the first step: lower the learning rate or check the initial weights and data."
        s, level = self._first_jump(h)
        if s == len(steps):
            return (f"No step's losses stood out (the batch median loss went from {h[0, 3]:.3g} at step {steps[0]} "
                    f"to {h[-1, 3]:.3g} at step {steps[-1]}): lower the learning rate.")
        t = int(steps[s])
        gap = "" if steps[s - 1] == t - 1 else f" (the steps {int(steps[s - 1]) + 1}..{t - 1} are no longer kept)"
        if not h[s, 2] > self.JUMP * level:  # one sample alone (the second largest stayed usual)
            sid = int(self.ids[self.positions[t][int(h[s, 1])]])
            return (f"It began with sample id {sid} at step {t}{gap}: its loss {h[s, 0]:.3g} against a usual level "
                    f"of {level:.3g}. Check that sample's inputs and label (an extreme value there moves every "
                    "weight), or lower the learning rate.")
        return (f"It began at step {t}{gap}, where the losses of the whole batch jumped (largest {h[s, 0]:.3g}, "
                f"second {h[s, 2]:.3g}, against a usual level of {level:.3g}): lower the learning rate.")

    def check_parameters(self, step: int, params: list[tuple[str, nn.Parameter]]) -> None:
        for name, p in params:
            if not bool(torch.isfinite(p).all()):
                raise NonFiniteError(f"parameter {name!r} is not finite after step {step}. {self.diagnosis(step)}")


def _nonfinite_rows(inputs: Any, b: int) -> np.ndarray | None:
    """(B,) mask of the samples whose floating inputs hold a NaN or inf (None: no such inputs)."""
    mask = None
    for t in leaves_in(inputs):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 1 and t.shape[0] == b:
            rows = ~torch.isfinite(t.detach()).reshape(b, -1).all(1)
            mask = rows if mask is None else mask | rows
    return None if mask is None else mask.cpu().numpy()


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
    """The dataset must be the one the run was trained on: same size, same sample ids and, for a
    run recorded by this version of :func:`fit`, the same content on the samples its fingerprint
    looked at (:func:`hessfree.datasets.fingerprint`)."""
    n = dataset_size(dataset, "training dataset")
    ids = dataset_sample_ids(dataset)
    if run.step_log is not None and (n != len(run.step_log.sample_ids)
                                     or not np.array_equal(ids, run.step_log.sample_ids)):
        raise DatasetMismatchError(f"this dataset ({n} samples) is not the one the run was trained on "
                                   f"({len(run.step_log.sample_ids)} samples, other sample ids): pass the same "
                                   "training dataset")
    recorded = run.manifest.get("data") if isinstance(run.manifest, dict) else None
    if isinstance(recorded, dict) and recorded.get("content_sha256"):
        now = fingerprint(dataset, ids)
        if now["content_sha256"] != recorded["content_sha256"]:
            raise DatasetMismatchError(
                f"this dataset is not the one the run was trained on: it has that one's size and sample ids but other "
                f"content (its fingerprint over {now['content_samples']} samples differs); pass the same training "
                "dataset, unchanged and in the same order (a dataset with random transforms cannot be replayed)")


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
    return Checkpoint(work_dir / rel, eta, step)
