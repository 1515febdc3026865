"""Ensembles and routing by environment (ftlab.combine): the arithmetic on hand-made
probabilities, per-environment metrics, manifest checks, and `ftlab-combine` on smoke runs."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_cfg
from ftlab import combine
from ftlab.evaluate import Predictions, assess
from ftlab.app_schema import CombineAppConfig
from ftlab.schema import ConfigError, EvalConfig

# Six rows, two environments. Model a is right on env "x" only, model b on env "y" only.
LABELS = np.array([0, 1, 0, 1, 0, 1])
ENV = np.array(["x", "x", "x", "y", "y", "y"])
A = np.array([[.9, .1], [.2, .8], [.7, .3], [.6, .4], [.1, .9], [.8, .2]])
B = np.array([[.3, .7], [.6, .4], [.4, .6], [.2, .8], [.7, .3], [.3, .7]])


def test_mean_averages_class_probabilities():
    c = np.array([[.5, .5]] * 6)
    np.testing.assert_allclose(combine.mean_probs([A, B]), (A + B) / 2)
    np.testing.assert_allclose(combine.mean_probs([A, B, c])[0], [(.9 + .3 + .5) / 3,
                                                                  (.1 + .7 + .5) / 3])


def test_route_takes_each_row_from_its_environments_model():
    out = combine.route_probs({"a": A, "b": B}, ENV, {"x": "a", "y": "b"}, "cell_type")
    np.testing.assert_array_equal(out, np.concatenate([A[:3], B[3:]]))
    swapped = combine.route_probs({"a": A, "b": B}, ENV, {"x": "b", "y": "a"})
    np.testing.assert_array_equal(swapped, np.concatenate([B[:3], A[3:]]))
    with pytest.raises(ConfigError) as e:
        combine.route_probs({"a": A}, ENV, {"x": "a"}, "cell_type")
    assert e.value.key == "route" and "cell_type 'y' (3 rows)" in str(e.value)
    assert "route.y=" in str(e.value)


def test_per_environment_metrics_of_combinations():
    cols = {"env": ENV}
    ids = np.array([f"s{i}" for i in range(6)])
    names = ["neg", "pos"]

    def ev(probs):
        return assess(EvalConfig(), Predictions(ids, LABELS, probs, cols), names)

    a, routed = ev(A), ev(combine.route_probs({"a": A, "b": B}, ENV, {"x": "a", "y": "b"}))
    assert a["slices"]["env"]["x"]["accuracy"] == 1.0
    assert a["slices"]["env"]["y"]["accuracy"] == 0.0
    assert {v: s["accuracy"] for v, s in routed["slices"]["env"].items()} == {"x": 1.0, "y": 1.0}
    assert routed["metrics"]["accuracy"] == 1.0 and routed["slices"]["env"]["x"]["n"] == 3
    # Mean: p(pos) per row .4 .6 .45 .6 .6 .45 -> preds 0 1 0 1 1 0: env y gets rows 4, 5
    # wrong; its F1 is 0 for class 0 and 1/2 for class 1 (precision 1/2, recall 1/2).
    mean = ev(combine.mean_probs([A, B]))
    assert mean["metrics"]["accuracy"] == pytest.approx(4 / 6)
    assert mean["slices"]["env"]["x"]["accuracy"] == 1.0
    assert mean["slices"]["env"]["y"]["accuracy"] == pytest.approx(1 / 3)
    assert mean["slices"]["env"]["y"]["macro_f1"] == pytest.approx(0.25)


def _fake_run(path: Path, rows: list[tuple[str, str]]) -> str:
    path.mkdir(parents=True)
    lines = ["sample_id,split,label"] + [f"{i},{s},a" for i, s in rows]
    (path / "manifest.csv").write_text("\n".join(lines) + "\n")
    return str(path)


def test_runs_must_share_the_split_rows(tmp_path):
    rows = [("d/1", "train"), ("d/2", "test"), ("d/3", "test")]
    a = _fake_run(tmp_path / "a", rows)
    b = _fake_run(tmp_path / "b", rows)
    c = _fake_run(tmp_path / "c", rows[:2] + [("d/4", "test")])
    assert combine.same_rows([a, b], "test") == ["d/2", "d/3"]
    with pytest.raises(ConfigError) as e:
        combine.same_rows([a, b, c], "test")
    assert e.value.key == "runs" and str(c) in str(e.value) and "row 1" in str(e.value)
    with pytest.raises(ConfigError) as e:
        combine.same_rows([a, str(tmp_path / "none")], "test")
    assert e.value.key == "runs" and "manifest.csv" in str(e.value)


def test_member_lists_are_checked():
    assert combine.members(CombineAppConfig(runs=["r/a", "r/b/", "r/a"], out="o")) == \
        ["r/a", "r/b"]
    assert combine.members(CombineAppConfig(mode="route", route={"x": "r/a", "y": "r/b"},
                                            runs=["r/c"], out="o")) == ["r/a", "r/b", "r/c"]
    for app, key in [(CombineAppConfig(runs=["r/a"], out="o"), "runs"),
                     (CombineAppConfig(mode="vote", runs=["a", "b"], out="o"), "mode"),
                     (CombineAppConfig(mode="route", out="o"), "route"),
                     (CombineAppConfig(runs=["a", "b"], route={"x": "a"}, out="o"), "route")]:
        with pytest.raises(ConfigError) as e:
            combine.members(app)
        assert e.value.key == key


SMOKE = ("experiment=elpv_tiny", "debug=smoke", "eval.baselines=false", "eval.latency=false",
         "eval.plots=false")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A smoke run and a second run dir holding the same model (same split, same weights)."""
    from ftlab.train import run
    root = tmp_path_factory.mktemp("combine_smoke")
    results = run(compose_cfg(*SMOKE), root / "a")
    shutil.copytree(root / "a", root / "b")
    return str(root / "a"), str(root / "b"), results


def test_mean_and_route_of_smoke_runs(two_runs, tmp_path):
    a, b, results = two_runs
    res = combine.combine_runs(CombineAppConfig(runs=[a, b], out=str(tmp_path / "mean")))
    ev = res["eval"]
    assert ev["metrics"]["accuracy"] == results["test/accuracy"]  # two copies of one model
    parent = Path(a).parent.name
    assert set(ev["compare"]) == {f"{parent}/a", f"{parent}/b", "mean"}
    assert set(ev["slices"]["cell_type"]) == {"mono", "poly"}
    assert res["table"].splitlines()[0].startswith("cell_type")
    saved = json.loads((tmp_path / "mean" / "eval.json").read_text())
    assert saved["mode"] == "mean"
    assert res["table"] in (tmp_path / "mean" / "report.md").read_text()
    routed = combine.combine_runs(CombineAppConfig(mode="route", route={"mono": a, "poly": b},
                                                   out=str(tmp_path / "route")))
    assert routed["eval"]["metrics"] == ev["metrics"]
    with pytest.raises(ConfigError) as e:
        combine.combine_runs(CombineAppConfig(mode="route", route={"mono": a},
                                              out=str(tmp_path / "r2")))
    assert e.value.key == "route" and "'poly'" in str(e.value)


def test_mismatched_manifest_is_rejected(two_runs, tmp_path):
    a, _, _ = two_runs
    c = tmp_path / "c"
    shutil.copytree(a, c)
    lines = (c / "manifest.csv").read_text().splitlines()
    test = [i for i, l in enumerate(lines) if ",test," in l]
    lines[test[0]], lines[test[1]] = lines[test[1]], lines[test[0]]  # same rows, other order
    (c / "manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        combine.combine_runs(CombineAppConfig(runs=[a, str(c)], out=str(tmp_path / "o")))
    assert e.value.key == "runs" and "different test split" in str(e.value)
    assert not (tmp_path / "o").exists()


BIN = Path(sys.executable).parent / "ftlab-combine"
ENV_VARS = {**os.environ, "WANDB_MODE": "disabled"}


def test_ftlab_combine_cli(two_runs, tmp_path):
    a, b, _ = two_runs
    ok = subprocess.run([str(BIN), "mode=route", f"+route.mono={a}", f"+route.poly={b}",
                         f"out={tmp_path}/r"], capture_output=True, text=True, env=ENV_VARS,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "route acc / F1" in ok.stdout and "poly" in ok.stdout
    assert (tmp_path / "r" / "report.md").exists()
    bad = subprocess.run([str(BIN), f"runs=[{a}]", f"out={tmp_path}/m"], capture_output=True,
                         text=True, env=ENV_VARS, timeout=600)
    errors = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: runs:")
