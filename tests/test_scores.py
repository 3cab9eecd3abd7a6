"""Scores: ordering by kind / goal, tie-breaking, matrices, fractions, frames, save / load."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import hessfree
from hessfree import InputError, Scores
from helpers import mlp, tabular

VALUES = np.array([0.5, -1.0, 2.0, -1.0, 0.0, 2.0])
IDS = np.array([60, 51, 42, 33, 24, 15])  # descending: a tie must be broken by position, not by id


def scores(kind="influence", goal="minimize", values=VALUES, ids=IDS, **kw):
    return Scores(values, ids, {"kind": kind, "goal": goal}, **kw)


# ----------------------------------------------------------------------------- ordering
def test_influence_minimize_lowest_is_most_harmful():
    s = scores()
    assert s.harmful(6).tolist() == [51, 33, 24, 60, 42, 15]  # -1 (pos 1), -1 (pos 3), 0, 0.5, 2, 2
    assert s.helpful(6).tolist() == [42, 15, 60, 24, 51, 33]  # 2 (pos 2), 2 (pos 5), 0.5, 0, -1, -1
    assert s.harmful(2).tolist() == [51, 33]
    assert s.helpful(1).tolist() == [42]
    np.testing.assert_array_equal(s.suspicion(), -VALUES)


def test_influence_maximize_highest_is_most_harmful():
    s = scores(goal="maximize")
    assert s.harmful(6).tolist() == [42, 15, 60, 24, 51, 33]
    assert s.helpful(6).tolist() == [51, 33, 24, 60, 42, 15]
    np.testing.assert_array_equal(s.suspicion(), VALUES)


@pytest.mark.parametrize("goal", ["minimize", "maximize"])
def test_outlier_highest_is_most_suspicious_whatever_the_goal(goal):
    s = scores(kind="outlier", goal=goal)
    assert s.harmful(3).tolist() == [42, 15, 60]
    assert s.helpful(3).tolist() == [51, 33, 24]


def test_defaults_are_influence_minimize():
    s = Scores(VALUES, IDS)
    assert (s.meta["kind"], s.meta["goal"]) == ("influence", "minimize")
    assert "sign_convention" in s.meta
    assert s.harmful(1).tolist() == [51]


def test_ties_are_stable_both_ways():
    s = scores(values=np.zeros(6))
    assert s.harmful(6).tolist() == IDS.tolist()
    assert s.helpful(6).tolist() == IDS.tolist()
    t = scores(kind="outlier", values=np.array([1.0, 3.0, 1.0, 3.0, 1.0, 3.0]))
    assert t.harmful(6).tolist() == [51, 33, 15, 60, 42, 24]
    assert t.helpful(6).tolist() == [60, 42, 24, 51, 33, 15]


@pytest.mark.parametrize("kind,goal", [("influence", "minimize"), ("influence", "maximize"), ("outlier", "minimize")])
def test_many_ties_keep_position_order(kind, goal):
    """Large enough (200) that numpy's default unstable quicksort would scramble the ties."""
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 3, 200).astype(float)
    ids = rng.permutation(10_000)[:200]
    s = scores(kind=kind, goal=goal, values=vals, ids=ids)
    susp = s.suspicion()
    # reference: most suspicious first, ties by position (Python's sort is stable)
    ref = sorted(range(200), key=lambda i: -susp[i])
    assert s.harmful(200).tolist() == ids[ref].tolist()
    ref_help = sorted(range(200), key=lambda i: susp[i])
    assert s.helpful(200).tolist() == ids[ref_help].tolist()
    m = Scores(np.stack([vals, vals[::-1]]), ids, {"kind": kind, "goal": goal})
    assert m.harmful(200)[0].tolist() == ids[ref].tolist()


def test_harmful_and_helpful_partition_for_distinct_values():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=50)
    ids = rng.permutation(1000)[:50]
    s = scores(values=vals, ids=ids)
    assert s.harmful(50).tolist() == s.helpful(50)[::-1].tolist()
    assert s.harmful(10).tolist() == ids[np.argsort(vals)[:10]].tolist()


def test_matrix_rows_are_ranked_separately():
    vals = np.array([[3.0, -2.0, 1.0, 0.0],
                     [-5.0, 4.0, 4.0, -1.0]])
    s = Scores(vals, [7, 8, 9, 10], {"kind": "influence", "goal": "minimize"}, test_ids=[100, 200])
    assert s.shape == (2, 4) and len(s) == 4
    h = s.harmful(2)
    assert h.shape == (2, 2)
    assert h.tolist() == [[8, 10], [7, 10]]
    assert s.helpful(2).tolist() == [[7, 9], [8, 9]]  # tie 4.0 / 4.0 -> lower position first
    assert s.harmful(0.5).tolist() == h.tolist()


@pytest.mark.parametrize("k,expected", [(0.5, 3), (0.34, 2), (0.01, 1), (0.99, 6), (np.float64(0.5), 3),
                                        (np.int64(4), 4), (6, 6)])
def test_fractions_and_integer_types(k, expected):
    s = scores()
    got = s.harmful(k)
    assert len(got) == expected
    assert got.tolist() == s.harmful(6)[:expected].tolist()
    assert got.dtype == np.int64


def test_real_method_scores_rank_as_documented():
    data, test = tabular(n=12, seed=0), tabular(n=3, seed=1)
    run = hessfree.fit(mlp(0), data, batch_size=4, epochs=2, progress=False)
    s = hessfree.self_influence(run, data, progress=False)
    assert (s.meta["kind"], s.meta["method"]) == ("outlier", "self_influence")
    assert s.harmful(1)[0] == int(np.argmax(s.values))
    inf = hessfree.influence(run, data, test, progress=False)
    assert inf.meta["goal"] == "minimize" and inf.meta["kind"] == "influence"
    assert inf.harmful(1)[0] == int(np.argmin(inf.values))
    pred = hessfree.influence(run, data, hessfree.targets.Prediction(test.tensors[0], 0), progress=False)
    assert pred.meta["goal"] == "maximize"
    assert pred.harmful(1)[0] == int(np.argmax(pred.values))
    pw = hessfree.pairwise_influence(run, data, test, progress=False)
    assert pw.harmful(2).tolist() == np.argsort(pw.values, axis=1, kind="stable")[:, :2].tolist()


# ----------------------------------------------------------------------------- frames
def test_to_frame_vector():
    f = scores().to_frame()
    assert f.index.name == "sample_id"
    assert f.index.tolist() == IDS.tolist()
    assert list(f.columns) == ["score"]
    assert f.loc[42, "score"] == 2.0 and f.loc[51, "score"] == -1.0


def test_to_frame_matrix():
    vals = np.arange(12.0).reshape(3, 4)
    f = Scores(vals, [7, 8, 9, 10], test_ids=[100, 200, 300]).to_frame()
    assert f.shape == (4, 3)  # one row per training sample
    assert f.index.name == "sample_id" and f.columns.name == "test_id"
    assert f.columns.tolist() == [100, 200, 300]
    assert f.loc[9, 300] == vals[2, 2] and f.loc[7, 200] == vals[1, 0]
    g = Scores(vals, [7, 8, 9, 10]).to_frame()
    assert g.columns.tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- save / load
def _rich_meta():
    return {"kind": "outlier", "goal": "minimize", "method": "x", "checkpoints": [0, 2],
            "learning_rates": [0.1, 1 / 3], "params": ["0.weight", "2"], "nested": {"a": [1, 2], "b": None},
            "timing": {"total_s": 0.123456789}, "flag": True}


def test_save_load_round_trip_vector(tmp_path):
    s = Scores(np.array([0.1, -2.5, 1e-300, 3.0]), [4, 9, 1, 0], _rich_meta())
    path = s.save(tmp_path / "self")
    assert path == tmp_path / "self.npz" and path.is_file()
    with np.load(path, allow_pickle=False) as z:  # no pickle anywhere
        assert set(z.files) == {"values", "sample_ids", "meta_json"}
        assert z["values"].dtype == np.float64
        assert json.loads(z["meta_json"].tobytes().decode())["method"] == "x"
    back = Scores.load(path)
    assert np.array_equal(back.values, s.values) and back.values.dtype == s.values.dtype
    assert np.array_equal(back.sample_ids, s.sample_ids) and back.sample_ids.dtype == np.int64
    assert back.test_ids is None
    assert back.meta == s.meta
    assert back.harmful(2).tolist() == s.harmful(2).tolist()


def test_save_load_round_trip_matrix_float32(tmp_path):
    vals = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    s = Scores(vals, [5, 6, 7], {"method": "pairwise_influence"}, test_ids=[11, 12])
    path = s.save(tmp_path / "pair.npz")
    assert path == tmp_path / "pair.npz"
    back = Scores.load(path)
    assert back.values.dtype == np.float32 and np.array_equal(back.values, vals)
    assert back.test_ids.tolist() == [11, 12]
    assert back.meta == s.meta
    assert back.to_frame().equals(s.to_frame())


def test_save_keeps_other_suffixes(tmp_path):
    assert Scores([1.0], [0]).save(tmp_path / "scores.v2").name == "scores.v2.npz"


def test_numpy_scalars_in_metadata_are_stored_as_numbers(tmp_path):
    s = Scores([1.0, 2.0], [0, 1], {"n": np.int64(3), "eta": np.float32(0.5), "nested": {"t": (1, [2.5, None])}})
    back = Scores.load(s.save(tmp_path / "m"))
    assert back.meta["n"] == 3 and back.meta["eta"] == 0.5 and back.meta["nested"] == {"t": [1, [2.5, None]]}


@pytest.mark.parametrize("bad,where", [
    (torch.float64, "dtype"), (torch.ones(2), "Tensor"), (np.arange(3), "ndarray"),
    (len, "builtin_function"), (object(), "object"), ({1: "a"}, "key 1"), ([1, {"y": torch.ones(1)}], r"meta\['x'\]\[1\]"),
])
def test_save_refuses_metadata_it_cannot_store_faithfully(tmp_path, bad, where):
    path = tmp_path / "m.npz"
    Scores([1.0], [0], {"x": 1}).save(path)
    before = path.read_bytes()
    with pytest.raises(InputError, match=where):
        Scores([1.0, 2.0], [0, 1], {"x": bad}).save(path)
    assert path.read_bytes() == before  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]  # and no temporary is left


def test_load_refuses_files_that_are_not_scores(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    np.savez(tmp_path / "objects.npz", values=np.array([object()], dtype=object), sample_ids=np.arange(1),
             meta_json=np.frombuffer(b"{}", dtype=np.uint8))
    np.savez(tmp_path / "badjson.npz", values=np.ones(1), sample_ids=np.arange(1),
             meta_json=np.frombuffer(b"{not json", dtype=np.uint8))
    for name, pattern in [("text.npz", "cannot be read"), ("other.npz", "no values, sample_ids, meta_json"),
                          ("objects.npz", "cannot be read"), ("badjson.npz", "not valid JSON"),
                          ("missing.npz", "no hessfree scores file")]:
        with pytest.raises(InputError, match=pattern):
            Scores.load(tmp_path / name)


def test_real_scores_round_trip(tmp_path):
    data = tabular(n=8)
    run = hessfree.fit(mlp(0), data, batch_size=4, progress=False)
    s = hessfree.self_influence(run, data, progress=False)
    back = Scores.load(s.save(tmp_path / "s"))
    assert np.array_equal(back.values, s.values)
    assert back.meta == json.loads(json.dumps(s.meta))
    assert back.meta["kind"] == "outlier"


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    Scores([1.0, 2.0], [0, 1]).save(path)
    assert os.listdir(tmp_path) == ["s.npz"]  # no temporary file left behind
    Scores([3.0, 4.0, 5.0], [0, 1, 2]).save(path)  # overwrite in place
    assert os.listdir(tmp_path) == ["s.npz"]
    assert Scores.load(path).values.tolist() == [3.0, 4.0, 5.0]

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        Scores([9.0], [0]).save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["s.npz"]  # the failed write left nothing behind ...
    assert Scores.load(path).values.tolist() == [3.0, 4.0, 5.0]  # ... and the old file intact


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("values,ids", [(np.zeros(5), np.arange(4)), (np.zeros((2, 3)), np.arange(2)),
                                        (np.zeros(3), np.arange(4))])
def test_values_ids_length_mismatch(values, ids):
    with pytest.raises(InputError, match="do not match"):
        Scores(values, ids)


def test_test_ids_length_mismatch():
    with pytest.raises(InputError):
        Scores(np.zeros((3, 5)), np.arange(5), test_ids=np.arange(2))


def test_ids_are_int64_and_values_arrays():
    s = Scores([1, 2, 3], (np.arange(3, dtype=np.int32)))
    assert s.sample_ids.dtype == np.int64
    assert isinstance(s.values, np.ndarray)
    assert "shape=(3,)" in repr(s)
