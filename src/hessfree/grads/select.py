"""Which parameters a method differentiates: ``"all"``, ``"last_layer"``, ``"last_layer_weight"``
or a list of names."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from hessfree.errors import ParameterSelectionError

ParamSpec = str | Sequence[str]


def frequency_scaled_layer(model: nn.Module, names: Sequence[str] | None = None) -> str | None:
    """The name of an nn.Embedding / nn.EmbeddingBag with ``scale_grad_by_freq=True`` that owns one
    of the parameters ``names`` (None: any trainable one), matched by tensor identity (a tied weight
    may be selected under another module's name); else None. Autograd divides such a layer's
    gradient by word counts within the batch, so a batch's gradient is not the sum of its samples'."""
    named = dict(model.named_parameters())
    chosen = {id(named[n]) for n in names} if names is not None else {
        id(p) for p in named.values() if p.requires_grad}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.scale_grad_by_freq and any(
                id(p) in chosen for p in mod.parameters(recurse=False)):
            return mod_name
    return None


def select_parameters(model: nn.Module, params: ParamSpec = "all") -> list[str]:
    """Names of the selected trainable parameters, in ``model.named_parameters()`` order.

    - ``"all"``: every parameter with ``requires_grad=True``;
    - ``"last_layer"``: the trainable parameters (weight and bias) of the last registered module
      that owns trainable parameters directly;
    - ``"last_layer_weight"``: that module's ``weight`` only (bias excluded), the default gradient
      of Outlier Gradient Analysis;
    - a list of parameter names (``"2.weight"``) and/or module names (``"2"``: all its trainable
      parameters). Frozen parameters are never included; naming one explicitly is an error.
    """
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    if not trainable:
        raise ParameterSelectionError("the model has no trainable parameters (all have requires_grad=False)")
    if isinstance(params, str):
        if params == "all":
            return trainable
        if params in ("last_layer", "last_layer_weight"):
            last: list[str] = []
            for mod_name, mod in model.named_modules():
                own = [f"{mod_name}.{n}" if mod_name else n
                       for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
                own = [n for n in own if n in named]  # tied parameters appear under their first name only
                if own:
                    last = own
            if params == "last_layer_weight":
                weight = [n for n in last if n.rpartition(".")[2] == "weight"]
                if not weight:
                    raise ParameterSelectionError(
                        f"the last layer with trainable parameters ({last}) has no trainable 'weight'; "
                        "name the parameters explicitly, e.g. params=['head.weight']")
                return weight
            return last
        params = [params]
    chosen: set[str] = set()
    modules = dict(model.named_modules())
    for name in params:
        if name in named:
            if not named[name].requires_grad:
                raise ParameterSelectionError(
                    f"parameter {name!r} is frozen (requires_grad=False) and is never included; unfreeze it "
                    "or leave it out of params")
            chosen.add(name)
        elif name in modules and name != "":
            prefix = f"{name}."
            found = [n for n in named if n.startswith(prefix)]
            live = [n for n in found if named[n].requires_grad]
            if not live:
                raise ParameterSelectionError(f"module {name!r} has no trainable parameters")
            chosen.update(live)
        else:
            close = [n for n in list(named) + list(modules) if name.split(".")[-1] in n][:5]
            raise ParameterSelectionError(
                f"unknown parameter or module name {name!r}; use names from model.named_parameters() or "
                f"model.named_modules(){f', e.g. {close}' if close else ''}, or 'all' / 'last_layer' / 'last_layer_weight'")
    if not chosen:
        raise ParameterSelectionError("the parameter selection is empty: name at least one parameter")
    return [n for n in trainable if n in chosen]
