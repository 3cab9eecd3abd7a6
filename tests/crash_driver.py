"""Kill -9 sweep, run as a subprocess by test_crash_safety.py (not a test module itself).

    python crash_driver.py fit|save WORKDIR

Each file-system step hessfree takes while writing (mkdir, fsync, rename, unlink, rmdir, rmtree)
is counted; for every step K and both sides of it, a forked child repeats the write and SIGKILLs
itself just before or just after step K. The parent then checks that what is at the path loads
and is either the old result or the new one, whole, and that the next write cleans up every
leftover. Prints one JSON line: the number of kills and the outcomes seen.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)  # no thread pool in the parent: the children are forked

import hessfree  # noqa: E402
from hessfree import Scores  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

PATCHED = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (os, "fsync"),
           (shutil, "rmtree")]


def arm(target: int, after: bool, counter: list[int]) -> None:
    """Patch the file-system calls: count them, and SIGKILL this process at call ``target``."""
    for mod, name in PATCHED:
        real = getattr(mod, name)

        def wrapped(*a, _real=real, **k):
            counter[0] += 1
            hit = counter[0] == target
            if hit and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                return _real(*a, **k)
            finally:  # also when the call raised (mkdir of a folder that exists)
                if hit and after:
                    os.kill(os.getpid(), signal.SIGKILL)

        setattr(mod, name, wrapped)


def in_child(action, target: int, after: bool) -> tuple[int, int]:
    """Run ``action`` in a forked child armed to die at call ``target``; (exit signal or 0, calls made)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        counter = [0]
        arm(target, after, counter)
        try:
            action()
        except BaseException as exc:  # noqa: BLE001
            os.write(w, f"error {exc!r}".encode())
            os._exit(3)
        os.write(w, str(counter[0]).encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    msg = os.read(r, 4096).decode()
    os.close(r)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status), 0
    if os.WEXITSTATUS(status) != 0:
        raise SystemExit(f"child failed: {msg}")
    return 0, int(msg)


def killed_writes(write, reset):
    """Count the file-system calls of ``write``, then for each call and each side of it: ``reset()``
    the files, run ``write`` in a child killed there, and yield (call, after) for the caller's checks."""
    _, total = in_child(write, target=-1, after=False)
    for target in range(1, total + 1):
        for after in (False, True):
            reset()
            sig, _ = in_child(write, target, after)
            assert sig == signal.SIGKILL, (target, after, sig)
            yield target, after


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def data(seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g))


def states(run) -> list[dict]:
    return [run.checkpoint_state(k) for k in range(len(run))]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
                                    for x, y in zip(a, b))


def sweep_fit(work: Path) -> dict:
    Q = dict(batch_size=8, epochs=2, checkpoint_every=3, progress=False)
    pristine = work / "pristine"
    hessfree.fit(model(0), data(0), run_dir=pristine, **Q)
    (pristine / "notes.txt").write_text("the user's")  # never hessfree's to remove
    old = states(hessfree.Run.load(pristine, model(0)))
    new = states(hessfree.fit(model(1), data(1), run_dir=work / "reference", **Q))
    rd = work / "run"

    def write() -> None:
        hessfree.fit(model(1), data(1), run_dir=rd, overwrite=True, **Q)

    def reset() -> None:
        shutil.rmtree(rd, ignore_errors=True)
        shutil.copytree(pristine, rd)

    reset()
    outcomes = {"old": 0, "new": 0, "leftovers": 0}
    kills = 0
    calls = 0
    for target, after in killed_writes(write, reset):
        kills, calls = kills + 1, target
        got = states(hessfree.Run.load(rd, model(0)))  # never empty, never half-written
        if same(got, old):
            outcomes["old"] += 1
        elif same(got, new):
            outcomes["new"] += 1
        else:
            raise AssertionError(f"kill at call {target} ({'after' if after else 'before'}): neither run")
        assert (rd / "notes.txt").read_text() == "the user's"
        live = json.loads((rd / "manifest.json").read_text())["steps"].split("/")[0]
        outcomes["leftovers"] += len([p for p in rd.iterdir() if p.name not in (live, "manifest.json", "notes.txt")])
        write()  # the next write cleans every leftover
        assert same(states(hessfree.Run.load(rd, model(0))), new)
        live = json.loads((rd / "manifest.json").read_text())["steps"].split("/")[0]
        left = sorted(p.name for p in rd.iterdir())
        assert left == sorted([live, "manifest.json", "notes.txt"]), (target, after, left)
        assert sorted(p.name for p in work.iterdir()) == ["pristine", "reference", "run"]
    return {"calls": calls, "kills": kills, **outcomes}


def sweep_save(work: Path) -> dict:
    path = work / "scores.npz"
    old = Scores(np.arange(5.0), np.arange(5), {"v": "old"})
    new = Scores(np.arange(200_000.0)[::-1].copy(), np.arange(200_000), {"v": "new"})

    def write() -> None:
        new.save(path)

    old.save(path)
    outcomes = {"old": 0, "new": 0, "leftovers": 0}
    kills = 0
    calls = 0
    for target, _ in killed_writes(write, lambda: old.save(path)):
        kills, calls = kills + 1, target
        got = Scores.load(path)
        key = got.meta["v"]
        ref = {"old": old, "new": new}[key]
        assert np.array_equal(got.values, ref.values) and np.array_equal(got.sample_ids, ref.sample_ids)
        outcomes[key] += 1
        outcomes["leftovers"] += len(os.listdir(work)) - 1
        write()
        assert sorted(p.name for p in work.iterdir()) == ["scores.npz"], sorted(os.listdir(work))
    return {"calls": calls, "kills": kills, **outcomes}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sweep_store(work: Path) -> dict:
    """A gradient store build killed at every file-system step, then resumed: the finished store
    is byte-identical to an uninterrupted build, the chunks committed before the kill are kept
    (not rewritten), and no leftover remains."""
    from hessfree.store import build_store

    run = hessfree.Run.from_checkpoints(model(0), [model(0).state_dict(), model(1).state_dict()], [0.5, 0.25])
    Q = dict(chunk_rows=7, batch_size=4, progress=False)
    reference = tree_bytes(build_store(run, data(0), work / "reference", **Q).path)
    path = work / "store"

    def write() -> None:
        build_store(run, data(0), path, **Q)

    outcomes = {"empty": 0, "manifest_only": 0, "partial": 0, "complete": 0, "leftovers": 0, "kept_chunks": 0}
    kills = calls = 0
    for target, _ in killed_writes(write, lambda: shutil.rmtree(path, ignore_errors=True)):
        kills, calls = kills + 1, target
        chunks = path / "chunks"
        committed = {p.name: p.stat().st_ino for p in chunks.iterdir() if not p.name.startswith(".")} \
            if chunks.is_dir() else {}
        temps = [p for p in chunks.iterdir() if p.name.startswith(".")] if chunks.is_dir() else []
        outcomes["leftovers"] += len(temps)
        if not (path / "manifest.json").exists():
            outcomes["empty"] += 1
        elif not committed:
            outcomes["manifest_only"] += 1
        elif len(committed) < 4:
            outcomes["partial"] += 1
        else:
            outcomes["complete"] += 1
        write()  # resume
        assert tree_bytes(path) == reference, (target, sorted(tree_bytes(path)), sorted(reference))
        for name, ino in committed.items():  # kept, not computed again
            assert (chunks / name).stat().st_ino == ino, (target, name)
        outcomes["kept_chunks"] += len(committed)
        assert not [p for p in chunks.iterdir() if p.name.startswith(".")], (target, sorted(os.listdir(chunks)))
    return {"calls": calls, "kills": kills, **outcomes}


if __name__ == "__main__":
    mode, work = sys.argv[1], Path(sys.argv[2])
    result = {"fit": sweep_fit, "save": sweep_save, "store": sweep_store}[mode](work)
    print(json.dumps(result))
