"""Outlier Gradient Analysis speed: closed-form last-layer L1 / L2 against vmap per-sample gradients.

Setting: N = 100,000 synthetic samples (``--n``) through a final linear layer of 640 weights:
with ``--model head`` (default) 64 standard-normal features go straight into
``Linear(64, 10, bias=False)``; with ``--model mlp`` 20 features go through a
``Linear(20, 64), ReLU`` body first (its forward is shared by every path, so it only dilutes the
ratio). Features from a seeded ``torch.Generator``; labels = argmax of a seeded random linear
teacher, 5% of them replaced by uniformly random classes; ``torch.manual_seed(seed)`` init, not
trained (the timings do not depend on the weights); loss cross-entropy,
``params="last_layer_weight"`` = the 640 weights of the final layer.

For detector in (l1, l2) the whole ``hessfree.outlier_scores`` call is timed (wall clock around
the call) with

* ``gradient_path="closed_form"``: r = softmax(z) - e_y and h from one forward pass,
  ||g||_2 = ||r||_2 ||h||_2 and sum|g| = ||r||_1 ||h||_1 (no backward, no outer product);
* ``gradient_path="vmap"``: the ``torch.func`` ``vmap(grad)`` per-sample reference;
* ``gradient_path="engine"``: the factorised-hook gradient engine (an extra row);
* a hand-written loop of the closed form's arithmetic outside hessfree (``hand_closed_form``: no
  checks, buffers allocated once): the floor of any implementation that goes through the data
  ``--batch-size`` rows at a time (an extra row);

all at the same ``--batch-size``. The paths' score vectors are compared (against the vmap one).
Then ``detector="iforest"`` on the closed-form dense (N, 640) gradient features, with the
split of ``scores.meta["timing"]`` into ``gradients_s`` and ``detector_s`` (and, as an extra
row, the same with the vmap features). A last row times the bare model forward over the data
in the same batches: the floor every path shares.

Each configuration is warmed up once on the first 4 batches (one-time costs: imports, torch.func
set-up), then timed in ``--repeats`` repeats at full N, the configurations interleaved within
each repeat so that a change in machine load hits them alike. A repeat of one configuration is
gc.collect(), one *cold* call, then ``--inner`` back-to-back *warm* calls with the garbage
collector off (as ``timeit`` does). Warm time: the median of a repeat's warm calls, then the
median over repeats (the steady-state cost of each path). Cold time: the median over repeats of
the first call, right after a full garbage collection and the other configurations' calls (until
the warm calls were added, every call of this benchmark was timed that way). Both are reported;
the cold one is slower by a few milliseconds whatever the path (the JSON has both), which weighs
on a closed-form call of a few milliseconds and hardly on a vmap call. An *idle probe* after the
repeats (``idle_probe``) times calls with and without hessfree back to back and right after a
50 ms ``time.sleep`` (gc off, no other work), to tell the machine's share of that penalty from the
code's. It runs outside the repeats' record of other processes' CPU share. Acceptance (issue):
closed-form L1 / L2 at least 20x faster than the vmap path; the JSON says PASS / FAIL under each
timing.

For a linear model (``--model head``: the head alone) hessfree's closed form runs many batches
per forward pass (``HeadNorms.rows_per_step``: nothing per sample is kept but the logits), so it
does not go through the data ``--batch-size`` rows at a time; the hand-written loop and the
bare-forward row do.

Usage::

    .venv/bin/python benchmarks/oga_speed.py                     # writes benchmarks/results/oga_speed.json
    .venv/bin/python benchmarks/oga_speed.py --n 20000 --repeats 1 --out /tmp/oga_speed.json   # smoke run
    .venv/bin/python benchmarks/oga_speed.py --threads 1 --batch-size 4096

Other processes on the machine distort the timings (two torch threads on a two-core machine
that is also running something else are slowed down many times over): the load average and the
share of the CPUs that other processes used during each repeat (from /proc/stat) are kept in the
JSON, and the table warns when that share exceeds 10%.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import hessfree
from hessfree.grads.closed_form import HeadCapture, HeadNorms, residual_norm
from hessfree.io import write_json
from hessfree.tasks import CrossEntropy

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "oga_speed.json"
D_IN, HIDDEN, CLASSES = 20, 64, 10
LABEL_NOISE = 0.05
THRESHOLD = 20.0  # acceptance: vmap time / closed-form time for L1 and L2
EXPECTED_PATH = {"closed_form": "closed_form", "engine": "factorised", "vmap": "vmap"}
WARMUP_BATCHES = 4
CONTENDED_SHARE = 0.10  # other processes' share of the CPUs above which a repeat is flagged as contended


def make_data(n: int, seed: int, d_in: int = D_IN) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g)
    teacher = torch.randn(d_in, CLASSES, generator=g)
    y = (X @ teacher).argmax(1)
    flip = torch.rand(n, generator=g) < LABEL_NOISE
    y[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=g)
    return TensorDataset(X, y)


def make_model(seed: int, kind: str = "mlp") -> nn.Sequential:
    torch.manual_seed(seed)
    if kind == "head":  # the samples' features go straight through the final layer of 640 weights
        return nn.Sequential(nn.Linear(HIDDEN, CLASSES, bias=False))
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES, bias=False))


def hand_closed_form(model: nn.Sequential, ds: TensorDataset, batch_size: int, ord: str) -> np.ndarray:
    """The closed form as a bare loop around the same arithmetic, outside hessfree: per batch
    h = body(x), zᵀ = W hᵀ (classes first) and the row norm of h go into buffers allocated once;
    then ||p − e_y|| over all rows at once (``residual_norm``). No label checks, no finiteness
    check, no sample ids: the floor for any implementation that works through the data
    ``batch_size`` rows at a time."""
    X, y = ds.tensors
    body, W = model[:-1], model[-1].weight.detach()
    n = len(X)
    zt, hn = torch.empty(W.shape[0], n), torch.empty(n)
    with torch.no_grad():
        for s in range(0, n, batch_size):
            h = body(X[s:s + batch_size])
            torch.mm(W, h.t(), out=zt[:, s:s + len(h)])
            hn[s:s + len(h)] = torch.linalg.vector_norm(h, dim=1) if ord == "l2" else h.abs().sum(1)
        return (residual_norm(zt, y, CrossEntropy(), ord, class_dim=0) * hn).double().numpy()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_snapshot() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def other_cpu_share(before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float) -> float | None:
    """Share of the machine's CPU time that other processes used between two snapshots."""
    if before is None or after is None or wall <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others) / (wall * (os.cpu_count() or 1))


def rel_diffs(x: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """max|x - ref| / max|ref| and max_i |x_i - ref_i| / |ref_i|."""
    d = np.abs(x - ref)
    return {"max_abs_over_max_ref": float(d.max() / max(np.abs(ref).max(), 1e-300)),
            "max_elementwise_rel": float((d / np.maximum(np.abs(ref), 1e-300)).max())}


class Config:
    """One timed configuration: an outlier_scores call (or the bare forward) and its results."""

    def __init__(self, key: str, detector: str | None, path: str | None, max_repeats: int):
        self.key, self.detector, self.path, self.max_repeats = key, detector, path, max_repeats
        self.times: list[float] = []  # per repeat: the median of its warm calls
        self.cold: list[float] = []  # per repeat: its first call, right after gc.collect() and the other configurations
        self.gradients_s: list[float] = []
        self.detector_s: list[float] = []
        self.meta_path: str | None = None
        self.values: np.ndarray | None = None
        self.warmup_s: float | None = None
        self.n: int | None = None  # full N (the hand-written loop keeps its values from a full-N call)

    def call(self, model: nn.Module, ds: TensorDataset, batch_size: int) -> tuple[float, Any]:
        if self.path is None:  # the bare forward in the same batches: the floor every path shares
            X = ds.tensors[0]
            model.eval()
            t0 = time.perf_counter()
            with torch.no_grad():
                for s in range(0, len(X), batch_size):
                    model(X[s:s + batch_size])
            return time.perf_counter() - t0, None
        if self.path == "hand":
            t0 = time.perf_counter()
            values = hand_closed_form(model, ds, batch_size, self.detector)
            seconds = time.perf_counter() - t0
            if self.values is None and len(values) == self.n:
                self.values = values
            return seconds, None
        t0 = time.perf_counter()
        sc = hessfree.outlier_scores(model, ds, detector=self.detector, params="last_layer_weight",
                                     gradient_path=self.path, batch_size=batch_size, loss="cross_entropy",
                                     random_state=0, progress=False)
        return time.perf_counter() - t0, sc

    def timed(self, model: nn.Module, ds: TensorDataset, batch_size: int, inner: int, budget: float) -> None:
        """One repeat: gc.collect(), a cold call, then ``inner`` back-to-back warm calls with the
        garbage collector off (as timeit does; none if the cold call took over ``budget`` s)."""
        gc.collect()
        cold, sc = self.call(model, ds, batch_size)
        self.record(sc)
        del sc
        warm = []
        if cold <= budget:
            gc.disable()
            try:
                for _ in range(inner):
                    seconds, sc = self.call(model, ds, batch_size)
                    warm.append(seconds)
                    self.record(sc)
                    del sc
            finally:
                gc.enable()
        self.cold.append(cold)
        self.times.append(statistics.median(warm) if warm else cold)

    def record(self, sc: Any) -> None:
        if sc is None:
            return
        self.gradients_s.append(float(sc.meta["timing"]["gradients_s"]))
        self.detector_s.append(float(sc.meta["timing"]["detector_s"]))
        self.meta_path = sc.meta["gradient_path"]
        if self.path in EXPECTED_PATH and self.meta_path != EXPECTED_PATH[self.path]:
            raise RuntimeError(f"{self.key}: asked for gradient_path={self.path!r} but {self.meta_path!r} ran")
        if self.values is None:
            self.values = np.asarray(sc.values, dtype=np.float64)

    def summary(self) -> dict[str, Any]:
        med = lambda xs: float(statistics.median(xs)) if xs else None  # noqa: E731
        return {"detector": self.detector, "gradient_path_requested": self.path, "gradient_path_ran": self.meta_path,
                "repeats": len(self.times), "median_s": med(self.times), "min_s": min(self.times),
                "times_s": self.times, "cold_median_s": med(self.cold), "cold_s": self.cold,
                "warmup_s_first_batches": self.warmup_s,
                "gradients_s_median": med(self.gradients_s), "detector_s_median": med(self.detector_s),
                "gradients_s": self.gradients_s, "detector_s": self.detector_s}


IDLE_S, IDLE_REPS = 0.05, 21  # the idle probe: pause before a call, and calls per timing


def idle_probe(model: nn.Module, ds: TensorDataset, batch_size: int) -> dict[str, Any]:
    """How much of the cold penalty does code without hessfree pay too? Each call is timed back to
    back (right after the same call) and right after ``time.sleep(IDLE_S)``, both with the garbage
    collector off and no other work in between: a label range check over all N labels
    (``((y < 0) | (y >= C)).any()``: three tiny torch ops, run by torch's thread pool),
    ``np.arange(N)`` (one NumPy thread, no torch), the bare ``model(X)`` over all N in one call,
    the bare forward batch by batch (the ``forward_only`` row), the hand-written loop
    (``hand_closed_form``, L2) at ``batch_size`` and at the step hessfree's closed form takes
    (``HeadNorms.rows_per_step``: many batches per step for a linear model), and hessfree's
    closed-form L2, interleaved. Medians over IDLE_REPS; their difference is the penalty of a
    pause (and the quartiles of each paused call's excess over the back-to-back median)."""
    X, y = ds.tensors
    model.eval()
    n_classes = model[-1].out_features

    def label_check() -> None:
        bool(((y < 0) | (y >= n_classes)).any())

    def numpy_arange() -> None:
        np.arange(len(X))

    def bare() -> None:
        with torch.no_grad():
            model(X)

    def batched() -> None:
        with torch.no_grad():
            for s in range(0, len(X), batch_size):
                model(X[s:s + batch_size])

    def closed_form() -> None:
        hessfree.outlier_scores(model, ds, detector="l2", params="last_layer_weight", gradient_path="closed_form",
                                batch_size=batch_size, loss="cross_entropy", random_state=0, progress=False)

    head = model[-1]
    step = HeadNorms(HeadCapture(head, str(len(model) - 1), [f"{len(model) - 1}.weight"], CrossEntropy(), model=model),
                     "l2").rows_per_step(ds, batch_size, torch.float32.itemsize)  # outlier_scores' default dtype
    calls = (("label_range_check", label_check), ("numpy_arange", numpy_arange),
             ("bare_model_forward_one_call", bare), ("bare_model_forward_batched", batched),
             ("hand_written_loop_l2", lambda: hand_closed_form(model, ds, batch_size, "l2")),
             *((("hand_written_loop_l2_at_hessfree_step", lambda: hand_closed_form(model, ds, step, "l2")),)
               if step != batch_size else ()),  # (with a body, hessfree's step is batch_size: the row above)
             ("closed_form_l2", closed_form))
    out: dict[str, Any] = {"pause_s": IDLE_S, "reps": IDLE_REPS, "gc": "off in both arms", "hessfree_step_rows": step}
    back: dict[str, list[float]] = {name: [] for name, _ in calls}
    paused: dict[str, list[float]] = {name: [] for name, _ in calls}
    gc.collect()
    gc.disable()
    try:
        for _ in range(IDLE_REPS):  # the calls interleaved, so that a change in the machine's state hits all alike
            for name, f in calls:
                f()
                t0 = time.perf_counter()
                f()
                back[name].append(time.perf_counter() - t0)
                time.sleep(IDLE_S)
                t0 = time.perf_counter()
                f()
                paused[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    for name, _ in calls:
        b, a = statistics.median(back[name]), statistics.median(paused[name])
        q1, _, q3 = statistics.quantiles([x - b for x in paused[name]], n=4) if IDLE_REPS >= 2 else (None,) * 3
        out[name] = {"back_to_back_median_s": b, "after_pause_median_s": a, "penalty_s": a - b,
                     "penalty_quartiles_s": [q1, q3], "back_to_back_s": back[name], "after_pause_s": paused[name]}
    return out


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    print(f"load average at start: {_loadavg()} on {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} "
          "(other processes competing for the CPUs distort the timings)", flush=True)
    t_start = time.perf_counter()
    ds = make_data(args.n, args.seed, HIDDEN if args.model == "head" else D_IN)
    model = make_model(args.seed, args.model)
    vmap_repeats = args.vmap_repeats if args.vmap_repeats is not None else args.repeats
    configs = []
    for det in ("l1", "l2"):
        for path in ("closed_form", "hand", "engine", "vmap"):
            configs.append(Config(f"{det}/{path}", det, path, vmap_repeats if path == "vmap" else args.repeats))
    configs.append(Config("iforest/closed_form", "iforest", "closed_form", args.repeats))
    if not args.no_iforest_vmap:
        configs.append(Config("iforest/vmap", "iforest", "vmap", vmap_repeats))
    configs.append(Config("forward_only", None, None, args.repeats))

    warm = TensorDataset(*(t[:WARMUP_BATCHES * args.batch_size] for t in ds.tensors))
    for c in configs:
        c.n = args.n
        c.warmup_s, _ = c.call(model, warm, args.batch_size)
    print(f"warm-up done ({time.perf_counter() - t_start:.1f} s)", flush=True)

    load_log = []
    vmap_reduced = False
    for r in range(max(args.repeats, vmap_repeats)):
        before, cpu0, w0 = _loadavg(), _cpu_snapshot(), time.perf_counter()
        for c in configs:
            if len(c.times) >= c.max_repeats:
                continue
            if c.path == "vmap" and r >= 1 and c.cold[0] > args.vmap_budget:
                vmap_reduced = True  # one vmap call already took longer than the budget: keep that one
                continue
            c.timed(model, ds, args.batch_size, args.inner, args.vmap_budget)
        share = other_cpu_share(cpu0, _cpu_snapshot(), time.perf_counter() - w0)
        load_log.append({"repeat": r, "loadavg_before": before, "loadavg_after": _loadavg(),
                         "wall_s": time.perf_counter() - w0, "other_processes_cpu_share": share})
        print(f"repeat {r + 1} done ({time.perf_counter() - t_start:.1f} s, load {load_log[-1]['loadavg_after']}, "
              f"other processes used {_f(share, '.0%')} of the CPUs)", flush=True)
    probe = idle_probe(model, ds, args.batch_size)
    shares = [x["other_processes_cpu_share"] for x in load_log if x["other_processes_cpu_share"] is not None]
    contended = bool(shares) and max(shares) > CONTENDED_SHARE

    res = {c.key: c.summary() for c in configs}
    by = {c.key: c for c in configs}
    for c in configs:  # agreement of the score vectors with the vmap reference of the same detector
        ref = by.get(f"{c.detector}/vmap")
        if c.values is not None and ref is not None and ref.values is not None:
            res[c.key]["vs_vmap"] = rel_diffs(c.values, ref.values)
        if c.detector in ("l1", "l2") and c.path != "closed_form":
            cf = by[f"{c.detector}/closed_form"]
            res[c.key]["vs_closed_form"] = rel_diffs(c.values, cf.values)
    ratios: dict[str, Any] = {}
    for det in ("l1", "l2"):
        cf = res[f"{det}/closed_form"]["median_s"]
        ratios[det] = {"vmap_over_closed_form": res[f"{det}/vmap"]["median_s"] / cf,
                       "vmap_over_closed_form_cold": (res[f"{det}/vmap"]["cold_median_s"]
                                                      / res[f"{det}/closed_form"]["cold_median_s"]),
                       "vmap_over_hand_written_loop": res[f"{det}/vmap"]["median_s"] / res[f"{det}/hand"]["median_s"],
                       "engine_over_closed_form": res[f"{det}/engine"]["median_s"] / cf,
                       "closed_form_over_forward_only": cf / res["forward_only"]["median_s"]}
    if "iforest/vmap" in res:
        ratios["iforest"] = {
            "vmap_over_closed_form_total": res["iforest/vmap"]["median_s"] / res["iforest/closed_form"]["median_s"],
            "vmap_over_closed_form_gradients": (res["iforest/vmap"]["gradients_s_median"]
                                                / res["iforest/closed_form"]["gradients_s_median"])}
    acceptance: dict[str, Any] = {
        "threshold": THRESHOLD,
        "criterion": "median vmap time / median closed-form time >= threshold for detector l1 and l2 (whole "
                     "outlier_scores call), under each timing: warm (back-to-back calls, gc off) and cold (the "
                     "first call after gc.collect(), as this benchmark timed every call before the warm calls "
                     "were added)"}
    for timing, key in (("warm", "vmap_over_closed_form"), ("cold", "vmap_over_closed_form_cold")):
        verdict = {det: bool(ratios[det][key] >= THRESHOLD) for det in ("l1", "l2")}
        acceptance[timing] = {**verdict, "passed": verdict["l1"] and verdict["l2"]}

    import sklearn
    from importlib.metadata import version
    n_weights = model[-1].weight.numel()
    return {
        "benchmark": "oga_speed",
        "command": " ".join(["benchmarks/oga_speed.py", *sys.argv[1:]]),
        "setting": {
            "n": args.n, "features": HIDDEN if args.model == "head" else D_IN, "model_kind": args.model,
            "classes": CLASSES, "label_noise": LABEL_NOISE, "seed": args.seed,
            "data": f"X ~ N(0, 1) ({args.n}, {ds.tensors[0].shape[1]}) from torch.Generator().manual_seed({args.seed}); "
                    "y = argmax of "
                    f"a seeded random linear teacher, {LABEL_NOISE:.0%} replaced by random classes",
            "model": (f"Sequential(Linear({HIDDEN}, {CLASSES}, bias=False))" if args.model == "head" else
                      f"Sequential(Linear({D_IN}, {HIDDEN}), ReLU, Linear({HIDDEN}, {CLASSES}, bias=False))")
                     + f", torch.manual_seed({args.seed}) init, untrained",
            "params": "last_layer_weight", "n_weights": n_weights, "loss": "cross_entropy",
            "batch_size": args.batch_size, "threads": args.threads,
        },
        "measurement": {
            "timing": "wall clock (time.perf_counter) around the whole hessfree.outlier_scores call; per repeat and "
                      "configuration: gc.collect(), one cold call (timed: cold_s), then --inner back-to-back warm "
                      "calls with the garbage collector off, as timeit does (their median: times_s); median over "
                      "repeats; configurations interleaved within each repeat. gradients_s / detector_s: medians "
                      "over every call",
            "inner": args.inner,
            "warmup": f"one untimed call per configuration on the first {WARMUP_BATCHES} batches",
            "repeats": args.repeats, "vmap_repeats_requested": vmap_repeats,
            "vmap_budget_s": args.vmap_budget,
            "vmap_repeats_reduced": vmap_reduced,
            "vmap_note": ("a vmap call took longer than --vmap-budget, so vmap configurations ran once"
                          if vmap_reduced else "vmap configurations ran the full number of repeats"),
            "agreement": "vs_vmap: max|x - x_vmap| / max|x_vmap| and max_i |x_i - x_vmap,i| / |x_vmap,i| of the "
                         "score vectors (float32 work, compared in float64)",
            "forward_only": "model(X[batch]) under no_grad over all N in the same batches, no hessfree call",
            "load": load_log,
            "contention": "other_processes_cpu_share = (machine busy CPU s from /proc/stat - this process's CPU s) "
                          f"/ (wall s x cpu_count) per repeat; contended = any repeat above {CONTENDED_SHARE:.0%}",
            "contended": contended,
        },
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "torch": torch.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
                        "hessfree": version("hessfree"), "torch_threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "loadavg_start": load_log[0]["loadavg_before"],
                        "loadavg_end": _loadavg()},
        "results": res,
        "idle_probe": probe,
        "ratios": ratios,
        "acceptance": acceptance,
        "seconds": time.perf_counter() - t_start,
    }


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(p: dict[str, Any]) -> str:
    res, ratios = p["results"], p["ratios"]
    s = p["setting"]
    lines = [f"N = {s['n']:,}, final layer {s['n_weights']} weights, batch {s['batch_size']}, "
             f"{s['threads']} thread(s)", "",
             "| detector | gradient path | median s (warm) | min s | cold s | reps | gradients s | detector s "
             "| vmap / this (warm) | vmap / this (cold) | rel diff vs vmap |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in res.items():
        det = r["detector"] or "(none)"
        path = r["gradient_path_ran"] or ("model forward only" if r["gradient_path_requested"] is None else "?")
        if r["gradient_path_requested"] == "engine":
            path = f"engine ({path})"
        if r["gradient_path_requested"] == "hand":
            path = "hand-written loop, no hessfree (floor)"
        ref = res.get(f"{r['detector']}/vmap")
        ratio = ref["median_s"] / r["median_s"] if ref is not None else None
        cold = ref["cold_median_s"] / r["cold_median_s"] if ref is not None else None
        diff = r.get("vs_vmap", {}).get("max_abs_over_max_ref")
        lines.append(f"| {det} | {path} | {r['median_s']:.4f} | {r['min_s']:.4f} | {r['cold_median_s']:.4f} | "
                     f"{r['repeats']} | {_f(r['gradients_s_median'], '.4f')} | {_f(r['detector_s_median'], '.4f')} | "
                     f"{_f(ratio, '.1f')} | {_f(cold, '.1f')} | {_f(diff, '.1e')} |")
    lines.append("")
    for det in ("l1", "l2"):
        rr = ratios[det]
        ok = {t: "PASS" if p["acceptance"][t][det] else "FAIL" for t in ("warm", "cold")}
        lines.append(f"{det}: vmap / closed form = {rr['vmap_over_closed_form']:.1f}x warm ({ok['warm']}), "
                     f"{rr['vmap_over_closed_form_cold']:.1f}x cold ({ok['cold']}) at >= "
                     f"{p['acceptance']['threshold']:.0f}x; engine / closed form = "
                     f"{rr['engine_over_closed_form']:.2f}x, closed form / bare forward = "
                     f"{rr['closed_form_over_forward_only']:.2f}x; a hand-written loop of the same arithmetic: "
                     f"vmap / it = {rr['vmap_over_hand_written_loop']:.1f}x")
    if "iforest" in ratios:
        rr = ratios["iforest"]
        lines.append(f"iforest: vmap / closed form = {rr['vmap_over_closed_form_total']:.2f}x total, "
                     f"{rr['vmap_over_closed_form_gradients']:.2f}x in the gradient phase")
    ip = p.get("idle_probe")
    if ip:
        names = {"label_range_check": "label range check over all N (torch)", "numpy_arange": "np.arange(N)",
                 "bare_model_forward_one_call": "bare model(X), one call",
                 "bare_model_forward_batched": "bare forward, batch by batch",
                 "hand_written_loop_l2": "hand-written loop L2",
                 "hand_written_loop_l2_at_hessfree_step": f"hand-written loop L2 at hessfree's step "
                                                          f"({ip.get('hessfree_step_rows')} rows)",
                 "closed_form_l2": "hessfree closed-form L2"}
        def ms(x: float | None) -> str:
            return "n/a" if x is None else f"{1e3 * x:+.2f}"
        parts = [f"{label} {1e3 * ip[k]['back_to_back_median_s']:.2f} / {1e3 * ip[k]['after_pause_median_s']:.2f} "
                 f"({ms(ip[k].get('penalty_s'))}, quartiles {ms((ip[k].get('penalty_quartiles_s') or [None])[0])} to "
                 f"{ms((ip[k].get('penalty_quartiles_s') or [None, None])[1])})" for k, label in names.items() if k in ip]
        lines.append(f"idle probe, ms back to back / right after a {1e3 * ip['pause_s']:.0f} ms sleep (+ penalty), "
                     f"gc off, calls interleaved, medians of {ip['reps']}: " + "; ".join(parts))
    lines.append("")
    lines.append("median / min: wall clock of the whole outlier_scores call, warm (per repeat the median of "
                 f"{p['measurement']['inner']} back-to-back calls, gc off); cold: the first call of each repeat, "
                 "right after gc.collect() and the other configurations' calls (median over repeats); gradients s / "
                 "detector s: medians of scores.meta['timing']; rel diff = max|x - x_vmap| / max|x_vmap|.")
    if p["measurement"]["contended"]:
        worst = max(x["other_processes_cpu_share"] for x in p["measurement"]["load"]
                    if x["other_processes_cpu_share"] is not None)
        lines.append(f"WARNING: other processes used up to {worst:.0%} of the CPUs during a repeat: these timings are "
                     "distorted (see 'load' in the JSON); rerun on a quiet machine.")
    if p["measurement"]["vmap_repeats_reduced"]:
        lines.append("NOTE: " + p["measurement"]["vmap_note"])
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="number of synthetic samples (default 100000)")
    ap.add_argument("--batch-size", type=int, default=1024, help="batch size of every path (default 1024)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per configuration (default 3)")
    ap.add_argument("--inner", type=int, default=3, help="warm calls per repeat, after its cold call (default 3)")
    ap.add_argument("--vmap-repeats", type=int, default=None, help="timed calls of the vmap configurations "
                    "(default: --repeats)")
    ap.add_argument("--vmap-budget", type=float, default=30.0, help="if one vmap call takes longer than this "
                    "many seconds, that configuration is not repeated (default 30)")
    ap.add_argument("--no-iforest-vmap", action="store_true", help="skip the extra iforest-on-vmap-features row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", choices=("head", "mlp"), default="head",
                    help="head: 64-d samples straight through the 640-weight final layer (the issue's setting); "
                         "mlp: a 20-64 ReLU body before it (the body's forward is shared by every path)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.repeats < 1 or args.inner < 1 or (
            args.vmap_repeats is not None and args.vmap_repeats < 1):
        ap.error("--n, --batch-size, --repeats, --inner and --vmap-repeats must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    payload = run_benchmark(args)
    table = format_table(payload)
    print()
    print(table)
    payload["table"] = table
    write_json(args.out, payload)
    print(f"\nwrote {args.out} ({payload['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
