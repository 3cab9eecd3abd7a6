"""Files are never lost, results never silently wrong, a model never left half-trained.

Kill -9 at every file-system step of a write, a full disk, folders that are not hessfree's,
edited or damaged run folders, the wrong dataset, and failing trainings.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import hessfree
from hessfree import InputError, NonFiniteError, RunDirectoryError, Scores
from hessfree.errors import DatasetMismatchError, RunIntegrityError
from helpers import Crashing, mlp, tabular

Q = dict(progress=False)
HERE = Path(__file__).parent


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` with its bytes (None for folders)."""
    return {str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bit_identical(a: dict, b: dict) -> bool:
    """Same keys, dtypes and bytes (NaN payloads included)."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes()
                                        for k in a)


# ----------------------------------------------------------------------------- kill -9
@pytest.mark.parametrize("mode", ["fit", "save"])
def test_kill9_at_every_step_never_loses_or_half_writes(tmp_path, mode):
    """The driver SIGKILLs a forked writer just before and just after each of its file-system calls
    (every rename included), then loads what is there (old or new, whole) and writes again, which
    must leave no leftover. See crash_driver.py."""
    proc = subprocess.run([sys.executable, str(HERE / "crash_driver.py"), mode, str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kills"] == 2 * out["calls"] and out["calls"] >= (30 if mode == "fit" else 3)
    assert out["old"] > 0 and out["new"] > 0 and out["old"] + out["new"] == out["kills"]
    assert out["leftovers"] > 0  # kills did leave temporaries, and the next write removed them all


# ----------------------------------------------------------------------------- full disk
def enospc_at(n: int):
    """A patched flush that fails with 'no space left' at its n-th call (after the bytes were written)."""
    import hessfree.io as hio

    real, calls = hio.fsync_file, [0]

    def fsync_file(path):
        calls[0] += 1
        if calls[0] == n:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path)

    return fsync_file


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_full_disk_during_fit_keeps_old_run_model_and_no_temporaries(tmp_path, monkeypatch, n):
    rd = tmp_path / "run"
    hessfree.fit(mlp(0), tabular(n=16), batch_size=8, epochs=2, run_dir=rd, **Q)
    before_tree = tree(tmp_path)
    model = mlp(1)
    before = state_of(model)
    monkeypatch.setattr("hessfree.io.fsync_file", enospc_at(n))
    with pytest.raises(OSError, match="No space left"):
        hessfree.fit(model, tabular(n=16, seed=1), batch_size=8, epochs=2, run_dir=rd, overwrite=True, **Q)
    assert tree(tmp_path) == before_tree  # old run byte for byte, nothing added
    assert bit_identical(state_of(model), before)
    hessfree.Run.load(rd, mlp(0))


def test_full_disk_during_scores_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    Scores([1.0, 2.0], [0, 1]).save(path)
    before = path.read_bytes()
    monkeypatch.setattr("hessfree.io.fsync_file", enospc_at(1))
    with pytest.raises(OSError, match="No space left") as info:
        Scores(np.arange(10.0), np.arange(10)).save(path)
    assert "disk holding" in "".join(getattr(info.value, "__notes__", []))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.npz"]


def _tmpfs(path: Path, size: str):
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


def test_real_full_disk_keeps_old_run_and_leaves_nothing(tmp_path):
    disk = tmp_path / "disk"
    _tmpfs(disk, "600k")
    try:
        rd = disk / "run"
        torch.manual_seed(0)
        small = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        hessfree.fit(small, tabular(n=16), batch_size=8, epochs=1, run_dir=rd, **Q)
        before_tree = tree(disk)
        torch.manual_seed(1)
        big = nn.Sequential(nn.Linear(6, 16000), nn.ReLU(), nn.Linear(16000, 3))  # ~450 kB a checkpoint
        before = state_of(big)
        with pytest.raises(OSError) as info:
            hessfree.fit(big, tabular(n=16), batch_size=8, epochs=2, run_dir=disk / "run2", **Q)
        assert info.value.errno == errno.ENOSPC
        assert tree(disk) == before_tree  # no recording left filling the disk
        assert bit_identical(state_of(big), before)
        hessfree.Run.load(rd, small)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ----------------------------------------------------------------------------- folders that are not runs
def test_overwrite_never_replaces_a_folder_hessfree_did_not_write(tmp_path):
    user = tmp_path / "proj"
    (user / "run").mkdir(parents=True)
    (user / "run" / "log.txt").write_text("my notes")
    (user / "run" / "sub").mkdir()
    before = tree(tmp_path)
    model = mlp(0)
    before_model = state_of(model)
    for target in (user / "run", user):
        with pytest.raises(RunDirectoryError, match="not a hessfree run.*never"):
            hessfree.fit(model, tabular(n=8), batch_size=4, run_dir=target, overwrite=True, **Q)
    assert tree(tmp_path) == before and bit_identical(state_of(model), before_model)
    (user / "run" / "manifest.json").write_text(json.dumps({"format": "somebody-else"}))
    with pytest.raises(RunDirectoryError, match="not a hessfree run manifest"):
        hessfree.fit(model, tabular(n=8), batch_size=4, run_dir=user / "run", overwrite=True, **Q)


def test_run_dir_dot_refused_before_training(tmp_path, monkeypatch):
    (tmp_path / "code.py").write_text("print(1)")
    monkeypatch.chdir(tmp_path)
    data = Crashing(tabular(n=8), ok=0)  # any fetch would raise: nothing may be read
    with pytest.raises(RunDirectoryError, match="not a hessfree run"):
        hessfree.fit(mlp(0), data, batch_size=4, run_dir=".", **Q)
    assert data.fetched == 0 and os.listdir(tmp_path) == ["code.py"]


def test_overwrite_of_an_older_layout_removes_only_its_own_files(tmp_path):
    rd = tmp_path / "run"
    run = hessfree.fit(mlp(0), tabular(n=8), batch_size=4, run_dir=rd, **Q)
    # rebuild the layout of runs recorded before data folders and checksums: files at the top
    manifest = json.loads((rd / "manifest.json").read_text())
    data = manifest["steps"].split("/")[0]
    for item in (rd / data).iterdir():
        if item.name != ".hessfree-data":
            shutil.move(str(item), str(rd / item.name))
    shutil.rmtree(rd / data)
    for _, c, key in hessfree.run_dir.path_fields(manifest):
        c[key] = c[key].split("/", 1)[1]
    del manifest["files"]
    manifest["version"] = 1
    (rd / "manifest.json").write_text(json.dumps(manifest))
    (rd / "checkpoints" / "mine.txt").write_text("keep")
    (rd / "notes.txt").write_text("keep")
    assert len(hessfree.Run.load(rd, mlp(0))) == len(run)  # an old run still loads (no checksums to check)
    hessfree.fit(mlp(1), tabular(n=8), batch_size=4, run_dir=rd, overwrite=True, **Q)
    live = json.loads((rd / "manifest.json").read_text())["steps"].split("/")[0]
    assert sorted(p.name for p in rd.iterdir()) == sorted(["checkpoints", live, "manifest.json", "notes.txt"])
    assert [p.name for p in (rd / "checkpoints").iterdir()] == ["mine.txt"]


def test_demo_never_overwrites_without_being_told(tmp_path):
    from hessfree.workflows.demo import DemoConfig, run_demo

    out = tmp_path / "proj"
    (out / "run").mkdir(parents=True)
    (out / "run" / "log.txt").write_text("mine")
    cfg = DemoConfig(epochs=1, n_checkpoints=1)
    with pytest.raises(RunDirectoryError, match="--overwrite"):
        run_demo(out, cfg, progress=False)
    with pytest.raises(RunDirectoryError, match="does not name as the demo's"):
        run_demo(out, cfg, progress=False, overwrite=True)
    assert tree(tmp_path) == {"proj": None, "proj/run": None, "proj/run/log.txt": b"mine"}
    out2 = tmp_path / "two"
    run_demo(out2, cfg, progress=False)
    (out2 / "mine.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "hessfree.cli", "demo", "--out", str(out2), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((out2 / "demo.json").read_text())["status"] == "complete"
    # a demo that fails part-way says so in demo.json instead of leaving results of two seeds unmarked
    with pytest.raises(ValueError):
        run_demo(out2, DemoConfig(epochs=1, n_checkpoints=1, noise=2.0), progress=False, overwrite=True)
    status = json.loads((out2 / "demo.json").read_text())
    assert status["status"] == "failed" and status["config"]["noise"] == 2.0
    assert (out2 / "mine.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- silently wrong results
@pytest.fixture()
def saved(tmp_path):
    rd = tmp_path / "run"
    hessfree.fit(mlp(0), tabular(n=16), batch_size=8, epochs=2, run_dir=rd, **Q)
    return rd


def edit_manifest(rd: Path, fn) -> None:
    m = json.loads((rd / "manifest.json").read_text())
    fn(m)
    (rd / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit,pattern", [
    (lambda m: m["checkpoints"][0].update(learning_rate=float("nan")), "learning rate nan"),
    (lambda m: m["checkpoints"][1].update(learning_rate=-0.1), "learning rate -0.1"),
    (lambda m: m["checkpoints"][0].update(learning_rate="0.1"), "not a finite positive"),
    (lambda m: m["checkpoints"][0].update(file="../../elsewhere.safetensors"), "outside the run folder"),
    (lambda m: m["checkpoints"][0].update(file="/etc/passwd"), "outside the run folder"),
    (lambda m: m.update(steps="../steps.npz"), "outside the run folder"),
    (lambda m: m.update(checkpoints=[]), "no checkpoints"),
    (lambda m: m.pop("task"), "no task name"),
    (lambda m: m["checkpoints"][0].update(step=-3), "step -3"),
])
def test_edited_manifest_refused(saved, edit, pattern):
    edit_manifest(saved, edit)
    with pytest.raises(RunIntegrityError, match=pattern):
        hessfree.Run.load(saved, mlp(0))


def test_manifest_not_json_or_missing_file(saved):
    m = json.loads((saved / "manifest.json").read_text())
    shutil.copy(saved / "manifest.json", saved.parent / "m.json")
    (saved / "manifest.json").write_text("{broken")
    with pytest.raises(RunIntegrityError, match="cannot be read as JSON"):
        hessfree.Run.load(saved, mlp(0))
    shutil.copy(saved.parent / "m.json", saved / "manifest.json")
    (saved / m["steps"]).unlink()
    with pytest.raises(RunIntegrityError, match="is missing"):
        hessfree.Run.load(saved, mlp(0))


def test_rewritten_checkpoint_is_caught_before_and_after_loading(saved):
    m = json.loads((saved / "manifest.json").read_text())
    ck = saved / m["checkpoints"][-1]["file"]
    good = ck.read_bytes()
    run = hessfree.Run.load(saved, mlp(0))
    # rewritten after loading: a valid checkpoint of the same shapes, other values
    from safetensors.torch import save_file
    save_file({k: v + 1 for k, v in run.checkpoint_state(-1).items()}, str(ck))
    with pytest.raises(RunIntegrityError, match="rewritten after the run was loaded"):
        hessfree.self_influence(run, tabular(n=16), **Q)
    with pytest.raises(RunIntegrityError, match="does not match the checksum"):
        hessfree.Run.load(saved, mlp(0))
    assert len(hessfree.Run.load(saved, mlp(0), verify=False)) == 2  # the user's explicit choice
    ck.write_bytes(good[:-10])  # truncated
    with pytest.raises(RunIntegrityError, match="truncated or rewritten"):
        hessfree.Run.load(saved, mlp(0))
    ck.write_bytes(good)  # put back: both runs score again, identically
    np.testing.assert_array_equal(hessfree.self_influence(run, tabular(n=16), **Q).values,
                                  hessfree.self_influence(hessfree.Run.load(saved, mlp(0)), tabular(n=16), **Q).values)


def test_damaged_step_log_refused(saved):
    m = json.loads((saved / "manifest.json").read_text())
    steps = saved / m["steps"]
    steps.write_bytes(steps.read_bytes()[:100])
    with pytest.raises(RunIntegrityError, match="cannot be read"):
        hessfree.Run.load(saved, mlp(0), verify=False)


def test_step_log_with_bad_rates_refused(saved):
    m = json.loads((saved / "manifest.json").read_text())
    steps = saved / m["steps"]
    with np.load(steps, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["lr"][2] = np.nan
    np.savez(steps, **arrays)
    with pytest.raises(RunIntegrityError, match="learning rates"):
        hessfree.Run.load(saved, mlp(0), verify=False)


def dit_run(n=24):
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(n, 3, dtype=torch.float64, generator=g), torch.randint(0, 2, (n,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    run = hessfree.fit(model, train, batch_size=6, epochs=2, record="every_step", **Q)
    return run, train


def test_dit_refuses_another_training_set_of_the_same_size(tmp_path):
    run, train = dit_run()
    q = hessfree.queries.ValLoss(train)
    hessfree.dit(run, train, q, **Q)
    x, y = train.tensors
    other = TensorDataset(x.flip(0).clone(), y.flip(0).clone())  # same size, same ids, other data
    with pytest.raises(DatasetMismatchError, match="other content"):
        hessfree.dit(run, other, q, **Q)
    nudged = TensorDataset(x.clone(), y.clone())
    nudged.tensors[0][0, 0] += 1e-6  # the first sample is always in the fingerprint
    with pytest.raises(DatasetMismatchError):
        hessfree.dit(run, nudged, q, **Q)
    with pytest.raises(DatasetMismatchError, match="other sample ids"):
        hessfree.dit(run, TensorDataset(x[:-1], y[:-1]), q, **Q)


def test_fit_refuses_a_task_whose_loss_is_a_scalar():
    class MeanLoss(hessfree.CrossEntropy):
        name = "mean_ce"

        def per_sample_loss(self, outputs, targets):
            return super().per_sample_loss(outputs, targets).mean()

    model = mlp(0)
    before = state_of(model)
    with pytest.raises(InputError, match=r"one loss per sample.*not their mean"):
        hessfree.fit(model, tabular(n=16), batch_size=8, loss=MeanLoss(), **Q)
    assert bit_identical(state_of(model), before)


# ----------------------------------------------------------------------------- failed fits
class FailAt(Dataset):
    """Raises ``exc`` at the ``at``-th fetch (after the label check has read every sample)."""

    def __init__(self, base, at, exc):
        self.base, self.at, self.exc, self.fetched = base, at, exc, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.fetched += 1
        if self.fetched == self.at:
            raise self.exc
        return self.base[i]


@pytest.mark.parametrize("how", ["nan_input", "keyboard_interrupt", "dataset_error", "lr_schedule", "nan_weights"])
def test_failed_fit_leaves_the_model_bit_identical(tmp_path, how):
    data = tabular(n=32)
    model = mlp(0)
    model[0].register_buffer("counter", torch.tensor([1.5, float("nan")]))  # a buffer, NaN payload included
    before = state_of(model)
    kw = dict(batch_size=8, epochs=3, run_dir=tmp_path / "r", **Q)
    if how == "nan_input":
        x, y = data.tensors
        x = x.clone()
        x[20, 1] = float("nan")
        data, err = TensorDataset(x, y), NonFiniteError
    elif how == "keyboard_interrupt":
        data, err = FailAt(data, 32 + 50, KeyboardInterrupt()), KeyboardInterrupt
    elif how == "dataset_error":
        data, err = FailAt(data, 32 + 70, ValueError("bad row")), ValueError
    elif how == "lr_schedule":
        kw["lr"], err = (lambda t: 0.1 if t < 7 else float("nan")), InputError
    else:
        kw["lr"], err = 1e30, NonFiniteError
    with pytest.raises(err):
        hessfree.fit(model, data, **kw)
    assert bit_identical(state_of(model), before)
    assert not (tmp_path / "r").exists() or not any(p for p in (tmp_path / "r").iterdir())


def huge_input_at_77():
    """A small MLP and 160 samples, sample 77's inputs 1e30."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 5, generator=g), torch.randint(0, 2, (160,), generator=g)
    x[77] = 1e30
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2)), TensorDataset(x, y)


def deep_relu():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def test_huge_input_is_traced_to_its_sample():
    model, data = huge_input_at_77()
    with pytest.raises(NonFiniteError, match=r"diverged\. It began with sample id 77 at step \d+"):
        hessfree.fit(model, data, lr=0.1, epochs=3, batch_size=16, **Q)


@pytest.mark.parametrize("lr", [1e2, 1e4])
def test_divergence_of_the_whole_batch_blames_the_learning_rate(lr):
    model = deep_relu()
    with pytest.raises(NonFiniteError, match=r"diverged\. It began at step 1, where the losses of the whole batch "
                                             r"jumped.*lower the learning rate"):
        hessfree.fit(model, tabular(n=64), lr=lr, epochs=50, batch_size=16, **Q)


# ----------------------------------------------------------------------------- stacking fallbacks
def test_a_users_dataset_error_surfaces_at_once_not_as_a_stacking_failure(caplog):
    data = tabular(n=64)
    run = hessfree.fit(mlp(0), data, batch_size=16, epochs=3, checkpoint_every=4, **Q)
    assert len(run) == 3
    counted = Crashing(data, ok=10**9)  # counts its fetches
    plain = hessfree.self_influence(run, counted, batch_size=16, **Q)
    assert plain.meta["checkpoints_per_pass"] == 3  # all three checkpoints share each pass
    total = counted.fetched  # the label check, then one pass over the 64 samples
    assert total >= 64
    for ok in (total - 41, total - 11):  # fails inside the stacked pass over the training data
        bad = Crashing(data, ok)
        with pytest.raises(RuntimeError, match="disk error"):
            hessfree.self_influence(run, bad, batch_size=16, **Q)
        assert bad.fetched == ok + 1  # not one fetch more: nothing redone one checkpoint at a time
    assert "one at a time" not in caplog.text
    test = Crashing(tabular(n=20, seed=3), ok=10**9)
    hessfree.pairwise_influence(run, data, test, batch_size=16, **Q)
    test = Crashing(tabular(n=20, seed=3), ok=test.fetched - 4)  # fails in a test batch of the stacked pass
    with pytest.raises(RuntimeError, match="disk error"):
        hessfree.pairwise_influence(run, data, test, batch_size=16, **Q)
    assert test.fetched == test.ok + 1


# ----------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_and_folders_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        rd = tmp_path / "run"
        hessfree.fit(mlp(0), tabular(n=8), batch_size=4, run_dir=rd, **Q)
        Scores([1.0], [0]).save(tmp_path / "s.npz")
    finally:
        os.umask(old)
    for p in [rd, *rd.rglob("*"), tmp_path / "s.npz"]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o777 if p.is_dir() else 0o666) & ~mask, (p, oct(mode))


def test_demo_overwrite_never_replaces_a_run_or_scores_it_did_not_write(tmp_path):
    from hessfree.workflows.demo import DemoConfig, run_demo

    cfg = DemoConfig(epochs=1, n_checkpoints=1)
    out = tmp_path / "results"
    users = hessfree.fit(mlp(0), tabular(n=16), batch_size=8, run_dir=out / "run", **Q)  # the user's own run
    with pytest.raises(RunDirectoryError, match="does not name as the demo's"):
        run_demo(out, cfg, progress=False, overwrite=True)
    assert hessfree.Run.load(out / "run", mlp(0)).manifest["n_samples"] == users.manifest["n_samples"] == 16
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "run").write_text("a file")
    proc = subprocess.run([sys.executable, "-m", "hessfree.cli", "demo", "--out", str(tmp_path / "f"), "--overwrite",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr
    # the demo's own results are replaced; scores changed since are not
    mine = tmp_path / "mine"
    run_demo(mine, cfg, progress=False)
    run_demo(mine, cfg, progress=False, overwrite=True)
    Scores([1.0], [0], {"method": "self_influence"}).save(mine / "self_influence.npz")
    with pytest.raises(RunDirectoryError, match="changed since"):
        run_demo(mine, cfg, progress=False, overwrite=True)


def test_a_users_file_inside_a_data_folder_survives_an_overwrite(tmp_path, caplog):
    rd = tmp_path / "run"
    hessfree.fit(mlp(0), tabular(n=8), batch_size=4, run_dir=rd, **Q)
    data = rd / json.loads((rd / "manifest.json").read_text())["steps"].split("/")[0]
    (data / "my_notes.txt").write_text("mine")
    (data / "checkpoints" / "my_best.pt").write_text("mine too")
    hessfree.fit(mlp(1), tabular(n=8), batch_size=4, run_dir=rd, overwrite=True, **Q)
    assert (data / "my_notes.txt").read_text() == "mine" and (data / "checkpoints" / "my_best.pt").exists()
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == [
        "checkpoints", "checkpoints/my_best.pt", "my_notes.txt"]  # only hessfree's files went
    assert "holds files hessfree did not write" in caplog.text
    hessfree.fit(mlp(1), tabular(n=8), batch_size=4, run_dir=rd, overwrite=True, **Q)  # and it is left alone
    assert (data / "my_notes.txt").read_text() == "mine"


def test_a_leftover_of_a_process_whose_pid_runs_again_is_cleaned(tmp_path):
    import hessfree.io as hio

    pid, start = hio.PROCESS
    for rd, run_first in ((tmp_path / "new", False), (tmp_path / "old", True)):
        if run_first:
            hessfree.fit(mlp(0), tabular(n=8), batch_size=4, run_dir=rd, **Q)
        # killed before a restart, by a process with this pid (a container's pids repeat) and another start time
        left = rd / f".hessfree-recording-{pid}-{start + 1}-deadbeef"
        (left / "checkpoints").mkdir(parents=True)
        (left / ".hessfree-data").write_text(json.dumps({"pid": pid, "start": start + 1}))
        (left / "checkpoints" / "init.safetensors").write_bytes(b"x" * 100)
        hessfree.fit(mlp(1), tabular(n=8), batch_size=4, run_dir=rd, overwrite=True, **Q)
        assert not left.exists()
    temp = tmp_path / f".s.npz.hessfree-{pid}-{start + 1}-abcdefgh.tmp"  # the same, for Scores.save
    temp.write_bytes(b"half")
    Scores([1.0], [0]).save(tmp_path / "s.npz")
    assert not temp.exists()


def test_a_failure_after_the_commit_keeps_the_new_run_and_the_trained_model(tmp_path, monkeypatch, caplog):
    rd = tmp_path / "run"
    hessfree.fit(mlp(0), tabular(n=8), batch_size=4, run_dir=rd, **Q)
    old = json.loads((rd / "manifest.json").read_text())["steps"].split("/")[0]

    def broken(*a, **k):
        raise OSError("permission denied while removing")

    monkeypatch.setattr("hessfree.run_dir._remove_old", broken)
    model = mlp(1)
    before = state_of(model)
    run = hessfree.fit(model, tabular(n=8, seed=1), batch_size=4, run_dir=rd, overwrite=True, **Q)
    assert not bit_identical(state_of(model), before)  # trained, and the run says so
    assert bit_identical(run.checkpoint_state(-1), state_of(model))
    assert "removing the previous one failed" in caplog.text and (rd / old).exists()
    monkeypatch.undo()
    hessfree.fit(mlp(1), tabular(n=8, seed=1), batch_size=4, run_dir=rd, overwrite=True, **Q)
    assert not (rd / old).exists()  # the next write removes it


def test_divergence_is_traced_after_the_loss_window_wrapped(monkeypatch):
    monkeypatch.setattr("hessfree.run._LossWatch.WINDOW_FLOATS", 4 * 16)  # 4 steps of batch 16
    model, data = huge_input_at_77()
    with pytest.raises(NonFiniteError, match=r"It began with sample id 77 at step \d+"):
        hessfree.fit(model, data, lr=0.1, epochs=3, batch_size=16, **Q)
    with pytest.raises(NonFiniteError, match="whole batch jumped.*usual level of 1"):
        hessfree.fit(deep_relu(), tabular(n=64), lr=lambda t: 0.01 if t < 70 else 1e3, epochs=30, batch_size=16, **Q)


class MSE(hessfree.Task):
    name = "mse"

    def per_sample_loss(self, outputs, targets):
        return (outputs.reshape(-1) - targets.reshape(-1)) ** 2


def test_an_overflowing_target_is_named_not_an_earlier_outlier():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x.sum(1)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).numpy()  # fit's first epoch
    y[int(order[3 * 8])] = 300.0  # an outlier in batch 3: a huge loss, at a rate too small to matter
    y[int(order[4 * 8])] = 3e19  # batch 4: its loss overflows float32
    torch.manual_seed(0)
    with pytest.raises(NonFiniteError, match=rf"step 4 for sample id\(s\) \[{int(order[4 * 8])}\] while the other"):
        hessfree.fit(nn.Linear(3, 1), TensorDataset(x, y), loss=MSE(), lr=1e-6, batch_size=8, **Q)


def test_a_users_runtime_error_in_a_stacked_pass_surfaces_at_once_with_a_note():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(0)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if (x[:, 0] > 2.5).any():
                raise RuntimeError("user check failed")
            return self.net(x)

    data = tabular(n=64)
    x, y = data.tensors
    run = hessfree.fit(Picky(), TensorDataset(x.clamp(max=2.0), y), batch_size=16, epochs=3, checkpoint_every=4, **Q)
    bad = x.clone().clamp(max=2.0)
    bad[60, 0] = 3.0  # in the last batch
    model = run.model
    model.calls = 0
    with pytest.raises(RuntimeError, match="user check failed") as info:
        hessfree.self_influence(run, TensorDataset(bad, y), batch_size=16, stack=True, **Q)
    calls_stacked = model.calls
    model.calls = 0
    with pytest.raises(RuntimeError, match="user check failed"):
        hessfree.self_influence(run, TensorDataset(bad, y), batch_size=16, stack=False, **Q)
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "shared this forward pass" in notes, notes  # raised from the stacked pass, with the way out
    # the stacked call adds the stacking check's forwards on 16 samples (3 here) to the unstacked
    # call's; redoing the group one checkpoint at a time would add the four training batches again
    assert calls_stacked <= model.calls + 3


def test_scores_files_small_cases(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    with pytest.raises(InputError, match="cannot be read as a hessfree scores file"):
        Scores.load(tmp_path / "a.npy")
    path = tmp_path / "s.npz"
    Scores([1.0], [0]).save(path)
    os.chmod(path, 0o600)
    Scores([2.0], [0]).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a replaced file keeps its permissions
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "t.npz"
    Scores([1.0], [0]).save(target)
    (tmp_path / "link.npz").symlink_to(target)
    Scores([3.0], [0]).save(tmp_path / "link.npz")
    assert (tmp_path / "link.npz").is_symlink() and Scores.load(target).values.tolist() == [3.0]


def test_a_data_folder_moved_elsewhere_and_linked_back_loads(tmp_path):
    rd = tmp_path / "run"
    hessfree.fit(mlp(0), tabular(n=8), batch_size=4, run_dir=rd, **Q)
    data = json.loads((rd / "manifest.json").read_text())["steps"].split("/")[0]
    shutil.move(str(rd / data), str(tmp_path / "elsewhere"))
    (rd / data).symlink_to(tmp_path / "elsewhere")
    assert len(hessfree.Run.load(rd, mlp(0))) == 1
