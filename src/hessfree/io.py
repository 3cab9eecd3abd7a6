"""Atomic file writes: write to a temporary file in the same folder, flush it to disk, then rename.

A crash mid-write leaves the previous file (if any) intact and never a half-written one. The
temporary file is named ``.NAME.hessfree-PID-START-XXXXXXXX.tmp``: a write that fails removes its
own temporary; one killed outright (``kill -9``, power loss) leaves it, and the next write to the
same path removes every such leftover whose process is gone (a pid running again after a restart
has another start time, so it does not keep a leftover alive). Files and folders are created with the
permissions the umask allows (as ``open`` and ``mkdir`` would), not the 0600 / 0700 of
:mod:`tempfile`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

log = logging.getLogger(__name__)

TEMP_TAG = "hessfree"  # in the name of every temporary file or folder hessfree creates


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, put back at once
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) made by :mod:`tempfile` the permissions the umask allows."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_start(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot, from /proc), or 0 where unknown. With
    the pid it names one process: a pid reused after a restart has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


PROCESS = (os.getpid(), process_start(os.getpid()))  # this process; set again in a forked child


def _after_fork() -> None:
    global PROCESS
    PROCESS = (os.getpid(), process_start(os.getpid()))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def writer_alive(pid: int, start: int = 0) -> bool:
    """Is the process that wrote something (its pid and start time) still running? A pid that now
    names another process (reused after a restart: another start time) is not."""
    if (pid, start) == PROCESS or (pid == PROCESS[0] and not start):
        return True
    if pid == PROCESS[0]:
        return False  # our pid, another start time: a process before a restart
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        pass
    now = process_start(pid)
    return not (start and now and now != start)


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporaries for ``name``: ``.NAME.hessfree-PID-START-``."""
    return f".{name}.{TEMP_TAG}-{PROCESS[0]}-{PROCESS[1]}-"


def _leftover_writer(entry: str, name: str, suffix: str) -> tuple[int, int] | None:
    """The writer (pid, start time) if ``entry`` is a hessfree temporary of ``name`` (else None)."""
    m = re.fullmatch(re.escape(f".{name}.{TEMP_TAG}-") + r"(\d+)-(?:(\d+)-)?[A-Za-z0-9_]+" + re.escape(suffix),
                     entry)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def clean_leftovers(path: str | os.PathLike, suffix: str = ".tmp") -> list[Path]:
    """Remove the temporaries that killed writes to ``path`` left beside it (their process is gone).

    Only names hessfree gives its own temporaries are touched; a leftover of a process that is still
    running (a concurrent write) is kept. Returns the paths removed.
    """
    path = Path(path)
    removed = []
    try:
        entries = os.listdir(path.parent)
    except OSError:
        return removed
    older = []
    for entry in entries:
        writer = _leftover_writer(entry, path.name, suffix)
        if writer is None:
            # an older hessfree named its temporaries without the tag: named for the user, never removed
            if re.fullmatch(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}" + re.escape(suffix), entry):
                older.append(entry)
            continue
        if writer_alive(*writer):
            continue
        p = path.parent / entry
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    if older:
        log.warning("%s has %d temporary file(s) that an older hessfree left when a write to %s was killed; "
                    "if no write to it is running, remove them with: rm %s", path.parent, len(older), path.name,
                    " ".join(str(path.parent / e) for e in older))
    if removed:
        log.info("removed %d leftover(s) of earlier killed writes to %s: %s", len(removed), path,
                 ", ".join(p.name for p in removed))
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success flush it to disk and rename it onto
    ``path``. On any failure (a full disk included) the temporary is removed and ``path`` keeps
    its previous content. A file that is replaced keeps its permissions (a new one gets those the
    umask allows); a symbolic link at ``path`` is written through (its target is replaced)."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else None
    except OSError:
        mode = None
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # after writing: a writer may have replaced the file mkstemp made
        os.chmod(tmp, mode) if mode is not None else honour_umask(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            exc.add_note(f"the disk holding {path.parent} is full; nothing was written to {path.name} "
                         "(its previous content, if any, is intact)")
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared / non-contiguous storage: store independent contiguous copies.
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(clean, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # an I/O failure (a full disk) as the OSError it is
            m = re.search(r"os error (\d+)", str(exc))
            if m is None:
                raise
            code = int(m.group(1))
            raise OSError(code, f"{os.strerror(code)} (writing {path})") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
