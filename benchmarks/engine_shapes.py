"""hessfree's gradient engine on the shapes people train, against a bare forward + backward and the peers.

Five models (float32, ALL parameters, integer labels, 10 classes, per-sample cross-entropy, eval mode):

* ``mlp``:         the digits MLP of ``peers.py`` (64-128-64-10) on sklearn digits (peers.py's split; the
                   first ``--n-train`` / ``--n-test`` rows of its 1,437 / 360);
* ``cnn``:         3x32x32 random images, 3 Conv2d (3->16->32->32, 3x3, padding 1, each + ReLU + 2x2
                   max-pool) + Linear(512, 144) + ReLU + Linear(144, 10): 89,658 parameters;
* ``token_mlp``:   random tokens, T=32: Embedding(1100, 64) -> Linear(64, 128) -> tanh -> Linear(128, 128)
                   per token -> mean over tokens -> Linear(128, 10): 96,522 parameters;
* ``transformer``: random tokens, T=32: Embedding(1000, 64) -> nn.TransformerEncoder(2 layers, d_model=64,
                   nhead=4, dim_feedforward=128, dropout=0, batch_first=True) -> mean -> Linear(64, 10):
                   131,594 parameters (no positional encoding: the benchmark is about the gradient engine);
* ``llama``:       random tokens, T=32: one Llama-style pre-norm decoder block from torch only: Embedding(1000,
                   64), nn.RMSNorm, q/k/v/o nn.Linear(64, 64, bias=False), 4 heads, causal
                   F.scaled_dot_product_attention(is_causal=True), a SwiGLU MLP of nn.Linear(64, 172) x2 and
                   nn.Linear(172, 64) (no bias), a final nn.RMSNorm, mean over tokens, Linear(64, 10):
                   114,250 parameters (no rotary embedding).

Checkpoints: ``torch.manual_seed(0)`` initialisation, then 3 checkpoints, each after 2 more plain-SGD steps
(lr 0.1, batch 256, mean cross-entropy) on the training set; every method scores from those 3 state dicts
with learning rates [0.1, 0.1, 0.1]:

* self-influence, shape (N,):              sum_k eta_k ||g_i(theta_k)||^2
* train x test matrix, shape (n_test, N):  sum_k eta_k g_i(theta_k) . grad l(z'_j; theta_k)

Methods (each scores in batches of 256, hessfree's default ``batch_size``):

* ``floor``: the bare cost of the passes, no per-sample anything. Self: for each checkpoint, load its weights
  once (``load_state_dict``), then per training batch of 256 a forward, the MEAN cross-entropy and
  ``torch.autograd.grad`` w.r.t. all parameters. Train x test: per checkpoint, the same over the test batches
  and the training batches, plus, per training batch, ``out[:, batch] += eta * G_test @ G_batch.T`` with G the
  (n, C=10) gradients of the per-sample losses w.r.t. the logits (``softmax - onehot``, from the same
  forward): the cheapest product that fills the (n_test, N) output (it is the exact TracIn matrix of the last
  layer's bias alone). So the floor is a lower bound on what any exact method does (the passes it must make,
  the matrix it must write), not an achievable time for all-parameter scores.
* ``floor_products``: the floor plus the products an exact method over materialised (B, P) per-sample
  gradients of all P parameters must do, on random (256, P) and (n_test, P) matrices allocated outside the
  timing: self, the squared row norms per training batch; train x test, ``out[:, batch] += eta * G_test @
  G_batch.T`` per training batch, both per checkpoint. This is the "floor of the passes plus the matrix
  products": forming the per-sample gradients is not counted, and a factorised form can beat the products.
* ``hessfree``: ``hessfree.Run.from_checkpoints(model, states, [0.1]*3)`` (outside the timing), then
  ``self_influence(run, train, batch_size=256, progress=False)`` /
  ``pairwise_influence(run, train, test, batch_size=256, progress=False)``; ``meta["fallback_params"]`` (the
  parameters that went through ``vmap(grad)``) and ``meta["checkpoints_per_pass"]`` are recorded.
  ``hessfree_nostack``: the same with ``stack=False`` (one checkpoint per pass), to show what sharing a
  pass between checkpoints gains or costs.
* ``captum``: Captum ``TracInCP(sample_wise_grads_per_batch=True)``, ``loss_fn=CrossEntropyLoss(reduction=
  "sum")``, checkpoint files read by ``peers._captum_load_func``; ``self_influence(train_loader,
  outer_loop_by_checkpoints=True)`` / ``influence(test_loader)``. Captum computes per-sample gradients with
  hooks on ``nn.Linear`` / ``nn.Conv2d`` only and SILENTLY leaves out every other parameter (embeddings,
  norms, nn.MultiheadAttention's projections): its error against the all-parameter reference shows it.
* ``vmap``: written here, exact: ``torch.func.vmap(grad(per-sample loss))`` over each batch of 256 (with
  ``functional_call``), the per-sample gradients flattened to (B, P); self = squared row norms; train x test:
  the (n_test, P) test gradients are materialised once per checkpoint, then ``G_test @ G_batch.T`` per
  training batch.
* ``dattri``: dattri ``TracInAttributor(normalized_grad=False, projector_kwargs={"proj_type": "identity"})``
  with ``weight_list`` = the learning rates, set up as in ``peers.py``; ``self_attribute`` / ``attribute(...).T``.

Reference: a float64 per-sample ``torch.autograd.grad`` loop over the 3 checkpoints on a float64 copy of the
model, for the FIRST ``--ref-train`` training samples (default 64) and the first ``--ref-test`` test samples
(default 16) only; every method's output is compared on that subset (self: its first 64 entries; train x test:
the top-left 16 x 64 block). Error = ``max|x - ref| / max|ref|`` over that subset.

Measured in one process per model and thread count (the script spawns itself with ``--model NAME --threads
T``; ``torch.set_num_threads(T)``), each method and quantity: one untimed warm-up call on the first 256 training
samples (lazy initialisation, first-call code paths; Captum's TracInCP is built anew for each training set,
outside the timing), then ``--repeats`` timed calls on all N (median reported); before each timed call
``gc.collect()`` + ``malloc_trim`` and the kernel's peak-RSS mark (VmHWM) is reset through
``/proc/self/clear_refs`` (peers.py's helpers); +peak MB = max over the timed calls of (VmHWM after - RSS
before), so no sampling thread runs during a timed call. The load average is recorded before each method.

Ratios: ``x floor`` = method median / floor median for the same quantity (self: hessfree_self / floor_self;
train x test: hessfree_pair / floor_pair as defined above); ``x floor+products`` = method median /
floor_products median. ``vs fastest exact peer`` = hessfree median / the
fastest median among vmap, Captum and dattri that are exact on the model: error <= 1e-4 on BOTH quantities
(Captum leaves parameters out and may still pass on one of them; < 1: hessfree is faster).

Caps (peers only: vmap, Captum, dattri): the warm-up's time on 256 samples predicts the timed calls on all N;
if that exceeds ``--budget-s`` (per method and quantity), the peer is timed on the first ``n_capped`` training
samples only (a multiple of 256, at least the reference subset), its times are scaled by N / n_capped (marked
``~`` in the tables, ``capped`` in the JSON, with the reason) and its memory is that of the capped run.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/engine_shapes.py            # both thread counts, all models
                                                                            # (20 min on a quiet 2-core machine)
    PYTHONPATH=src .venv/bin/python benchmarks/engine_shapes.py --quick    # smoke run (tiny sizes)
    PYTHONPATH=src .venv/bin/python benchmarks/engine_shapes.py --models cnn llama --threads 1 --out /tmp/x.json

Needs the ``bench`` extra (captum==0.9.0, dattri==0.3.0, psutil) and scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's bars

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import peers  # noqa: E402  (the digits MLP and split, the memory / load-average helpers, Captum's loader)

DEFAULT_OUT = HERE / "results" / "engine_shapes.json"
LR = 0.1
N_CHECKPOINTS = 3
STEPS_BETWEEN = 2  # SGD steps before each checkpoint
TRAIN_BATCH = 256
SCORE_BATCH = 256
N_CLASSES = 10
T = 32
EXACT_TOL = 1e-4
MODEL_NAMES = ["mlp", "cnn", "token_mlp", "transformer", "llama"]
QUANTITIES = ("self", "pair")


# ----------------------------------------------------------------------------- models
class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten())
        self.fc1 = nn.Linear(32 * 4 * 4, 144)
        self.fc2 = nn.Linear(144, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.features(x))))


class TokenMLP(nn.Module):
    def __init__(self, vocab: int = 1100, d: int = 64, h: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)
        self.head = nn.Linear(h, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.tanh(self.fc1(self.emb(x))))  # (B, T, h), per token
        return self.head(h.mean(1))


class Encoder(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 64, nhead: int = 4, ff: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead, dim_feedforward=ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(x)).mean(1))


class LlamaBlock(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 64, nhead: int = 4, ff: int = 172) -> None:
        super().__init__()
        self.nhead = nhead
        self.emb = nn.Embedding(vocab, d)
        self.attn_norm = nn.RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.gate = nn.Linear(d, ff, bias=False)
        self.up = nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d, bias=False)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, d = h.shape
        a = self.attn_norm(h)
        q, k, v = (m(a).reshape(b, t, self.nhead, d // self.nhead).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        h = h + self.o(att)
        m = self.mlp_norm(h)
        h = h + self.down(F.silu(self.gate(m)) * self.up(m))
        return self.head(self.norm(h).mean(1))


def _digits(n_train: int, n_test: int, seed: int) -> tuple[TensorDataset, TensorDataset, str]:
    d = peers.load_data(quick=False)
    Xtr, ytr = d.train_ds.tensors
    Xte, yte = d.test_ds.tensors
    note = (f"sklearn digits, peers.py's split (1,437 train / 360 test), first {min(n_train, len(Xtr))} train and "
            f"{min(n_test, len(Xte))} test rows")
    return (TensorDataset(Xtr[:n_train], ytr[:n_train]), TensorDataset(Xte[:n_test], yte[:n_test]), note)


def _random_images(n_train: int, n_test: int, seed: int) -> tuple[TensorDataset, TensorDataset, str]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_train + n_test, 3, 32, 32, generator=g)
    y = torch.randint(0, N_CLASSES, (n_train + n_test,), generator=g)
    return (TensorDataset(X[:n_train], y[:n_train]), TensorDataset(X[n_train:], y[n_train:]),
            f"random N(0,1) images 3x32x32, random labels in 0..9 (torch.Generator seed {seed})")


def _random_tokens(vocab: int) -> Callable[[int, int, int], tuple[TensorDataset, TensorDataset, str]]:
    def make(n_train: int, n_test: int, seed: int) -> tuple[TensorDataset, TensorDataset, str]:
        g = torch.Generator().manual_seed(seed)
        X = torch.randint(0, vocab, (n_train + n_test, T), generator=g)
        y = torch.randint(0, N_CLASSES, (n_train + n_test,), generator=g)
        return (TensorDataset(X[:n_train], y[:n_train]), TensorDataset(X[n_train:], y[n_train:]),
                f"random tokens in 0..{vocab - 1}, T={T}, random labels in 0..9 (torch.Generator seed {seed})")
    return make


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    data: Callable[[int, int, int], tuple[TensorDataset, TensorDataset, str]]
    description: str


MODELS = {
    "mlp": ModelSpec("mlp", peers.make_model, _digits, "peers.py's digits MLP: Linear(64,128), ReLU, "
                     "Linear(128,64), ReLU, Linear(64,10)"),
    "cnn": ModelSpec("cnn", CNN, _random_images, "3 x [Conv2d 3x3 pad 1, ReLU, MaxPool2d(2)] (3->16->32->32) + "
                     "Linear(512,144), ReLU, Linear(144,10)"),
    "token_mlp": ModelSpec("token_mlp", TokenMLP, _random_tokens(1100), "Embedding(1100,64) -> Linear(64,128) "
                           "-> tanh -> Linear(128,128) per token -> mean over T -> Linear(128,10)"),
    "transformer": ModelSpec("transformer", Encoder, _random_tokens(1000), "Embedding(1000,64) -> "
                             "nn.TransformerEncoder(2 x TransformerEncoderLayer(64, nhead=4, dim_feedforward=128, "
                             "dropout=0, batch_first=True)) -> mean over T -> Linear(64,10)"),
    "llama": ModelSpec("llama", LlamaBlock, _random_tokens(1000), "Embedding(1000,64) -> x + o(causal SDPA(q,k,v)"
                       "(RMSNorm x)) -> x + down(silu(gate(RMSNorm x)) * up(RMSNorm x)) -> RMSNorm -> mean over T "
                       "-> Linear(64,10); q/k/v/o 64x64, gate/up 64x172, down 172x64, no biases but the head's"),
}


def build_model(spec: ModelSpec) -> nn.Module:
    torch.manual_seed(0)
    return spec.build().eval()


def make_checkpoints(spec: ModelSpec, train_ds: TensorDataset) -> list[dict[str, torch.Tensor]]:
    """Brief plain-SGD training (lr 0.1, mean CE, batch 256): a checkpoint after every STEPS_BETWEEN steps."""
    model = build_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    X, y = train_ds.tensors
    states, step = [], 0
    for _ in range(N_CHECKPOINTS):
        for _ in range(STEPS_BETWEEN):
            lo = (step * TRAIN_BATCH) % len(X)
            xb, yb = X[lo:lo + TRAIN_BATCH], y[lo:lo + TRAIN_BATCH]
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


# ----------------------------------------------------------------------------- reference
def reference(spec: ModelSpec, states: list[dict], lrs: list[float], train_ds: TensorDataset,
              test_ds: TensorDataset, n_tr: int, n_te: int) -> dict[str, Any]:
    """float64 per-sample autograd loop over the first n_tr train / n_te test samples."""
    t0 = time.perf_counter()
    model = build_model(spec).double()
    params = [p for p in model.parameters()]

    def grads(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(len(X)):
            x = X[i:i + 1]
            x = x.double() if x.is_floating_point() else x
            loss = F.cross_entropy(model(x), y[i:i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    Xtr, ytr = (t[:n_tr] for t in train_ds.tensors)
    Xte, yte = (t[:n_te] for t in test_ds.tensors)
    self_inf = np.zeros(len(Xtr))
    pair = np.zeros((len(Xte), len(Xtr)))
    for state, lr in zip(states, lrs):
        model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        a, b = grads(Xtr, ytr), grads(Xte, yte)
        self_inf += lr * (a * a).sum(1).numpy()
        pair += lr * (b @ a.T).numpy()
    return {"self": self_inf, "pair": pair, "seconds": time.perf_counter() - t0,
            "n_train": len(Xtr), "n_test": len(Xte)}


# ----------------------------------------------------------------------------- methods
# setup(ctx) -> {"self": prepare, "pair": prepare, **notes}: prepare(train_ds) builds what the library wants
# for that training set (outside the timing) and returns call(); call() -> np.ndarray, self (n,), pair (m, n).

@dataclass
class Ctx:
    spec: ModelSpec
    states: list[dict[str, torch.Tensor]]
    lrs: list[float]
    test_ds: TensorDataset
    captum_files: list[str]
    dattri_files: list[str]


def _loader(ds: TensorDataset) -> DataLoader:
    return DataLoader(ds, batch_size=SCORE_BATCH, shuffle=False)


def setup_floor(ctx: Ctx) -> dict:
    model = build_model(ctx.spec)
    params = list(model.parameters())
    Xte, yte = ctx.test_ds.tensors

    def passes(X: torch.Tensor, y: torch.Tensor, keep: bool) -> list[torch.Tensor]:
        gs = []
        for lo in range(0, len(X), SCORE_BATCH):
            yb = y[lo:lo + SCORE_BATCH]
            logits = model(X[lo:lo + SCORE_BATCH])
            torch.autograd.grad(F.cross_entropy(logits, yb), params)
            if keep:  # per-sample dl/dlogits, for the output product (not part of the self floor)
                with torch.no_grad():
                    gs.append(torch.softmax(logits, 1) - F.one_hot(yb, logits.shape[1]).to(logits.dtype))
        return gs

    def prep_self(ds: TensorDataset) -> Callable[[], np.ndarray]:
        Xtr, ytr = ds.tensors

        def call() -> np.ndarray:
            for state in ctx.states:
                model.load_state_dict(state)
                passes(Xtr, ytr, False)
            return np.zeros(0)
        return call

    def prep_pair(ds: TensorDataset) -> Callable[[], np.ndarray]:
        Xtr, ytr = ds.tensors

        def call() -> np.ndarray:
            out = torch.zeros(len(Xte), len(Xtr))
            for state, eta in zip(ctx.states, ctx.lrs):
                model.load_state_dict(state)
                g_te = torch.cat(passes(Xte, yte, True))
                for i, g in enumerate(passes(Xtr, ytr, True)):
                    lo = i * SCORE_BATCH
                    out[:, lo:lo + len(g)] += eta * (g_te @ g.T)
            return np.zeros(0)
        return call

    return {"self": prep_self, "pair": prep_pair,
            "inside_timing": "per checkpoint: load_state_dict once; per batch of 256: forward, mean CE, "
                             "torch.autograd.grad w.r.t. all parameters. pair adds the test batches and, per "
                             "training batch, out[:, batch] += eta * G_test @ G_batch.T with G = softmax - onehot "
                             "(n, 10): the cheapest product that fills the (n_test, N) output"}


def setup_floor_products(ctx: Ctx) -> dict:
    """The floor's passes plus the products an exact method over materialised (B, P) per-sample gradients
    must do: self, the squared row norms of a (B, P) matrix per training batch; train x test, one
    (n_test, P) @ (P, B) product per training batch, both per checkpoint. The (n, P) matrices are random,
    allocated outside the timing (so forming per-sample gradients is not counted: a lower bound again)."""
    base = setup_floor(ctx)
    P = sum(p.numel() for p in build_model(ctx.spec).parameters())
    gen = torch.Generator().manual_seed(0)
    g_batch = torch.randn(SCORE_BATCH, P, generator=gen)
    g_test = torch.randn(len(ctx.test_ds), P, generator=gen)

    def prep_self(ds: TensorDataset) -> Callable[[], np.ndarray]:
        passes = base["self"](ds)

        def call() -> np.ndarray:
            passes()
            for _ in ctx.states:
                for lo in range(0, len(ds), SCORE_BATCH):
                    torch.linalg.vector_norm(g_batch[:len(ds) - lo], dim=1).square_()
            return np.zeros(0)
        return call

    def prep_pair(ds: TensorDataset) -> Callable[[], np.ndarray]:
        passes = base["pair"](ds)

        def call() -> np.ndarray:
            passes()
            out = torch.zeros(len(ctx.test_ds), len(ds))
            for eta in ctx.lrs:
                for lo in range(0, len(ds), SCORE_BATCH):
                    g = g_batch[:len(ds) - lo]
                    out[:, lo:lo + len(g)] += eta * (g_test @ g.T)
            return np.zeros(0)
        return call

    return {"self": prep_self, "pair": prep_pair,
            "inside_timing": "the floor's call, then per checkpoint and training batch of 256: self, "
                             "vector_norm(G_batch, dim=1).square_(); pair, out[:, batch] += eta * G_test @ G_batch.T, "
                             f"with G_batch (256, P) and G_test (n_test, P) random, P = {P} (all parameters), "
                             "allocated outside the timing"}


def setup_hessfree(ctx: Ctx, stack: bool = True) -> dict:
    import hessfree

    run = hessfree.Run.from_checkpoints(build_model(ctx.spec), ctx.states, ctx.lrs)
    meta: dict[str, Any] = {}

    def prep(q: str) -> Callable[[TensorDataset], Callable[[], np.ndarray]]:
        def prepare(ds: TensorDataset) -> Callable[[], np.ndarray]:
            def call() -> np.ndarray:
                if q == "self":
                    s = hessfree.self_influence(run, ds, batch_size=SCORE_BATCH, progress=False, stack=stack)
                else:
                    s = hessfree.pairwise_influence(run, ds, ctx.test_ds, batch_size=SCORE_BATCH, progress=False,
                                                    stack=stack)
                meta[q] = {k: s.meta.get(k) for k in ("fallback_params", "checkpoints_per_pass")}
                return np.asarray(s.values)
            return call
        return prepare

    return {
        "self": prep("self"), "pair": prep("pair"), "_meta": meta,
        "inside_timing": "hessfree.self_influence(run, train, batch_size=256, progress=False) / "
                         "pairwise_influence(run, train, test, batch_size=256, progress=False), float32, "
                         f"stack={stack}; the Run "
                         "(Run.from_checkpoints of the 3 in-memory state dicts) is built outside",
    }


def setup_captum(ctx: Ctx) -> dict:
    from captum.influence import TracInCP

    def tracin(ds: TensorDataset) -> Any:
        return TracInCP(build_model(ctx.spec), _loader(ds), ctx.captum_files,
                        checkpoints_load_func=peers._captum_load_func, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                        batch_size=None, sample_wise_grads_per_batch=True)

    def prep_self(ds: TensorDataset) -> Callable[[], np.ndarray]:
        t, tr = tracin(ds), _loader(ds)
        return lambda: peers._t2np(t.self_influence(tr, outer_loop_by_checkpoints=True))

    def prep_pair(ds: TensorDataset) -> Callable[[], np.ndarray]:
        t, te = tracin(ds), _loader(ctx.test_ds)
        return lambda: peers._t2np(t.influence(te))

    return {
        "self": prep_self, "pair": prep_pair,
        "inside_timing": "TracInCP(sample_wise_grads_per_batch=True).self_influence(train_loader, "
                         "outer_loop_by_checkpoints=True) / .influence(test_loader) (n_test, n_train); includes "
                         "Captum loading the checkpoint files; TracInCP construction outside",
        "scope": "per-sample gradients by hooks on nn.Linear / nn.Conv2d only: parameters of any other module "
                 "are left out without a warning",
    }


def setup_vmap(ctx: Ctx) -> dict:
    from torch.func import functional_call, grad, vmap

    model = build_model(ctx.spec)
    names = [n for n, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss1(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(loss1), in_dims=(None, 0, 0))
    Xte, yte = ctx.test_ds.tensors

    def flat_grads(p: dict, X: torch.Tensor, y: torch.Tensor):
        for lo in range(0, len(X), SCORE_BATCH):
            g = per_sample(p, X[lo:lo + SCORE_BATCH], y[lo:lo + SCORE_BATCH])
            yield lo, torch.cat([g[n].reshape(len(g[n]), -1) for n in names], 1)

    def params_of(state: dict) -> dict:
        return {n: state[n] for n in names}

    def prep_self(ds: TensorDataset) -> Callable[[], np.ndarray]:
        Xtr, ytr = ds.tensors

        def call() -> np.ndarray:
            out = torch.zeros(len(Xtr), dtype=torch.float64)
            for state, eta in zip(ctx.states, ctx.lrs):
                p = params_of(state)
                for lo, G in flat_grads(p, Xtr, ytr):
                    out[lo:lo + len(G)] += eta * (G * G).sum(1).double()
            return out.numpy()
        return call

    def prep_pair(ds: TensorDataset) -> Callable[[], np.ndarray]:
        Xtr, ytr = ds.tensors

        def call() -> np.ndarray:
            out = torch.zeros(len(Xte), len(Xtr), dtype=torch.float64)
            for state, eta in zip(ctx.states, ctx.lrs):
                p = params_of(state)
                G_te = torch.cat([G for _, G in flat_grads(p, Xte, yte)])  # (n_test, P), once per checkpoint
                for lo, G in flat_grads(p, Xtr, ytr):
                    out[:, lo:lo + len(G)] += eta * (G_te @ G.T).double()
            return out.numpy()
        return call

    return {"self": prep_self, "pair": prep_pair,
            "inside_timing": "per checkpoint, per batch of 256: vmap(grad(per-sample CE)) with functional_call, "
                             "flattened to (B, P) float32; self: squared row norms; pair: (n_test, P) test gradients "
                             "once per checkpoint, then G_test @ G_batch.T; accumulated in float64"}


def setup_dattri(ctx: Ctx) -> dict:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    model = build_model(ctx.spec)

    def loss_func(params: dict[str, torch.Tensor], data_target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = data_target  # one sample (dattri vmaps grad(loss_func) over the batch)
        out = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=ctx.dattri_files)
    attributor = TracInAttributor(task=task, weight_list=torch.tensor(ctx.lrs, dtype=torch.float32),
                                  normalized_grad=False, projector_kwargs={"proj_type": "identity"}, device="cpu")
    te = _loader(ctx.test_ds)

    def prep_self(ds: TensorDataset) -> Callable[[], np.ndarray]:
        tr = _loader(ds)
        return lambda: peers._t2np(attributor.self_attribute(tr))

    def prep_pair(ds: TensorDataset) -> Callable[[], np.ndarray]:
        tr = _loader(ds)
        return lambda: peers._t2np(attributor.attribute(tr, te).T)

    return {
        "self": prep_self, "pair": prep_pair,
        "inside_timing": "TracInAttributor.self_attribute(train_loader) / .attribute(train_loader, test_loader).T; "
                         "includes dattri loading the checkpoint files; attribute() recomputes the test gradients "
                         "for every training batch",
        "projector": "projector_kwargs={'proj_type': 'identity'} (no random projection)",
    }


@dataclass
class Method:
    key: str
    label: str
    setup: Callable[[Ctx], dict]
    peer: bool  # a peer: probed, capped if too slow, candidate for "fastest exact peer"


METHODS = [
    Method("floor", "floor (bare fwd+bwd)", setup_floor, False),
    Method("floor_products", "floor + products", setup_floor_products, False),
    Method("hessfree", "hessfree", setup_hessfree, False),
    Method("hessfree_nostack", "hessfree stack=False", lambda ctx: setup_hessfree(ctx, stack=False), False),
    Method("vmap", "torch.func vmap(grad)", setup_vmap, True),
    Method("captum", "Captum TracInCP (swgpb=True)", setup_captum, True),
    Method("dattri", "dattri TracIn (identity)", setup_dattri, True),
]


# ----------------------------------------------------------------------------- measurement
def _subset(ds: TensorDataset, n: int) -> TensorDataset:
    return TensorDataset(*(t[:n] for t in ds.tensors))


def measure(call: Callable[[], np.ndarray], repeats: int) -> dict:
    """``repeats`` timed calls (the warm-up happened before); kernel peak RSS per call."""
    seconds, cpu, peak = [], [], []
    proc = psutil.Process()
    out = None
    for _ in range(repeats):
        out = None
        peers._release_memory()
        can_hwm = peers._reset_hwm()
        before = proc.memory_info().rss
        c0, t0 = time.process_time(), time.perf_counter()
        out = call()
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        hwm = peers._read_hwm_bytes() if can_hwm else None
        peak.append(None if hwm is None else (hwm - before) / 2**20)
    return {"output": out, "seconds": seconds, "cpu_seconds": cpu, "peak_increase_mb": peak}


def _err_text(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= 600 else msg[:600] + " ..."


def run_method(m: Method, ctx: Ctx, train_ds: TensorDataset, ref: dict, args: argparse.Namespace) -> dict:
    res: dict[str, Any] = {"label": m.label, "loadavg_before": peers._loadavg()}
    n = len(train_ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = m.setup(ctx)
    except Exception as e:  # noqa: BLE001 - a failing method is a result, not a crash
        for q in QUANTITIES:
            res[q] = {"error": _err_text(e), "traceback": traceback.format_exc(limit=8)}
        return res
    res.update({k: v for k, v in spec.items() if k not in QUANTITIES and not k.startswith("_")})
    for q in QUANTITIES:
        r: dict[str, Any] = {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # warm-up on the first batch of training samples (lazy initialisation, first-call paths); for
                # a peer its time also estimates the full cost
                ds_w = _subset(train_ds, min(n, SCORE_BATCH))
                call = spec[q](ds_w)
                t0 = time.perf_counter()
                call()
                warm_s = time.perf_counter() - t0
                del call
                r["warmup"] = {"n_train": len(ds_w), "seconds": warm_s}
                ds = train_ds
                if m.peer and n > len(ds_w):
                    per_sample = warm_s / len(ds_w) * args.repeats
                    est = per_sample * n
                    r["warmup"]["estimated_timed_s"] = est
                    if est > args.budget_s:
                        cap = int(args.budget_s / per_sample) // SCORE_BATCH * SCORE_BATCH
                        cap = min(n, max(cap, SCORE_BATCH, -(-ref["n_train"] // SCORE_BATCH) * SCORE_BATCH))
                        if cap < n:
                            ds = _subset(train_ds, cap)
                            r["capped"] = {"n_train": cap, "of": n, "time_scale": n / cap,
                                           "reason": f"the warm-up on {len(ds_w)} samples ({warm_s:.2f} s) predicts "
                                                     f"{est:.1f} s for {args.repeats} timed calls on all {n} training "
                                                     f"samples, over --budget-s {args.budget_s:g}: timed on the first "
                                                     f"{cap}, times scaled by {n}/{cap} (linear in the training "
                                                     "samples)" + ("; vmap's train x test computes its test "
                                                     "gradients once per checkpoint, so the scaling overstates its "
                                                     "time" if (m.key, q) == ("vmap", "pair") else "")}
                call = spec[q](ds)
                meas = measure(call, args.repeats)
                del call
            scale = r["capped"]["time_scale"] if "capped" in r else 1.0
            r.update({
                "n_train_scored": len(ds),
                "seconds": meas["seconds"],
                "cpu_seconds": meas["cpu_seconds"],
                "median_s_measured": statistics.median(meas["seconds"]),
                "median_s": statistics.median(meas["seconds"]) * scale,
                "peak_increase_mb": meas["peak_increase_mb"],
                "peak_increase_mb_max": max((x for x in meas["peak_increase_mb"] if x is not None), default=None),
            })
            if "_meta" in spec:
                r.update(spec["_meta"].get(q, {}))
            out = meas["output"]
            if not m.key.startswith("floor"):
                r["output_shape"] = list(out.shape)
                expect = (len(ds),) if q == "self" else (len(ctx.test_ds), len(ds))
                if tuple(out.shape) != expect:
                    raise ValueError(f"output shape {tuple(out.shape)}, expected {expect}")
                sub = out[:ref["n_train"]] if q == "self" else out[:ref["n_test"], :ref["n_train"]]
                r["rel_err"] = peers.rel_err(sub, ref[q])
                r["sign_agrees"] = bool(np.sum(sub.astype(np.float64) * ref[q]) > 0)
        except Exception as e:  # noqa: BLE001 - a failing method is a result, not a crash
            r["error"] = _err_text(e)
            r["traceback"] = traceback.format_exc(limit=8)
        res[q] = r
        peers._release_memory()
    res["loadavg_after"] = peers._loadavg()
    return res


def exact_peers(results: dict[str, dict]) -> list[str]:
    """Peers that are exact on this model: error <= EXACT_TOL on BOTH quantities. (A peer that leaves
    parameters out can stay under the tolerance on one quantity: Captum's train x test on random tokens, where
    the embedding's share of the inner products is small, while its self-influence shows the omission.)"""
    return [m.key for m in METHODS if m.peer and m.key in results
            and all("median_s" in results[m.key].get(q, {}) and results[m.key][q].get("rel_err", np.inf) <= EXACT_TOL
                    for q in QUANTITIES)]


def add_ratios(results: dict[str, dict]) -> None:
    exact = exact_peers(results)
    for q in QUANTITIES:
        floor = results.get("floor", {}).get(q, {}).get("median_s")
        floor_products = results.get("floor_products", {}).get(q, {}).get("median_s")
        times = {k: results[k][q]["median_s"] for k in exact}
        fastest = min(times, key=times.get) if times else None
        for m in METHODS:
            r = results.get(m.key, {}).get(q, {})
            if "median_s" not in r:
                continue
            if floor:
                r["x_floor"] = r["median_s"] / floor
            if floor_products:
                r["x_floor_products"] = r["median_s"] / floor_products
            if m.key == "hessfree" and fastest:
                r["fastest_exact_peer"] = fastest
                r["vs_fastest_exact_peer"] = r["median_s"] / times[fastest]


# ----------------------------------------------------------------------------- child: one model, one thread count
def child(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    t_start = time.perf_counter()
    load_start = peers._loadavg()
    train_ds, test_ds, data_note = spec.data(args.n_train, args.n_test, 0)
    states = make_checkpoints(spec, train_ds)
    lrs = [LR] * N_CHECKPOINTS
    model = build_model(spec)
    n_params = sum(p.numel() for p in model.parameters())
    ref = reference(spec, states, lrs, train_ds, test_ds, min(args.ref_train, len(train_ds)),
                    min(args.ref_test, len(test_ds)))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="hessfree-shapes-") as tmp:
        captum_files, dattri_files = [], []
        for k, state in enumerate(states):
            p = Path(tmp) / f"captum_ckpt_{k:02d}.pt"
            torch.save({"state_dict": state, "learning_rate": lrs[k]}, p)
            captum_files.append(str(p))
            p = Path(tmp) / f"dattri_ckpt_{k:02d}.pt"
            torch.save(state, p)
            dattri_files.append(str(p))
        ctx = Ctx(spec, states, lrs, test_ds, captum_files, dattri_files)
        for m in METHODS:
            if args.methods and m.key not in args.methods:
                continue
            print(f"  [{args.model}, {args.threads} thread(s)] {m.label} ...", file=sys.stderr, flush=True)
            results[m.key] = run_method(m, ctx, train_ds, ref, args)
    add_ratios(results)
    return {
        "model": args.model, "threads": args.threads, "torch_threads": torch.get_num_threads(),
        "description": spec.description, "n_params": n_params, "data": data_note,
        "n_train": len(train_ds), "n_test": len(test_ds),
        "reference": {"n_train": ref["n_train"], "n_test": ref["n_test"], "seconds": ref["seconds"],
                      "kind": "float64 per-sample torch.autograd.grad loop, first n_train train / n_test test"},
        "loadavg_start": load_start, "loadavg_end": peers._loadavg(),
        "process_seconds": time.perf_counter() - t_start,
        "results": results,
    }


# ----------------------------------------------------------------------------- report
def _cell(r: dict) -> str:
    if not r:
        return "-"
    if "error" in r:
        return "failed"
    s = f"{'~' if 'capped' in r else ''}{r['median_s']:.3f}"
    ratios = [f"{r[k]:.1f}×" for k in ("x_floor", "x_floor_products") if k in r]
    return s + (f" ({' / '.join(ratios)})" if ratios else "")


def _pair(a: Any, b: Any, fmt: str) -> str:
    f = (lambda x: "-" if x is None else format(x, fmt))
    return f"{f(a)} / {f(b)}"


def format_table(runs: list[dict], threads: int) -> str:
    lines = [f"{threads} thread(s)", "",
             "| model | method | self s (× floor / × floor+products) | train×test s (× floor / × floor+products) | +peak MB self / pair | rel. error self / "
             "pair | fallback params |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for run in runs:
        if run.get("threads") != threads:
            continue
        if "error" in run:
            lines.append(f"| {run['model']} | (process failed: {run['error'][:120]}) | | | | | |")
            continue
        for m in METHODS:
            res = run["results"].get(m.key)
            if res is None:
                continue
            s, p = res.get("self", {}), res.get("pair", {})
            fb = "-"
            if m.key == "hessfree":
                lst = s.get("fallback_params", p.get("fallback_params"))
                if lst is not None:
                    fb = f"{len(lst)}" + (f" ({', '.join(lst[:4])}{', …' if len(lst) > 4 else ''})" if lst else "")
            err = _pair(s.get("rel_err"), p.get("rel_err"), ".1e") if not m.key.startswith("floor") else "-"
            mem = _pair(s.get("peak_increase_mb_max"), p.get("peak_increase_mb_max"), ".0f")
            lines.append(f"| {run['model']} ({run['n_params']:,} params) | {m.label} | {_cell(s)} | {_cell(p)} | "
                         f"{mem} | {err} | {fb} |")
            for q in QUANTITIES:
                r = res.get(q, {})
                if "error" in r:
                    notes.append(f"- {run['model']}, {m.label}, {q}: {r['error'][:300]}")
                if "capped" in r:
                    c = r["capped"]
                    notes.append(f"- {run['model']}, {m.label}, {q}: capped to {c['n_train']} of {c['of']} training "
                                 f"samples, time scaled ×{c['time_scale']:.2f} (~)")
        h = run["results"].get("hessfree", {})
        parts = []
        for q in QUANTITIES:
            r = h.get(q, {})
            if "vs_fastest_exact_peer" in r:
                parts.append(f"{q}: {r['vs_fastest_exact_peer']:.2f}× {r['fastest_exact_peer']}'s time")
            elif "median_s" in r:
                parts.append(f"{q}: no exact peer")
        cpp = _pair(h.get("self", {}).get("checkpoints_per_pass"), h.get("pair", {}).get("checkpoints_per_pass"), "")
        notes.append(f"- {run['model']}: hessfree = {'; '.join(parts)}; checkpoints per pass self / pair {cpp}; "
                     f"load average {run['loadavg_start']} at start, before each method "
                     f"{[run['results'][k]['loadavg_before'][0] for k in run['results']]}")
    return "\n".join(lines + [""] + notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=MODEL_NAMES)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts (default: 1 and 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (default 3; 1 --quick)")
    p.add_argument("--n-train", type=int, default=None, help="training samples (default 1024; 64 with --quick)")
    p.add_argument("--n-test", type=int, default=None, help="test samples (default 128; 16 with --quick)")
    p.add_argument("--ref-train", type=int, default=64, help="training samples in the float64 reference (first ones)")
    p.add_argument("--ref-test", type=int, default=16, help="test samples in the float64 reference (first ones)")
    p.add_argument("--budget-s", type=float, default=10.0,
                   help="a peer whose timed calls on all N are predicted (from its warm-up) to take longer than "
                        "this, per quantity, is timed on fewer training samples and scaled (default 10 s)")
    p.add_argument("--methods", nargs="+", choices=[m.key for m in METHODS], default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 64 train / 16 test, 1 repeat")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--model", choices=MODEL_NAMES, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.n_train is None:
        args.n_train = 64 if args.quick else 1024
    if args.n_test is None:
        args.n_test = 16 if args.quick else 128
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model:  # child: one model at one thread count
        args.threads = args.threads[0]
        payload = child(args)
        args.child_out.write_text(json.dumps(payload))
        return 0
    from hessfree.io import write_json

    print(f"load average at start: {peers._loadavg()} on {os.cpu_count()} CPUs", flush=True)
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="hessfree-shapes-parent-") as tmp:
        for name in args.models:  # a model's thread counts back to back: the machine's load drifts
            for threads in args.threads:
                out = Path(tmp) / f"{name}_{threads}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--model", name, "--threads", str(threads),
                       "--child-out", str(out), "--repeats", str(args.repeats), "--n-train", str(args.n_train),
                       "--n-test", str(args.n_test), "--ref-train", str(args.ref_train), "--ref-test",
                       str(args.ref_test), "--budget-s", str(args.budget_s)]
                if args.methods:
                    cmd += ["--methods", *args.methods]
                t1 = time.perf_counter()
                print(f"{name}, {threads} thread(s) ...", flush=True)
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                if proc.returncode == 0 and out.exists():
                    runs.append(json.loads(out.read_text()))
                else:
                    runs.append({"model": name, "threads": threads, "error": f"child exited {proc.returncode}",
                                 "stderr_tail": proc.stderr[-3000:]})
                    print(proc.stderr[-3000:], file=sys.stderr)
                print(f"  done in {time.perf_counter() - t1:.0f} s", flush=True)
    tables = {str(t): format_table(runs, t) for t in args.threads}
    payload = {
        "benchmark": "engine_shapes",
        "command": " ".join(["PYTHONPATH=src .venv/bin/python benchmarks/engine_shapes.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "setup": {
            "n_checkpoints": N_CHECKPOINTS, "learning_rates": [LR] * N_CHECKPOINTS,
            "checkpoints": f"torch.manual_seed(0) init, then {STEPS_BETWEEN} plain-SGD steps (lr {LR}, batch "
                           f"{TRAIN_BATCH}, mean CE) before each checkpoint",
            "score_batch": SCORE_BATCH, "dtype": "float32", "params": "all",
            "n_train": args.n_train, "n_test": args.n_test, "repeats": args.repeats, "quick": bool(args.quick),
            "budget_s": args.budget_s,
            "self_influence": "sum_k eta_k ||g_i(theta_k)||^2, shape (N,)",
            "pairwise": "sum_k eta_k g_i(theta_k) . grad l(z'_j; theta_k), shape (n_test, N)",
        },
        "definitions": {
            "floor_self": "per checkpoint: load_state_dict once; per training batch of 256: forward, mean CE, "
                          "torch.autograd.grad w.r.t. all parameters",
            "floor_pair": "per checkpoint: the same over the test and the training batches, plus per training "
                          "batch out[:, batch] += eta * G_test @ G_batch.T with G = softmax - onehot (n, 10 classes) "
                          "from the same forward (the last-layer bias's TracIn matrix: the cheapest product that "
                          "fills the output)",
            "x_floor": "method median / floor median, same quantity",
            "vs_fastest_exact_peer": f"hessfree median / fastest median among the peers (vmap, Captum, dattri) "
                                     f"with rel_err <= {EXACT_TOL} on both quantities for that model (< 1: "
                                     "hessfree faster)",
            "rel_err": "max|x - ref| / max|ref| on the reference subset (first ref_train train, first ref_test "
                       "test samples) against a float64 per-sample torch.autograd.grad loop",
            "timing": "median of `repeats` wall-clock calls after one untimed warm-up; capped peers: time on "
                      "n_capped training samples x N / n_capped",
            "memory": "per timed call: kernel VmHWM (reset via /proc/self/clear_refs after gc.collect + "
                      "malloc_trim) minus RSS just before the call; max over the calls",
            "loadavg": "os.getloadavg() at each process's start and before each method",
        },
        "environment": {**peers.environment(0), "threads_requested": args.threads},
        "wall_seconds": time.perf_counter() - t0,
        "runs": runs,
        "tables": tables,
    }
    payload["environment"].pop("torch_threads", None)
    for t in args.threads:
        print()
        print(tables[str(t)])
    write_json(args.out, payload)
    print(f"\nwrote {args.out} ({payload['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
