"""Small models, data and a brute-force per-sample autograd reference shared by the tests."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import hessfree


def mlp(seed: int = 0, d_in: int = 6, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(inplace=True), nn.Linear(16, 8), nn.Tanh(),
                         nn.Linear(8, classes))


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 3 * 3, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class TokenModel(nn.Module):
    """Embedding + a Linear applied over the sequence dimension + mean pool + head."""

    def __init__(self, vocab: int = 11, dim: int = 5, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.proj = nn.Linear(dim, 7)
        self.head = nn.Linear(7, classes)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.emb(ids)))  # (B, T, 7): Linear with a sequence dimension
        return self.head(h.mean(1))


class Wrapped(nn.Module):
    """A model whose own parameter names all start with 'module.' (like nn.DataParallel)."""

    def __init__(self):
        super().__init__()
        self.module = mlp(0)

    def forward(self, x):
        return self.module(x)


def tabular(n: int = 40, d: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))


def images(n: int = 30, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g))


def tokens(n: int = 30, T: int = 6, vocab: int = 11, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)  # includes padding id 0 and repeated ids
    return TensorDataset(ids, torch.randint(0, classes, (n,), generator=g))


def trained_run(model: nn.Module, data: TensorDataset, epochs: int = 3, **kw) -> hessfree.Run:
    kw.setdefault("lr", lambda t: 0.2 / (1 + 0.1 * t))
    kw.setdefault("batch_size", 8)
    return hessfree.fit(model, data, epochs=epochs, checkpoint_every=3, seed=1, progress=False, **kw)


def brute_grads(run: hessfree.Run, data: TensorDataset, names: list[str]) -> list[torch.Tensor]:
    """Per checkpoint, a (N, P) float64 matrix of per-sample gradients by a plain autograd loop."""
    out = []
    for k in range(len(run.checkpoints)):
        model = copy.deepcopy(run.model).double().eval()
        model.load_state_dict(run.checkpoint_state(k))
        model.double()
        params = dict(model.named_parameters())
        rows = []
        for i in range(len(data)):
            x, y = data[i]
            x = x.double() if x.dtype.is_floating_point else x
            loss = run.task.per_sample_loss(model(x[None]), y[None])[0]
            g = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(params[n]) if gi is None else gi.to_dense()).reshape(-1)
                                   for n, gi in zip(names, g)]))  # to_dense: nn.Embedding(sparse=True)
        out.append(torch.stack(rows))
    return out


def brute_target_grad(run: hessfree.Run, k: int, names: list[str], fn) -> torch.Tensor:
    model = copy.deepcopy(run.model).double().eval()
    model.load_state_dict(run.checkpoint_state(k))
    model.double()
    params = dict(model.named_parameters())
    g = torch.autograd.grad(fn(model), [params[n] for n in names], allow_unused=True)
    return torch.cat([(gi if gi is not None else torch.zeros_like(params[n])).reshape(-1) for n, gi in zip(names, g)])


def rel_err(x, ref, floor: float = 1e-3) -> float:
    """max |x - ref| / |ref| over entries with |ref| >= floor * max |ref|."""
    x = torch.as_tensor(x, dtype=torch.float64)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    mask = ref.abs() >= floor * ref.abs().max()
    return float(((x - ref).abs()[mask] / ref.abs()[mask]).max())


class Crashing(Dataset):
    """A non-Tensor dataset whose __getitem__ raises after ``ok`` successful fetches."""

    def __init__(self, base, ok):
        self.base, self.ok, self.fetched = base, ok, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.fetched += 1
        if self.fetched > self.ok:
            raise RuntimeError(f"disk error reading sample {i}")
        return self.base[i]
