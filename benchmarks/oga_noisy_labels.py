"""Outlier Gradient Analysis on noisy labels: digits, wine and breast cancer with 10% / 20% flips.

For each dataset (scikit-learn's bundled copies) the samples are split 60 / 20 / 20 (stratified,
seed 0) into train / validation / test and standardised on the training part. A fraction (10%,
20%) of the TRAINING labels is flipped uniformly to another class (`hessfree.data.flip_labels`,
seed 0); validation and test labels stay clean. The validation part is used only as the trusted
reference of the OGA one-class SVM, never as a test set.

An MLP (d-H-C, ReLU, cross entropy, plain SGD) is trained on the noisy training set with
`hessfree.fit` (6 checkpoints). Every training sample is scored by
  * OGA (`hessfree.outlier_scores`) on the last layer's weight gradients with the detectors
    iforest, l1, l2, lof and ocsvm (reference = validation), and iforest on all parameters;
  * TracIn self-influence over the checkpoints (`hessfree.self_influence`);
  * cleanlab: `cleanlab.filter.find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence")`
    with out-of-sample pred_probs from 5-fold cross-validation (StratifiedKFold, shuffle, seed 0)
    of (a) a LogisticRegression on the standardised features and (b) the same MLP, trained per
    fold with the same settings. The continuous score is 1 − `cleanlab.rank.get_label_quality_scores`
    (self-confidence, the ranking `find_label_issues` uses); the flagged set is reported too.
Detection of the flipped samples: AUROC, AP and recall@k with k = number flipped.

Trim + retrain: the k most suspicious samples by three scores FIXED IN ADVANCE (OGA iforest on the
last-layer weight, the paper's main variant; self-influence; cleanlab with LogisticRegression
pred_probs) are removed and the MLP retrained (3 seeds), against no removal, k random removals
and the oracle (remove exactly the flipped samples). Reported: clean test accuracy mean ± std.
`hessfree.trim_and_retrain` runs every arm; its train_fn is the default training (hessfree.fit,
same seed, one checkpoint) memoised on (seed, kept rows), so the "none" and "random" arms, the same
in each of the four calls, are trained once.

The models are tiny: on a shared 2-core machine `--threads 1` is several times faster than the
default 2 (OpenMP threads stall when the cores are busy); the numbers do not depend on it.

Usage: .venv/bin/python benchmarks/oga_noisy_labels.py [--seeds 3] [--threads 2]
Needs the `bench` extra's cleanlab. Writes benchmarks/results/oga_noisy_labels.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import Subset, TensorDataset

import hessfree
from hessfree.io import write_json

try:
    import cleanlab
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
except ImportError:  # pragma: no cover - a benchmark extra
    sys.exit("this benchmark needs cleanlab: pip install 'hessfree[bench]' (cleanlab==2.9.0)")

# name -> (loader, hidden units, epochs, lr, batch size)
DATASETS = {
    "digits": (load_digits, 64, 30, 0.05, 32),
    "wine": (load_wine, 16, 60, 0.05, 16),
    "breast_cancer": (load_breast_cancer, 16, 40, 0.05, 32),
}
NOISE = (0.10, 0.20)
N_CHECKPOINTS, CV_FOLDS, SPLIT_SEED, NOISE_SEED = 6, 5, 0, 0
OGA_ROWS = {  # row name -> outlier_scores keyword arguments
    "OGA iforest (last-layer W)": {"detector": "iforest"},
    "OGA l1 (last-layer W)": {"detector": "l1"},
    "OGA l2 (last-layer W)": {"detector": "l2"},
    "OGA lof (last-layer W)": {"detector": "lof"},
    "OGA ocsvm (last-layer W, ref=val)": {"detector": "ocsvm", "reference": True},
    "OGA iforest (all params)": {"detector": "iforest", "params": "all"},
}
SELF_INF = "self-influence (TracIn)"
CL_LR, CL_MLP = "cleanlab (LogReg 5-fold)", "cleanlab (MLP 5-fold)"
# Fixed before any result was seen: OGA's main variant, self-influence, cleanlab's usual setting.
TRIM_BY = ("OGA iforest (last-layer W)", SELF_INF, CL_LR)


def load(name: str) -> dict:
    loader = DATASETS[name][0]
    X, y = loader(return_X_y=True)
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, random_state=SPLIT_SEED, stratify=y)
    va, te = train_test_split(rest, test_size=0.5, random_state=SPLIT_SEED, stratify=y[rest])
    sc = StandardScaler().fit(X[tr])
    Z = {part: sc.transform(X[rows]).astype(np.float32) for part, rows in (("tr", tr), ("va", va), ("te", te))}
    return {"X": Z, "y": {"tr": y[tr], "va": y[va], "te": y[te]}, "classes": int(y.max()) + 1}


def as_ds(X: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.tensor(X), torch.tensor(np.asarray(y), dtype=torch.long))


def make_model_fn(d: int, hidden: int, c: int):
    return lambda: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, c))


def train(model_fn, ds, epochs: int, lr: float, batch: int, seed: int, n_checkpoints: int = 1):
    torch.manual_seed(seed)
    model = model_fn()
    steps = -(-len(ds) // batch) * epochs
    run = hessfree.fit(model, ds, loss="cross_entropy", lr=lr, epochs=epochs, batch_size=batch,
                       checkpoint_every=max(1, steps // n_checkpoints), seed=seed, progress=False)
    return model, run


def cached_train_fn(epochs: int, lr: float, batch: int):
    """A ``trim_and_retrain`` train_fn doing what its default does (``hessfree.fit`` with the same
    seed, one checkpoint), memoised on (seed, kept rows): the "none" and "random" arms, identical in
    every call for the same k and seeds, are trained once instead of once per score."""
    cache: dict = {}

    def train_fn(model: nn.Module, data, seed: int) -> None:
        key = (seed, tuple(data.indices) if isinstance(data, Subset) else "all")
        if key not in cache:
            steps = -(-len(data) // batch) * epochs
            hessfree.fit(model, data, loss="cross_entropy", lr=lr, epochs=epochs, batch_size=batch,
                         checkpoint_every=steps, seed=seed, progress=False)
            cache[key] = {n: v.detach().clone() for n, v in model.state_dict().items()}
            train_fn.trained += 1
        model.load_state_dict(cache[key])

    train_fn.trained = 0
    return train_fn


def accuracy(model: nn.Module, ds) -> float:
    return hessfree.evaluate_model(model, ds, hessfree.CrossEntropy())["accuracy"]


def cv_probs_mlp(X, y, model_fn, epochs, lr, batch, c) -> np.ndarray:
    probs = np.zeros((len(y), c))
    folds = StratifiedKFold(CV_FOLDS, shuffle=True, random_state=0)
    for f, (fit_rows, held) in enumerate(folds.split(X, y)):
        model, _ = train(model_fn, as_ds(X[fit_rows], y[fit_rows]), epochs, lr, batch, seed=f)
        model.eval()
        with torch.no_grad():
            probs[held] = torch.softmax(model(torch.tensor(X[held])), 1).double().numpy()
    return probs


def cleanlab_scores(noisy: np.ndarray, probs: np.ndarray, flipped: np.ndarray) -> tuple[hessfree.Scores, dict]:
    # cleanlab 2.x spells the issue's `ranked_by_label_quality=True` as return_indices_ranked_by=...
    issues = find_label_issues(noisy, probs, return_indices_ranked_by="self_confidence", n_jobs=1)  # worst first
    quality = get_label_quality_scores(noisy, probs)  # the ranking find_label_issues uses (self_confidence)
    n_hit = int(flipped[issues].sum())
    extra = {"n_flagged": int(len(issues)), "flagged_precision": n_hit / max(1, len(issues)),
             "flagged_recall": n_hit / int(flipped.sum()),
             "pred_probs_accuracy_vs_noisy_labels": float((probs.argmax(1) == noisy).mean())}
    return hessfree.Scores(1.0 - quality, np.arange(len(noisy)), {"kind": "outlier", "method": "cleanlab"}), extra


def one_setting(name: str, noise: float, seeds: list[int]) -> dict:
    _, hidden, epochs, lr, batch = DATASETS[name]
    D = load(name)
    Xtr, c = D["X"]["tr"], D["classes"]
    noisy, flipped = hessfree.data.flip_labels(D["y"]["tr"], noise, num_classes=c, seed=NOISE_SEED)
    train_ds, val_ds, test_ds = as_ds(Xtr, noisy), as_ds(D["X"]["va"], D["y"]["va"]), as_ds(D["X"]["te"], D["y"]["te"])
    k = int(flipped.sum())
    model_fn = make_model_fn(Xtr.shape[1], hidden, c)
    t0 = time.perf_counter()
    model, run = train(model_fn, train_ds, epochs, lr, batch, seed=0, n_checkpoints=N_CHECKPOINTS)
    fit_s = time.perf_counter() - t0
    clean_model, _ = train(model_fn, as_ds(Xtr, D["y"]["tr"]), epochs, lr, batch, seed=0)
    with torch.no_grad():
        fit_wrong = float(np.mean(model(torch.tensor(Xtr[flipped])).argmax(1).numpy() == noisy[flipped]))
    info = {"n_train": len(noisy), "n_val": len(val_ds), "n_test": len(test_ds), "classes": c, "k_flipped": k,
            "model": f"MLP {Xtr.shape[1]}-{hidden}-{c}", "n_checkpoints": len(run.checkpoints), "fit_s": fit_s,
            "test_acc_noisy_model": accuracy(model, test_ds),
            "test_acc_clean_labels_model": accuracy(clean_model, test_ds),
            "train_acc_vs_noisy_labels": accuracy(model, train_ds),
            "flipped_fit_to_noisy_label": fit_wrong}

    scores, times, extras = {}, {}, {}
    for row, kw in OGA_ROWS.items():
        kw = dict(kw)
        if kw.pop("reference", False):
            kw["reference"] = val_ds
        t = time.perf_counter()
        scores[row] = hessfree.outlier_scores(run, train_ds, random_state=0, progress=False, **kw)
        times[row] = time.perf_counter() - t
    t = time.perf_counter()
    scores[SELF_INF] = hessfree.self_influence(run, train_ds, progress=False)
    times[SELF_INF] = time.perf_counter() - t
    t = time.perf_counter()
    lr_probs = cross_val_predict(LogisticRegression(max_iter=2000), Xtr, noisy,
                                 cv=StratifiedKFold(CV_FOLDS, shuffle=True, random_state=0), method="predict_proba")
    scores[CL_LR], extras[CL_LR] = cleanlab_scores(noisy, lr_probs, flipped)
    times[CL_LR] = time.perf_counter() - t
    t = time.perf_counter()
    mlp_probs = cv_probs_mlp(Xtr, noisy, model_fn, epochs, lr, batch, c)
    scores[CL_MLP], extras[CL_MLP] = cleanlab_scores(noisy, mlp_probs, flipped)
    times[CL_MLP] = time.perf_counter() - t

    detection = {}
    for row, sc in scores.items():
        detection[row] = {"auroc": hessfree.metrics.auroc(sc, flipped),
                          "ap": hessfree.metrics.average_precision(sc, flipped),
                          "recall_at_k": hessfree.metrics.recall_at_k(sc, flipped, k),
                          "time_s": times[row], **extras.get(row, {})}

    t_retrain = time.perf_counter()
    retrain = {}
    train_fn = cached_train_fn(epochs, lr, batch)  # the none / random arms are the same in every call
    oracle = hessfree.Scores(flipped.astype(float), np.arange(len(noisy)), {"kind": "outlier", "method": "oracle"})
    for row in (*TRIM_BY, "oracle (remove the flipped)"):
        sc = oracle if row.startswith("oracle") else scores[row]
        res = hessfree.trim_and_retrain(sc, train_ds, test_ds, model_fn=model_fn, k=k, loss="cross_entropy",
                                        seeds=seeds, train_fn=train_fn)
        s = res.summary()
        retrain.setdefault("none", s["none"])
        retrain[f"trimmed by {row}"] = {**s["trimmed"], "flipped_among_removed": float(flipped[res.removed].mean())}
        retrain["random"] = s["random"]
    retrain["random"] = retrain.pop("random")  # last row
    info["retrain_trainings"] = train_fn.trained
    info["retrain_s"] = time.perf_counter() - t_retrain
    return {**info, "detection": detection, "retrain": retrain}


def print_setting(name: str, noise: float, r: dict) -> None:
    print(f"\n== {name}, {noise:.0%} flipped: {r['n_train']} train ({r['k_flipped']} flipped) / {r['n_val']} val / "
          f"{r['n_test']} test, {r['model']}, {r['n_checkpoints']} checkpoints; test acc noisy-trained "
          f"{r['test_acc_noisy_model']:.3f}, clean-trained {r['test_acc_clean_labels_model']:.3f}; "
          f"{r['flipped_fit_to_noisy_label']:.0%} of flipped samples fit to their wrong label")
    print(f"\n| score | AUROC | AP | recall@k (k={r['k_flipped']}) | time (s) |")
    print("|---|---:|---:|---:|---:|")
    for row, v in r["detection"].items():
        print(f"| {row} | {v['auroc']:.3f} | {v['ap']:.3f} | {v['recall_at_k']:.3f} | {v['time_s']:.2f} |")
    for row in (CL_LR, CL_MLP):
        v = r["detection"][row]
        print(f"\n{row}: find_label_issues flags {v['n_flagged']} (precision {v['flagged_precision']:.3f}, "
              f"recall {v['flagged_recall']:.3f}); CV accuracy vs noisy labels "
              f"{v['pred_probs_accuracy_vs_noisy_labels']:.3f}", end="")
    print(f"\n\n| arm (remove k={r['k_flipped']}) | test acc | flipped among removed |")
    print("|---|---:|---:|")
    for arm, v in r["retrain"].items():
        fr = f"{v['flipped_among_removed']:.2f}" if "flipped_among_removed" in v else "—"
        print(f"| {arm} | {v['accuracy'][0]:.4f} ± {v['accuracy'][1]:.4f} | {fr} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "oga_noisy_labels.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load0 = list(os.getloadavg())  # other jobs on the machine inflate the timings
    results = {}
    for name in args.datasets:
        for noise in NOISE:
            t = time.perf_counter()
            r = one_setting(name, noise, list(range(args.seeds)))
            r["seconds"] = time.perf_counter() - t
            results[f"{name}@{noise:.2f}"] = r
            print_setting(name, noise, r)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    write_json(out, {
        "command": "benchmarks/oga_noisy_labels.py " + " ".join(sys.argv[1:]),
        "settings": {"datasets": {n: {"hidden": h, "epochs": e, "lr": lr, "batch_size": b}
                                  for n, (_, h, e, lr, b) in DATASETS.items() if n in args.datasets},
                     "noise_model": "uniform flips to another class, training part only",
                     "noise_rates": list(NOISE), "noise_seed": NOISE_SEED,
                     "split": "60/20/20 train/val/test stratified, random_state=0; standardised on train",
                     "loss": "cross_entropy", "optimizer": "plain SGD (hessfree.fit)", "n_checkpoints": N_CHECKPOINTS,
                     "oga": {row: {k: ("validation" if k == "reference" else v) for k, v in kw.items()}
                             for row, kw in OGA_ROWS.items()},
                     "cleanlab": "1 - get_label_quality_scores (self_confidence); pred_probs from 5-fold "
                                 "StratifiedKFold(shuffle, random_state=0) of LogisticRegression(max_iter=2000) "
                                 "or the MLP (fold f trained with seed f)",
                     "recall_at_k": "k = number of flipped samples", "trim_by (fixed in advance)": list(TRIM_BY),
                     "retrain_seeds": list(range(args.seeds)), "torch_threads": args.threads},
        "versions": {"hessfree": hessfree.__version__, "torch": torch.__version__, "cleanlab": cleanlab.__version__,
                     "sklearn": sklearn.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "seconds": seconds, "load_average_at_start_1_5_15min": load0,
        "load_average_at_end_1_5_15min": list(os.getloadavg()), "cpu_count": os.cpu_count(), "results": results})
    print(f"\nwrote {out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
