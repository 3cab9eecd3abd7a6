"""The gradient store, the gradient stream and streaming top-k: stored scores equal live ones, top-k
equals the dense matrix's, builds survive kill -9 and agree across processes, mismatches are refused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import hessfree
from hessfree.errors import InputError
from hessfree.store import GradientStore, StoreMismatchError, build_store, open_store
from store_cases import CHUNKS, case

HERE = Path(__file__).parent
Q = dict(progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    run, train, queries = case()
    path = tmp_path_factory.mktemp("stores") / "exact"
    store = build_store(run, train, path, **CHUNKS, **Q)
    return run, train, queries, store


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- stored = live
def test_exact_store_scores_equal_live_scores(setup):
    run, train, queries, store = setup
    assert store.complete and store.rows == 41 and store.n_chunks == 4
    live_self = hessfree.self_influence(run, train, dtype=torch.float64, **Q)
    assert rel(hessfree.self_influence(store, None).values, live_self.values) < 1e-6
    assert np.array_equal(hessfree.self_influence(store, None).sample_ids, live_self.sample_ids)
    live_pair = hessfree.pairwise_influence(run, train, queries, dtype=torch.float64, **Q)
    got = hessfree.pairwise_influence(store, None, queries, **Q)
    assert got.values.shape == (6, 41) and rel(got.values, live_pair.values) < 1e-6
    assert np.array_equal(got.test_ids, live_pair.test_ids)
    live_inf = hessfree.influence(run, train, queries, dtype=torch.float64, **Q)
    assert rel(hessfree.influence(store, train, queries, **Q).values, live_inf.values) < 1e-6
    pred = hessfree.targets.Prediction(queries.tensors[0][:2], 1)
    assert rel(hessfree.influence(store, None, pred, **Q).values,
               hessfree.influence(run, train, pred, dtype=torch.float64, **Q).values) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_store_scores_within_its_rounding(setup, tmp_path, dtype, tol):
    run, train, queries, store = setup
    half = build_store(run, train, tmp_path / "half", dtype=dtype, **CHUNKS, **Q)
    assert half.manifest["dtype"] == str(dtype).replace("torch.", "")
    exact = hessfree.pairwise_influence(store, None, queries, **Q).values
    got = hessfree.pairwise_influence(half, None, queries, **Q).values
    assert 0 < rel(got, exact) < tol  # rounded, but only by the stored dtype
    # squared norms are exact whatever the stored dtype
    assert np.array_equal(hessfree.self_influence(half, None).values, hessfree.self_influence(store, None).values)


def test_float16_overflow_is_refused_with_the_way_out(setup, tmp_path):
    _, train, _, _ = setup
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 3)
    run = hessfree.Run.from_checkpoints(linear, [linear.state_dict()], [1.0])
    big = TensorDataset(train.tensors[0] * 1e6, train.tensors[1])  # weight gradients r x of ~1e6
    with pytest.raises(InputError, match="float16's range.*bfloat16"):
        build_store(run, big, tmp_path / "big", dtype=torch.float16, **CHUNKS, **Q)
    assert not (tmp_path / "big").exists()  # the new store this call made, without a chunk, is gone
    build_store(run, big, tmp_path / "big", dtype=torch.bfloat16, **CHUNKS, **Q)  # the way out, same folder


# ----------------------------------------------------------------------------- top-k
def test_topk_equals_the_dense_matrix_ties_included(tmp_path):
    run, train, queries = case()
    X, y = train.tensors
    # duplicated samples have equal gradients: ties within and across chunks
    dup = TensorDataset(torch.cat([X[:20], X[:20], X[3:4]]), torch.cat([y[:20], y[:20], y[3:4]]))
    store = build_store(run, dup, tmp_path / "dup", **CHUNKS, **Q)
    dense = hessfree.pairwise_influence(store, None, queries, **Q)
    for k in (1, 4, 41):
        top = hessfree.topk_influence(store, None, queries, k=k, **Q)
        assert np.array_equal(top.helpful(), dense.helpful(k)) and np.array_equal(top.harmful(), dense.harmful(k))
        rows = np.arange(len(queries))[:, None]
        assert np.array_equal(top.helpful_values, dense.values[rows, top.helpful_ids])
        assert np.array_equal(top.harmful_values, dense.values[rows, top.harmful_ids])
    top = hessfree.topk_influence(store, None, queries, k=5, **Q)
    # a live stream with the same chunks gives the same answer as the store
    live = hessfree.topk_influence(run, dup, queries, k=5, **CHUNKS, **Q)
    assert np.array_equal(live.helpful_ids, top.helpful_ids) and np.array_equal(live.harmful_ids, top.harmful_ids)
    assert np.allclose(live.helpful_values, top.helpful_values, rtol=1e-12, atol=0)


def test_topk_cosine_and_aggregates_against_brute_force(setup):
    run, train, queries, store = setup
    G = {}  # per checkpoint: float64 per-sample gradients, brute force (one backward per sample)
    for name, ds in (("train", train), ("query", queries)):
        G[name] = np.stack([_per_sample(run, k, ds) for k in range(3)])
    etas = np.array(run.learning_rates)

    def unit(a):
        n = np.linalg.norm(a, axis=2, keepdims=True)
        return a / n

    cos = np.einsum("k,kmp,knp->mn", etas, unit(G["query"]), unit(G["train"]))
    raw = np.einsum("k,kmp,knp->mn", etas, G["query"], G["train"])
    top = hessfree.topk_influence(store, None, queries, k=3, normalize="cosine", aggregate="mean", **Q)
    order = np.argsort(-cos, axis=1, kind="stable")[:, :3]
    assert np.array_equal(top.helpful_ids, order)
    assert np.allclose(top.helpful_values, np.take_along_axis(cos, order, 1), rtol=1e-5, atol=1e-7)
    assert rel(top.aggregate.values, cos.mean(0)) < 1e-5
    mx = hessfree.topk_influence(store, None, queries, k=3, aggregate="max", **Q)
    assert rel(mx.aggregate.values, raw.max(0)) < 1e-5
    assert mx.meta["aggregate"] == "max" and mx.meta["source"] == "store"


def _per_sample(run, k, ds) -> np.ndarray:
    model = run.model
    state = run.checkpoint_state(k)
    params = {n: v.double().requires_grad_(True) for n, v in state.items()}
    rows = []
    for i in range(len(ds)):
        x, y = ds[i]
        out = torch.func.functional_call(model, params, (x[None].double(),))
        loss = torch.nn.functional.cross_entropy(out, y[None])
        gs = torch.autograd.grad(loss, [params[n] for n, _ in model.named_parameters()])
        rows.append(torch.cat([g.reshape(-1) for g in gs]).numpy())
    return np.stack(rows)


def test_topk_result_saves_and_loads_with_its_aggregate(setup, tmp_path):
    _, _, queries, store = setup
    top = hessfree.topk_influence(store, None, queries, k=2, aggregate="mean", **Q)
    back = hessfree.TopInfluence.load(top.save(tmp_path / "top"))
    assert np.array_equal(back.helpful_ids, top.helpful_ids)
    assert np.array_equal(back.aggregate.values, top.aggregate.values)
    assert back.aggregate.meta["method"] == top.aggregate.meta["method"]


# ----------------------------------------------------------------------------- kill -9, resume
def test_kill9_at_every_step_of_a_build_then_resume_is_byte_identical(tmp_path):
    """The driver SIGKILLs a forked build just before and just after each of its file-system calls,
    then resumes it: the store equals an uninterrupted build byte for byte, committed chunks are
    kept, no temporary remains (crash_driver.py, mode store)."""
    proc = subprocess.run([sys.executable, str(HERE / "crash_driver.py"), "store", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kills"] == 2 * out["calls"] and out["calls"] >= 30
    assert out["empty"] > 0 and out["manifest_only"] > 0 and out["partial"] > 0 and out["complete"] > 0
    assert out["leftovers"] > 0 and out["kept_chunks"] > 0


def test_resume_computes_only_the_missing_chunks(setup, tmp_path):
    run, train, _, store = setup
    path = tmp_path / "again"
    shutil.copytree(store.path, path)
    gone = path / "chunks" / "000000000024"
    shutil.rmtree(gone)
    kept = {p.name: p.stat().st_ino for p in (path / "chunks").iterdir()}
    assert not GradientStore(path).complete and GradientStore(path).missing() == [2]
    with pytest.raises(InputError, match="incomplete.*build_store again"):
        hessfree.self_influence(GradientStore(path), None)
    build_store(run, train, path, **CHUNKS, **Q)
    assert tree_bytes(path) == tree_bytes(store.path)
    assert all((path / "chunks" / n).stat().st_ino == ino for n, ino in kept.items())


# ----------------------------------------------------------------------------- several processes
def test_torchrun_two_processes_equal_one(setup, tmp_path):
    run, train, queries, store = setup
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(HERE / "dist_driver.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert tree_bytes(tmp_path / "store_w2") == tree_bytes(store.path)
    two = hessfree.TopInfluence.load(tmp_path / "topk_w2.npz")
    one = hessfree.topk_influence(store, None, queries, k=4, aggregate="max", **Q)
    for a in ("helpful_ids", "harmful_ids", "helpful_values", "harmful_values"):
        assert np.array_equal(getattr(two, a), getattr(one, a)), a
    assert np.array_equal(two.aggregate.values, one.aggregate.values)
    assert two.meta["world"] == 2


# ----------------------------------------------------------------------------- refusals
def test_a_store_of_other_inputs_is_refused_naming_what_differs(setup, tmp_path):
    run, train, queries, store = setup
    other_run, other_train, _ = case(seed=1)
    with pytest.raises(StoreMismatchError, match="checkpoint 0 \\(other weights\\)"):
        open_store(store.path, other_run)
    with pytest.raises(StoreMismatchError, match="dataset"):
        open_store(store.path, run).check(run, other_train)
    with pytest.raises(StoreMismatchError, match="chunk_rows"):
        build_store(run, train, store.path, chunk_rows=5, batch_size=5, **Q)
    with pytest.raises(StoreMismatchError, match="dtype"):
        build_store(run, train, store.path, dtype=torch.float16, **CHUNKS, **Q)
    with pytest.raises(StoreMismatchError, match="data"):
        build_store(run, other_train, store.path, **CHUNKS, **Q)
    with pytest.raises(StoreMismatchError, match="dataset"):
        hessfree.topk_influence(store, other_train, queries, k=2, **Q)
    lr = hessfree.Run.from_checkpoints(run.model, [run.checkpoint_state(k) for k in range(3)], [0.1, 0.2, 0.4])
    with pytest.raises(StoreMismatchError, match="checkpoint 2 \\(missing or another learning rate\\)"):
        open_store(store.path, lr)


def test_bad_folders_and_arguments_are_refused_before_any_work(setup, tmp_path):
    run, train, queries, store = setup
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("the user's")
    with pytest.raises(InputError, match="not empty and holds no gradient store"):
        build_store(run, train, users, **Q)
    assert sorted(os.listdir(users)) == ["notes.txt"] and (users / "notes.txt").read_text() == "the user's"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        build_store(run, train, tmp_path / "file", **Q)
    with pytest.raises(InputError, match="float32, float16 or bfloat16"):
        build_store(run, train, tmp_path / "f64", dtype=torch.float64, **Q)
    with pytest.raises(InputError, match="chunk_rows"):
        build_store(run, train, tmp_path / "c0", chunk_rows=0, **Q)
    bad_labels = TensorDataset(train.tensors[0], train.tensors[1] + 5)
    with pytest.raises(hessfree.LabelError):
        build_store(run, bad_labels, tmp_path / "labels", **Q)
    assert not (tmp_path / "labels").exists()  # refused before anything was written
    with pytest.raises(InputError, match="no gradient store"):
        GradientStore(tmp_path / "nothing")
    with pytest.raises(InputError, match="normalize"):
        hessfree.topk_influence(store, None, queries, normalize="l2", **Q)
    with pytest.raises(InputError, match="aggregate"):
        hessfree.topk_influence(store, None, queries, aggregate="sum", **Q)
    with pytest.raises(InputError, match="k must be"):
        hessfree.topk_influence(store, None, queries, k=42, **Q)
    with pytest.raises(InputError, match="not bound to a run"):
        hessfree.topk_influence(GradientStore(store.path), None, queries, **Q)
    with pytest.raises(InputError, match="fixes params"):
        hessfree.topk_influence(store, None, queries, params="last_layer", **Q)
    with pytest.raises(InputError, match="checkpoints cannot be chosen"):
        hessfree.self_influence(store, None, checkpoints="last")
    with pytest.raises(InputError, match="training dataset"):
        hessfree.topk_influence(run, None, queries, **Q)


def test_store_files_are_plain_npy_without_pickle(setup):
    _, _, _, store = setup
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest["format"] == "hessfree-gradient-store" and manifest["rows"] == 41
    assert len(manifest["checkpoints"]) == 3 and all(len(c["sha256"]) == 64 for c in manifest["checkpoints"])
    for f in (store.path / "chunks").rglob("*.npy"):
        np.load(f, allow_pickle=False)  # loads without pickle
    first = np.load(store.path / "chunks" / "000000000000" / "grads.npy", mmap_mode="r")
    assert first.shape == (3, 12, store.dim) and first.dtype == np.float32


# ----------------------------------------------------------------------------- OGA from a store
@pytest.mark.parametrize("detector", ["l2", "l1", "iforest", "lof"])
def test_outlier_scores_from_a_store_equal_live_ones(setup, tmp_path, detector):
    run, train, queries, _ = setup
    store = build_store(run, train, tmp_path / "last", params="last_layer_weight", checkpoints="last", **CHUNKS, **Q)
    live = hessfree.outlier_scores(run, train, detector=detector, gradient_path="engine", **Q)
    got = hessfree.outlier_scores(store, None, detector=detector, **Q)
    tol = {"l2": 1e-6, "l1": 1e-6}.get(detector, 1e-4)
    assert rel(got.values, live.values) < tol, detector
    assert got.meta["source"] == "store" and got.meta["detector"] == detector


def test_ocsvm_from_a_store_fits_on_the_reference(setup, tmp_path):
    run, train, queries, _ = setup
    store = build_store(run, train, tmp_path / "last", params="last_layer_weight", checkpoints="last", **CHUNKS, **Q)
    live = hessfree.outlier_scores(run, train, detector="ocsvm", reference=queries, gradient_path="engine", **Q)
    got = hessfree.outlier_scores(store, train, detector="ocsvm", reference=queries, **Q)
    # libsvm stops at tol = 1e-3: float32 rounding differences in the features (other batches) move it that much
    assert got.meta["reference_used"] and rel(got.values, live.values) < 5e-3
    with pytest.raises(InputError, match="not the store's parameter selection"):
        hessfree.outlier_scores(store, None, detector="l2", params="all", **Q)
    with pytest.raises(InputError, match="open the store with its run"):
        hessfree.outlier_scores(GradientStore(store.path), None, detector="ocsvm", reference=queries, **Q)
