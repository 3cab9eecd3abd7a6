"""Atomic file writes: write to a temporary file in the same folder, flush it to disk, then rename.

A crash mid-write leaves the previous file (if any) intact and never a half-written one. The
temporary file is named ``.NAME.hessfree-PID-XXXXXXXX.tmp``: a write that fails removes its own
temporary; one killed outright (``kill -9``, power loss) leaves it, and the next write to the same
path removes every such leftover whose process is gone. Files and folders are created with the
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


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporaries for ``name``: ``.NAME.hessfree-PID-``."""
    return f".{name}.{TEMP_TAG}-{os.getpid()}-"


def _leftover_pid(entry: str, name: str, suffix: str) -> int | None:
    """The writer's pid if ``entry`` is a hessfree temporary of ``name`` (else None)."""
    m = re.fullmatch(re.escape(f".{name}.{TEMP_TAG}-") + r"(\d+)-[A-Za-z0-9_]+" + re.escape(suffix), entry)
    return int(m.group(1)) if m else None


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
        pid = _leftover_pid(entry, path.name, suffix)
        if pid is None:
            # an older hessfree named its temporaries without the tag: named for the user, never removed
            if re.fullmatch(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}" + re.escape(suffix), entry):
                older.append(entry)
            continue
        if pid_alive(pid):
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
    its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        honour_umask(tmp)  # after writing: a writer may have replaced the file mkstemp made
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
