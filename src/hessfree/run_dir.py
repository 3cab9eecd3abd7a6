"""A run folder on disk: its layout, the commit that makes a recording live, checks on loading.

Layout of a run folder ``D``::

    D/manifest.json                 the commit point: the only file that says which data is live
    D/data-<time>-<tag>/            one recording: checkpoints/, steps.npz, trajectory.safetensors
    D/.hessfree-recording-<pid>-…/  a recording in progress (or left by a killed one)

A recording is written into a hidden folder inside ``D``; committing it renames that folder to
``data-…``, then replaces ``manifest.json`` atomically (flushed to disk first), then removes the
previous recording's files. At every moment ``D/manifest.json`` names a complete recording (the
old one until the rename of the manifest, the new one after), so a run folder is never empty and
never loads half-written. What a killed write leaves (a recording folder, or a data folder no
manifest names) is removed by the next write to the same folder. Nothing is ever removed that
hessfree did not write: a folder is removed only if it carries hessfree's marker file (such a
folder is hessfree's, whole), a file only if the manifest hessfree wrote names it.

The manifest records the SHA-256 and size of every file of the recording; :func:`verify_files`
checks them, and :func:`validate_manifest` checks the values (finite positive learning rates,
paths inside the run folder) before anything is read.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hessfree.errors import RunDirectoryError, RunIntegrityError
import hessfree.io as hio
from hessfree.io import TEMP_TAG, fsync_dir, honour_umask, sha256_file, write_json, writer_alive

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_FORMAT = "hessfree-run"
MARKER = ".hessfree-data"  # in every recording folder: {"pid", "start"} of its writer until committed,
# then {"pid": None, "files": [its files]}
_TEMP = re.compile(r"\..+\." + TEMP_TAG + r"-\d+-(?:\d+-)?[A-Za-z0-9_]+\.tmp")  # io.atomic_path's temporaries
_LAYOUT = re.compile(r"(checkpoints/(init|step_\d+)\.safetensors|steps\.npz|trajectory\.safetensors)")
RECORDING_PREFIX = ".hessfree-recording-"
DATA_PREFIX = "data-"


# ----------------------------------------------------------------------------- manifest paths
def path_fields(manifest: dict) -> Iterator[tuple[str, dict, str]]:
    """(what, container, key) for every file path a run manifest holds."""
    for k, c in enumerate(manifest.get("checkpoints") or []):
        if isinstance(c, dict):
            yield f"checkpoint {k}", c, "file"
    for key, what in (("steps", "step log"), ("initial", "initial state")):
        if manifest.get(key):
            yield what, manifest, key
    if isinstance(manifest.get("trajectory"), dict):
        yield "trajectory", manifest["trajectory"], "file"


def referenced(manifest: dict) -> list[str]:
    return [c[key] for _, c, key in path_fields(manifest) if isinstance(c.get(key), str)]


# ----------------------------------------------------------------------------- reading
def read_manifest(run_dir: Path) -> dict:
    """The parsed manifest of a run folder, or RunDirectoryError saying what is there instead."""
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise RunDirectoryError(f"{run_dir} {what}: no manifest.json to read; pass the folder fit(run_dir=...) wrote")
    if not path.is_file():
        left = _recordings(run_dir)
        if left:
            raise RunDirectoryError(
                f"{run_dir} holds no committed run, only {len(left)} unfinished recording(s) "
                f"({', '.join(p.name for p in left)}): the training that wrote it was killed or is still running; "
                "record it again (the next fit into this folder removes what a killed one left)")
        raise RunDirectoryError(f"{run_dir} holds no {MANIFEST}: not a hessfree run directory")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunIntegrityError(f"{path} cannot be read as JSON ({exc}): the run folder is damaged; "
                                "record the run again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT:
        raise RunDirectoryError(f"{path} is not a hessfree run manifest")
    return manifest


def positive_number(x: Any) -> bool:
    """A finite number > 0 (a Python or NumPy int or float, not a bool): what a learning rate must be."""
    return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
            and math.isfinite(x) and x > 0)


def validate_manifest(manifest: dict, run_dir: Path) -> None:
    """Refuse a manifest whose values or paths hessfree did not write (before reading any file)."""
    where = run_dir / MANIFEST

    def bad(msg: str) -> RunIntegrityError:
        return RunIntegrityError(f"{where}: {msg}; the run folder was edited or damaged, record the run again")

    if manifest.get("status") != "complete":
        raise RunDirectoryError(f"{run_dir} is an incomplete recording (status {manifest.get('status')!r}): the "
                                "training that wrote it did not finish; record it again")
    task = manifest.get("task")
    if not isinstance(task, dict) or not isinstance(task.get("name"), str):
        raise bad("no task name")
    ckpts = manifest.get("checkpoints")
    if not isinstance(ckpts, list) or not ckpts:
        raise bad("no checkpoints listed")
    for k, c in enumerate(ckpts):
        if not isinstance(c, dict) or not isinstance(c.get("file"), str):
            raise bad(f"checkpoint {k} names no file")
        if not positive_number(c.get("learning_rate")):
            raise bad(f"checkpoint {k} has learning rate {c.get('learning_rate')!r}, not a finite positive number")
        step = c.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise bad(f"checkpoint {k} has step {step!r}, not a non-negative integer")
    traj = manifest.get("trajectory")
    if traj is not None:
        if not isinstance(traj, dict) or not isinstance(traj.get("file"), str) or not manifest.get("initial"):
            raise bad("the trajectory entry is incomplete")
        if not isinstance(traj.get("every"), int) or traj["every"] < 1:
            raise bad(f"trajectory 'every' is {traj.get('every')!r}")
        l2 = traj.get("l2")
        if not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 < 0:
            raise bad(f"trajectory l2 is {l2!r}, not a finite non-negative number")
    for what, c, key in path_fields(manifest):
        rel = c.get(key)
        if not isinstance(rel, str) or not rel:
            raise bad(f"the {what} path is {rel!r}")
        p = Path(rel)
        # lexical: a data folder the user moved elsewhere and linked back stays loadable
        if p.is_absolute() or ".." in p.parts or p.drive:
            raise bad(f"the {what} path {rel!r} points outside the run folder")
    files = manifest.get("files")
    if files is not None and not isinstance(files, dict):
        raise bad("the 'files' checksum table is not a mapping")


def verify_files(manifest: dict, run_dir: Path) -> dict[str, tuple[str, os.stat_result]]:
    """Check every file the manifest names against its recorded size and SHA-256.

    Returns {relative path: (sha256, stat)} for later re-checks. A manifest from before checksums
    were recorded (no ``files`` table) is accepted with a log message and nothing is checked.
    """
    files = manifest.get("files")
    out: dict[str, tuple[str, os.stat_result]] = {}
    for rel in referenced(manifest):
        path = run_dir / rel
        if not path.is_file():
            raise RunIntegrityError(f"{path} is missing: the run folder {run_dir} is incomplete (was a file moved or "
                                    "deleted?); record the run again")
    if files is None:
        log.info("%s records no checksums (written by an older hessfree): its files are not verified", run_dir)
        return out
    for rel in referenced(manifest):
        want = files.get(rel)
        if not isinstance(want, dict) or not isinstance(want.get("sha256"), str):
            raise RunIntegrityError(f"{run_dir / MANIFEST} records no checksum for {rel}; record the run again")
        path = run_dir / rel
        st = path.stat()
        if st.st_size != want.get("bytes"):
            raise RunIntegrityError(f"{path} has {st.st_size} bytes but the run recorded {want.get('bytes')}: it was "
                                    "truncated or rewritten after the run was recorded; record the run again")
        got = sha256_file(path)
        if got != want["sha256"]:
            raise RunIntegrityError(f"{path} does not match the checksum recorded with the run: it was rewritten "
                                    "after the run was recorded; record the run again (or load with verify=False "
                                    "to skip the check at your own risk)")
        out[rel] = (got, st)
    return out


# ----------------------------------------------------------------------------- writing
def _marker(path: Path) -> dict | None:
    try:
        obj = json.loads((path / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _recordings(run_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in run_dir.iterdir() if p.name.startswith(RECORDING_PREFIX) and p.is_dir())
    except OSError:
        return []


def _ours_and_dead(folder: Path) -> bool:
    """A hessfree recording folder whose writer is gone: it carries the marker, naming no writer
    (committed) or one that no longer runs, or it is a recording folder of such a process (pid and
    start time in its name) killed while its marker was being written (nothing inside but the
    marker's temporary)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    mark = _marker(folder)
    if mark is not None:
        pid, start = mark.get("pid"), mark.get("start", 0)
        return not (isinstance(pid, int) and writer_alive(pid, start if isinstance(start, int) else 0))
    if not folder.name.startswith(RECORDING_PREFIX):
        return False
    try:
        pid, start = (int(v) for v in folder.name[len(RECORDING_PREFIX):].split("-")[:2])
        return not writer_alive(pid, start) and all(
            e.name == MARKER or e.name.startswith(f".{MARKER}.") for e in folder.iterdir())
    except (OSError, ValueError):
        return False


def leftovers(run_dir: Path, manifest: dict | None) -> list[Path]:
    """What killed writes left in ``run_dir``: recording folders of dead processes, and data
    folders carrying hessfree's marker that the live manifest does not name."""
    if not run_dir.is_dir():
        return []
    live = {Path(rel).parts[0] for rel in referenced(manifest)} if manifest else set()
    out = []
    for p in sorted(run_dir.iterdir()):
        if p.name.startswith(RECORDING_PREFIX) or (p.name.startswith(DATA_PREFIX) and p.name not in live):
            if _ours_and_dead(p) or _emptied(p):
                out.append(p)
    return out


def _emptied(folder: Path) -> bool:
    """An empty folder with the exact name of a data folder: one whose removal was killed between
    its marker and the folder itself."""
    try:
        return (re.fullmatch(re.escape(DATA_PREFIX) + r"\d{8}T\d{6}-[0-9a-f]{6}", folder.name) is not None
                and not folder.is_symlink() and folder.is_dir() and not any(folder.iterdir()))
    except OSError:
        return False


def _older_leftovers(run_dir: Path) -> list[Path]:
    """Hidden siblings an older hessfree used (``.NAME.recording-*``, ``.NAME.old-*``)."""
    try:
        return sorted(p for p in run_dir.parent.iterdir() if p.is_dir() and (
            p.name.startswith(f".{run_dir.name}.recording-") or p.name.startswith(f".{run_dir.name}.old-")))
    except OSError:
        return []


class Recording:
    """A recording in progress inside a run folder; :meth:`commit` makes it the live run."""

    def __init__(self, root: Path, folder: Path, made: list[Path]):
        self.root, self.dir = root, folder
        self.made = made  # folders start() created (the run folder and its missing parents), deepest first
        self.committed = False

    @classmethod
    def start(cls, run_dir: str | os.PathLike, overwrite: bool) -> "Recording":
        """Check that ``run_dir`` may receive a run, clean what killed writes left there, and open
        a recording folder inside it. Raises RunDirectoryError before anything is written."""
        root = Path(run_dir).absolute()
        if root.exists() and not root.is_dir():
            raise RunDirectoryError(f"run_dir {root} is an existing file, not a directory; choose another path")
        manifest = None
        if root.is_dir():
            if (root / MANIFEST).exists():
                manifest = read_manifest(root)  # raises if it is not hessfree's
                if not overwrite:
                    raise RunDirectoryError(
                        f"{root} already holds a hessfree run; choose a new run_dir or pass overwrite=True (the old "
                        "run stays loadable until the new one is complete; files hessfree did not write are kept)")
            else:
                own = set(leftovers(root, None))
                other = [p for p in root.iterdir() if p not in own]
                if other:
                    names = ", ".join(sorted(p.name for p in other)[:5])
                    raise RunDirectoryError(
                        f"{root} already exists and is not a hessfree run (it holds {names}"
                        f"{', …' if len(other) > 5 else ''} and no manifest.json hessfree wrote); hessfree never "
                        "writes a run into a folder it did not make, even with overwrite=True: choose a new or "
                        "empty run_dir")
        for p in leftovers(root, manifest):
            remove_marked(p)
            log.info("removed %s, left by a killed or failed recording", p)
        old = _older_leftovers(root)
        if old:
            log.warning("folders an older hessfree left beside %s when a recording was killed: %s; if you do not "
                        "need them (an '.old-' one may hold a previous run), remove them with: rm -r %s", root,
                        ", ".join(p.name for p in old), " ".join(str(p) for p in old))
        made = [p for p in (root, *root.parents) if not p.exists()]
        root.mkdir(parents=True, exist_ok=True)
        pid, start = hio.PROCESS  # read now: a forked child has its own
        folder = root / f"{RECORDING_PREFIX}{pid}-{start}-{secrets.token_hex(4)}"
        rec = cls(root, folder, made)
        folder.mkdir()
        try:
            write_json(folder / MARKER, {"pid": pid, "start": start, "created": _now()})
        except BaseException:
            rec.abort()
            raise
        return rec

    def abort(self) -> None:
        """Remove this recording's folder (a failed or refused training), unless it is committed."""
        if not self.committed:
            remove_marked(self.dir)
            for p in self.made:  # the folders made for it, if nothing else was put there meanwhile
                try:
                    p.rmdir()
                except OSError:
                    break

    def commit(self, manifest: dict) -> None:
        """Make this recording the live run of the folder (see the module docstring for the order)."""
        name = f"{DATA_PREFIX}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        files = {}
        own = sorted(c[key] for _, c, key in path_fields(manifest))  # relative to the recording folder
        for _, c, key in path_fields(manifest):
            path = self.dir / c[key]
            c[key] = f"{name}/{c[key]}"
            files[c[key]] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest["files"] = files
        try:
            old = read_manifest(self.root) if (self.root / MANIFEST).exists() else None
        except RunDirectoryError:
            old = None
        for sub in self.dir.rglob("*"):  # files are flushed as written; their folders here
            if sub.is_dir():
                fsync_dir(sub)
        fsync_dir(self.dir)
        honour_umask(self.dir, directory=True)
        os.replace(self.dir, self.root / name)
        self.dir = self.root / name
        fsync_dir(self.root)
        write_json(self.root / MANIFEST, manifest)  # the commit: atomic, flushed
        self.committed = True
        try:  # the new run is live: what follows is tidying, and its failure must not fail the commit
            # committed: from now on only a manifest keeps this folder (once none names it, it is a
            # leftover, whoever wrote it), and the marker lists its files, the only ones removed then
            write_json(self.dir / MARKER, {"pid": None, "committed": _now(), "files": own})
            if old is not None:
                _remove_old(self.root, old, keep=set(referenced(manifest)))
        except Exception as exc:  # noqa: BLE001
            log.warning("the new run in %s is complete, but removing the previous one failed (%s); the next fit "
                        "into this folder removes it", self.root, exc)

    def __repr__(self) -> str:
        return f"Recording({str(self.dir)!r})"


def remove_marked(folder: Path) -> None:
    """Remove what hessfree wrote in one of its recording folders, its marker last (a removal
    killed part-way leaves a folder that still carries the marker, which the next write removes):
    the files the marker lists (a committed folder) or, for one never committed, the files of a
    recording's layout, and io.atomic_path's temporaries. Anything else found there stays, with
    the folder, and is named in a warning."""
    if folder.is_symlink() or not folder.is_dir():
        return
    mark = _marker(folder) or {}
    listed = set(mark["files"]) if isinstance(mark.get("files"), list) else None
    for p in sorted(folder.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        rel = p.relative_to(folder).as_posix()
        if rel == MARKER or p.is_dir() and not p.is_symlink():
            continue
        ours = _TEMP.fullmatch(p.name) is not None or (rel in listed if listed is not None else
                                                        _LAYOUT.fullmatch(rel) is not None)
        if ours:
            p.unlink(missing_ok=True)
    for d in sorted((q for q in folder.rglob("*") if q.is_dir() and not q.is_symlink()),
                    key=lambda q: len(q.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
    (folder / MARKER).unlink(missing_ok=True)  # last but the folder: killed after it, the folder is empty
    try:
        folder.rmdir()
    except OSError:
        left = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
        log.warning("kept %s: it holds files hessfree did not write (%s)", folder, ", ".join(left[:5]))


def _remove_old(root: Path, old: dict, keep: set[str]) -> None:
    """Remove the replaced recording: its data folder whole if it carries hessfree's marker (a
    folder with the marker is hessfree's, temporaries of a killed write included); otherwise (an
    older layout kept the files at the top of the run folder) exactly the files its manifest named,
    then the folders that left empty. Anything else in the run folder stays."""
    folders = set()
    for rel in referenced(old):
        p = Path(rel)
        if rel in keep or p.is_absolute() or ".." in p.parts:
            continue
        top = root / p.parts[0]
        if len(p.parts) > 1 and top.name.startswith(DATA_PREFIX) and _marker(top) is not None:
            remove_marked(top)
            continue
        try:
            (root / p).unlink()
        except FileNotFoundError:
            pass
        folders.update(root / q for q in list(p.parents)[:-1])
    for d in sorted(folders, key=lambda q: len(q.parts), reverse=True):
        try:
            d.rmdir()  # only if empty: a user's file inside keeps it
        except OSError:
            pass
    fsync_dir(root)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
