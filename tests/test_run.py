"""Recording (fit), the run directory format, Run.load / Run.from_checkpoints, and what scoring
must leave untouched (model weights, train/eval mode); CPU determinism; float64 end to end."""
from __future__ import annotations

import copy
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Subset, TensorDataset

import hessfree
from hessfree import RunDirectoryError, targets
from hessfree.grads.select import select_parameters
from helpers import Crashing, Wrapped, brute_grads, mlp, rel_err, tabular

Q = dict(progress=False)


def lr_schedule(t):
    return 0.3 / (1 + 0.5 * t)


def state_equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def hidden_siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- the run directory
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """N=10, batch 4, 2 epochs: 3 steps/epoch (last batch of 2), checkpoints at steps 3 and 6."""
    rd = tmp_path_factory.mktemp("rec") / "run"
    data = tabular(n=10, seed=0)
    model = mlp(0)
    init = copy.deepcopy(model.state_dict())
    run = hessfree.fit(model, data, lr=lr_schedule, epochs=2, batch_size=4, seed=3, run_dir=rd, **Q)
    return rd, data, model, init, run


def test_fit_writes_run_directory(recorded):
    rd, data, model, init, run = recorded
    manifest = json.loads((rd / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["format"] == "hessfree-run"
    assert (manifest["n_samples"], manifest["steps_per_epoch"], manifest["n_steps"]) == (10, 3, 6)
    assert manifest["checkpoint_every"] == 3  # default: one epoch = ceil(10 / 4)
    assert manifest["lr"] == "schedule"
    data_dir = manifest["steps"].split("/")[0]  # one recording folder, named by the manifest
    assert data_dir.startswith("data-") and manifest["steps"] == f"{data_dir}/steps.npz"
    assert (rd / manifest["steps"]).is_file()
    files = [c["file"] for c in manifest["checkpoints"]]
    assert files == [f"{data_dir}/checkpoints/step_00000003.safetensors",
                     f"{data_dir}/checkpoints/step_00000006.safetensors"]
    # every file carries its size and SHA-256
    assert sorted(manifest["files"]) == sorted(files + [manifest["steps"], manifest["initial"]])
    for rel, entry in manifest["files"].items():
        assert entry["bytes"] == (rd / rel).stat().st_size
        assert entry["sha256"] == hashlib.sha256((rd / rel).read_bytes()).hexdigest()
    assert sorted(p.name for p in rd.iterdir()) == [data_dir, "manifest.json"]  # nothing hidden left
    assert [c["epoch"] for c in manifest["checkpoints"]] == [1.0, 2.0]
    for f in files:
        assert (rd / f).is_file()
    # the initial weights are kept, the last checkpoint is the trained model
    assert state_equal(load_file(str(rd / manifest["initial"])), init)
    assert state_equal(load_file(str(rd / files[-1])), model.state_dict())
    assert not state_equal(load_file(str(rd / files[0])), init)
    assert hidden_siblings(rd) == []  # the recording directory was renamed into place
    with np.load(rd / manifest["steps"], allow_pickle=False) as z:
        assert z["offsets"].tolist() == [0, 4, 8, 10, 14, 18, 20]


def test_run_load_restores_everything(recorded):
    rd, data, model, init, run = recorded
    loaded = hessfree.Run.load(rd, mlp(5))
    assert loaded.run_dir == rd
    assert loaded.task.name == "cross_entropy"
    assert len(loaded) == 2
    assert [c.step for c in loaded.checkpoints] == [3, 6]
    # each checkpoint carries the learning rate of the step that produced it (0-based step s-1)
    assert loaded.learning_rates == [lr_schedule(2), lr_schedule(5)]
    assert loaded.learning_rates == run.learning_rates
    for k in range(2):
        assert state_equal(loaded.checkpoint_state(k), run.checkpoint_state(k))
    log = loaded.step_log
    assert len(log) == 6
    np.testing.assert_array_equal(log.learning_rates, [lr_schedule(t) for t in range(6)])
    np.testing.assert_array_equal(log.sample_ids, np.arange(10))
    assert [len(log.batch_ids(t)) for t in range(6)] == [4, 4, 2, 4, 4, 2]
    epochs = [np.concatenate([log.batch_ids(t) for t in range(e * 3, e * 3 + 3)]) for e in range(2)]
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(10))  # a permutation per epoch
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert not np.array_equal(epochs[0], np.arange(10))
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_array_equal(epochs[0], expected)  # the seed decides the order
    assert "2 checkpoints" in repr(loaded)


def test_step_log_replays_the_training(recorded):
    """Replaying the logged batches with the logged learning rates from init reproduces each checkpoint."""
    rd, data, model, init, run = recorded
    replay = mlp(0)
    replay.load_state_dict(init)
    log = run.step_log
    x, y = data.tensors
    ckpt = {c.step: c for c in run.checkpoints}
    for t in range(len(log)):
        pos = log.positions[t]
        loss = nn.functional.cross_entropy(replay(x[pos]), y[pos])
        grads = torch.autograd.grad(loss, list(replay.parameters()))
        with torch.no_grad():
            for p, g in zip(replay.parameters(), grads):
                p.sub_(g, alpha=float(log.learning_rates[t]))
        if t + 1 in ckpt:
            ref = ckpt[t + 1].state()
            for n, v in replay.state_dict().items():
                assert torch.allclose(v, ref[n], rtol=1e-5, atol=1e-6), (t, n)


@pytest.mark.parametrize("n,bs,epochs,every,steps", [
    (10, 4, 2, None, [3, 6]),
    (10, 4, 2, 4, [4, 6]),        # final checkpoint always saved
    (10, 4, 2, 100, [6]),
    (8, 4, 3, None, [2, 4, 6]),   # N divisible by the batch size
    (5, 32, 2, None, [1, 2]),     # batch larger than N
])
def test_checkpoint_schedule(n, bs, epochs, every, steps):
    run = hessfree.fit(mlp(0), tabular(n=n), epochs=epochs, batch_size=bs, checkpoint_every=every, lr=0.1, **Q)
    assert [c.step for c in run.checkpoints] == steps
    assert run.learning_rates == [0.1] * len(steps)
    assert len(run.step_log) == epochs * math.ceil(n / bs)
    assert run.run_dir is None and run.manifest["status"] == "complete"


def test_in_memory_checkpoints_are_snapshots():
    model = mlp(0)
    run = hessfree.fit(model, tabular(n=12), epochs=2, batch_size=4, **Q)
    first, last = run.checkpoint_state(0), run.checkpoint_state(-1)
    assert not state_equal(first, last)
    assert state_equal(last, model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert state_equal(run.checkpoint_state(-1), last)
    assert not state_equal(run.checkpoint_state(-1), model.state_dict())


def test_fit_restores_mode_and_leaves_frozen_params():
    model = mlp(0)
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = [p.clone() for p in model[0].parameters()]
    model.eval()
    hessfree.fit(model, tabular(n=12), batch_size=4, **Q)
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters()))


def test_load_refuses_incomplete_directory(recorded, tmp_path):
    import shutil
    rd = tmp_path / "copy"
    shutil.copytree(recorded[0], rd)
    hessfree.Run.load(rd, mlp(0))  # the copy is fine as it is
    manifest = json.loads((rd / "manifest.json").read_text())
    manifest["status"] = "recording"
    (rd / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirectoryError, match="incomplete recording.*record it again"):
        hessfree.Run.load(rd, mlp(0))


def test_crash_mid_recording_keeps_old_run(tmp_path):
    rd = tmp_path / "run"
    old = hessfree.fit(mlp(0), tabular(n=10, seed=0), batch_size=4, epochs=2, run_dir=rd, **Q)
    old_states = [old.checkpoint_state(k) for k in range(len(old))]
    old_manifest = (rd / "manifest.json").read_text()

    # 8 fetches for the label check before training, epoch 1 (12 fetches, 1 checkpoint), then crash
    data = Crashing(tabular(n=12, seed=1), ok=8 + 14)
    with pytest.raises(RuntimeError, match="disk error"):
        hessfree.fit(mlp(1), data, batch_size=4, epochs=3, run_dir=rd, overwrite=True, **Q)

    assert (rd / "manifest.json").read_text() == old_manifest
    again = hessfree.Run.load(rd, mlp(0))
    assert len(again) == len(old_states)
    for k, sd in enumerate(old_states):
        assert state_equal(again.checkpoint_state(k), sd)

    # the failed recording removed itself: the old run's files and nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    live = json.loads(old_manifest)["steps"].split("/")[0]
    assert sorted(p.name for p in rd.iterdir()) == [live, "manifest.json"]


def test_overwrite_replaces_old_run(tmp_path):
    rd = tmp_path / "run"
    hessfree.fit(mlp(0), tabular(n=10, seed=0), batch_size=4, run_dir=rd, **Q)
    (rd / "user_note.txt").write_text("belongs to the old run")
    model = mlp(1)
    new = hessfree.fit(model, tabular(n=16, seed=1), batch_size=4, epochs=2, run_dir=rd, overwrite=True, **Q)
    assert new.run_dir == rd
    loaded = hessfree.Run.load(rd, mlp(0))
    assert loaded.manifest["n_samples"] == 16
    assert [c.step for c in loaded.checkpoints] == [4, 8]
    assert state_equal(loaded.checkpoint_state(-1), model.state_dict())
    assert (rd / "user_note.txt").read_text() == "belongs to the old run"  # not hessfree's: kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no backup / recording left behind
    live = loaded.manifest["steps"].split("/")[0]
    assert sorted(p.name for p in rd.iterdir()) == [live, "manifest.json", "user_note.txt"]  # old data gone


def test_subset_sample_ids(tmp_path):
    base = tabular(n=30, seed=0)
    idx = [27, 3, 14, 8, 21, 0, 11]
    inner = Subset(base, list(range(5, 30)))  # a chain of Subsets maps to the root dataset
    chained = Subset(inner, [i - 5 for i in [27, 14, 8, 21, 11]])
    for sub, ids in ((Subset(base, idx), idx), (chained, [27, 14, 8, 21, 11])):
        run = hessfree.fit(mlp(0), sub, batch_size=3, epochs=2, run_dir=tmp_path / f"r{len(ids)}", **Q)
        np.testing.assert_array_equal(run.step_log.sample_ids, ids)
        spe = math.ceil(len(ids) / 3)
        for e in range(2):
            seen = np.concatenate([run.step_log.batch_ids(t) for t in range(e * spe, (e + 1) * spe)])
            assert sorted(seen.tolist()) == sorted(ids)
        s = hessfree.self_influence(run, sub, **Q)
        np.testing.assert_array_equal(s.sample_ids, ids)
        # scores of the subset equal the scores of the same rows taken as a plain dataset
        x, y = base.tensors
        plain = hessfree.self_influence(run, TensorDataset(x[ids], y[ids]), **Q)
        np.testing.assert_array_equal(plain.sample_ids, np.arange(len(ids)))
        np.testing.assert_allclose(s.values, plain.values, rtol=1e-6)


def test_subset_batches_are_the_rows_of_its_tensor_dataset():
    """A Subset chain over a TensorDataset (random_split's output) is batched by indexing the
    tensors, not item by item: the same batches as collating its items, for list, ndarray, tensor
    and range indices, in dataset or any order."""
    from torch.utils.data import default_collate

    from hessfree.datasets import iter_batches

    base = tabular(n=30, seed=0)
    rng = np.random.default_rng(0)
    for indices in ([27, 3, 14, 8, 21, 0, 11, 5, 6], np.array([27, 3, 14, 8, 21, 0, 11, 5, 6]),
                    torch.tensor([27, 3, 14, 8, 21, 0, 11, 5, 6]), range(12, 21),
                    range(-9, 0), [-1, 0, 1, 2, -2, -3, 4, 5, 6], [np.int32(4), torch.tensor(7), 8, 9, 10, 11, 12, 13, 14]):
        for sub in (Subset(base, indices), Subset(Subset(base, indices), [8, 0, 3, 3, 5, 1])):
            for order in (None, rng.permutation(len(sub))):
                batches = list(iter_batches(sub, 4, order))
                assert sum(len(p) for p, _ in batches) == len(sub)
                for pos, batch in batches:
                    want = default_collate([sub[int(i)] for i in pos])
                    assert len(batch) == 2 and all(torch.equal(a, b) for a, b in zip(batch, want))


def test_subset_indices_out_of_range_or_not_integers_are_refused():
    """Out-of-range Subset indices raise as item-by-item indexing would (a contiguous run past the
    end must not be cut short by a slice); float indices are refused, not truncated."""
    from hessfree.datasets import iter_batches
    from hessfree.errors import InputError

    base = tabular(n=30, seed=0)
    for indices in (list(range(25, 35)), [-31], np.arange(28, 33)):
        with pytest.raises(IndexError, match="out of range"):
            list(iter_batches(Subset(base, indices), 4))
    for indices in ([1.7, 2.2], np.array([1.0, 2.0]), torch.tensor([1.0, 2.0])):
        with pytest.raises(InputError, match="integers"):
            list(iter_batches(Subset(base, indices), 4))


def test_tensor_dataset_subclass_items_go_through_its_getitem():
    """A TensorDataset subclass with its own __getitem__ (a transform) is read item by item, never
    by indexing its tensors past the transform (before, scores ignored the transform)."""
    class Doubled(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return 2 * x, y

    class ShiftedSplit(Subset):  # a transform on a split
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x - 10.0, y

        def __getitems__(self, idx):
            return [self[i] for i in idx]

    x, y = tabular(n=20, seed=1).tensors
    model = mlp(0)
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [1.0], loss="cross_entropy")
    for ds, plain in ((Doubled(x, y), TensorDataset(2 * x, y)),
                      (Subset(Doubled(x, y), [4, 1, 9]), TensorDataset(2 * x[[4, 1, 9]], y[[4, 1, 9]])),
                      (ShiftedSplit(TensorDataset(x, y), [4, 1, 9]), TensorDataset(x[[4, 1, 9]] - 10.0, y[[4, 1, 9]]))):
        np.testing.assert_allclose(hessfree.self_influence(run, ds, batch_size=8, **Q).values,
                                   hessfree.self_influence(run, plain, batch_size=8, **Q).values, rtol=1e-6)
        np.testing.assert_allclose(hessfree.outlier_scores(run, ds, detector="l2", batch_size=8, **Q).values,
                                   hessfree.outlier_scores(run, plain, detector="l2", batch_size=8, **Q).values,
                                   rtol=1e-6)


# ----------------------------------------------------------------------------- from_checkpoints
@pytest.fixture(scope="module")
def two_states():
    run = hessfree.fit(mlp(0), tabular(n=12, seed=0), batch_size=4, epochs=2, lr=0.2, **Q)
    return [run.checkpoint_state(k) for k in range(2)]


@pytest.mark.parametrize("read_whole", [True, False])  # small safetensors files read in one go, large ones mmapped
def test_from_checkpoints_formats_give_identical_scores(tmp_path, two_states, monkeypatch, read_whole):
    if not read_whole:
        monkeypatch.setattr("hessfree.run._READ_WHOLE_BYTES", 0)
    train, test = tabular(n=12, seed=0), tabular(n=5, seed=1)
    sources = {"state_dict": list(two_states), "safetensors": [], "pt": [], "pt_wrapped": []}
    for k, sd in enumerate(two_states):
        save_file(sd, str(tmp_path / f"c{k}.safetensors"))
        sources["safetensors"].append(tmp_path / f"c{k}.safetensors")
        torch.save(sd, tmp_path / f"c{k}.pt")
        sources["pt"].append(str(tmp_path / f"c{k}.pt"))
        torch.save({"state_dict": sd, "optimizer": {"lr": 0.2}}, tmp_path / f"w{k}.pt")
        sources["pt_wrapped"].append(tmp_path / f"w{k}.pt")
    results = {}
    for form, srcs in sources.items():
        run = hessfree.Run.from_checkpoints(mlp(7), srcs, [0.2, 0.1])
        assert run.learning_rates == [0.2, 0.1]
        results[form] = (hessfree.self_influence(run, train, **Q).values,
                         hessfree.pairwise_influence(run, train, test, **Q).values)
    ref = results.pop("state_dict")
    assert np.all(ref[0] > 0)
    for form, (s, p) in results.items():
        assert np.array_equal(s, ref[0]), form
        assert np.array_equal(p, ref[1]), form
    # a single float is one learning rate for all checkpoints; it scales the scores linearly
    run = hessfree.Run.from_checkpoints(mlp(7), two_states, 0.4)
    assert run.learning_rates == [0.4, 0.4]
    single = hessfree.self_influence(run, train, checkpoints=[0], **Q).values
    first = hessfree.self_influence(hessfree.Run.from_checkpoints(mlp(7), two_states, [0.2, 0.1]), train,
                                    checkpoints=[0], **Q).values
    np.testing.assert_allclose(single, 2 * first, rtol=1e-12)


def test_from_checkpoints_clones_live_state_dicts():
    model = mlp(0)
    data = tabular(n=12)
    frozen_copy = copy.deepcopy(model.state_dict())
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.1])  # aliases the live parameters
    before = hessfree.self_influence(run, data, **Q).values
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    assert state_equal(run.checkpoint_state(0), frozen_copy)
    after = hessfree.self_influence(run, data, **Q).values
    assert np.array_equal(before, after)
    rerun = hessfree.self_influence(hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.1]), data, **Q)
    assert not np.allclose(rerun.values, before)  # the mutated model really scores differently


# ----------------------------------------------------------------------------- scoring leaves the model alone
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_scoring_leaves_model_weights_and_mode(mode):
    data, test = tabular(n=12, seed=0), tabular(n=4, seed=1)
    model = mlp(0)
    run = hessfree.fit(model, data, batch_size=4, epochs=2, **Q)
    model.train(mode == "train")
    # give the architecture different live weights from every checkpoint
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    before = copy.deepcopy(model.state_dict())
    grads_flags = [p.requires_grad for p in model.parameters()]
    calls = [
        lambda: hessfree.self_influence(run, data, **Q),
        lambda: hessfree.influence(run, data, targets.Loss(test), **Q),
        lambda: hessfree.influence(run, data, targets.Prediction(test.tensors[0], 1), **Q),
        lambda: hessfree.pairwise_influence(run, data, test, params="last_layer", **Q),
    ]
    for call in calls:
        call()
        assert model.training == (mode == "train")
        assert state_equal(model.state_dict(), before)
        assert [p.requires_grad for p in model.parameters()] == grads_flags
        assert all(p.grad is None for p in model.parameters())
        assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    # also when scoring fails half-way
    x, y = data.tensors
    bad = x.clone()
    bad[-1] = float("nan")
    with pytest.raises(hessfree.NonFiniteError):
        hessfree.self_influence(run, TensorDataset(bad, y), batch_size=4, **Q)
    assert model.training == (mode == "train")
    assert state_equal(model.state_dict(), before)
    assert all(not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- determinism
def test_fit_is_bit_identical_on_rerun(tmp_path):
    data = tabular(n=14, seed=2)
    runs = [hessfree.fit(mlp(4), data, batch_size=4, epochs=2, lr=lr_schedule, seed=9, run_dir=tmp_path / f"r{i}",
                         **Q) for i in range(2)]
    assert len(runs[0]) == len(runs[1]) == 2
    for k in range(2):
        a, b = (tmp_path / "r0" / runs[0].manifest["checkpoints"][k]["file"],
                tmp_path / "r1" / runs[1].manifest["checkpoints"][k]["file"])
        assert a.read_bytes() == b.read_bytes()
        assert state_equal(runs[0].checkpoint_state(k), runs[1].checkpoint_state(k))
    for t in range(len(runs[0].step_log)):
        assert np.array_equal(runs[0].step_log.positions[t], runs[1].step_log.positions[t])
    other = hessfree.fit(mlp(4), data, batch_size=4, epochs=2, lr=lr_schedule, seed=10, **Q)
    assert not state_equal(other.checkpoint_state(-1), runs[0].checkpoint_state(-1))  # the seed matters


def test_scores_are_bit_identical_on_rerun():
    data, test = tabular(n=14, seed=2), tabular(n=5, seed=3)
    run = hessfree.fit(mlp(4), data, batch_size=4, epochs=2, **Q)
    fns = {
        "self": lambda: hessfree.self_influence(run, data, batch_size=5, **Q),
        "pairwise": lambda: hessfree.pairwise_influence(run, data, test, batch_size=5, **Q),
        "influence": lambda: hessfree.influence(run, data, test, batch_size=5, **Q),
    }
    for name, fn in fns.items():
        a, b = fn(), fn()
        assert a.values.dtype == np.float64
        assert np.array_equal(a.values, b.values), name
        assert np.array_equal(a.sample_ids, b.sample_ids)


# ----------------------------------------------------------------------------- float64 end to end
def test_float64_end_to_end(tmp_path):
    data32 = tabular(n=16, seed=0)
    data64 = TensorDataset(data32.tensors[0].double(), data32.tensors[1])
    model = mlp(0).double()
    hessfree.fit(model, data64, batch_size=4, epochs=2, lr=0.2, run_dir=tmp_path / "r", **Q)
    run = hessfree.Run.load(tmp_path / "r", mlp(0).double())
    assert all(v.dtype == torch.float64 for v in run.checkpoint_state(-1).values())
    names = select_parameters(run.model, "all")
    G = brute_grads(run, data64, names)
    ref = sum(eta * (g * g).sum(1) for eta, g in zip(run.learning_rates, G))

    s64 = hessfree.self_influence(run, data64, dtype=torch.float64, **Q)
    s32 = hessfree.self_influence(run, data32, dtype=torch.float32, **Q)
    assert s64.meta["dtype"] == "float64" and s32.meta["dtype"] == "float32"
    assert rel_err(s64.values, ref) <= 1e-10
    assert rel_err(s32.values, ref) <= 1e-4
    assert not np.array_equal(s32.values, s64.values)  # float32 really ran in lower precision

    test64 = TensorDataset(data64.tensors[0][:3], data64.tensors[1][:3])
    p64 = hessfree.pairwise_influence(run, data64, test64, dtype=torch.float64, **Q)
    pair_ref = sum(eta * g[:3] @ g.T for eta, g in zip(run.learning_rates, G))
    assert rel_err(p64.values, pair_ref) <= 1e-10


def test_fit_wrapper_model_with_module_prefix(tmp_path):
    run = hessfree.fit(Wrapped(), tabular(n=8), batch_size=4, run_dir=tmp_path / "r", **Q)
    assert len(run) == 1


def test_scoring_puts_the_model_back_after_an_error():
    data = tabular(n=12, seed=0)
    run = hessfree.fit(mlp(0), data, epochs=1, batch_size=4, **Q)
    model = run.model
    model.train()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    bad = TensorDataset(data.tensors[0].clone(), data.tensors[1])
    bad.tensors[0][5] = float("nan")
    with pytest.raises(hessfree.NonFiniteError, match="sample id"):
        hessfree.self_influence(run, bad, **Q)
    assert model.training
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1])


def test_unreadable_safetensors_checkpoints_name_the_file(tmp_path, two_states):
    from hessfree.errors import CheckpointMismatchError

    paths = []
    for k, sd in enumerate(two_states):
        paths.append(tmp_path / f"c{k}.safetensors")
        save_file(sd, str(paths[-1]))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointMismatchError, match="bad.safetensors"):
        hessfree.Run.from_checkpoints(mlp(7), [paths[0], bad], [0.1, 0.1])
    run = hessfree.Run.from_checkpoints(mlp(7), paths, [0.1, 0.1])
    paths[1].write_bytes(paths[1].read_bytes()[:-40])  # truncated after the Run was made
    with pytest.raises(CheckpointMismatchError, match=r"c1\.safetensors.*truncated"):
        hessfree.self_influence(run, tabular(n=12, seed=0), **Q)
    paths[1].unlink()
    with pytest.raises(CheckpointMismatchError, match=r"c1\.safetensors"):
        hessfree.self_influence(run, tabular(n=12, seed=0), **Q)


def test_aliased_checkpoint_keys_must_agree(tmp_path):
    """A module registered twice has two state-dict keys for one tensor; a checkpoint whose two
    entries differ is refused (the engine would read one, load_state_dict the other)."""
    from hessfree.errors import CheckpointMismatchError

    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(good, **{"2.weight": good["0.weight"] + 1})
    hessfree.Run.from_checkpoints(model, [good], [1.0])  # equal entries: fine
    with pytest.raises(CheckpointMismatchError, match="'0.weight' and '2.weight' are one tensor"):
        hessfree.Run.from_checkpoints(model, [good, bad], [1.0, 1.0])
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in bad.items()}, str(path))
    run = hessfree.Run.from_checkpoints(model, [path], [1.0])  # only the header is read here
    data = TensorDataset(torch.randn(6, 4), torch.randint(0, 3, (6,)))
    with pytest.raises(CheckpointMismatchError, match="checkpoint 0.*one tensor"):
        hessfree.self_influence(run, data, progress=False)
