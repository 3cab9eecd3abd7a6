"""End to end: the console script runs the demo and its JSON agrees with the saved scores."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from torch import nn

import hessfree
from hessfree.workflows.demo import digits_noisy


def test_demo_cli_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "hessfree.cli", "demo", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "recall@10%" in proc.stdout
    result = json.loads((out / "demo.json").read_text())
    assert result["n_checkpoints"] == 6 and result["n_flipped"] == 144
    row = next(r for r in result["methods"] if r["method"] == "self_influence")
    # recompute from what was saved: the saved scores and the seeded flips
    scores = hessfree.Scores.load(out / "self_influence.npz")
    flipped = digits_noisy(0.1, 0)["flipped"]
    assert np.isclose(row["recall_at_10pct"], hessfree.metrics.recall_at_k(scores, flipped, 0.1))
    assert row["recall_at_10pct"] >= 0.95
    run = hessfree.Run.load(out / "run", nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
    assert len(run.checkpoints) == 6


def test_cli_rejects_unknown_command():
    proc = subprocess.run([sys.executable, "-m", "hessfree.cli", "nonsense"], capture_output=True, text=True)
    assert proc.returncode != 0 and "invalid choice" in proc.stderr
