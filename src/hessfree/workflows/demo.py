"""The built-in demo: find flipped labels in scikit-learn digits by self-influence.

Digits (1,437 train / 360 test, stratified), 10% of training labels flipped uniformly to another
class (seeded), a one-hidden-layer MLP (64-128-10, plain SGD lr 0.05, batch 32, 30 epochs) trained with :func:`hessfree.fit` (6 checkpoints), then
TracIn self-influence against three baselines (loss, EL2N, GraNd). Reports recall@10%, AUROC and
the wall time of each stage.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import TensorDataset

from hessfree import baselines
from hessfree.data import flip_labels
from hessfree.errors import RunDirectoryError
from hessfree.evaluate import metrics
from hessfree.evaluate.retrain import evaluate_model
from hessfree.io import sha256_file, write_json
from hessfree.methods.tracin import self_influence
from hessfree.run import fit
from hessfree.run_dir import read_manifest

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    noise: float = 0.10
    seed: int = 0
    hidden: int = 128
    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 32
    n_checkpoints: int = 6


def digits_noisy(noise: float, seed: int) -> dict[str, Any]:
    """Standardised digits split 1,437 / 360 with ``noise`` of the training labels flipped."""
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=360, random_state=0, stratify=y)
    scaler = StandardScaler().fit(Xtr)
    noisy, flipped = flip_labels(ytr, noise, num_classes=10, seed=seed)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {"train": TensorDataset(as_t(scaler.transform(Xtr)), torch.tensor(noisy)),
            "test": TensorDataset(as_t(scaler.transform(Xte)), torch.tensor(yte)),
            "flipped": flipped, "clean_labels": ytr}


DEMO_FORMAT = "hessfree-demo"


def check_out_dir(out: Path, overwrite: bool) -> dict[str, str]:
    """Refuse, before any work, an output folder whose demo results exist (without ``overwrite``)
    or are not the demo's own: ``run/`` and ``self_influence.npz`` are replaced only if the
    ``demo.json`` there (written by the demo) names them, the run by its data folder and the scores
    by their SHA-256. Returns what that ``demo.json`` names (empty if there is none)."""
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"{out} is a file, not a folder: choose another --out")
    existing = [name for name in ("demo.json", "self_influence.npz", "run") if (out / name).exists()]
    if existing and not overwrite:
        raise RunDirectoryError(f"{out} already holds {', '.join(existing)}: pass --overwrite to replace the demo's "
                                "results there (files the demo did not write are never touched), or choose another "
                                "--out")
    written: dict[str, str] = {}
    if "demo.json" in existing:
        try:
            record = json.loads((out / "demo.json").read_text())
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or record.get("format") != DEMO_FORMAT:
            raise RunDirectoryError(f"{out / 'demo.json'} was not written by hessfree demo: it is never replaced; "
                                    "choose another --out")
        written = record.get("written") if isinstance(record.get("written"), dict) else {}
    never = "the demo never replaces what it did not write; choose another --out (or move it away yourself)"
    if "run" in existing:
        run = out / "run"
        if not run.is_dir():
            raise RunDirectoryError(f"{run} is a file, not a run the demo recorded: {never}")
        if any(run.iterdir()):
            live = _live_data(run)
            if live is None or written.get("run") != live:
                raise RunDirectoryError(f"{run} holds {'a hessfree run' if live else 'files'} that demo.json does "
                                        f"not name as the demo's: {never}")
    if "self_influence.npz" in existing:
        scores = out / "self_influence.npz"
        if not scores.is_file() or written.get("self_influence.npz") != sha256_file(scores):
            raise RunDirectoryError(f"{scores} is not the file demo.json names as the demo's (it was not written by "
                                    f"the demo, or changed since): {never}")
    return written


def _live_data(run: Path) -> str | None:
    """The data folder a hessfree run folder's manifest makes live, or None if it is no run."""
    try:
        return Path(read_manifest(run)["steps"]).parts[0]
    except (RunDirectoryError, KeyError, TypeError, IndexError):
        return None


def run_demo(out_dir: str | os.PathLike = "results/demo", config: DemoConfig | None = None,
             progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run the demo; write ``demo.json``, the run and the scores under ``out_dir``; return the result.

    Results already in ``out_dir`` are replaced only with ``overwrite=True``, and only those the
    demo wrote (named in its ``demo.json``). ``demo.json`` is written first with ``"status":
    "running"``, again as each result is written, and last with ``"complete"`` (or ``"failed"``),
    so a folder whose demo was killed part-way says so, and says which results are the demo's.
    """
    cfg = config or DemoConfig()
    out = Path(out_dir)
    written = dict(check_out_dir(out, overwrite))
    header = {"format": DEMO_FORMAT, "config": asdict(cfg),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def note(key: str | None = None, value: str | None = None) -> None:
        if key is not None:
            written[key] = value
        write_json(out / "demo.json", {**header, "status": "running", "written": written})

    note()
    try:
        result = _run(out, cfg, progress, note)
    except BaseException as exc:
        write_json(out / "demo.json", {**header, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                       "written": written})
        raise
    result = {**header, "status": "complete", "written": written, **result}
    write_json(out / "demo.json", result)
    return result


def _run(out: Path, cfg: DemoConfig, progress: bool, note: Callable[[str, str], None]) -> dict[str, Any]:
    timing: dict[str, float] = {}
    t = time.perf_counter()
    data = digits_noisy(cfg.noise, cfg.seed)
    train, flipped = data["train"], data["flipped"]
    timing["data_s"] = time.perf_counter() - t

    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Linear(64, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))
    steps = -(-len(train) // cfg.batch_size) * cfg.epochs
    t = time.perf_counter()
    # a previous demo run there was allowed by check_out_dir; it is replaced atomically, once complete
    run = fit(model, train, loss="cross_entropy", lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
              checkpoint_every=steps // cfg.n_checkpoints, seed=cfg.seed, run_dir=out / "run", overwrite=True,
              progress=progress)
    note("run", _live_data(out / "run"))
    timing["fit_s"] = time.perf_counter() - t
    test_acc = evaluate_model(model, data["test"], run.task)["accuracy"]

    rows = []
    methods = {
        "self_influence": lambda: self_influence(run, train, progress=progress),
        "loss (last checkpoint)": lambda: baselines.loss(run, train, progress=progress),
        "EL2N": lambda: baselines.el2n(run, train, progress=progress),
        "GraNd": lambda: baselines.grand(run, train, progress=progress),
    }
    for name, fn in methods.items():
        t = time.perf_counter()
        scores = fn()
        dt = time.perf_counter() - t
        rows.append({"method": name, "recall_at_10pct": metrics.recall_at_k(scores, flipped, 0.1),
                     "auroc": metrics.auroc(scores, flipped), "average_precision":
                     metrics.average_precision(scores, flipped), "time_s": dt})
        if name == "self_influence":
            timing["self_influence_s"] = dt
            note("self_influence.npz", sha256_file(scores.save(out / "self_influence.npz")))
    return {"n_train": len(train), "n_flipped": int(flipped.sum()), "n_checkpoints": len(run.checkpoints),
            "test_accuracy": test_acc, "timing": timing, "methods": rows, "torch_threads": torch.get_num_threads()}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"digits, {result['n_train']} training samples, {result['n_flipped']} labels flipped, "
             f"{result['n_checkpoints']} checkpoints, test accuracy {result['test_accuracy']:.3f}",
             "", f"{'method':<24}{'recall@10%':>12}{'AUROC':>9}{'AP':>9}{'time (s)':>10}"]
    for r in result["methods"]:
        lines.append(f"{r['method']:<24}{r['recall_at_10pct']:>12.3f}{r['auroc']:>9.4f}"
                     f"{r['average_precision']:>9.4f}{r['time_s']:>10.2f}")
    t = result["timing"]
    lines += ["", "stage times (s): " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in t.items())]
    return "\n".join(lines)
