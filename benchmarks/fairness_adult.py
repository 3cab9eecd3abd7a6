"""Fairness repair on UCI Adult (evaluation.md protocol 4), as the published fairness experiments
set it up: rows with a missing value dropped; all 30,162 training rows for training; the official
test rows split 50/50 with random_state=42000 into validation (where targets are measured) and
test; one-hot features standardised.

Models: (1) L2-regularised logistic regression without intercept, λ = meta.json's l2_reg
(scikit-learn lbfgs on Σ loss + λ/2 ||w||², deterministic), scored by IP (a one-checkpoint Run,
η = 1) and, as a baseline row, by exact-Hessian influence q·H⁻¹g_i with H = Σ p(1−p) x xᵀ + λI;
(2) an MLP d-32-1 trained with hessfree.fit (plain SGD), scored by TracIn over its checkpoints.
For the demographic-parity and equal-opportunity targets, remove the 1%, 5%, 10% most
fairness-harmful samples, retrain, and report test accuracy and signed / absolute DP and EO gaps
against no removal and random removal (5 seeds).

Usage: .venv/bin/python benchmarks/fairness_adult.py [--data-dir DIR] [--seeds 5]
Writes benchmarks/results/fairness_adult.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset

import hessfree
from hessfree.io import write_json
from hessfree import targets

FRACTIONS = (0.01, 0.05, 0.10)
MLP_EPOCHS, MLP_LR, MLP_BATCH = 5, 0.05, 256


def lr_fit(X: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    clf = LogisticRegression(C=1.0 / lam, fit_intercept=False, solver="lbfgs", max_iter=5000, tol=1e-10)
    clf.fit(X, y)
    return clf.coef_.reshape(-1)


def linear_model(w: np.ndarray) -> nn.Module:
    m = nn.Linear(len(w), 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w, dtype=torch.float32)[None])
    return m


def exact_hessian_influence(w: np.ndarray, X: np.ndarray, y: np.ndarray, lam: float, q: np.ndarray) -> np.ndarray:
    """q·H⁻¹g_i for every training sample (float64): the classical influence, same sign convention."""
    p = 1 / (1 + np.exp(-(X @ w)))
    H = (X * (p * (1 - p))[:, None]).T @ X + lam * np.eye(len(w))
    G = (p - y)[:, None] * X  # per-sample gradients of the BCE loss
    return G @ np.linalg.solve(H, q)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fairness_adult.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    d = hessfree.data.adult(args.data_dir)
    lam = float(d.meta["l2_reg"])
    va_idx, te_idx = train_test_split(np.arange(len(d.y_test)), test_size=0.5, random_state=42000)
    Xtr, ytr = d.X_train.astype(np.float64), d.y_train
    train = TensorDataset(torch.tensor(d.X_train), torch.tensor(ytr, dtype=torch.float32))
    val = TensorDataset(torch.tensor(d.X_test[va_idx]), torch.tensor(d.y_test[va_idx], dtype=torch.float32))
    test = TensorDataset(torch.tensor(d.X_test[te_idx]), torch.tensor(d.y_test[te_idx], dtype=torch.float32))
    s_val, s_test = d.s_test[va_idx], d.s_test[te_idx]
    n = len(ytr)
    tgts = {"DP": lambda: targets.DemographicParity(val, s_val), "EO": lambda: targets.EqualOpportunity(val, s_val)}
    task = hessfree.BCEWithLogits()
    results: dict = {"logistic_regression": {}, "mlp": {}}

    def evaluate(model):
        return hessfree.evaluate_model(model, test, task, s_test)

    # ---------------------------------------------------------------- logistic regression
    w = lr_fit(Xtr, ytr, lam)
    base_model = linear_model(w)
    run = hessfree.Run.from_checkpoints(base_model, [base_model.state_dict()], [1.0], loss="bce")
    lr_res = {"no removal": evaluate(base_model), "lambda": lam}
    for tname, make in tgts.items():
        target = make()
        ip = hessfree.influence(run, train, target, dtype=torch.float64, progress=False)
        with hessfree.grads.GradientEngine(base_model, task, ["weight"], dtype=torch.float64) as eng:
            eng.bind(base_model.state_dict())
            q = target.gradient(eng)["weight"].reshape(-1).numpy()
        exact = hessfree.Scores(exact_hessian_influence(w, Xtr, ytr, lam, q), ip.sample_ids,
                                {"kind": "influence", "method": "exact_hessian"})
        rows = {}
        for frac in FRACTIONS:
            k = int(round(frac * n))
            row = {}
            for label, sc in (("IP", ip), ("exact Hessian", exact)):
                keep = np.setdiff1d(np.arange(n), sc.harmful(k))
                row[label] = evaluate(linear_model(lr_fit(Xtr[keep], ytr[keep], lam)))
            rand = []
            for seed in seeds:
                keep = np.sort(np.random.default_rng(seed).choice(n, n - k, replace=False))
                rand.append(evaluate(linear_model(lr_fit(Xtr[keep], ytr[keep], lam))))
            row["random"] = {m: (float(np.mean([r[m] for r in rand])), float(np.std([r[m] for r in rand])))
                             for m in rand[0]}
            row["k"] = k
            rows[f"{frac:.0%}"] = row
        corr = hessfree.metrics.spearman(ip.values, exact.values)
        lr_res[tname] = {"removal": rows, "spearman_ip_vs_exact": corr}
        print(f"LR {tname}: Spearman(IP, exact Hessian) = {corr:.3f}", flush=True)
    results["logistic_regression"] = lr_res

    # ---------------------------------------------------------------- MLP
    def make_mlp():
        return nn.Sequential(nn.Linear(Xtr.shape[1], 32), nn.ReLU(), nn.Linear(32, 1))

    torch.manual_seed(0)
    mlp = make_mlp()
    steps = -(-n // MLP_BATCH) * MLP_EPOCHS
    mrun = hessfree.fit(mlp, train, loss="bce", lr=MLP_LR, epochs=MLP_EPOCHS, batch_size=MLP_BATCH,
                        checkpoint_every=steps // 5, seed=0, progress=False)
    mlp_res = {"no removal": evaluate(mlp)}
    for tname, make in tgts.items():
        sc = hessfree.influence(mrun, train, make(), progress=False)
        rows = {}
        for frac in FRACTIONS:
            tr = hessfree.trim_and_retrain(sc, train, test, model_fn=make_mlp, k=frac, loss="bce", lr=MLP_LR,
                                           epochs=MLP_EPOCHS, batch_size=MLP_BATCH, seeds=seeds,
                                           sensitive_test=s_test)
            rows[f"{frac:.0%}"] = {**tr.summary(), "k": tr.k}
        mlp_res[tname] = {"removal": rows}
        print(f"MLP {tname} done", flush=True)
    results["mlp"] = mlp_res

    # ---------------------------------------------------------------- report
    def show(v):
        return v if isinstance(v, tuple) else (v, 0.0)

    for model_name, res in results.items():
        print(f"\n== {model_name}: no removal: " + ", ".join(f"{m} {v:.4f}" for m, v in res["no removal"].items()))
        for tname in tgts:
            print(f"-- target {tname}")
            print(f"{'removed':<9}{'method':<15}{'acc':>16}{'DP gap':>18}{'|DP|':>16}{'EO gap':>18}{'|EO|':>16}")
            for frac, row in res[tname]["removal"].items():
                for method, v in row.items():
                    if method == "k":
                        continue
                    if model_name == "mlp" and method == "none":
                        continue
                    cells = [show(v[m]) for m in ("accuracy", "dp_gap", "abs_dp_gap", "eo_gap", "abs_eo_gap")]
                    print(f"{frac:<9}{method:<15}" + "".join(f"{c[0]:>10.4f}±{c[1]:<6.4f}" for c in cells))
    out = Path(args.out)
    write_json(out, {"command": "benchmarks/fairness_adult.py " + " ".join(sys.argv[1:]),
                               "seconds": time.perf_counter() - t0, "n_train": n, "n_val": len(va_idx),
                               "n_test": len(te_idx), "results": results})  # temp file + rename
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
