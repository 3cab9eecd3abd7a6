"""Trim and retrain: remove the k most harmful samples by a score, retrain from scratch with the
same seed and hyperparameters, and compare with no removal and with random removal of the same k,
over several seeds (evaluation.md, "Downstream")."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from hessfree.datasets import dataset_size, iter_batches, sample_ids
from hessfree.errors import InputError
from hessfree.run import fit
from hessfree.scores import Scores
from hessfree.tasks import Task, resolve_task

log = logging.getLogger(__name__)


def evaluate_model(model: nn.Module, dataset: Dataset, task: Task, sensitive: Any = None,
                   positive_class: int = 1, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy, mean loss and (with a binary ``sensitive``) the signed and absolute
    demographic-parity and equal-opportunity (true-positive-rate) gaps, group 1 minus group 0,
    all from hard predictions."""
    was = model.training
    model.eval()
    preds, labels, losses = [], [], []
    with torch.no_grad():
        for _, batch in iter_batches(dataset, batch_size):
            x, y = task.split(batch)
            out = task.safe_forward(model, x)
            losses.append(task.per_sample_loss(out, y))
            if out.ndim == 1 or out.shape[-1] == 1:
                preds.append((out.reshape(-1) > 0).long())
            else:
                preds.append(out.argmax(1))
            labels.append(torch.as_tensor(y).reshape(-1).round().long())
    model.train(was)
    pred, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    res = {"accuracy": float((pred == y).mean()), "loss": float(torch.cat(losses).mean())}
    if sensitive is not None:
        s = np.asarray(sensitive).reshape(-1).astype(bool)
        if len(s) != len(y):
            raise InputError(f"sensitive has {len(s)} entries for {len(y)} evaluation samples")
        pos = pred == positive_class
        dp = pos[s].mean() - pos[~s].mean()
        tp = y == positive_class
        eo = pos[s & tp].mean() - pos[~s & tp].mean() if (s & tp).any() and (~s & tp).any() else float("nan")
        res.update({"dp_gap": float(dp), "abs_dp_gap": float(abs(dp)), "eo_gap": float(eo), "abs_eo_gap": float(abs(eo))})
    return res


@dataclass
class TrimResult:
    """Per-seed metrics for each arm ("none", "trimmed", "random"), with the removed ids."""

    k: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    removed: np.ndarray | None = None  # ids removed by the score (the same for every seed)

    def summary(self) -> dict[str, dict[str, tuple[float, float]]]:
        """arm -> metric -> (mean, std over seeds)."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for arm in ("none", "trimmed", "random"):
            rows = [r for r in self.rows if r["arm"] == arm]
            metrics = [m for m in rows[0] if m not in ("arm", "seed")]
            out[arm] = {m: (float(np.mean([r[m] for r in rows])), float(np.std([r[m] for r in rows])))
                        for m in metrics}
        return out

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def table(self) -> str:
        s = self.summary()
        metrics = list(s["none"])
        lines = [f"{'arm':<10}" + "".join(f"{m:>22}" for m in metrics)]
        for arm, vals in s.items():
            lines.append(f"{arm:<10}" + "".join(f"{vals[m][0]:>13.4f} ± {vals[m][1]:<6.4f}" for m in metrics))
        return "\n".join(lines)


def trim_and_retrain(scores: Scores, train_dataset: Dataset, test_dataset: Dataset, *,
                     model_fn: Callable[[], nn.Module], k: int | float, loss: str | Task = "cross_entropy",
                     lr: float | Callable[[int], float] = 0.1, epochs: int = 10, batch_size: int = 32,
                     seeds: Sequence[int] = (0, 1, 2, 3, 4), sensitive_test: Any = None, positive_class: int = 1,
                     train_fn: Callable[[nn.Module, Dataset, int], Any] | None = None,
                     progress: bool = False) -> TrimResult:
    """Remove the k most harmful samples by ``scores`` (``scores.harmful(k)``; a fraction in (0, 1)
    means that share of N), retrain from scratch, and compare with no removal and with k random
    removals — each arm trained with the same seed (``torch.manual_seed(seed)`` before
    ``model_fn()``, and ``fit(seed=seed)`` for the batch order) and the same hyperparameters.

    ``train_fn(model, dataset, seed)``, if given, trains each arm's model in place instead of
    :func:`hessfree.fit` (e.g. with Adam); ``lr`` / ``epochs`` / ``batch_size`` are then unused.

    Returns a :class:`TrimResult` (per-seed rows; ``summary()`` gives mean ± std; ``table()``).
    """
    task = resolve_task(loss)
    n = dataset_size(train_dataset, "training dataset")
    dataset_size(test_dataset, "test dataset")
    if scores.values.ndim != 1 or len(scores) != n:
        raise InputError(f"scores must be one value per training sample ({n}), got shape {scores.values.shape}")
    ids = sample_ids(train_dataset)
    if not np.array_equal(np.sort(scores.sample_ids), np.sort(ids)):
        raise InputError("the scores' sample ids are not the training dataset's: score this dataset")
    if not seeds:
        raise InputError("give at least one seed")
    removed = scores.harmful(k)
    k = len(removed)
    if k >= n:
        raise InputError(f"removing k={k} of {n} samples leaves nothing to train on")
    pos_of = {int(i): p for p, i in enumerate(ids)}
    trimmed_pos = np.array(sorted(set(range(n)) - {pos_of[int(i)] for i in removed}))
    result = TrimResult(k=k, removed=removed)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        random_pos = np.sort(rng.choice(n, n - k, replace=False))
        for arm, keep in (("none", None), ("trimmed", trimmed_pos), ("random", random_pos)):
            t0 = time.perf_counter()
            data = train_dataset if keep is None else Subset(train_dataset, keep.tolist())
            torch.manual_seed(seed)
            model = model_fn()
            if train_fn is not None:
                train_fn(model, data, seed)
            else:
                steps = -(-len(data) // batch_size) * epochs
                fit(model, data, loss=task, lr=lr, epochs=epochs, batch_size=batch_size, checkpoint_every=steps,
                    seed=seed, progress=progress)
            row = {"arm": arm, "seed": seed, **evaluate_model(model, test_dataset, task, sensitive_test,
                                                              positive_class)}
            row["train_s"] = time.perf_counter() - t0
            result.rows.append(row)
            log.info("seed %d, %s: %s", seed, arm, row)
    return result
