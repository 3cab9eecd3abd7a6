"""Benchmark hessfree's TracIn scores against Captum and dattri on one small, exact task.

Task (identical for every library): scikit-learn digits, features / 16 (float32),
``train_test_split(test_size=360, random_state=0, stratify=y)`` -> 1,437 train / 360 test;
MLP 64-128-64-10 (``torch.manual_seed(0)`` init) trained once with ``hessfree.fit`` (plain SGD,
lr 0.1, 30 epochs, batch 256, a checkpoint every 5 epochs -> 6 checkpoints). Every library then
scores from those same 6 checkpoints and learning rates:

* self-influence, shape (N,):              sum_k eta_k ||g_i(theta_k)||^2
* train x test matrix, shape (n_test, N):  sum_k eta_k g_i(theta_k) . grad l(z'_j; theta_k)

with g the gradient of one sample's cross-entropy loss w.r.t. all parameters, model in eval mode.
Each method is checked against a float64 brute-force reference (a per-sample
``torch.autograd.grad`` loop over checkpoints and samples on a float64 copy of the model).

Measured in one process, with ``torch.set_num_threads(--threads)``: the median of ``--repeats``
wall-clock timings around the scoring call only, the memory increase during the call (peak RSS
sampled every ~5 ms by a background thread with psutil, minus the RSS just before the call), and
the relative error ``max|x - ref| / max|ref|``.

Usage::

    .venv/bin/python benchmarks/peers.py                 # full run, writes benchmarks/results/peers.json
    .venv/bin/python benchmarks/peers.py --quick         # smoke run on a subset, 1 repeat
    .venv/bin/python benchmarks/peers.py --threads 1 --repeats 5 --out /tmp/peers.json

Needs the ``bench`` extra: ``pip install -e ".[bench]" torch==2.13.0``
(captum==0.9.0, dattri==0.3.0, psutil).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# dattri draws tqdm bars inside its loops with no switch to turn them off; tqdm honours this.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "peers.json"

LR = 0.1
EPOCHS = 30
BATCH_SIZE = 256  # SGD batch of the one training run
SCORE_BATCH = 256  # batch every library scores with (--score-batch)
N_TEST = 360
CHECKPOINT_EPOCHS = 5
LAST_LAYER = ("4.weight", "4.bias")  # the final nn.Linear(64, 10) of the Sequential below
QUICK_N_TRAIN = 300
QUICK_N_TEST = 60


# ----------------------------------------------------------------------------- task
def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


@dataclass
class Data:
    train_ds: TensorDataset  # the full training set (used for training)
    score_train_ds: TensorDataset  # the training samples that are scored (full set, or a subset with --quick)
    test_ds: TensorDataset


def load_data(quick: bool) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=N_TEST, random_state=0, stratify=y)
    train_ds = TensorDataset(torch.from_numpy(X_tr), torch.from_numpy(y_tr))
    test_ds = TensorDataset(torch.from_numpy(X_te), torch.from_numpy(y_te))
    score_train_ds = train_ds
    if quick:
        score_train_ds = TensorDataset(train_ds.tensors[0][:QUICK_N_TRAIN], train_ds.tensors[1][:QUICK_N_TRAIN])
        test_ds = TensorDataset(test_ds.tensors[0][:QUICK_N_TEST], test_ds.tensors[1][:QUICK_N_TEST])
    return Data(train_ds, score_train_ds, test_ds)


@dataclass
class Checkpoints:
    """The checkpoints every library scores from, in the forms their APIs want."""

    states: list[dict[str, torch.Tensor]]
    learning_rates: list[float]
    run: Any = None  # the hessfree.Run (None when the checkpoints were made another way)
    captum_files: list[str] = field(default_factory=list)  # {"state_dict", "learning_rate"} per file
    dattri_files: list[str] = field(default_factory=list)  # plain state dict per file


def train_with_hessfree(data: Data, workdir: Path) -> Checkpoints:
    import hessfree

    model = make_model()
    steps_per_epoch = -(-len(data.train_ds) // BATCH_SIZE)
    run = hessfree.fit(model, data.train_ds, loss="cross_entropy", lr=LR, epochs=EPOCHS, batch_size=BATCH_SIZE,
                       checkpoint_every=steps_per_epoch * CHECKPOINT_EPOCHS, seed=0, run_dir=workdir / "run",
                       progress=False)
    n = len(run.checkpoints)
    states = [{k: v.detach().clone() for k, v in run.checkpoint_state(k).items()} for k in range(n)]
    return Checkpoints(states=states, learning_rates=[float(x) for x in run.learning_rates], run=run)


def write_peer_files(ck: Checkpoints, workdir: Path) -> None:
    """Captum: files holding the state dict and the learning rate (our load function returns it).
    dattri: plain state-dict files (its default loader: torch.load + load_state_dict + eval)."""
    for k, (state, lr) in enumerate(zip(ck.states, ck.learning_rates)):
        p = workdir / f"captum_ckpt_{k:02d}.pt"  # zero-padded: Captum natural-sorts the paths
        torch.save({"state_dict": state, "learning_rate": lr}, p)
        ck.captum_files.append(str(p))
        p = workdir / f"dattri_ckpt_{k:02d}.pt"
        torch.save(state, p)
        ck.dattri_files.append(str(p))


# ----------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """float64 brute force; ``pair`` is (n_test, n_train). Keys: "all", "last_wb" (last layer
    weight + bias), "last_w" (last layer weight only, which is what TracInCPFast computes)."""

    self_inf: dict[str, np.ndarray]
    pair: dict[str, np.ndarray]
    seconds: float


def brute_force_reference(ck: Checkpoints, data: Data) -> Reference:
    t0 = time.perf_counter()
    model = make_model().double().eval()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    sizes = [p.numel() for p in params]
    offsets = np.cumsum([0] + sizes)
    cols = {
        "all": slice(0, offsets[-1]),
        "last_wb": slice(offsets[names.index(LAST_LAYER[0])], offsets[names.index(LAST_LAYER[1]) + 1]),
        "last_w": slice(offsets[names.index(LAST_LAYER[0])], offsets[names.index(LAST_LAYER[0]) + 1]),
    }
    assert names.index(LAST_LAYER[1]) == names.index(LAST_LAYER[0]) + 1

    def grads(ds: TensorDataset) -> torch.Tensor:
        X, y = ds.tensors
        out = torch.empty(len(X), offsets[-1], dtype=torch.float64)
        for i in range(len(X)):
            loss = nn.functional.cross_entropy(model(X[i:i + 1].double()), y[i:i + 1])
            out[i] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        return out

    n_tr, n_te = len(data.score_train_ds), len(data.test_ds)
    self_inf = {k: np.zeros(n_tr) for k in cols}
    pair = {k: np.zeros((n_te, n_tr)) for k in cols}
    for state, lr in zip(ck.states, ck.learning_rates):
        model.load_state_dict({k: v.double() for k, v in state.items()})
        g_tr, g_te = grads(data.score_train_ds), grads(data.test_ds)
        for key, c in cols.items():
            a, b = g_tr[:, c], g_te[:, c]
            self_inf[key] += lr * (a * a).sum(1).numpy()
            pair[key] += lr * (b @ a.T).numpy()
        del g_tr, g_te
    return Reference(self_inf, pair, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- measurement
_LIBC = None
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    pass


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so 'RSS before' is a fair baseline."""
    gc.collect()
    if _LIBC is not None:
        try:
            _LIBC.malloc_trim(0)
        except Exception:
            pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _read_hwm_bytes() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


class RssSampler:
    """Peak RSS of this process, sampled by a background thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self.before = self.proc.memory_info().rss
        self.peak = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


@dataclass
class Measurement:
    output: np.ndarray
    seconds: list[float]
    cpu_seconds: list[float]  # process CPU time (all threads) during the call
    mem_increase_mb: list[float]  # psutil-sampled peak RSS - RSS before, in the one memory call
    hwm_increase_mb: list[float]  # kernel VmHWM (exact peak RSS) - RSS before (Linux only)


def measure(fn: Callable[[], Any], to_numpy: Callable[[Any], np.ndarray], repeats: int) -> Measurement:
    """After one untimed warm-up call, time ``repeats`` calls with nothing else running in the
    process, then measure memory in ONE further call: the RSS-sampling thread competes for the
    GIL and would slow the timed calls (more so for fast, Python-heavy ones)."""
    seconds, cpu, mem, hwm = [], [], [], []
    out = fn()  # one untimed warm-up call (lazy initialisation, first-touch of the data)
    for _ in range(repeats):
        out = None
        _release_memory()
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = None
    _release_memory()
    can_hwm = _reset_hwm()
    with RssSampler() as s:
        out = fn()
    mem.append((s.peak - s.before) / 2**20)
    peak = _read_hwm_bytes() if can_hwm else None
    if peak is not None:
        hwm.append((peak - s.before) / 2**20)
    return Measurement(to_numpy(out), seconds, cpu, mem, hwm)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    if x.shape != ref.shape:
        raise ValueError(f"shape {x.shape} does not match the reference {ref.shape}")
    return float(np.max(np.abs(x.astype(np.float64) - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------- methods
# Each method is a function (ck, data) -> {"self": (call, to_numpy), "pair": (call, to_numpy), **notes}.
# Construction of attributors happens in that function, outside the timing; only `call()` is timed.

def _t2np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def method_hessfree(params: str) -> Callable[[Checkpoints, Data], dict]:
    def setup(ck: Checkpoints, data: Data) -> dict:
        import hessfree

        if ck.run is None:
            raise RuntimeError("no hessfree.Run available")
        run = ck.run
        return {
            "self": (lambda: hessfree.self_influence(run, data.score_train_ds, params=params, batch_size=SCORE_BATCH,
                                                     dtype=torch.float32, progress=False),
                     lambda s: np.asarray(s.values)),
            "pair": (lambda: hessfree.pairwise_influence(run, data.score_train_ds, data.test_ds, params=params,
                                                         batch_size=SCORE_BATCH, dtype=torch.float32, progress=False),
                     lambda s: np.asarray(s.values)),
            "inside_timing": f"hessfree.self_influence / pairwise_influence(run, ..., params={params!r}, "
                             f"batch_size={SCORE_BATCH}, float32): reads the 6 checkpoints from the run "
                             "directory and computes everything",
            "orientation": "pairwise values are (n_test, n_train): used as is",
            "lr_handling": "per-checkpoint learning rates from the Run (run.learning_rates)",
        }
    return setup


def _captum_load_func(model: nn.Module, path: str) -> float:
    """Captum's checkpoints_load_func: load weights into `model` in place, return the checkpoint's lr."""
    ckpt = torch.load(path, map_location="cpu")
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return float(ckpt["learning_rate"])


def method_captum_tracincp(sample_wise: bool) -> Callable[[Checkpoints, Data], dict]:
    def setup(ck: Checkpoints, data: Data) -> dict:
        from captum.influence import TracInCP

        model = make_model().eval()
        # sample_wise_grads_per_batch=True needs a *reduction* loss (per-sample grads via hooks on
        # Linear layers); False needs a per-example loss (reduction="none") and loops over samples.
        loss_fn = nn.CrossEntropyLoss(reduction="sum" if sample_wise else "none")
        train_loader = DataLoader(data.score_train_ds, batch_size=SCORE_BATCH, shuffle=False)
        test_loader = DataLoader(data.test_ds, batch_size=SCORE_BATCH, shuffle=False)
        tracin = TracInCP(model, train_loader, ck.captum_files, checkpoints_load_func=_captum_load_func,
                          loss_fn=loss_fn, batch_size=None, sample_wise_grads_per_batch=sample_wise)
        return {
            "self": (lambda: tracin.self_influence(train_loader, outer_loop_by_checkpoints=True), _t2np),
            "pair": (lambda: tracin.influence(test_loader), _t2np),
            "inside_timing": "TracInCP.self_influence(train_loader, outer_loop_by_checkpoints=True) / "
                             "TracInCP.influence(test_loader) (influence-score mode, k=None); includes Captum "
                             "loading checkpoint files through checkpoints_load_func (for influence() Captum "
                             "reloads every checkpoint once per training batch). TracInCP construction is outside.",
            "orientation": "influence() returns (n_test, n_train) (documented and checked): used as is",
            "lr_handling": "checkpoints_load_func returns each checkpoint's lr; Captum multiplies each "
                           "checkpoint's contribution by it",
        }
    return setup


def method_captum_fast(ck: Checkpoints, data: Data) -> dict:
    from captum.influence import TracInCPFast

    model = make_model().eval()
    train_loader = DataLoader(data.score_train_ds, batch_size=SCORE_BATCH, shuffle=False)
    test_batch = tuple(data.test_ds.tensors)  # TracInCPFast.influence takes a single batch (tuple)
    tracin = TracInCPFast(model, final_fc_layer=model[4], train_dataset=train_loader, checkpoints=ck.captum_files,
                          checkpoints_load_func=_captum_load_func, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                          batch_size=None)
    return {
        "self": (lambda: tracin.self_influence(train_loader, outer_loop_by_checkpoints=True), _t2np),
        "pair": (lambda: tracin.influence(test_batch), _t2np),
        "inside_timing": "TracInCPFast.self_influence(train_loader, outer_loop_by_checkpoints=True) / "
                         "TracInCPFast.influence((X_test, y_test)); includes checkpoint-file loading. "
                         "Construction outside.",
        "orientation": "influence() returns (n_test, n_train): used as is",
        "lr_handling": "checkpoints_load_func returns each checkpoint's lr; Captum multiplies by it",
        "scope": "LAST LAYER ONLY, not exact all-parameter: (x.x')(dL/dy . dL/dy') = gradient w.r.t. the "
                 "final Linear's weight only (its bias gradient is left out)",
    }


def method_dattri(ck: Checkpoints, data: Data) -> dict:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    model = make_model().eval()

    def loss_func(params: dict[str, torch.Tensor], data_target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # dattri vmaps grad(loss_func) over the batch: x is one sample (64,), y a 0-d label
        x, y = data_target
        out = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=ck.dattri_files)
    attributor = TracInAttributor(task=task, weight_list=torch.tensor(ck.learning_rates, dtype=torch.float32),
                                  normalized_grad=False, projector_kwargs={"proj_type": "identity"}, device="cpu")
    train_loader = DataLoader(data.score_train_ds, batch_size=SCORE_BATCH, shuffle=False)
    test_loader = DataLoader(data.test_ds, batch_size=SCORE_BATCH, shuffle=False)
    return {
        "self": (lambda: attributor.self_attribute(train_loader), _t2np),
        "pair": (lambda: attributor.attribute(train_loader, test_loader).T, _t2np),
        "inside_timing": "TracInAttributor.self_attribute(train_loader) / .attribute(train_loader, test_loader); "
                         "includes dattri loading checkpoint files (AttributionTask default loader) and building "
                         "its (identity) projector per batch; attribute() recomputes the test gradients for every "
                         "training batch. AttributionTask/TracInAttributor construction is outside.",
        "orientation": "attribute() returns (n_train, n_test): transposed to (n_test, n_train) (the transpose "
                       "is inside the timing; it is a view)",
        "lr_handling": "weight_list = per-checkpoint learning rates; dattri multiplies each checkpoint's "
                       "contribution by its weight",
        "projector": "projector_kwargs={'proj_type': 'identity'}: dattri's BasicProjector returns the "
                     "gradients unchanged (no random projection)",
    }


@dataclass
class Method:
    key: str
    label: str
    setup: Callable[[Checkpoints, Data], dict]
    ref: str  # reference key this method computes exactly
    baseline: str  # hessfree method key to take speed ratios against
    note: str = ""


METHODS = [
    Method("hessfree", "hessfree (all params)", method_hessfree("all"), "all", "hessfree"),
    Method("captum_tracincp_swgpb_true", "Captum TracInCP sample_wise_grads_per_batch=True",
           method_captum_tracincp(True), "all", "hessfree"),
    Method("captum_tracincp_swgpb_false", "Captum TracInCP sample_wise_grads_per_batch=False",
           method_captum_tracincp(False), "all", "hessfree"),
    Method("dattri_tracin_identity", "dattri TracInAttributor (identity projector)", method_dattri, "all",
           "hessfree"),
    Method("hessfree_last_layer", "hessfree params='last_layer'", method_hessfree("last_layer"), "last_wb",
           "hessfree_last_layer", "last layer only"),
    Method("captum_tracincp_fast", "Captum TracInCPFast [last layer only, not exact all-parameter]",
           method_captum_fast, "last_w", "hessfree_last_layer", "last layer weight only"),
]
QUANTITIES = {"self": "self-influence (N,)", "pair": "train x test (n_test, n_train)"}


def run_method(m: Method, ck: Checkpoints, data: Data, ref: Reference, repeats: int) -> dict:
    res: dict[str, Any] = {"label": m.label, "reference": m.ref, "loadavg_before": _loadavg()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = m.setup(ck, data)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc(limit=6)
        return res
    res.update({k: v for k, v in spec.items() if k not in QUANTITIES})
    for q in QUANTITIES:
        call, to_numpy = spec[q]
        r: dict[str, Any] = {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                meas = measure(call, to_numpy, repeats)
            refs = ref.self_inf if q == "self" else ref.pair
            out = meas.output
            r.update({
                "seconds": meas.seconds,
                "median_s": statistics.median(meas.seconds),
                "cpu_seconds": meas.cpu_seconds,
                "mem_increase_mb": meas.mem_increase_mb,
                "mem_increase_mb_max": max(meas.mem_increase_mb),
                "hwm_increase_mb": meas.hwm_increase_mb,
                "hwm_increase_mb_max": max(meas.hwm_increase_mb) if meas.hwm_increase_mb else None,
                "output_shape": list(out.shape),
                "output_dtype": str(out.dtype),
                "rel_err": rel_err(out, refs[m.ref]),
                "rel_err_vs": {k: rel_err(out, v) for k, v in refs.items()},
                "sign_agrees": bool(np.sum(out.astype(np.float64) * refs[m.ref]) > 0),
            })
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {e}"
            r["traceback"] = traceback.format_exc(limit=6)
        res[q] = r
    res["loadavg_after"] = _loadavg()
    return res


# ----------------------------------------------------------------------------- report
def add_ratios(results: dict[str, dict]) -> None:
    for m in METHODS:
        res = results.get(m.key, {})
        for q in QUANTITIES:
            r = res.get(q)
            if not r or "median_s" not in r:
                continue
            for base in {m.baseline, "hessfree"}:
                b = results.get(base, {}).get(q, {})
                if "median_s" in b:
                    r[f"speed_ratio_vs_{base}"] = r["median_s"] / b["median_s"]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(results: dict[str, dict]) -> str:
    lines = []
    head = (f"{'method':<66} {'quantity':<6} {'median s':>9} {'ratio':>7} {'+RSS MB':>8} {'+HWM MB':>8} "
            f"{'rel err':>9}  vs")
    lines.append(head)
    lines.append("-" * len(head))
    for m in METHODS:
        res = results.get(m.key)
        if res is None:
            continue
        if "error" in res:
            lines.append(f"{m.label:<66} ERROR: {res['error']}")
            continue
        for q in QUANTITIES:
            r = res.get(q, {})
            if "error" in r:
                lines.append(f"{m.label:<66} {q:<6} ERROR: {r['error']}")
                continue
            ratio = r.get(f"speed_ratio_vs_{m.baseline}")
            lines.append(
                f"{m.label:<66} {q:<6} {r['median_s']:>9.3f} {_fmt(ratio, '>7.2f')} "
                f"{r['mem_increase_mb_max']:>8.1f} {_fmt(r['hwm_increase_mb_max'], '>8.1f')} "
                f"{r['rel_err']:>9.2e}  {m.ref}" + ("" if r["sign_agrees"] else "  SIGN FLIPPED"))
    lines.append("")
    lines.append("ratio = method median time / hessfree median time for the same quantity (last-layer rows: vs "
                 "hessfree params='last_layer'). Timed calls run alone; memory comes from one extra call: +RSS = "
                 "psutil-sampled peak RSS - RSS before; +HWM = same with the kernel's exact peak (VmHWM, reset "
                 "before the call). rel err = "
                 "max|x-ref|/max|ref| against the float64 reference named in 'vs' (all = all parameters, "
                 "last_wb = last layer weight+bias, last_w = last layer weight only).")
    return "\n".join(lines)


def environment(threads: int) -> dict:
    import sklearn

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "numpy": np.__version__, "scikit-learn": sklearn.__version__, "psutil": psutil.__version__,
           "torch_threads": torch.get_num_threads(), "threads_requested": threads,
           "cpu_count": os.cpu_count(), "loadavg": _loadavg()}
    for name in ("captum", "dattri", "hessfree"):
        try:
            from importlib.metadata import version
            env[name] = version(name)
        except Exception:  # noqa: BLE001
            env[name] = None
    return env


# ----------------------------------------------------------------------------- main
def run_benchmark(args: argparse.Namespace,
                  make_checkpoints: Callable[[Data, Path], Checkpoints] = train_with_hessfree) -> dict:
    global SCORE_BATCH
    SCORE_BATCH = args.score_batch
    torch.set_num_threads(args.threads)
    print(f"load average at start: {_loadavg()} on {os.cpu_count()} CPUs (other processes competing for the "
          "CPUs distort the timings; the JSON keeps the load average before/after each method)", flush=True)
    repeats = 1 if args.quick and args.repeats is None else (args.repeats or 3)
    data = load_data(args.quick)
    with tempfile.TemporaryDirectory(prefix="hessfree-peers-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        ck = make_checkpoints(data, workdir)
        train_s = time.perf_counter() - t0
        write_peer_files(ck, workdir)
        print(f"trained: {len(ck.states)} checkpoints, learning rates {ck.learning_rates} ({train_s:.1f} s)",
              flush=True)
        ref = brute_force_reference(ck, data)
        print(f"float64 reference: {ref.seconds:.1f} s", flush=True)
        results: dict[str, dict] = {}
        for m in METHODS:
            if args.only and m.key not in args.only:
                continue
            print(f"running {m.label} ...", flush=True)
            results[m.key] = run_method(m, ck, data, ref, repeats)
        add_ratios(results)
    payload = {
        "benchmark": "peers",
        "task": {
            "dataset": "sklearn load_digits, X/16 float32, train_test_split(test_size=360, random_state=0, "
                       "stratify=y)",
            "n_train_fit": len(data.train_ds), "n_train_scored": len(data.score_train_ds),
            "n_test_scored": len(data.test_ds), "quick": bool(args.quick),
            "model": "Sequential(Linear(64,128), ReLU, Linear(128,64), ReLU, Linear(64,10)), torch.manual_seed(0)",
            "training": f"hessfree.fit(loss='cross_entropy', lr={LR}, epochs={EPOCHS}, batch_size={BATCH_SIZE}, "
                        f"checkpoint_every=<{CHECKPOINT_EPOCHS} epochs of steps>, seed=0)",
            "n_checkpoints": len(ck.states), "learning_rates": ck.learning_rates,
            "score_batch_size": SCORE_BATCH,
            "self_influence": "sum_k eta_k ||g_i(theta_k)||^2, shape (N,)",
            "pairwise": "sum_k eta_k g_i(theta_k) . grad l(z'_j; theta_k), shape (n_test, n_train)",
            "gradient": "per-sample cross-entropy loss (mean over one sample), model in eval mode",
        },
        "measurement": {
            "repeats": repeats, "timing": "median wall-clock (time.perf_counter) around the scoring call only, "
                      "after one untimed warm-up call per method and quantity; "
                      "the timed calls run with no sampling thread",
            "memory": "one further call: peak RSS sampled every 5 ms by a psutil background thread minus RSS just "
                      "before the call "
                      "(gc.collect + malloc_trim first); also the kernel VmHWM peak (reset via "
                      "/proc/self/clear_refs) as an exact cross-check",
            "error": "max|x - ref| / max|ref| against a float64 per-sample torch.autograd.grad loop",
            "reference_seconds": ref.seconds, "train_seconds": train_s,
        },
        "environment": environment(args.threads),
        "results": results,
    }
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method and quantity "
                                                             "(default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: score {QUICK_N_TRAIN} train x {QUICK_N_TEST} test samples")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--score-batch", type=int, default=SCORE_BATCH,
                   help="batch size every library scores with (default 256, the training batch)")
    p.add_argument("--only", nargs="*", choices=[m.key for m in METHODS], help="run only these methods")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    payload = run_benchmark(args)
    table = format_table(payload["results"])
    print()
    print(table)
    payload["table"] = table
    from hessfree.io import write_json  # (hessfree is imported late here, as in the rest of this file)
    write_json(args.out, payload)  # temp file + rename
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
