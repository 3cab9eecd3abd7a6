"""Bad inputs raise a specific hessfree exception, with a message that says what to do, before
any expensive work (no training step taken, no per-sample gradient computed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset, Subset, TensorDataset

import hessfree
from hessfree import (CheckpointMismatchError, HessfreeError, InputError, LabelError, NonFiniteError,
                      ParameterSelectionError, RunDirectoryError, Scores, targets)
from hessfree.grads.engine import GradientEngine
from helpers import Wrapped, mlp, tabular

Q = dict(progress=False)


# ----------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="module")
def data():
    return tabular(n=20, seed=0)


@pytest.fixture(scope="module")
def run(data):
    return hessfree.fit(mlp(0), data, epochs=2, batch_size=8, seed=1, **Q)  # 3 steps/epoch -> 2 checkpoints


@pytest.fixture
def grad_calls(monkeypatch):
    """Count per-sample gradient batches: a check that fires 'before expensive work' leaves it at 0."""
    calls = []
    orig = GradientEngine.batch_grads

    def spy(self, batch, ids=None):
        calls.append(None if ids is None else np.asarray(ids).copy())
        return orig(self, batch, ids)

    monkeypatch.setattr(GradientEngine, "batch_grads", spy)
    return calls


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def same_params(model, before):
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def last_position(n, seed):
    """Dataset position that fit's first epoch visits last (fit shuffles with torch.randperm)."""
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[-1])


def bce_data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 2, (n,), generator=g).float())


def empty_data():
    return TensorDataset(torch.empty(0, 6), torch.empty(0, dtype=torch.long))




# ----------------------------------------------------------------------------- checkpoints
def _wrong_shape_sd():
    return mlp(0, classes=4).state_dict()


def _missing_key_sd():
    sd = mlp(0).state_dict()
    del sd["4.bias"]
    return sd


def _extra_key_sd():
    sd = mlp(0).state_dict()
    sd["5.weight"] = torch.zeros(2, 2)
    return sd


BAD_STATES = {"shape": _wrong_shape_sd, "missing": _missing_key_sd, "unexpected": _extra_key_sd}
BAD_MSG = {"shape": r"'4\.weight' has shape \(4, 8\) but the model expects \(3, 8\)",
           "missing": r"missing keys \['4\.bias'\]", "unexpected": r"unexpected keys \['5\.weight'\]"}


def _as_source(sd, form, tmp_path):
    if form == "state_dict":
        return sd
    if form == "safetensors":
        path = tmp_path / "ck.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    if form == "pt":
        path = tmp_path / "ck.pt"
        torch.save(sd, path)
        return str(path)
    if form == "pt_wrapped":
        path = tmp_path / "ck.pth"
        torch.save({"state_dict": sd, "epoch": 3}, path)
        return path
    if form == "dict_wrapped":
        return {"state_dict": sd}
    raise AssertionError(form)


FORMS = ["state_dict", "safetensors", "pt", "pt_wrapped", "dict_wrapped"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", list(BAD_STATES))
def test_checkpoint_mismatch_raises_on_construction(tmp_path, form, bad):
    src = _as_source(BAD_STATES[bad](), form, tmp_path)
    good = mlp(0).state_dict()
    with pytest.raises(CheckpointMismatchError, match=BAD_MSG[bad]) as ei:
        hessfree.Run.from_checkpoints(mlp(0), [good, src], [0.1, 0.1])
    assert "checkpoint 1" in str(ei.value)  # names the offending checkpoint
    assert isinstance(ei.value, InputError)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("prefix", ["", "module."])
def test_wrapped_and_prefixed_checkpoints_are_accepted(tmp_path, form, prefix):
    sd = {prefix + k: v for k, v in mlp(1).state_dict().items()}
    run = hessfree.Run.from_checkpoints(mlp(0), [_as_source(sd, form, tmp_path)], 0.5)
    got = run.checkpoint_state(0)
    ref = mlp(1).state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert run.learning_rates == [0.5]


def test_run_load_with_other_architecture_raises(tmp_path, data):
    hessfree.fit(mlp(0), data, batch_size=8, run_dir=tmp_path / "r", **Q)
    with pytest.raises(CheckpointMismatchError, match="different architecture"):
        hessfree.Run.load(tmp_path / "r", mlp(0, classes=4))


def test_missing_checkpoint_file_and_non_list(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        hessfree.Run.from_checkpoints(mlp(0), [tmp_path / "nope.safetensors"], [0.1])
    with pytest.raises(InputError, match="must be a list"):
        hessfree.Run.from_checkpoints(mlp(0), mlp(0).state_dict(), [0.1])
    with pytest.raises(InputError, match="at least one"):
        hessfree.Run.from_checkpoints(mlp(0), [], [])


def test_torch_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointMismatchError, match="not a state_dict"):
        hessfree.Run.from_checkpoints(mlp(0), [path], [0.1])


def test_pickled_module_file_gives_hessfree_error(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(mlp(0), path)
    with pytest.raises(HessfreeError, match="state_dict"):
        hessfree.Run.from_checkpoints(mlp(0), [path], [0.1])


def test_model_whose_own_keys_start_with_module():
    model = Wrapped()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.1])
    assert set(run.checkpoint_state(0)) == set(model.state_dict())


# ----------------------------------------------------------------------------- learning rates
@pytest.mark.parametrize("rates", [[0.1], [0.1, 0.1, 0.1], []])
def test_learning_rate_list_of_wrong_length(rates):
    sd = mlp(0).state_dict()
    with pytest.raises(InputError, match="one learning rate per checkpoint"):
        hessfree.Run.from_checkpoints(mlp(0), [sd, sd], rates)


@pytest.mark.parametrize("eta", [0.0, -0.1, float("nan"), float("inf")])
def test_learning_rate_must_be_finite_positive(eta, data):
    sd = mlp(0).state_dict()
    with pytest.raises(InputError, match="finite positive"):
        hessfree.Run.from_checkpoints(mlp(0), [sd, sd], [0.1, eta])
    model = mlp(0)
    before = params_of(model)
    with pytest.raises(InputError, match="finite positive"):
        hessfree.fit(model, data, lr=eta, **Q)
    assert same_params(model, before)


def test_lr_schedule_going_bad_midway(data):
    model = mlp(0)
    with pytest.raises(InputError, match="returned -0.1 at step 2"):
        hessfree.fit(model, data, batch_size=8, lr=lambda t: 0.1 if t < 2 else -0.1, **Q)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- empty datasets
def test_empty_training_dataset_in_fit():
    model = mlp(0)
    before = params_of(model)
    with pytest.raises(InputError, match="training dataset is empty"):
        hessfree.fit(model, empty_data(), **Q)
    assert same_params(model, before)


def test_empty_datasets_in_scoring(run, data, grad_calls):
    with pytest.raises(InputError, match="training dataset is empty"):
        hessfree.self_influence(run, empty_data(), **Q)
    with pytest.raises(InputError, match="test dataset is empty"):
        hessfree.pairwise_influence(run, data, empty_data(), **Q)
    with pytest.raises(InputError, match="target dataset is empty"):
        hessfree.influence(run, data, targets.Loss(empty_data()), **Q)
    with pytest.raises(InputError, match="target dataset is empty"):
        hessfree.influence(run, data, empty_data(), **Q)  # a bare dataset means Loss(dataset)
    with pytest.raises(InputError, match="training dataset is empty"):
        hessfree.influence(run, empty_data(), data, **Q)
    assert grad_calls == []


# ----------------------------------------------------------------------------- labels
def _ce(labels):
    x = tabular(n=len(labels), seed=0).tensors[0]
    return TensorDataset(x, labels)


LABEL_CASES = {
    # name: (loss, n_outputs, dataset builder, message pattern)
    "float_for_ce": ("cross_entropy", 3, lambda: _ce(torch.zeros(20)), r"torch\.long.*y\.long\(\)"),
    "bool_for_ce": ("cross_entropy", 3, lambda: _ce(torch.zeros(20, dtype=torch.bool)), r"y\.long\(\)"),
    "int32_for_ce": ("cross_entropy", 3, lambda: _ce(torch.zeros(20, dtype=torch.int32)), r"got torch\.int32.*y\.long"),
    "column_labels_for_ce": ("cross_entropy", 3, lambda: _ce(torch.zeros(20, 1, dtype=torch.long)),
                             r"one class label per sample.*, 1\).*reshape"),
    "int_for_bce": ("bce", 1, lambda: TensorDataset(bce_data().tensors[0], bce_data().tensors[1].long()),
                    r"float 0/1 labels.*y\.float\(\)"),
    "bce_with_three_logits": ("bce", 3, lambda: bce_data(), r"one logit per sample.*cross_entropy"),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_label_dtype_errors(case, grad_calls):
    loss, classes, build, pattern = LABEL_CASES[case]
    ds = build()
    model = mlp(0, classes=classes)
    before = params_of(model)
    with pytest.raises(LabelError, match=pattern):
        hessfree.fit(model, ds, loss=loss, batch_size=8, **Q)
    assert same_params(model, before)  # no SGD step was taken
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.1], loss=loss)
    with pytest.raises(LabelError, match=pattern):
        hessfree.self_influence(run, ds, **Q)
    assert grad_calls == []


def _with_label(loss, pos, value):
    ds = bce_data() if loss == "bce" else tabular(n=20, seed=0)
    x, y = ds.tensors
    y = y.clone()
    y[pos] = value
    return TensorDataset(x, y)


RANGE_CASES = [("cross_entropy", 3, r"label 3 of sample id {i} is outside \[0, 3\).*relabel classes as 0\.\.2"),
               ("cross_entropy", -1, r"label -1 of sample id {i} is outside \[0, 3\)"),
               ("cross_entropy", -100, r"label -100 of sample id {i} is outside"),
               ("bce", 2.0, r"label 2\.0 of sample id {i} is outside \[0, 1\] for bce")]


def _model_for(loss):
    return mlp(0, classes=1 if loss == "bce" else 3)


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("loss,value,pattern", RANGE_CASES)
def test_label_out_of_range_in_fit_batch(loss, value, pattern, where):
    # the first sample of step 0, or one in the last batch: both caught before any step
    i = (int(torch.randperm(20, generator=torch.Generator().manual_seed(0))[0]) if where == "first"
         else last_position(20, seed=0))
    model = _model_for(loss)
    before = params_of(model)
    with pytest.raises(LabelError, match=pattern.format(i=i)):
        hessfree.fit(model, _with_label(loss, i, value), loss=loss, batch_size=8, seed=0, **Q)
    assert same_params(model, before)


@pytest.mark.parametrize("loss,value,pattern", RANGE_CASES)
def test_label_out_of_range_in_last_scoring_batch(loss, value, pattern, grad_calls):
    model = _model_for(loss)
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.1], loss=loss)
    good = _with_label(loss, 0, 0 if loss == "cross_entropy" else 0.0)
    bad = _with_label(loss, 19, value)  # position 19 = last batch at batch_size 8
    with pytest.raises(LabelError, match=pattern.format(i=19)):
        hessfree.self_influence(run, bad, batch_size=8, **Q)
    with pytest.raises(LabelError, match=pattern.format(i=19)):
        hessfree.pairwise_influence(run, good, bad, batch_size=8, **Q)
    assert grad_calls == []  # the whole label tensor was checked before the loop


def test_label_error_names_subset_id_during_scoring(run, data):
    x, y = data.tensors
    y = y.clone()
    y[17] = 9
    sub = Subset(TensorDataset(x, y), [3, 17, 5])  # all its labels checked up front, through the Subset's rows
    with pytest.raises(LabelError, match="sample id 17 "):
        hessfree.self_influence(run, sub, batch_size=1, **Q)


def test_fit_on_a_subset_names_a_bad_label_past_the_first_batch(data):
    """Every label of a Subset over a TensorDataset is checked before training, not only those of
    the first batch (a bad one later raised cross_entropy's raw IndexError)."""
    x, y = data.tensors
    y = y.clone()
    y[17] = 9
    order = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 17, 13]
    with pytest.raises(LabelError, match="sample id 17 "):
        hessfree.fit(mlp(0), Subset(TensorDataset(x, y), order), batch_size=4, **Q)


def test_loss_target_label_error_names_sample_id(run, data):
    x, y = tabular(n=20, seed=3).tensors
    y = y.clone()
    y[15] = 7
    target = targets.Loss(Subset(TensorDataset(x, y), list(range(10, 20))), batch_size=4)
    with pytest.raises(LabelError, match="sample id 15 "):
        hessfree.influence(run, data, target, **Q)


# ----------------------------------------------------------------------------- parameter selection
def frozen_model():
    model = mlp(0)
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("params,pattern", [
    (["0.weight"], r"'0\.weight' is frozen.*unfreeze it"),
    (["2.weight", "0.bias"], r"'0\.bias' is frozen"),
    (["0"], r"module '0' has no trainable parameters"),
    (["4.wieght"], r"unknown parameter or module name '4\.wieght'.*named_parameters"),
    ("head", r"unknown parameter or module name 'head'"),
    ([], r"selection is empty"),
])
def test_bad_parameter_selection(params, pattern, data, grad_calls):
    model = frozen_model()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.1])
    with pytest.raises(ParameterSelectionError, match=pattern):
        hessfree.self_influence(run, data, params=params, **Q)
    with pytest.raises(ParameterSelectionError, match=pattern):
        hessfree.influence(run, data, data, params=params, **Q)
    assert grad_calls == []


def test_frozen_parameters_never_included(data):
    model = frozen_model()
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.1])
    s = hessfree.self_influence(run, data, params="all", **Q)
    assert s.meta["param_names"] == ["2.weight", "2.bias", "4.weight", "4.bias"]
    t = hessfree.self_influence(run, data, params=["2", "4"], **Q)
    assert np.array_equal(s.values, t.values)


def test_all_frozen_model():
    model = mlp(0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(InputError, match="no trainable parameters"):
        hessfree.fit(model, tabular(n=8), **Q)
    run = hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.1])
    with pytest.raises(ParameterSelectionError, match="no trainable parameters"):
        hessfree.self_influence(run, tabular(n=8), **Q)


# ----------------------------------------------------------------------------- Scores k
@pytest.mark.parametrize("k", [6, 0, -1, 1.0, 1.5, True, "3", None])
def test_scores_bad_k(k):
    s = Scores(np.arange(5.0), np.arange(5))
    with pytest.raises(InputError, match=r"1 <= k <= 5"):
        s.harmful(k)
    with pytest.raises(InputError, match=r"1 <= k <= 5"):
        s.helpful(k)
    m = Scores(np.zeros((2, 5)), np.arange(5))
    with pytest.raises(InputError):
        m.harmful(k)


# ----------------------------------------------------------------------------- non-finite
class NaNAt(Dataset):
    """A plain (non-Tensor) dataset: a NaN input row at ``bad`` positions."""

    def __init__(self, base, bad):
        self.base, self.bad = base, set(bad)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (torch.full_like(x, float("nan")) if i in self.bad else x), y


def test_nonfinite_loss_in_fit_names_sample(data):
    i = last_position(20, seed=0)
    model = mlp(0)
    with pytest.raises(NonFiniteError, match=rf"step 2 for sample id\(s\) \[{i}\]"):
        hessfree.fit(model, NaNAt(data, [i]), batch_size=8, seed=0, **Q)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # the NaN step was not applied


def test_nonfinite_loss_in_fit_subset_names_parent_id(data):
    x, y = data.tensors
    x = x.clone()
    x[13] = float("nan")
    with pytest.raises(NonFiniteError, match=r"sample id\(s\) \[13\]"):
        hessfree.fit(mlp(0), Subset(TensorDataset(x, y), [2, 13, 7, 4]), batch_size=4, **Q)


def test_nonfinite_in_scoring_names_sample(run, data):
    with pytest.raises(NonFiniteError, match=r"sample id\(s\) \[11, 16\]"):
        hessfree.self_influence(run, NaNAt(data, [11, 16]), batch_size=10, **Q)
    x, y = data.tensors
    x = x.clone()
    x[16] = float("inf")
    sub = Subset(TensorDataset(x, y), [1, 16, 2])
    with pytest.raises(NonFiniteError, match=r"sample id\(s\) \[16\]"):
        hessfree.self_influence(run, sub, **Q)
    with pytest.raises(NonFiniteError, match=r"sample id\(s\) \[16\]"):
        hessfree.pairwise_influence(run, data, sub, **Q)
    assert issubclass(NonFiniteError, FloatingPointError)


# ----------------------------------------------------------------------------- run directories
def test_fit_into_existing_run_dir_without_overwrite(tmp_path, data):
    rd = tmp_path / "run"
    first = hessfree.fit(mlp(0), data, batch_size=8, run_dir=rd, **Q)
    old = [first.checkpoint_state(k) for k in range(len(first))]
    model = mlp(1)
    before = params_of(model)
    with pytest.raises(RunDirectoryError, match="overwrite=True"):
        hessfree.fit(model, data, batch_size=8, run_dir=rd, **Q)
    assert same_params(model, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stray recording directory
    again = hessfree.Run.load(rd, mlp(0))
    assert len(again) == len(old)
    for k, sd in enumerate(old):
        assert all(torch.equal(again.checkpoint_state(k)[n], sd[n]) for n in sd)
    with pytest.raises(RunDirectoryError):
        hessfree.fit(mlp(0), data, run_dir=next(rd.glob("data-*")), **Q)  # a non-empty non-run dir is refused


def test_fit_into_existing_empty_dir_is_allowed(tmp_path, data):
    (tmp_path / "r").mkdir()
    run = hessfree.fit(mlp(0), data, batch_size=8, run_dir=tmp_path / "r", **Q)
    assert run.run_dir == tmp_path / "r"


def test_run_dir_that_is_a_file(tmp_path, data):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(RunDirectoryError):
        hessfree.fit(mlp(0), data, run_dir=f, **Q)


def test_run_load_bad_directories(tmp_path, data):
    with pytest.raises(RunDirectoryError, match="no manifest.json"):
        hessfree.Run.load(tmp_path / "missing", mlp(0))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RunDirectoryError, match="not a hessfree run manifest"):
        hessfree.Run.load(tmp_path / "other", mlp(0))


def test_run_load_custom_task_needs_loss(tmp_path, data):
    class MyCE(hessfree.CrossEntropy):
        name = "my_ce"

    hessfree.fit(mlp(0), data, batch_size=8, run_dir=tmp_path / "r", loss=MyCE(), **Q)
    with pytest.raises(InputError, match="custom Task 'my_ce': pass it as loss="):
        hessfree.Run.load(tmp_path / "r", mlp(0))
    assert hessfree.Run.load(tmp_path / "r", mlp(0), loss=MyCE()).task.name == "my_ce"


# ----------------------------------------------------------------------------- checkpoint selection
@pytest.mark.parametrize("sel,pattern", [
    ([2], r"checkpoint index 2 is outside the run's 2 checkpoints"),
    ([-3], r"checkpoint index -3 is outside"),
    ([0, 1.0], r"checkpoint index 1\.0 is outside"),
    ([], r"selection is empty"),
    ("first", r"None, 'last' or a list of indices"),
])
def test_bad_checkpoint_selection(run, data, sel, pattern, grad_calls):
    with pytest.raises(InputError, match=pattern):
        hessfree.self_influence(run, data, checkpoints=sel, **Q)
    with pytest.raises(InputError, match=pattern):
        hessfree.pairwise_influence(run, data, data, checkpoints=sel, **Q)
    assert grad_calls == []


def test_good_checkpoint_selection(run, data):
    last = hessfree.self_influence(run, data, checkpoints="last", **Q)
    neg = hessfree.self_influence(run, data, checkpoints=[-1], **Q)
    both = hessfree.self_influence(run, data, **Q)
    first = hessfree.self_influence(run, data, checkpoints=[0], **Q)
    assert last.meta["checkpoints"] == neg.meta["checkpoints"] == [1]
    assert np.array_equal(last.values, neg.values)
    np.testing.assert_allclose(first.values + last.values, both.values, rtol=1e-12)


def test_checkpoint_selection_bare_int(run, data):
    one = hessfree.self_influence(run, data, checkpoints=-1, **Q)
    last = hessfree.self_influence(run, data, checkpoints="last", **Q)
    assert one.meta["checkpoints"] == last.meta["checkpoints"] == [len(run.checkpoints) - 1]
    assert np.array_equal(one.values, last.values)
    with pytest.raises(InputError, match="outside the run"):
        hessfree.self_influence(run, data, checkpoints=len(run.checkpoints), **Q)


# ----------------------------------------------------------------------------- unknown loss / run type
def test_unknown_loss_name(data, tmp_path):
    model = mlp(0)
    before = params_of(model)
    with pytest.raises(InputError, match=r"unknown loss 'mse'.*\['bce', 'cross_entropy'\]"):
        hessfree.fit(model, data, loss="mse", run_dir=tmp_path / "r", **Q)
    assert same_params(model, before)
    assert not any(tmp_path.iterdir())
    with pytest.raises(InputError, match="unknown loss"):
        hessfree.Run.from_checkpoints(model, [model.state_dict()], [0.1], loss="CrossEntropy")


def test_scoring_a_non_run(data):
    with pytest.raises(InputError, match="Run.from_checkpoints"):
        hessfree.self_influence(mlp(0), data, **Q)


@pytest.mark.parametrize("kw,pattern", [({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
                                        ({"checkpoint_every": 0}, "checkpoint_every"),
                                        ({"epochs": 1.5}, "epochs")])
def test_fit_bad_ints(data, kw, pattern):
    with pytest.raises(InputError, match=pattern):
        hessfree.fit(mlp(0), data, **kw, **Q)


def test_scoring_bad_batch_size(run, data):
    with pytest.raises(InputError, match="batch_size"):
        hessfree.self_influence(run, data, batch_size=0, **Q)
