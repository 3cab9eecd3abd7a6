"""An on-disk gradient store: the training set's per-sample gradients (or their projection) at
every checkpoint, computed once and scored against many query sets.

Layout of a store folder::

    manifest.json                   what fixes the values (below); written first, never changed
    chunks/000000000000/grads.npy   (checkpoints, rows, dim) gradients in the store's dtype
                        sq_norms.npy (checkpoints, rows) float64 squared norms of the exact gradients
                        ids.npy      (rows,) int64 sample ids
    chunks/000000004096/...         one folder per chunk, named by its first global row

Every file is a plain ``.npy`` (memory-mapped when read; no pickle anywhere); bfloat16 gradients
are stored as their raw 16 bits (``uint16``). The manifest records the model (parameter names and
shapes), each checkpoint's SHA-256 and learning rate, the dataset's fingerprint, the projection,
the dtype, the batch and chunk sizes, the row count and the library version. A chunk is written
into a temporary folder and committed by one atomic rename, so a build killed at any moment
(``kill -9`` included) leaves only whole chunks; :func:`build_store` on the same folder with the
same inputs computes only the missing ones, and the finished store is byte-identical to one built
without interruption (each chunk is computed in the same batches whichever process computes it,
whenever). A store used with another run, dataset or projection than the one it was built from is
refused with the fields that differ.

Several processes (``torchrun --nproc_per_node=W``, ``torch.distributed`` initialised) build one
store together: rank r computes the missing chunks c with ``c % W == r``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hessfree.datasets import fingerprint
from hessfree.errors import HessfreeError, InputError
from hessfree.grads.select import ParamSpec
from hessfree.grads.stream import Chunk, GradientStream, state_sha256
from hessfree.io import clean_leftovers, fsync_dir, fsync_file, honour_umask, temp_prefix, write_json
from hessfree.run import Run

log = logging.getLogger(__name__)

FORMAT = "hessfree-gradient-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FILES = ("grads.npy", "sq_norms.npy", "ids.npy")
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class StoreMismatchError(InputError):
    """A gradient store was built from another run, dataset, projection or settings than those given."""


class StoreIntegrityError(HessfreeError):
    """A gradient store's files are not what its manifest and layout say."""


def _library_version() -> str:
    from hessfree import __version__

    return __version__


def _dtype_name(dtype: Any) -> str:
    if dtype not in _DTYPES:
        raise InputError(f"a store holds float32, float16 or bfloat16 gradients, got dtype={dtype!r}")
    return _DTYPES[dtype]


def _chunk_name(start: int) -> str:
    return f"{start:012d}"


def _model_description(run: Run) -> dict[str, Any]:
    return {"class": type(run.model).__name__,
            "state": {n: list(t.shape) for n, t in run.model.state_dict().items()}}


def _manifest(stream: GradientStream, dataset: Dataset, dtype: torch.dtype) -> dict[str, Any]:
    d = stream.describe()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": _library_version(),
        "rows": int(stream.n), "chunk_rows": d.pop("chunk_rows"), "n_chunks": int(stream.n_chunks),
        "dim": d.pop("dim"), "dtype": _dtype_name(dtype), "projection": d.pop("projection"),
        "model": _model_description(stream.run),
        "checkpoints": [{"index": int(k), "learning_rate": float(eta), "sha256": sha}
                        for k, eta, sha in zip(stream.ks, stream.etas, stream.checkpoint_fingerprints())],
        "data": fingerprint(dataset, stream.ids),
        **{k: v for k, v in d.items() if k not in ("checkpoints", "learning_rates")},
    }


def _differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(have) | set(want)):
        if key == "library_version":
            continue
        if have.get(key) != want.get(key):
            out.append(key)
    return out


def _read_manifest(path: Path) -> dict[str, Any] | None:
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise StoreIntegrityError(f"{f} is not a readable JSON manifest ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f"{path} holds a {MANIFEST} that is not a hessfree gradient store's; pick another folder")
    if m.get("format_version") != FORMAT_VERSION:
        raise StoreIntegrityError(f"{path} is a gradient store of format version {m.get('format_version')}; this "
                                  f"hessfree reads version {FORMAT_VERSION}: build it again in another folder")
    return m


def _to_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy() if hasattr(torch, "uint16") else t.view(torch.int16).numpy().view(
            np.uint16)
    return t.numpy()


def _from_numpy(a: np.ndarray, dtype_name: str) -> Tensor:
    """A tensor over ``a``'s memory (a read-only memory map: it is only ever read)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a)
    if dtype_name == "bfloat16":
        return t.view(torch.bfloat16)
    return t


def _write_chunk(root: Path, chunk: Chunk, dtype: torch.dtype) -> None:
    """Write ``chunk`` into a temporary folder and commit it with one rename (atomic)."""
    grads = chunk.grads.to(dtype)
    if dtype == torch.float16 and not bool(torch.isfinite(grads).all()):
        raise InputError(f"rows {chunk.start}-{chunk.stop - 1}: gradients beyond float16's range (±65504); build the "
                         "store with dtype=torch.bfloat16 or torch.float32")
    final = root / "chunks" / _chunk_name(chunk.start)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final)  # folders of earlier killed writes of this chunk (their process is gone)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), suffix=".tmp", dir=final.parent))
    try:
        honour_umask(tmp, directory=True)
        arrays = {"grads.npy": _to_numpy(grads), "sq_norms.npy": chunk.sq_norms.detach().cpu().double().numpy(),
                  "ids.npy": np.ascontiguousarray(chunk.ids, dtype=np.int64)}
        for name, a in arrays.items():
            with open(tmp / name, "wb") as fh:
                np.save(fh, a, allow_pickle=False)
            honour_umask(tmp / name)
            fsync_file(tmp / name)
        fsync_dir(tmp)
        os.rename(tmp, final)  # atomic; fails if another writer committed it meanwhile
        fsync_dir(final.parent)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _committed(root: Path, manifest: dict[str, Any]) -> set[int]:
    """Indices of the chunks whose folders are committed."""
    step = manifest["chunk_rows"]
    return {c for c in range(manifest["n_chunks"]) if (root / "chunks" / _chunk_name(c * step)).is_dir()}


def _prepare_folder(root: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Check the folder a store is built in and write the manifest of a new store. Returns the
    existing manifest when the folder holds a store of the same inputs (a resumed build)."""
    if root.exists() and not root.is_dir():
        raise InputError(f"{root} is a file; build_store needs a folder (new or an earlier store's)")
    existing = _read_manifest(root) if root.is_dir() else None
    if existing is None and root.is_dir():
        clean_leftovers(root / MANIFEST)  # a build killed while writing its manifest
    if existing is None and root.is_dir() and any(root.iterdir()):
        raise InputError(f"{root} is not empty and holds no gradient store: pick a new folder (hessfree writes "
                         "only into folders it made or that are empty)")
    if existing is not None:
        diff = _differences(existing, manifest)
        if diff:
            raise StoreMismatchError(f"{root} holds a gradient store built from other inputs ({', '.join(diff)} "
                                     "differ); build into another folder, or remove that store yourself")
        return existing
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / MANIFEST, manifest)
    return None


def _undo_empty_store(root: Path, manifest: dict[str, Any], made_root: bool) -> None:
    """A new store whose build failed before committing any chunk: remove what this call wrote
    (its manifest, its empty chunks folder, the folder itself if this call made it), so that the
    same folder can be used again with other settings (e.g. another dtype)."""
    if _committed(root, manifest):
        return  # whole chunks were committed: kept for a resumed build
    chunks = root / "chunks"
    try:
        if chunks.is_dir() and not any(chunks.iterdir()):
            chunks.rmdir()
        (root / MANIFEST).unlink(missing_ok=True)
        if made_root and not any(root.iterdir()):
            root.rmdir()
    except OSError as e:
        log.warning("could not remove the unfinished store at %s: %s", root, e)


def _agree(failure: BaseException | None, what: str) -> None:
    """Raise ``failure`` here; with several processes, first make every process learn whether any
    failed (each then raises: its own error, or one naming the step where another failed)."""
    rank, world = _world()
    if world > 1:
        flag = torch.tensor([0 if failure is None else 1])
        torch.distributed.all_reduce(flag)
        if failure is None and int(flag) > 0:
            raise HessfreeError(f"another process failed while {what}; see its error")
    if failure is not None:
        raise failure


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def build_store(run: Run, dataset: Dataset, path: str | os.PathLike, *, projection: Any = None,
                dtype: torch.dtype = torch.float32, chunk_rows: int | None = None, params: ParamSpec = "all",
                checkpoints: Sequence[int] | str | None = None, batch_size: int = 256,
                compute_dtype: torch.dtype = torch.float32, device: Any = None,
                progress: bool = True) -> "GradientStore":
    """Compute the per-sample gradients of ``dataset`` at the run's checkpoints and write them to
    the folder ``path`` (created if missing; an existing store of the same inputs is resumed:
    only its missing chunks are computed). Returns the finished :class:`GradientStore`.

    ``projection``: None (exact gradients, ``dim`` = number of selected parameters) or a projector
    spec (:mod:`hessfree.grads.projectors`). ``dtype``: what the gradients are stored in
    (float32, float16, bfloat16); squared norms are always float64 and exact (taken before the
    projection and the rounding). ``chunk_rows``: rows per chunk (default: as many whole batches as
    keep a chunk under 256 MiB). ``compute_dtype``: the gradient engine's dtype.

    Refused before any gradient work: a folder that holds anything but a hessfree store, a store
    built from other inputs (the differing fields are named), bad arguments.
    """
    _dtype_name(dtype)  # refuse an unsupported dtype before anything else
    root = Path(path)
    rank, world = _world()
    with GradientStream(run, dataset, params=params, checkpoints=checkpoints, projection=projection,
                        batch_size=batch_size, chunk_rows=chunk_rows, dtype=compute_dtype, device=device) as stream:
        stream.check_training_data()  # before anything is written
        manifest = _manifest(stream, dataset, dtype)
        # the first process inspects the folder and writes the manifest; the others wait for its verdict
        failure: BaseException | None = None
        existing = None
        made_root = not root.exists()
        if rank == 0:
            try:
                existing = _prepare_folder(root, manifest)
            except BaseException as e:  # noqa: BLE001  (re-raised below, after telling the others)
                failure = e
        _agree(failure, "checking the store folder")
        if rank != 0:
            existing = _read_manifest(root)
        todo = [c for c in range(stream.n_chunks) if c % world == rank and c not in _committed(root, manifest)]
        if todo and existing is not None:
            log.info("resuming the gradient store at %s: %d chunk(s) to compute", root, len(todo))
        failure = None
        try:
            for c in tqdm(todo, desc="build_store", disable=not progress or rank != 0, leave=False):
                _write_chunk(root, stream.chunk(c), dtype)
        except BaseException as e:  # noqa: BLE001
            failure = e
        try:
            _agree(failure, "computing chunks")
        except BaseException:
            if rank == 0 and existing is None:
                _undo_empty_store(root, manifest, made_root)
            raise
    _barrier()
    store = GradientStore(root, run)
    if rank == 0 and not store.complete:
        raise StoreIntegrityError(f"{root}: chunks {store.missing()[:10]} are missing after the build")
    return store


class GradientStore:
    """A finished (or partial) gradient store, read from disk; chunks are memory-mapped.

    ``GradientStore(path)`` reads the manifest; :meth:`check` compares it with a run (and
    optionally the dataset) before scoring against them; :meth:`chunks` yields
    :class:`hessfree.grads.stream.Chunk` objects whose gradients are float32 tensors.
    """

    def __init__(self, path: str | os.PathLike, run: Run | None = None):
        self.path = Path(path)
        self.run = run  # the run it was built from (checked), needed for query gradients
        m = _read_manifest(self.path) if self.path.is_dir() else None
        if m is None:
            raise InputError(f"no gradient store at {self.path} (no {MANIFEST}); build one with hessfree.store."
                             "build_store")
        self.manifest = m

    def __repr__(self) -> str:
        m = self.manifest
        return (f"GradientStore({str(self.path)!r}, rows={m['rows']}, dim={m['dim']}, dtype={m['dtype']}, "
                f"checkpoints={len(m['checkpoints'])}, projection={m['projection']})")

    # -- what it holds ------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def learning_rates(self) -> list[float]:
        return [float(c["learning_rate"]) for c in self.manifest["checkpoints"]]

    @property
    def checkpoint_indices(self) -> list[int]:
        return [int(c["index"]) for c in self.manifest["checkpoints"]]

    @property
    def n_chunks(self) -> int:
        return int(self.manifest["n_chunks"])

    def bounds(self, c: int) -> tuple[int, int]:
        step = int(self.manifest["chunk_rows"])
        return c * step, min(self.rows, (c + 1) * step)

    def missing(self) -> list[int]:
        done = _committed(self.path, self.manifest)
        return [c for c in range(self.n_chunks) if c not in done]

    @property
    def complete(self) -> bool:
        return not self.missing()

    def _require_complete(self) -> None:
        missing = self.missing()
        if missing:
            raise InputError(f"the gradient store at {self.path} is incomplete ({len(missing)} of {self.n_chunks} "
                             "chunks missing): run build_store again with the same arguments to finish it")

    # -- checks -------------------------------------------------------------------------
    def check(self, run: Run, dataset: Dataset | None = None, *, params: ParamSpec | None = None,
              projection: Any = "store") -> None:
        """Refuse (StoreMismatchError, naming what differs) a run whose model or checkpoints are
        not those the store was built from, a dataset other than the store's, or a parameter
        selection / projection other than the store's."""
        m = self.manifest
        diff = []
        if _model_description(run) != m["model"]:
            diff.append("model (parameter names or shapes)")
        n = len(run.checkpoints)
        for c in m["checkpoints"]:
            k = int(c["index"])
            if k >= n or float(run.checkpoints[k].learning_rate) != float(c["learning_rate"]):
                diff.append(f"checkpoint {k} (missing or another learning rate)")
            elif state_sha256(run.checkpoint_state(k)) != c["sha256"]:
                diff.append(f"checkpoint {k} (other weights)")
        if run.task.name != m["loss"]:
            diff.append(f"loss ({run.task.name!r}, the store's {m['loss']!r})")
        if dataset is not None:
            from hessfree.datasets import sample_ids

            if fingerprint(dataset, sample_ids(dataset)) != m["data"]:
                diff.append("dataset (size, sample ids or content)")
        if params is not None:
            from hessfree.grads.select import select_parameters

            if select_parameters(run.model, params) != m["params"]:
                diff.append("parameter selection")
        if projection != "store":
            from hessfree.grads.projectors import make_projector

            shapes = {k: tuple(v) for k, v in m["param_shapes"].items()}
            p = make_projector(projection, shapes)
            if (None if p is None else p.describe()) != m["projection"]:
                diff.append("projection")
        if diff:
            raise StoreMismatchError(f"the gradient store at {self.path} was built from other inputs: "
                                     + "; ".join(diff))

    def stream(self, run: Run, device: Any = None, checked: bool = False) -> GradientStream:
        """A stream with the store's settings over ``run`` (for query gradients projected as the
        stored rows are); checks the run first unless ``checked``."""
        if not checked:
            self.check(run)
        m = self.manifest
        proxy = _RowsOnly(m["rows"])
        compute = getattr(torch, m["compute_dtype"])
        return GradientStream(run, proxy, params=list(m["params"]), checkpoints=self.checkpoint_indices,
                              projection=m["projection"], batch_size=int(m["batch_size"]),
                              chunk_rows=int(m["chunk_rows"]), dtype=compute, device=device)

    # -- reading ------------------------------------------------------------------------
    def read(self, c: int, mmap: bool = True) -> Chunk:
        """Chunk ``c`` (gradients as stored: float32, float16 or bfloat16 tensors)."""
        start, stop = self.bounds(c)
        folder = self.path / "chunks" / _chunk_name(start)
        if not folder.is_dir():
            raise InputError(f"chunk {c} (rows {start}-{stop - 1}) of the gradient store at {self.path} is missing: "
                             "run build_store again with the same arguments to finish it")
        K = len(self.manifest["checkpoints"])
        arrays = {}
        for name in _FILES:
            try:
                arrays[name] = np.load(folder / name, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise StoreIntegrityError(f"{folder / name} cannot be read as a .npy file ({e})") from e
        want = {"grads.npy": (K, stop - start, self.dim), "sq_norms.npy": (K, stop - start),
                "ids.npy": (stop - start,)}
        for name, shape in want.items():
            if arrays[name].shape != shape:
                raise StoreIntegrityError(f"{folder / name} has shape {arrays[name].shape}, the manifest says {shape}")
        return Chunk(c, start, stop, np.asarray(arrays["ids.npy"]), _from_numpy(arrays["grads.npy"], self.manifest[
            "dtype"]), torch.from_numpy(np.array(arrays["sq_norms.npy"])))

    def chunks(self, indices: Sequence[int] | None = None) -> Iterator[Chunk]:
        self._require_complete()
        for c in (range(self.n_chunks) if indices is None else indices):
            yield self.read(c)

    def sample_ids(self) -> np.ndarray:
        self._require_complete()
        return np.concatenate([np.load(self.path / "chunks" / _chunk_name(self.bounds(c)[0]) / "ids.npy",
                                       allow_pickle=False) for c in range(self.n_chunks)])

    def sq_norms(self) -> np.ndarray:
        """(checkpoints, rows) float64 exact squared gradient norms."""
        self._require_complete()
        return np.concatenate([np.load(self.path / "chunks" / _chunk_name(self.bounds(c)[0]) / "sq_norms.npy",
                                       allow_pickle=False) for c in range(self.n_chunks)], axis=1)


class _RowsOnly(Dataset):
    """Stands in for the training dataset of a store's stream: only its size is ever read."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        raise RuntimeError("internal error: a store's stream read a training row")


def open_store(path: str | os.PathLike, run: Run | None = None) -> GradientStore:
    """Open the gradient store at ``path``; with ``run``, check that it was built from it."""
    store = GradientStore(path)
    if run is not None:
        store.check(run)
        store.run = run
    return store
