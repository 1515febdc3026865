"""Drift statistics and `ftlab-monitor` on toy logs: a shifted stream is flagged, unshifted
ones are not; accuracy only with labels; small windows never; exit status 1 on drift."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from ftlab import drift, monitor, predlog
from ftlab.app_schema import DriftThresholds, MonitorAppConfig
from ftlab.schema import ConfigError

CLASSES = ["a", "b", "c"]
CENTERS = np.random.default_rng(0).normal(0, 1.5, (3, 6))


def toy(n, seed, shift=0.0, blur=0.0, prior=(1 / 3, 1 / 3, 1 / 3)):
    """(probs, labels, embeddings): Gaussian classes in 6-d, Bayes posteriors as probs;
    `shift` moves every embedding, `blur` moves it that fraction of the way to the middle of
    the classes (less confident), `prior` sets the class mix."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=prior)
    emb = CENTERS[y] + rng.normal(0, 1, (n, 6))
    emb += blur * (CENTERS.mean(0) - emb) + shift
    probs = softmax(-0.5 * ((emb[:, None] - CENTERS[None]) ** 2).sum(-1), axis=1)
    return probs, y, emb


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model dir holding reference.npz and a log with one stream per scenario."""
    tmp = tmp_path_factory.mktemp("monitor")
    model = (tmp / "model").resolve()
    model.mkdir()
    (model / "config.yaml").write_text("# a run dir, for ftlab.registry.locate\n")
    p, y, e = toy(1000, 0)
    ref = predlog.fit_reference(CLASSES, p, y, e, k=3)
    predlog.save_reference(model / "reference.npz", ref)
    log = tmp / "log.db"

    def add(stream, n, seed, labels=None, **kw):
        p, y, e = toy(n, seed, **kw)
        ids = [f"{stream}-{i}" for i in range(n)]
        predlog.append(log, model=str(model), version="run", stream=stream,
                       class_names=CLASSES, sample_ids=ids, probs=p, proj=ref.project(e),
                       ts=1_700_000_000.0 + seed)
        if labels is not None:
            predlog.add_labels(log, stream, ids, labels(y))

    for seed in range(1, 6):
        add(f"same{seed}", 500, seed)
    for seed in range(110, 120):
        add(f"few{seed}", 60, seed)
    add("shifted", 500, 10, shift=0.5, blur=0.4, prior=(0.6, 0.3, 0.1))
    add("tiny", 5000, 11, shift=0.2)
    add("small", 30, 12, shift=1.5, prior=(0.8, 0.1, 0.1))
    add("true_labels", 300, 13, labels=lambda y: y)
    flip = np.random.default_rng(1).random(300) < 0.4
    add("bad_labels", 300, 14, labels=lambda y: np.where(flip, (y + 1) % 3, y))
    return {"tmp": tmp, "model": model, "log": log, "ref": ref}


def assess(setup, stream, **th):
    win = predlog.read(setup["log"], model=str(setup["model"]), stream=stream)
    return drift.assess(setup["ref"], win, DriftThresholds(**th))


def flagged(res):
    return {c["feature"] for c in res["checks"] if c["flagged"]}


def test_psi_and_ks():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 2000)
    assert drift.psi(x, x) == pytest.approx(0.0)
    assert drift.psi(x, rng.normal(0, 1, 2000)) < 0.05
    assert drift.psi(x, rng.normal(1, 1, 2000)) > 0.5
    assert drift.psi(np.ones(100), np.ones(10)) == pytest.approx(0.0)  # tied edges merged
    assert drift.psi(x, x + 100) > 5  # all mass past the last edge: finite, large
    assert drift.ks(x, x + 1)[1] < 1e-10 < drift.ks(x, x)[1]
    mix = drift.class_mix(np.array([0, 1, 2] * 10), np.array([0] * 30), 3)
    assert mix["window"] == [1.0, 0.0, 0.0] and mix["psi"] > 1 and mix["pvalue"] < 1e-6


def test_shifted_stream_flagged_unshifted_quiet(setup):
    for seed in range(1, 6):
        res = assess(setup, f"same{seed}")
        assert not res["drift"], (seed, res["checks"])
    res = assess(setup, "shifted")
    assert res["drift"]
    assert {"confidence", "pc1", "class mix"} <= flagged(res)
    assert res["class_mix"]["window"][0] > res["class_mix"]["reference"][0] + 0.2


def test_psi_noise_on_few_rows_is_not_flagged(setup):
    """With no shift, PSI on 60 rows often passes 0.2; the tests keep such windows quiet
    (false alarms ~ pvalue: a few seeds in a hundred)."""
    results = [assess(setup, f"few{seed}") for seed in range(110, 120)]
    assert not any(r["drift"] for r in results)
    assert sum(max(c["value"] for c in r["checks"]) >= 0.2 for r in results) >= 3


def test_tiny_shift_on_many_rows_is_not_flagged(setup):
    """KS alone rejects a 0.2-sd shift on 5000 rows; PSI says it is small: quiet."""
    res = assess(setup, "tiny")
    assert min(c["pvalue"] for c in res["checks"]) < res["alpha"]
    assert not res["drift"]


def test_accuracy_drop_flagged_only_with_labels(setup):
    res = assess(setup, "same1")
    assert res["accuracy"] is None and "accuracy" not in {c["feature"] for c in res["checks"]}
    res = assess(setup, "true_labels")
    assert res["labeled"] == 300 and not res["drift"]
    assert abs(res["accuracy"]["drop"]) < 0.05
    res = assess(setup, "bad_labels")
    assert flagged(res) == {"accuracy"} and res["drift"]
    assert res["accuracy"]["drop"] > 0.2 and res["accuracy"]["n"] == 300
    res = assess(setup, "bad_labels", min_rows=301)  # fewer labeled rows than min_rows
    assert not res["drift"] and "min_rows" in res["checks"][-1]["note"]


def test_small_window_reported_never_flagged(setup):
    res = assess(setup, "small")
    assert res["small_window"] and not res["drift"] and res["n"] == 30
    assert max(c["value"] for c in res["checks"]) > 0.2  # large shift, still not flagged
    assert assess(setup, "small", min_rows=20)["drift"]


def app(setup, **kw):
    return MonitorAppConfig(**{"ref": str(setup["model"]), "log": str(setup["log"]),
                               "registry": str(setup["tmp"] / "reg"), **kw})


def test_run_app_writes_report(setup, tmp_path):
    res = monitor.run_app(app(setup, stream="shifted", out=str(tmp_path / "out")))
    out = tmp_path / "out"
    assert res["drift"] and res["out"] == str(out)
    assert json.loads((out / "drift.json").read_text())["drift"] is True
    md = (out / "report.md").read_text()
    assert "**Drift**" in md and "| class mix | psi |" in md and "![drift](drift.png)" in md
    assert "| a |" in md and "No labels have arrived" in md
    assert (out / "drift.png").read_bytes()[:4] == b"\x89PNG"
    assert "DRIFT" in monitor.summary(res) and "report.md" in monitor.summary(res)
    res = monitor.run_app(app(setup, stream="bad_labels", last=200))  # default out dir
    assert res["n"] == 200 and Path(res["out"]).parent == setup["log"].parent / "monitor"
    assert "## Accuracy" in (Path(res["out"]) / "report.md").read_text()


@pytest.mark.parametrize("kw, key", [
    ({"since": "yesterday"}, "since"),
    ({"since": "2100-01-01"}, "since"),
    ({"stream": "nope"}, "stream"),
    ({"last": 0}, "last"),
    ({"log": "missing.db"}, "log"),
    ({"ref": "elsewhere"}, "ref"),
    ({"thresholds": DriftThresholds(pvalue=2.0)}, "thresholds.pvalue"),
])
def test_bad_input_is_a_config_error(setup, kw, key):
    if "ref" in kw:
        kw["ref"] = str(setup["tmp"] / kw["ref"])  # a run dir with no reference.npz
        Path(kw["ref"]).mkdir(exist_ok=True)
        (Path(kw["ref"]) / "config.yaml").touch()
    with pytest.raises(ConfigError) as e:
        monitor.run_app(app(setup, **kw))
    assert e.value.key == key and "\n" not in str(e.value)
    if "ref" in kw:
        assert "no reference.npz; run ftlab-predict" in str(e.value)


def test_cli_exit_status(setup, tmp_path):
    """1 on drift, 0 without, 2 with one line on a bad value; `ref=` composes with the real
    conf/ (which also has a `model` config group)."""
    exe = Path(sys.executable).parent / "ftlab-monitor"
    base = [str(exe), f"ref={setup['model']}", f"log={setup['log']}",
            f"registry={tmp_path / 'reg'}"]

    def run(*args):
        return subprocess.run(base + list(args), capture_output=True, text=True, timeout=120,
                              check=False)

    r = run("stream=shifted", f"out={tmp_path / 'a'}")
    assert r.returncode == 1, r.stderr
    assert "DRIFT" in r.stdout and (tmp_path / "a" / "drift.png").is_file()
    r = run("stream=same1", f"out={tmp_path / 'b'}")
    assert r.returncode == 0, r.stderr
    assert "no drift" in r.stdout
    r = run("stream=shifted", "since=not-a-time")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: since:")
    assert len(r.stderr.strip().splitlines()) == 1
