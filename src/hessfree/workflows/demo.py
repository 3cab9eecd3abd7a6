"""The built-in demo: find flipped labels in scikit-learn digits by self-influence.

Digits (1,437 train / 360 test, stratified), 10% of training labels flipped uniformly to another
class (seeded), a one-hidden-layer MLP (64-128-10, plain SGD lr 0.05, batch 32, 30 epochs) trained with :func:`hessfree.fit` (6 checkpoints), then
TracIn self-influence against three baselines (loss, EL2N, GraNd). Reports recall@10%, AUROC and
the wall time of each stage.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import TensorDataset

from hessfree import baselines
from hessfree.data import flip_labels
from hessfree.evaluate import metrics
from hessfree.evaluate.retrain import evaluate_model
from hessfree.io import write_json
from hessfree.methods.tracin import self_influence
from hessfree.run import fit

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


def run_demo(out_dir: str | os.PathLike = "results/demo", config: DemoConfig | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the demo; write ``demo.json``, the run and the scores under ``out_dir``; return the result."""
    cfg = config or DemoConfig()
    out = Path(out_dir)
    timing: dict[str, float] = {}
    t = time.perf_counter()
    data = digits_noisy(cfg.noise, cfg.seed)
    train, flipped = data["train"], data["flipped"]
    timing["data_s"] = time.perf_counter() - t

    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Linear(64, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))
    steps = -(-len(train) // cfg.batch_size) * cfg.epochs
    t = time.perf_counter()
    # The demo owns out_dir/run: a previous demo run there is replaced (atomically, once complete).
    run = fit(model, train, loss="cross_entropy", lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
              checkpoint_every=steps // cfg.n_checkpoints, seed=cfg.seed, run_dir=out / "run", overwrite=True,
              progress=progress)
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
            scores.save(out / "self_influence.npz")
    result = {"config": asdict(cfg), "n_train": len(train), "n_flipped": int(flipped.sum()),
              "n_checkpoints": len(run.checkpoints), "test_accuracy": test_acc, "timing": timing,
              "methods": rows, "torch_threads": torch.get_num_threads()}
    write_json(out / "demo.json", result)
    return result


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
