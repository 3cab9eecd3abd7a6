"""The gradient engine: exact per-sample gradients of the selected parameters, one batch at a time.

One forward and one backward per batch: forward hooks on the selected nn.Linear / nn.Conv2d /
nn.Embedding layers keep each layer's input ``a`` and output, and one ``autograd.grad`` of the
summed per-sample loss with respect to those outputs gives ``g`` (row i = sample i's own
gradient, since per-sample losses are independent in eval mode). Parameters of any other module
(and parameters shared between modules, or layers whose weights are used outside their own
forward) go through the ``torch.func`` ``vmap(grad)`` fallback. On the first batch the engine
checks that the per-sample gradients of every hooked layer sum to the batch gradient from plain
autograd, and moves a layer that fails the check to the fallback (a model that is row-wise by
construction, :func:`hessfree.grads.stacked.rowwise_by_construction`, cannot fail it and skips it).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules import module as _module

from hessfree.datasets import batch_len, leaves_in, map_tensors, tensors_in, to_device, with_tensors
from hessfree.errors import InputError, NonFiniteError
from hessfree.grads.blocks import BatchGrads, Block, DenseBlock
from hessfree.grads.rules import Selected, rule_for
from hessfree.grads.stacked import (NotStackable, owners, repeat_batch, rowwise_by_construction, stackable_kind,
                                    stacked_forward)
from hessfree.tasks import BCEWithLogits, CrossEntropy, Task, safe_call

log = logging.getLogger(__name__)

_VMAP_BYTES = 1 << 28  # per-chunk budget of materialised fallback gradients


FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_dtype_device(dtype: Any, device: Any, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
                       ) -> tuple[torch.dtype, torch.device]:
    """(dtype, device) of a computation, checked before any work: ``dtype`` one of ``dtypes`` (a
    torch dtype, not a string), ``device`` None (the CPU), a device string or a torch.device that
    this PyTorch build and machine have. Raises :class:`InputError` saying what to pass instead."""
    names = ", ".join(str(d) for d in dtypes)
    if isinstance(dtype, str):
        raise InputError(f"dtype must be a torch dtype ({names}), got the string {dtype!r}; pass e.g. "
                         f"torch.{dtype.replace('torch.', '')} instead")
    if dtype not in dtypes:
        raise InputError(f"dtype must be a floating torch dtype ({names}), got {dtype!r}: gradients are "
                         "computed in floating point (the model's inputs keep their own dtype)")
    if device is None:
        return dtype, torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"device {device!r} is not a torch device ({exc}); pass 'cpu', 'cuda', 'cuda:1' or a "
                         "torch.device") from exc
    if dev.type == "meta":
        raise InputError("device 'meta' holds no data: scores need a real device such as 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(dev)!r} is not available: torch.cuda.is_available() is False (a CPU-only "
                             "PyTorch build, or no GPU visible); pass device='cpu' or None")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {str(dev)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError, TypeError) as exc:
            raise InputError(f"device {str(dev)!r} is not available in this PyTorch build or machine ({exc}); pass "
                             "device='cpu' or None") from exc
    return dtype, dev


class CallWrapper(nn.Module):
    """A module that exists only so that ``functional_call`` can swap in weights of the modules it
    holds. Calling it runs ``forward`` directly, not through ``nn.Module.__call__``: a global
    module hook then runs on the user's modules only, as in the user's own calls, and not once
    more on this wrapper."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


class _TaskModule(CallWrapper):
    """Lets ``functional_call`` run ``task.forward(model, inputs)`` with swapped-in weights."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, inputs: Any) -> Tensor:
        return self.task.forward(self.model, inputs)


def _tensor_slots(holders: dict[str, list[tuple[nn.Module, str]]]) -> dict[str, list[tuple[dict, str]]]:
    """Canonical state-dict name -> every (module._parameters / _buffers dict, key) holding it, from
    :func:`hessfree.grads.stacked.owners` (tied tensors: one entry with every slot)."""
    return {name: [(mod._parameters if local in mod._parameters else mod._buffers, local) for mod, local in mods]
            for name, mods in holders.items()}


def _unsqueeze0(obj: Any) -> Any:
    return map_tensors(lambda t: t.unsqueeze(0), obj)


class GradientEngine:
    """Per-sample gradients of ``names`` (selected trainable parameters) of ``model`` under ``task``.

    Use as a context manager (it installs hooks and puts the model in eval mode), call
    :meth:`bind` with a checkpoint's state dict, then :meth:`batch_grads` per batch.
    ``ghost=False`` forces the ``vmap(grad)`` path for every parameter (the reference path).
    """

    def __init__(self, model: nn.Module, task: Task, names: list[str], *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, ghost: bool = True):
        self.dtype, self.device = check_dtype_device(dtype, device)
        self.model, self.task, self.names = model, task, list(names)
        self._wrapper = _TaskModule(model, task)
        self._hooks: list[Any] = []
        self._capturing = False
        self._captures: dict[str, list[tuple[Tensor, Tensor, int, str | None]]] = defaultdict(list)
        self._clone_outputs = False
        self._checked = False
        self.exact_by_construction = False  # set on __enter__ (see rowwise_by_construction)
        self._was_training = model.training
        self._state: dict[str, Tensor] = {}
        self._owners = owners(model)
        self._slots = _tensor_slots(self._owners)
        self._rows = 0  # samples of the batch being evaluated (read by stacked forwards)
        self._originals: list[tuple[dict, str, Any]] = []
        self._sparse: list[nn.Module] = []  # sparse embeddings switched to dense gradients while active
        self._stack = 1  # checkpoints bound at once (see bind_stacked)
        self._stacked: set[str] = set()  # canonical names bound as (K, ...) stacks
        self._forwards: list[nn.Module] = []  # modules running a stacked forward
        self._plan(ghost)

    # -- set-up -----------------------------------------------------------------------------
    def _plan(self, ghost: bool) -> None:
        owners: dict[int, dict[int, tuple[str, nn.Module, str]]] = defaultdict(dict)
        for mod_name, mod in self.model.named_modules(remove_duplicate=False):
            for local, p in mod.named_parameters(recurse=False):
                owners[id(p)][id(mod)] = (mod_name, mod, local)
        params = dict(self.model.named_parameters())
        self.rules: dict[str, dict[str, Any]] = {}  # module name -> {module, kind, weight, bias}
        self.fallback: list[str] = []
        for n in self.names:
            own = list(owners[id(params[n])].values())
            rule = rule_for(own[0][1]) if len(own) == 1 else None
            if ghost and rule is not None and own[0][2] in rule.params:
                mod_name, mod, local = own[0]
                entry = self.rules.setdefault(mod_name, {"module": mod, "rule": rule,
                                                         "names": {k: None for k in rule.params}})
                entry["names"][local] = n
            else:
                self.fallback.append(n)
        for mod_name, e in list(self.rules.items()):
            if e["rule"].needs_weight and e["names"].get("weight") is None:
                del self.rules[mod_name]
                self.fallback.extend(v for v in e["names"].values() if v is not None)
        self.fallback.sort(key=self.names.index)

    def _demote(self, mod_name: str, why: str) -> None:
        e = self.rules.pop(mod_name)
        log.warning("layer %r: %s; its per-sample gradients use the vmap(grad) fallback", mod_name, why)
        self.fallback.extend(n for n in e["names"].values() if n is not None)
        self.fallback.sort(key=self.names.index)

    def __enter__(self) -> "GradientEngine":
        self._was_training = self.model.training
        self.model.eval()
        # A row-wise Sequential under a built-in loss needs neither the first-batch sum check nor
        # the stacking check (decided before this engine adds hooks of its own).
        self.exact_by_construction = (type(self.task) in (CrossEntropy, BCEWithLogits)
                                      and rowwise_by_construction(self.model))
        if self.exact_by_construction:
            self._checked = True
        # The checkpoint's tensors are swapped into the model's parameter/buffer slots once per
        # checkpoint (not per batch, as functional_call would) and the originals put back on exit.
        self._originals = [(slot, attr, slot[attr]) for slots in self._slots.values() for slot, attr in slots]
        # Sparse embedding gradients do not go through vmap or the dense consumers; the forward is the
        # same with sparse=False, which is put back on exit
        self._sparse = [m for m in self.model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
        for m in self._sparse:
            m.sparse = False
        self._patched: list[nn.Module] = []
        for mod_name, e in list(self.rules.items()):
            mod, rule = e["module"], e["rule"]
            if not rule.patches:
                self._hooks.append(mod.register_forward_hook(self._make_hook(mod_name)))
            elif "forward" in vars(mod):  # the user's (or an adapter's) own instance forward: left alone
                self._demote(mod_name, "it carries an instance forward of its own, which its rule would replace")
            else:
                mod.forward = rule.patch(mod, self._make_capture(mod_name))
                self._patched.append(mod)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._unstack()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for mod in getattr(self, "_patched", []):
            del mod.forward
        self._patched = []
        for slot, attr, original in self._originals:
            slot[attr] = original
        self._originals = []
        for m in self._sparse:
            m.sparse = True
        self._sparse = []
        self.model.train(self._was_training)

    def _make_hook(self, mod_name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor):
            if not self._capturing or mod_name not in self.rules:
                return None
            self._captures[mod_name].append((inputs[0].detach(), output, output._version, None))
            # An in-place op on the output (e.g. ReLU(inplace=True)) would move it in the graph, and
            # its gradient would no longer be the layer's. batch_grads sees that from the version
            # counter and switches to handing the rest of the model a clone instead.
            return output.clone() if self._clone_outputs else None
        return hook

    def _make_capture(self, mod_name: str):
        """For a rule that replaces a module's forward: ``capture(tag, x, out)`` keeps an inner
        operation's input and output (as the hook does for a whole module) and returns the output
        to use on."""
        def capture(tag: str, x: Tensor, out: Tensor) -> Tensor:
            if not self._capturing or mod_name not in self.rules:
                return out
            self._captures[mod_name].append((x.detach(), out, out._version, tag))
            return out.clone() if self._clone_outputs else out
        return capture

    def bind(self, state: dict[str, Tensor]) -> None:
        """Evaluate at these weights from now on (floating tensors cast to the engine's dtype)."""
        if not self._originals:
            raise RuntimeError("use the engine as a context manager: `with GradientEngine(...) as engine:`")
        self._unstack()
        selected = set(self.names)
        self._state = {}
        for k, slots in self._slots.items():  # canonical names; a tied tensor's other names share its slot list
            if k not in state:
                continue  # e.g. a non-persistent buffer: the model's own stays in place
            v = self._cast(state[k])
            if k in selected:
                v = v.detach().requires_grad_(True)
            self._state[k] = v
            for slot, attr in slots:
                slot[attr] = v

    def _cast(self, v: Tensor) -> Tensor:
        return v.to(self.device, dtype=self.dtype) if v.dtype.is_floating_point else v.to(self.device)

    @property
    def stack(self) -> int:
        """Checkpoints bound at once (1 unless :meth:`bind_stacked`)."""
        return self._stack

    @property
    def can_stack(self) -> bool:
        """Can several checkpoints share one pass? (factorised layers only, after the first batch's check)"""
        return bool(self.rules) and not self.fallback and self._checked

    def bind_stacked(self, states: list[dict[str, Tensor]]) -> frozenset[str]:
        """Evaluate at K checkpoints at once (see :mod:`hessfree.grads.stacked`): ``batch_grads``
        then returns K·B rows for a batch of B samples, checkpoint-major. Returns the names of the
        tensors bound stacked (those that differ between the checkpoints).

        Raises NotStackable, with the engine's binding unchanged, when the engine has
        vmap-fallback parameters, or a tensor that differs between the checkpoints is not the
        weight or bias of an nn.Linear / nn.Embedding, or such a layer already carries an
        instance ``forward`` of its own (a user's patch, an adapter's hook).
        """
        if not self.can_stack:
            raise NotStackable("the engine has vmap-fallback parameters or has not checked its layers yet")
        K = len(states)
        selected = set(self.names)
        bound: dict[str, Tensor] = {}
        stacked: set[str] = set()
        modules: dict[int, tuple[nn.Module, str]] = {}
        for k, slots in self._slots.items():  # decide everything before touching the model
            if k not in states[0]:
                continue
            vs = [self._cast(s[k]) for s in states]
            if all(torch.equal(vs[0], v) for v in vs[1:]):
                v = vs[0]
            else:
                holders = self._owners.get(k, [])
                if not holders:
                    raise NotStackable(f"{k!r} differs between the checkpoints")
                for mod, local in holders:
                    kind = stackable_kind(mod)
                    if kind is None or local not in ("weight", "bias"):
                        raise NotStackable(f"{k!r} differs between the checkpoints and is not the weight or bias "
                                           "of an nn.Linear or nn.Embedding")
                    if "forward" in vars(mod) and id(mod) not in {id(m) for m in self._forwards}:
                        raise NotStackable(f"the module holding {k!r} has an instance forward of its own")
                    modules[id(mod)] = (mod, kind)
                v = torch.stack(vs)
                stacked.add(k)
            bound[k] = v.detach().requires_grad_(True) if k in selected else v
        self._unstack()
        self._state = bound
        for k, v in bound.items():
            for slot, attr in self._slots[k]:
                slot[attr] = v
        for mod, kind in modules.values():
            mod.forward = stacked_forward(mod, kind, K, lambda: self._rows)  # instance attribute: hooks still run
            self._forwards.append(mod)
        self._stack, self._stacked = K, stacked
        return frozenset(stacked)

    def _unstack(self) -> None:
        for mod in self._forwards:  # only forwards this engine set (bind_stacked refuses to replace others)
            del mod.forward
        self._forwards.clear()
        if self._stack > 1:
            self._state = {}  # stacked tensors must not survive into a later single bind
        self._stack, self._stacked = 1, set()

    # -- evaluation -------------------------------------------------------------------------
    def prepare(self, batch: Any) -> tuple[Any, Any]:
        return self.task.split(to_device(batch, self.device, self.dtype))

    def forward(self, inputs: Any) -> Tensor:
        """Model output at the bound weights (differentiable w.r.t. the selected parameters); with
        several checkpoints bound, the output at the first of them."""
        if self._stack == 1:
            return self.task.safe_forward(self.model, inputs)
        B = batch_len(inputs)
        self._rows = B
        return self.task.safe_forward(self.model, repeat_batch(inputs, self._stack, B))[:B]

    def dense_grad(self, scalar: Tensor, retain_graph: bool = False) -> dict[str, Tensor]:
        """Gradient of a scalar w.r.t. the selected parameters: name -> tensor (zeros if unused)."""
        leaves = [self._state[n] for n in self.names]
        gs = torch.autograd.grad(scalar, leaves, allow_unused=True, retain_graph=retain_graph)
        # nn.Embedding(sparse=True) gives a sparse gradient: every consumer works on dense tensors
        return {n: (torch.zeros_like(p) if g is None else g.to_dense() if g.layout != torch.strided else g)
                for n, p, g in zip(self.names, leaves, gs)}

    def batch_grads(self, batch: Any, ids: Any = None, validate: bool = True, check_loss: bool = True) -> BatchGrads:
        """Per-sample gradients of one collated batch; ``ids`` name samples in error messages.

        ``validate=False`` skips the label check (for datasets whose labels were all checked);
        ``check_loss=False`` skips the finite-loss check (for callers that check the finished
        per-sample scores, which a non-finite loss makes non-finite too).
        """
        inputs, targets = self.prepare(batch)
        B = b = batch_len(inputs)
        own_targets = targets
        if self._stack > 1:  # K checkpoints bound: the batch repeated K times, rows checkpoint-major
            self._rows = b
            inputs, targets = repeat_batch(inputs, self._stack, b), repeat_batch(targets, self._stack, b)
            B *= self._stack
        self._captures.clear()
        self._capturing = True
        try:
            outputs = self.task.safe_forward(self.model, inputs)
        finally:
            self._capturing = False
        if not self._clone_outputs and any(out._version != v for calls in self._captures.values()
                                           for _, out, v, _ in calls):
            self._clone_outputs = True
            return self.batch_grads(batch, ids, validate, check_loss)
        if validate:  # the labels are the same at every checkpoint: check them once
            self.task.validate(outputs if self._stack == 1 else outputs[:b], own_targets, ids)
        # A built-in loss gives its per-sample losses and output gradient in closed form: the
        # backward then starts at the model output (no loss graph).
        closed = self.task.loss_and_output_grad(outputs, targets) if self.rules else None
        losses = self.task.per_sample_loss(outputs, targets) if closed is None else closed[0]
        if losses.shape != (B,):
            raise InputError(f"the loss must give one value per sample, shape ({B},), got {tuple(losses.shape)}: "
                             f"{type(self.task).__name__}.per_sample_loss must not reduce over the batch "
                             "(use reduction='none')")
        if check_loss:  # a sample's stacked losses summed (float64): non-finite at any checkpoint stays so
            _check_finite(losses.detach().view(self._stack, b).double().sum(0), ids, "loss")
        blocks: list[Block] = []
        if self.rules:
            check = not self._checked and self._stack == 1
            # Σ outputs·∂l/∂outputs has the gradient of Σ l; passing grad_outputs= instead would import
            # torch.fx (and sympy, ~0.25 s) on the first call and check shapes in Python on every call
            total = losses.sum() if closed is None else (outputs * closed[1]).sum()
            full = self.dense_grad(total, retain_graph=True) if check else None
            # and of single samples (the first and the last): a rule that groups a layer's rows into
            # samples wrongly (a sequence-first input whose length equals the batch size) still sums
            # to the batch gradient, but not to one sample's
            rows = sorted({0, B - 1}) if check else []
            singles = [self.dense_grad(losses[i] if closed is None else (outputs[i] * closed[1][i]).sum(),
                                       retain_graph=True) for i in rows]
            order = [(m, i) for m in self.rules for i in range(len(self._captures.get(m, [])))]
            outs = [self._captures[m][i][1] for m, i in order]
            gouts = torch.autograd.grad(total, outs, allow_unused=True) if outs else []
            per_module: dict[str, list[tuple]] = defaultdict(list)
            for (m, i), go in zip(order, gouts):
                x, out, _, tag = self._captures[m][i]
                go = go if go is not None else torch.zeros_like(out)
                per_module[m].append((x, go) if tag is None else (x, go, tag))
            self._captures.clear()
            for m, e in list(self.rules.items()):
                blocks.append(self._block(m, e, per_module.get(m, []), B))
            if check:
                self._checked = True
                bad = [m for m, b in zip(list(self.rules), blocks)
                       if not _sums_to(b, full) or not all(_sums_to(b.select(slice(i, i + 1)), one)
                                                           for i, one in zip(rows, singles))]
                if bad:
                    for m in bad:
                        self._demote(m, "its per-sample gradients do not add up to the autograd gradient of the batch "
                                        "or of single samples (its weights are used outside its own forward, or its "
                                        "input is laid out so that its rows are not the batch's samples)")
                    return self.batch_grads(batch, ids, validate, check_loss)
        if self.fallback:
            blocks.append(self._vmap_block(inputs, targets, B))
        return BatchGrads(blocks, losses.detach(), group=self._stack)

    def _block(self, mod_name: str, e: dict[str, Any], calls: list[tuple[Tensor, Tensor]], B: int) -> Block:
        w = e["names"].get("weight")
        state = self._state.get(w) if w else None
        shape = None if state is None else tuple(state.shape[1:] if w in self._stacked else state.shape)
        return e["rule"].block(e["module"], calls, Selected(e["names"], B, shape, self.dtype, self.device,
                                                            e.setdefault("memo", {})))

    def _vmap_block(self, inputs: Any, targets: Any, B: int) -> DenseBlock:
        # Only the fallback parameters are swapped per call; everything else is already bound.
        fb = {f"model.{n}": self._state[n].detach() for n in self.fallback}
        wrapper, task = self._wrapper, self.task

        if _module._global_backward_hooks or _module._global_backward_pre_hooks:
            raise InputError(f"a global module backward hook is registered: torch.func's vmap(grad), which "
                             f"{', '.join(self.fallback)} need, cannot run through it; remove it while scoring")
        for what, obj in (("inputs", inputs), ("targets", targets)):
            other = sorted({type(v).__name__ for v in leaves_in(obj) if v is not None and not isinstance(v, Tensor)})
            if other:
                raise InputError(f"the batch's {what} hold {', '.join(other)} values besides tensors: the vmap(grad) "
                                 f"fallback for {', '.join(self.fallback)} maps over every entry of a batch, one "
                                 "sample at a time, so each must be a tensor with the batch as its first dimension")
        P = sum(v.numel() for v in fb.values())
        chunk = max(1, _VMAP_BYTES // max(1, P * self.dtype.itemsize))

        def per_sample(x: Any) -> dict[str, Tensor]:
            # vmap maps over the batch's tensors as lists, and each sample's batch is rebuilt in its own
            # containers: torch.func cannot map over containers it does not know (UserDict, BatchEncoding)
            def loss_one(fb_params: dict[str, Tensor], xs: list[Tensor], ys: list[Tensor]) -> Tensor:
                xi, yi = with_tensors(x, xs), with_tensors(targets, ys)
                out = functional_call(wrapper, fb_params, (_unsqueeze0(xi),))
                return task.per_sample_loss(out, _unsqueeze0(yi))[0]

            return vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk if chunk < B else None)(
                fb, tensors_in(x), tensors_in(targets))

        g = safe_call(self.model, per_sample, inputs)
        return DenseBlock(torch.cat([g[f"model.{n}"].reshape(B, -1) for n in self.fallback], 1), list(self.fallback),
                          [self._state[n].numel() for n in self.fallback])


def _sums_to(block: Block, full: dict[str, Tensor] | None) -> bool:
    """Does Σ_i (per-sample gradient of ``block``) equal the batch gradient ``full``?"""
    if full is None:
        return True
    for name, mine in block.total().items():
        ref = full[name].reshape(-1)
        mine = mine.reshape(-1)
        if mine.shape != ref.shape:
            return False
        scale = ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny)
        # half precision: 8 ulps of 1 (bfloat16 6e-2, float16 8e-3). Materialised per-sample gradients
        # are each rounded before they are summed; a wrong rule misses by far more
        tol = 8 * torch.finfo(ref.dtype).eps if ref.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if float((mine - ref).abs().max() / scale) > tol and float((mine - ref).abs().max()) > 1e-12:
            return False
    return True


def _check_finite(values: Tensor, ids: Any, what: str) -> None:
    if math.isfinite(float(values.detach().sum())):  # fast path: one reduction, one sync
        return
    ok = torch.isfinite(values)
    if not bool(ok.all()):
        if ids is None:  # not per sample (a target's gradient): no ids to name
            raise NonFiniteError(f"non-finite {what}; check the target's data and the checkpoint's weights")
        bad = (~ok).nonzero().flatten().tolist()
        named = [int(ids[i]) for i in bad]
        raise NonFiniteError(f"non-finite {what} for sample id(s) {named[:10]}; check those samples' inputs "
                             "and labels, and the checkpoint's weights")
