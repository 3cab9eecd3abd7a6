"""The layer-rule registry: every rule against a float64 per-sample autograd loop.

Self-influence, the train × test matrix and target dot products, float64 ≤ 1e-9 and float32 ≤ 5e-5
relative error (entries ≥ 1e-3 of the max), with odd shapes (stride, dilation, padding, positions),
and no parameter left on the vmap fallback. Also: a user's own rule, and a wrong rule caught by
the engine's first-batch check.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import hessfree
from hessfree.grads import cost, rules
from hessfree.grads.blocks import DenseBlock
from helpers import brute_grads, brute_target_grad, rel_err

TOL = {torch.float64: 1e-9, torch.float32: 5e-5}
Q = dict(progress=False)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=2, dilation=2)
        self.c2 = nn.Conv1d(4, 5, 2, stride=2, bias=False)
        self.c3 = nn.Conv1d(5, 4, 3, padding="valid")
        self.fc = nn.Linear(4 * 3, 3)

    def forward(self, x):  # (B, 3, 11)
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x))
        return self.fc(torch.tanh(self.c3(x)).flatten(1))


class GroupedRouteNet(nn.Module):
    """Convolutions with 8 or 1 input channels (those need no channel padding in the grouped
    route), with stride, dilation, padding and no bias."""

    def __init__(self):
        super().__init__()
        self.c2d = nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=2)
        self.c1d = nn.Conv1d(8, 8, 3, stride=2, padding=1, bias=False)
        self.one = nn.Conv1d(1, 8, 2, dilation=2)
        self.fc = nn.Linear(8 * 9 + 8 * 4 + 8 * 5, 3)

    def forward(self, x):  # (B, 8, 7, 7)
        a = torch.tanh(self.c2d(x)).flatten(1)
        b = torch.tanh(self.c1d(x.mean(2))).flatten(1)
        c = torch.tanh(self.one(x.mean((1, 2)).unsqueeze(1))).flatten(1)
        return self.fc(torch.cat([a, b, c], 1))


class NormSeq(nn.Module):
    """LayerNorm and RMSNorm over (B, T, d), one of them without a bias, and a norm used twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.rms = nn.RMSNorm(6, eps=1e-5)
        self.ln2 = nn.LayerNorm(6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (B, T=5, 4)
        h = torch.tanh(self.ln(self.inp(x)))
        h = self.rms(h) + self.rms(h * 0.5)  # called twice: two calls' gradients summed
        return self.head(self.ln2(h).mean(1))


class NormConv(nn.Module):
    """GroupNorm and eval-mode BatchNorm2d / BatchNorm1d with running statistics."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.gn = nn.GroupNorm(3, 6)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # (B, 2, 4, 4)
        h = torch.relu(self.bn(self.gn(self.conv(x))))
        return self.head(torch.tanh(self.bn1(self.fc(h.flatten(1)))))


class TConv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D, as transformers defines it: y = x W + b with W (nx, nf)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPTish(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.attn = TConv1D(6, 6)
        self.ln = nn.LayerNorm(6)
        self.head = TConv1D(3, 6)

    def forward(self, ids):  # (B, T)
        h = self.ln(torch.tanh(self.attn(self.emb(ids))))
        return self.head(h.mean(1))


def seq_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def conv1d_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 11, generator=g), torch.randint(0, 3, (n,), generator=g))


def img8_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, 7, 7, generator=g), torch.randint(0, 3, (n,), generator=g))


def img_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def token_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, 13, (n, 7), generator=g), torch.randint(0, 3, (n,), generator=g))


def perturbed_run(model: nn.Module, k: int = 3, seed: int = 0) -> hessfree.Run:
    """k checkpoints: the model's weights (and running statistics) perturbed, as training would."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(k):
        sd = {n: (t + 0.3 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t.clone())
              for n, t in model.state_dict().items()}
        for n in sd:
            if n.endswith("running_var"):
                sd[n] = sd[n].abs() + 0.5
        states.append(sd)
    return hessfree.Run.from_checkpoints(model, states, [0.1, 0.05, 0.02][:k])


@pytest.fixture(autouse=True)
def registry():
    saved = dict(rules._RULES)
    yield
    rules._RULES.clear()
    rules._RULES.update(saved)


CASES = {
    "conv1d": (Conv1dNet, conv1d_data),
    "conv_grouped_route": (GroupedRouteNet, img8_data),
    "layernorm_rmsnorm": (NormSeq, seq_data),
    "groupnorm_batchnorm": (NormConv, img_data),
    "transposed_linear": (GPTish, token_data),
}


def check_against_bruteforce(run, train, test, dtype, batch_size):
    """Self, train × test and target dot products against the float64 per-sample loop; no fallback."""
    names = [n for n, _ in run.model.named_parameters()]
    G, H = brute_grads(run, train, names), brute_grads(run, test, names)
    etas = run.learning_rates
    kw = dict(dtype=dtype, batch_size=batch_size, **Q)
    tol = TOL[dtype]

    s = hessfree.self_influence(run, train, **kw)
    assert s.meta["fallback_params"] == []  # every parameter went through a rule
    assert rel_err(s.values, sum(eta * (g * g).sum(1) for eta, g in zip(etas, G))) <= tol

    p = hessfree.pairwise_influence(run, train, test, **kw)
    assert rel_err(p.values, sum(eta * h @ g.T for eta, g, h in zip(etas, G, H))) <= tol

    def val_loss(model):
        x, y = test.tensors
        x = x.double() if x.dtype.is_floating_point else x
        return run.task.per_sample_loss(model(x), y).mean()

    q = [brute_target_grad(run, k, names, val_loss) for k in range(len(run))]
    t = hessfree.influence(run, train, hessfree.targets.Loss(test, batch_size=4), **kw)
    assert rel_err(t.values, sum(eta * g @ qk for eta, g, qk in zip(etas, G, q))) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_bruteforce(name, dtype):
    if name == "transposed_linear":
        rules.register_rule(TConv1D, rules.TransposedLinearRule())
    build, make = CASES[name]
    torch.manual_seed(0)
    check_against_bruteforce(perturbed_run(build()), make(19, 0), make(6, 1), dtype, batch_size=7)


def test_batchnorm_without_running_statistics_keeps_the_fallback():
    torch.manual_seed(0)
    model = NormConv()
    model.bn = nn.BatchNorm2d(6, track_running_stats=False)  # eval mode still normalises by the batch
    run = perturbed_run(model, k=1)
    s = hessfree.self_influence(run, img_data(8, 0), **Q)
    assert {"bn.bias", "bn.weight"} <= set(s.meta["fallback_params"])  # a batch-coupled layer has no rule


class Scale(nn.Module):
    """y = x ⊙ w + b elementwise: a layer type hessfree has no rule for."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.weight + self.bias


class ScaleRule(rules.LayerRule):
    def block(self, module, calls, sel):
        gw = sum((go * x).reshape(sel.B, -1, module.weight.numel()).sum(1) for x, go in calls)
        gb = sum(go.reshape(sel.B, -1, module.weight.numel()).sum(1) for _, go in calls)
        cols = [(sel.weight, gw), (sel.bias, gb)]
        cols = [(n, v) for n, v in cols if n is not None]
        return DenseBlock(torch.cat([v for _, v in cols], 1), [n for n, _ in cols], [module.weight.numel()] * len(cols))


def scale_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), Scale(5), nn.Linear(5, 3))


def test_a_users_rule_is_used_and_exact():
    run = perturbed_run(scale_model())
    data = TensorDataset(torch.randn(11, 4), torch.randint(0, 3, (11,)))
    before = hessfree.self_influence(run, data, dtype=torch.float64, **Q)
    assert sorted(before.meta["fallback_params"]) == ["2.bias", "2.weight"]
    rules.register_rule(Scale, ScaleRule())
    after = hessfree.self_influence(run, data, dtype=torch.float64, **Q)
    assert after.meta["fallback_params"] == []
    assert rel_err(after.values, before.values) <= 1e-12
    with pytest.raises(TypeError):
        rules.register_rule(Scale, object())


def test_a_wrong_rule_is_caught_on_the_first_batch_and_demoted(caplog):
    class Wrong(ScaleRule):
        def block(self, module, calls, sel):
            b = super().block(module, calls, sel)
            return DenseBlock(b.G * 1.5, b.names, b.sizes)

    run = perturbed_run(scale_model())
    data = TensorDataset(torch.randn(11, 4), torch.randint(0, 3, (11,)))
    ref = hessfree.self_influence(run, data, dtype=torch.float64, **Q)
    rules.register_rule(Scale, Wrong())
    with caplog.at_level(logging.WARNING):
        s = hessfree.self_influence(run, data, dtype=torch.float64, **Q)
    assert "layer '2'" in caplog.text and sorted(s.meta["fallback_params"]) == ["2.bias", "2.weight"]
    assert rel_err(s.values, ref.values) <= 1e-12


def test_transposed_rule_registers_for_transformers_when_installed():
    try:
        import transformers  # noqa: F401
    except ImportError:
        assert rules.register_transformers_rules() is False
        return
    assert rules.register_transformers_rules() is True
    from transformers.pytorch_utils import Conv1D
    assert isinstance(rules.rule_for(Conv1D(4, 3)), rules.TransposedLinearRule)


class Encoder(nn.Module):
    """Embedding + nn.TransformerEncoder (self-attention, LayerNorm, GELU MLP) + mean pool + head,
    with a key-padding mask from token 0 and, optionally, a causal mask and sequence-first layout."""

    def __init__(self, batch_first=True, causal=False):
        super().__init__()
        self.batch_first, self.causal = batch_first, causal
        self.emb = nn.Embedding(13, 8, padding_idx=0)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, activation="gelu",
                                           batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):  # (B, T)
        h = self.emb(ids)
        pad = ids == 0
        pad[:, 0] = False  # never a fully masked row
        T = ids.shape[1]  # a bool causal mask, as the padding mask is bool (torch warns on mixed types)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1) if self.causal else None
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h, mask=mask, src_key_padding_mask=pad, is_causal=self.causal)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


class PlainAttention(nn.Module):
    """nn.MultiheadAttention called directly (need_weights left at its default), weights used too."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.attn = nn.MultiheadAttention(6, 3, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (B, T=5, 4)
        h = torch.tanh(self.inp(x))
        out, w = self.attn(h, h, h)
        return self.head(out.mean(1) + torch.einsum("bt,btd->bd", w.sum(1), h) / 5)


ATTENTION = {
    "encoder": (lambda: Encoder(), token_data),
    "encoder_seq_first_causal": (lambda: Encoder(batch_first=False, causal=True), token_data),
    "plain_attention_weights": (PlainAttention, seq_data),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_rule_matches_bruteforce(name, dtype):
    build, make = ATTENTION[name]
    torch.manual_seed(0)
    run = perturbed_run(build())
    check_against_bruteforce(run, make(13, 0), make(5, 1), dtype, batch_size=6)
    attention = next(m for m in run.model.modules() if isinstance(m, nn.MultiheadAttention))
    assert "forward" not in vars(attention)  # the rule's forward is gone once scoring is over


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func over attention, in the fallback
def test_cross_attention_is_refused_with_the_way_out():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.attn(x, x * 2, x * 2, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    run = perturbed_run(Cross(), k=1)
    data = seq_data(6, 0)
    with pytest.raises(NotImplementedError, match="self-attention"):
        hessfree.self_influence(run, data, **Q)
    rules.unregister_rule(nn.MultiheadAttention)
    s = hessfree.self_influence(run, data, dtype=torch.float64, **Q)
    assert "attn.in_proj_weight" in s.meta["fallback_params"]


class SeqFirst(nn.Module):
    """A Linear and a LayerNorm fed sequence-first (T, B, d) input, as batch_first=False code does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # (B, T, 4)
        h = torch.tanh(self.ln(self.lin(x.transpose(0, 1))))  # (T, B, 5)
        return self.head(h.mean(0))


@pytest.mark.parametrize("T,n", [(7, 12), (6, 12), (6, 6)])
def test_sequence_first_inputs_are_grouped_by_sample(T, n, caplog):
    """Rows of a (T, B, d) input are regrouped by sample (hessfree used to read them as (B, T, d):
    35% off, with per-sample gradients that still summed to the batch gradient). The layout is read
    from the shape on the first (checked) batch and kept; when T equals the batch size there, the
    shape cannot tell, and the single-sample check moves the layer to the exact fallback."""
    torch.manual_seed(0)
    run = perturbed_run(SeqFirst(), k=2)
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(n, T, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    names = [n for n, _ in run.model.named_parameters()]
    G = brute_grads(run, train, names)
    with caplog.at_level(logging.WARNING):
        s = hessfree.self_influence(run, train, dtype=torch.float64, batch_size=6, **Q)
    assert rel_err(s.values, sum(eta * (gk * gk).sum(1) for eta, gk in zip(run.learning_rates, G))) <= 1e-9
    if T == n == 6:  # the first batch, 6 samples of length 6, is ambiguous
        assert "lin.weight" in s.meta["fallback_params"] and "single samples" in caplog.text
    else:
        assert s.meta["fallback_params"] == []


# ----------------------------------------------------------------------------- the cost model
FORMS = {  # every form the cost model can pick, forced for every block: (sq norms, linear gram, embedding gram)
    "factorised": ("factorised", "factorised", "factorised"),
    "dense_read": ("dense", "dense", "read"),
    "dense": ("dense", "dense", "dense"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("forms", list(FORMS))
@pytest.mark.parametrize("name", ["conv1d", "conv_grouped_route", "layernorm_rmsnorm", "transposed_linear", "encoder"])
def test_every_form_the_cost_model_can_pick_is_exact(name, forms, dtype, monkeypatch):
    sq, lin, emb = FORMS[forms]
    monkeypatch.setattr(cost, "linear_sq_norms", lambda *a, **k: sq)
    monkeypatch.setattr(cost, "linear_gram", lambda *a, **k: lin)
    monkeypatch.setattr(cost, "embedding_gram", lambda *a, **k: emb)
    if name == "transposed_linear":
        rules.register_rule(TConv1D, rules.TransposedLinearRule())
    build, make = ATTENTION[name] if name in ATTENTION else CASES[name]
    torch.manual_seed(0)
    check_against_bruteforce(perturbed_run(build()), make(13, 0), make(5, 1), dtype, batch_size=6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_unfold_route_for_convolutions_is_exact_too(dtype, monkeypatch):
    monkeypatch.setattr(rules.ConvRule, "_grouped", staticmethod(lambda module, x: False))  # as off the CPU
    for build, make in (CASES["conv1d"], CASES["conv_grouped_route"], CASES["groupnorm_batchnorm"]):
        torch.manual_seed(0)
        check_against_bruteforce(perturbed_run(build()), make(13, 0), make(5, 1), dtype, batch_size=6)


def test_cost_model_picks_the_form_the_shapes_call_for():
    # one position: the factorised form is always cheaper than d_in × d_out
    assert cost.linear_sq_norms(1, 64, 128) == "factorised"
    # a convolution: 1,024 output positions, 27 × 16 weights: form the gradient
    assert cost.linear_sq_norms(1024, 28, 16) == "dense"
    assert cost.linear_gram(256, 128, 1024, 1024, 28, 16) == "dense"
    # short sequences through a wide layer: pairs of positions are cheaper than 4,096 × 4,096 weights
    assert cost.linear_gram(8, 8, 4, 4, 4096, 4096) == "factorised"
    # a layer whose per-sample gradients would not fit the budget is never materialised
    assert cost.linear_gram(256, 128, 512, 512, 4096, 4096) == "factorised"
    # T = 32 tokens over a 1,100-row table: both sides formed, one matrix product; read at ids when
    # the table is too large for the other side to be formed
    assert cost.embedding_gram(256, 128, 32, 32, 1100, 64, kept=(True, False)) == "dense"
    assert cost.embedding_gram(256, 128, 32, 32, 50_000, 64, kept=(True, False)) in ("read", "factorised")
    assert cost.embedding_gram(256, 128, 32, 32, 10**6, 64) == "factorised"  # nothing fits


@pytest.mark.parametrize("forms", ["dense", "dense_read"])
def test_training_gradients_kept_across_test_chunks_are_exact(forms, monkeypatch):
    from hessfree.methods import tracin
    sq, lin, emb = FORMS[forms]
    monkeypatch.setattr(cost, "linear_gram", lambda *a, **k: lin)
    monkeypatch.setattr(cost, "embedding_gram", lambda *a, **k: emb)
    monkeypatch.setattr(tracin, "_MERGE_SAMPLES", 2)  # test batches of 2 stay apart: every training batch kept
    kept = []
    real = tracin.BatchGrads.weighted_gram
    monkeypatch.setattr(tracin.BatchGrads, "weighted_gram",
                        lambda self, other, w, keep_other=False: kept.append(keep_other) or real(self, other, w, keep_other))
    torch.manual_seed(0)
    build, make = ATTENTION["encoder"]
    check_against_bruteforce(perturbed_run(build()), make(13, 0), make(5, 1), torch.float64, batch_size=2)
    assert kept and all(kept)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_half_precision_keeps_every_rule(dtype, tol):
    """Per-sample gradients formed in half precision are each rounded before the engine's first-batch
    check sums them: the check allows for that (8 ulps), so no layer is demoted to the fallback."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(20, 3, 6, 6, generator=g), torch.randint(0, 3, (20,), generator=g))
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.1])
    ref = hessfree.self_influence(run, data, dtype=torch.float64, **Q)
    half = hessfree.self_influence(run, data, dtype=dtype, **Q)
    assert half.meta["fallback_params"] == []
    assert rel_err(half.values, ref.values) <= tol
