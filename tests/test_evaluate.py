"""The evaluation report: metrics against scikit-learn, slices, review, thresholds, and the
report of a real (smoke) run, reproduced from its run dir by `ftlab-eval`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from conftest import compose_cfg
from ftlab import analysis, metrics
from ftlab.evaluate import Predictions, assess
from ftlab.app_schema import EvalAppConfig
from ftlab.schema import ConfigError, EvalConfig
from ftlab.train import run


def _toy(n=200, c=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[labels] * rng.random((n, 1))
    return metrics.softmax(logits), labels


def test_full_metrics_agree_with_scikit_learn():
    probs, y = _toy()
    names = ["a", "b", "c"]
    ev = metrics.full(probs, y, names, bins=10)
    pred = probs.argmax(-1)
    m = ev["metrics"]
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["loss"] == pytest.approx(skm.log_loss(y, probs))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(
        np.eye(3)[y], probs, average="macro"))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred)
    for i, name in enumerate(names):
        assert ev["per_class"][name]["precision"] == pytest.approx(p[i])
        assert ev["per_class"][name]["recall"] == pytest.approx(r[i])
        assert ev["per_class"][name]["support"] == s[i]
    assert ev["confusion"] == skm.confusion_matrix(y, pred).tolist()
    # ECE by hand: |accuracy - confidence| per bin, weighted by the bin's share.
    conf, hit = probs.max(-1), pred == y
    ece = sum(abs(hit[m].mean() - conf[m].mean()) * m.mean() for m in
              ((conf > lo) & (conf <= lo + 0.1) for lo in np.arange(10) / 10) if m.any())
    assert m["ece"] == pytest.approx(ece)
    assert sum(b["count"] for b in ev["calibration"]["bins"]) == len(y)


def test_auc_is_none_for_a_class_without_positives_not_a_crash():
    probs, y = _toy(c=3)
    y[y == 2] = 0
    ev = metrics.full(probs, y, ["a", "b", "c"])
    assert ev["per_class"]["c"]["roc_auc"] is None
    assert ev["metrics"]["roc_auc"] == pytest.approx(np.mean(
        [skm.roc_auc_score(y == k, probs[:, k]) for k in (0, 1)]))


def test_slices_and_worst_slice_on_toy_data():
    # env "a": all correct; env "b": half wrong.
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    pred = np.array([0, 1, 0, 1, 0, 0, 1, 1])
    env = np.array(["a"] * 4 + ["b"] * 4)
    probs = np.eye(2)[pred] * 0.8 + 0.1
    s = analysis.slice_metrics(probs, labels, {"env": env})
    assert s["env"]["a"] == {"n": 4, "accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0}
    assert s["env"]["b"]["n"] == 4 and s["env"]["b"]["accuracy"] == 0.5
    assert s["env"]["b"]["macro_f1"] == pytest.approx(skm.f1_score(labels[4:], pred[4:],
                                                                   average="macro"))
    assert analysis.worst_slice(s, {"macro_f1": 0.75}) is None  # slices under MIN_SLICE rows
    big = {"env": {k: {**v, "n": 10} for k, v in s["env"].items()}}
    worst = analysis.worst_slice(big, {"macro_f1": 0.75})
    assert worst["score"] == s["env"]["b"]["macro_f1"]
    assert (worst["column"], worst["value"], worst["n"]) == ("env", "b", 10)


def test_review_orders_mistakes_and_confused_pairs():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.4, 0.6, 0.0], [0.1, 0.1, 0.8],
                      [0.55, 0.45, 0.0], [0.3, 0.65, 0.05]])
    labels = np.array([1, 1, 0, 2, 0, 0])
    ids = np.array([f"s{i}" for i in range(6)])
    r = analysis.review(probs, labels, ids, ["a", "b", "c"], top=2, texts=["x |y"] * 6)
    assert [e["id"] for e in r["confident_mistakes"]] == ["s0", "s5"]
    assert [e["id"] for e in r["unsure_correct"]] == ["s4", "s1"]
    assert r["confident_mistakes"][0]["snippet"] == "x |y"
    cm = skm.confusion_matrix(labels, probs.argmax(-1), labels=[0, 1, 2]).tolist()
    assert analysis.confused_pairs(cm, ["a", "b", "c"])[0] == {"true": "a", "pred": "b",
                                                             "count": 2}


def test_cost_threshold_minimises_the_configured_cost():
    # Positives score 0.3-0.45 or 0.9; negatives 0.1-0.35. Missing a positive costs 10x.
    val_p = np.array([0.9, 0.45, 0.4, 0.3, 0.35, 0.2, 0.1, 0.25])
    val_y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    probs = np.stack([1 - val_p, val_p], -1)
    t = metrics.cost_threshold(probs, val_y, probs, val_y, 1, 10.0, 1.0)
    assert t["threshold"] == pytest.approx(0.3)  # catches every positive, one false alarm
    assert (t["cost"], t["recall"]) == (1.0, 1.0)
    assert t["default_cost"] == 30.0 and t["default_recall"] == 0.25
    cheap = metrics.cost_threshold(probs, val_y, probs, val_y, 1, 1.0, 10.0)
    assert cheap["threshold"] > 0.35  # false alarms now cost more: none allowed


def test_assess_picks_rarer_class_as_positive_and_checks_cost_config():
    probs, y = _toy(c=2)
    y[:150] = 0
    pred = Predictions(np.arange(len(y)).astype(str), y, probs, {})
    ev = assess(EvalConfig(), pred, ["ok", "bad"], val=pred)
    assert ev["threshold"]["positive"] == "bad"
    from ftlab.evaluate import check
    with pytest.raises(ConfigError) as e:
        check(_with_positive("broken"), ["ok", "bad"])
    assert e.value.key == "eval.cost.positive"


def _with_positive(name):
    from ftlab.schema import CostConfig
    return EvalConfig(cost=CostConfig(positive=name))


SMOKE = ("experiment=elpv_tiny", "debug=smoke")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    results = run(compose_cfg(*SMOKE), run_dir)
    return run_dir, results


def test_smoke_run_writes_report_and_pictures(smoke_run):
    run_dir, results = smoke_run
    out = run_dir / "eval" / "test"
    report = (out / "report.md").read_text()
    for name in ("training_curves", "confusion_matrix", "reliability", "slices", "errors"):
        img = np.asarray(Image.open(out / f"{name}.png").convert("L"))
        assert min(img.shape) > 100 and img.std() > 5, name  # a picture, not a blank
        assert f"({name}.png)" in report
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["slices"]["cell_type"]) == {"mono", "poly"}  # ELPV's two plants
    assert {"majority", "pixel_logreg", "fine_tuned"} <= set(ev["baselines"])
    assert ev["threshold"]["positive"] == "defective"
    assert set(ev["cost"]["latency"]) == {"1", "32"} and ev["cost"]["params"] > 0
    assert results["test/macro_f1"] == ev["metrics"]["macro_f1"]
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("id,label,pred,cell_type,p_functional") and len(rows) == ev["n"] + 1


def test_eval_of_run_dir_reproduces_training_test_metrics(smoke_run, tmp_path):
    from ftlab.runs import evaluate_run
    run_dir, results = smoke_run
    ev, out = evaluate_run(EvalAppConfig(run_dir=str(run_dir), out=str(tmp_path / "e"),
                                         eval=EvalConfig(baselines=False, latency=False,
                                                         plots=False)))
    for k, v in ev["metrics"].items():
        assert results[f"test/{k}"] == v, k
    assert (tmp_path / "e" / "report.md").exists()


BIN = Path(sys.executable).parent / "ftlab-eval"
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def test_ftlab_eval_cli_on_val_split_and_bad_inputs(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    ok = subprocess.run([str(BIN), f"run_dir={run_dir}", "split=val", f"out={tmp_path}/v",
                         "checkpoint=latest"],
                        capture_output=True, text=True, env=ENV, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "val (" in ok.stdout and (tmp_path / "v" / "eval.json").exists()
    for args, key in [([f"run_dir={tmp_path}/nothing"], "run_dir"),
                      ([f"run_dir={run_dir}", "split=holdout"], "split"),
                      ([f"run_dir={run_dir}", "dataset=digits"], "dataset")]:
        bad = subprocess.run([str(BIN), *args], capture_output=True, text=True, env=ENV,
                             timeout=600)
        errors = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
        assert bad.returncode == 2 and len(errors) == 1 and key in errors[0], bad.stderr[-800:]


def test_unknown_slice_column_rejected_before_training(tmp_path):
    with pytest.raises(ConfigError) as e:
        run(compose_cfg(*SMOKE, "eval.slices=[plant]"), tmp_path)
    assert e.value.key == "eval.slices" and not (tmp_path / "ckpt").exists()
