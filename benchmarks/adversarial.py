"""Adversarial (evasion) robustness by data removal (evaluation.md protocol 6).

Breast cancer (scikit-learn's bundled copy, standardised), 10 repeats of a stratified
60 / 20 / 20 train / validation / test split (seed = repeat). A model is trained with
`hessfree.fit`; validation and test points are attacked on it (Boundary(1.3) for the logistic
regression, FGSM(eps) for the MLP); every training sample is scored by TracIn against
`targets.Robustness` (loss on the attacked validation points); the 5% most robustness-harmful
samples are removed and the model retrained with the same seed. Reported: test accuracy before
the attack, on the attacked test points, and on the same attacked points after the defence,
against random removal of the same number of samples.

Usage: .venv/bin/python benchmarks/adversarial.py [--repeats 10]
Writes benchmarks/results/adversarial.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import Subset, TensorDataset

import hessfree
from hessfree.io import write_json
from hessfree import targets
from hessfree.grads.engine import GradientEngine

EPOCHS, LR, BATCH, REMOVE = 50, 0.05, 32, 0.05
MODELS = {
    "logistic regression, Boundary(1.3)": (lambda d: nn.Linear(d, 1), lambda: targets.Boundary(1.3)),
    "MLP d-16-1, FGSM(0.5)": (lambda d: nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 1)),
                              lambda: targets.FGSM(0.5)),
}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return hessfree.evaluate_model(model, TensorDataset(x, y), hessfree.BCEWithLogits())["accuracy"]


def attack(model: nn.Module, atk, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    with GradientEngine(model, hessfree.BCEWithLogits(), names) as eng:
        eng.bind(model.state_dict())
        return atk(eng, x, y)


def train(make, data, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = make()
    steps = -(-len(data) // BATCH) * EPOCHS
    hessfree.fit(model, data, loss="bce", lr=LR, epochs=EPOCHS, batch_size=BATCH, checkpoint_every=steps // 5,
                 seed=seed, progress=False)
    return model


def one_repeat(name: str, seed: int) -> dict:
    X, y = load_breast_cancer(return_X_y=True)
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=y)
    va, te = train_test_split(rest, test_size=0.5, random_state=seed, stratify=y[rest])
    sc = StandardScaler().fit(X[tr])
    T = lambda rows: (torch.tensor(sc.transform(X[rows]), dtype=torch.float32),  # noqa: E731
                      torch.tensor(y[rows], dtype=torch.float32))
    (xtr, ytr), (xva, yva), (xte, yte) = T(tr), T(va), T(te)
    train_ds = TensorDataset(xtr, ytr)
    make_model, make_attack = MODELS[name]
    make = lambda: make_model(X.shape[1])  # noqa: E731
    torch.manual_seed(seed)
    model = make()
    steps = -(-len(tr) // BATCH) * EPOCHS
    run = hessfree.fit(model, train_ds, loss="bce", lr=LR, epochs=EPOCHS, batch_size=BATCH,
                       checkpoint_every=steps // 5, seed=seed, progress=False)
    atk = make_attack()
    xte_adv = attack(model, atk, xte, yte)  # the threat: test points attacked on the deployed model
    val = TensorDataset(xva, yva)
    scores = hessfree.influence(run, train_ds, targets.Robustness(val, atk), progress=False)
    k = int(round(REMOVE * len(tr)))
    keep = np.setdiff1d(np.arange(len(tr)), scores.harmful(k))
    defended = train(make, Subset(train_ds, keep.tolist()), seed)
    rand_keep = np.sort(np.random.default_rng(seed).choice(len(tr), len(tr) - k, replace=False))
    randomly = train(make, Subset(train_ds, rand_keep.tolist()), seed)
    return {"clean": accuracy(model, xte, yte), "attacked": accuracy(model, xte_adv, yte),
            "defended_attacked": accuracy(defended, xte_adv, yte), "defended_clean": accuracy(defended, xte, yte),
            "random_attacked": accuracy(randomly, xte_adv, yte), "random_clean": accuracy(randomly, xte, yte),
            "k": k}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "adversarial.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = {}
    for name in MODELS:
        reps = [one_repeat(name, seed) for seed in range(args.repeats)]
        summary = {m: (float(np.mean([r[m] for r in reps])), float(np.std([r[m] for r in reps]))) for m in reps[0]}
        results[name] = {"repeats": reps, "summary": summary}
        print(f"\n== {name} (remove {REMOVE:.0%} = {reps[0]['k']} samples, {args.repeats} repeats)")
        for m, (mu, sd) in summary.items():
            if m != "k":
                print(f"{m:<20}{mu:>8.4f} ± {sd:.4f}")
    out = Path(args.out)
    write_json(out, {"command": "benchmarks/adversarial.py " + " ".join(sys.argv[1:]),
                               "settings": {"epochs": EPOCHS, "lr": LR, "batch_size": BATCH, "remove": REMOVE},
                               "seconds": time.perf_counter() - t0, "results": results})  # temp file + rename
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
