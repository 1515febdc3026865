"""`ftlab-retrain`: the gate refuses a candidate that does not win (production stays, the
reason is written); test samples can never enter training (refused before any training,
whatever the CSV says); labels accumulate across retrains, promoted or not; a promoted
candidate rolls back to the exact previous production."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_cfg
from ftlab import registry, retrain
from ftlab.app_schema import GateConfig, RetrainAppConfig
from ftlab.data import labeled
from ftlab.data.examples import Examples
from ftlab.data.prepare import load_split
from ftlab.runs import load_config
from ftlab.schema import ConfigError

TINY = ("experiment=digits_tiny", "debug=smoke", "schedule=full", "schedule.phases.train.epochs=1",
        "eval.baselines=false", "eval.latency=false", "eval.plots=false")  # one phase, 3 steps


def write_labels(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample_id", "label"])
        w.writerows(rows)
    return path


# --- the pieces ---------------------------------------------------------------------------

@pytest.mark.parametrize("base, cand, p, gate, ok", [
    (0.80, 0.70, 0.01, GateConfig(), False),  # worse
    (0.80, 0.80, 1.00, GateConfig(), False),  # a tie never replaces production
    (0.80, 0.81, 0.50, GateConfig(margin=0.02), False),  # better, by less than the margin
    (0.80, 0.85, 0.20, GateConfig(require_significance=True), False),  # could be chance
    (0.80, 0.85, 0.01, GateConfig(require_significance=True), True),
    (0.80, 0.81, 0.50, GateConfig(margin=0.01), True),
])
def test_gate(base, cand, p, gate, ok):
    got, why = retrain.decide(gate, {"accuracy": base}, {"accuracy": cand}, {"p_value": p})
    assert got is ok and f"{cand:.4f}" in why


def test_mcnemar_counts_only_discordant_pairs():
    a = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1], bool)
    b = np.array([1, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1], bool)
    t = retrain.mcnemar(a, b)
    assert (t["only_baseline_right"], t["only_candidate_right"]) == (2, 1)
    assert t["p_value"] == pytest.approx(1.0)  # 1 of 3 discordant: binomial p = 1
    t = retrain.mcnemar(np.zeros(10, bool), np.ones(10, bool))
    assert t["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert retrain.mcnemar(a, a)["p_value"] == 1.0


def test_merged_labels_keep_every_label_and_the_latest_wins(tmp_path):
    classes = ["ok", "bad"]
    old = write_labels(tmp_path / "old.csv", [("a", "ok"), ("b", "bad")])
    new = write_labels(tmp_path / "new.csv", [("b", "ok"), ("c", "1")])
    out, n = retrain.merged_labels([tmp_path / "missing.csv", old], str(new), classes,
                                   tmp_path / "m" / "labels.csv")
    assert n == 3
    ids, ys = labeled.read(out, classes)
    assert dict(zip(ids, ys.tolist())) == {"a": 0, "b": 0, "c": 1}


def test_merge_moves_labeled_samples_into_train_and_never_test_ones(tmp_path):
    ex = Examples(ids=np.array([f"s{i}" for i in range(8)]), labels=np.zeros(8, np.int64),
                  class_names=["ok", "bad"])
    parts = {"train": np.array([0, 1]), "val": np.array([2, 3]), "test": np.array([4, 5]),
             "adapt": np.array([6, 7])}
    new_ex, new_parts = labeled.merge(ex, parts, write_labels(
        tmp_path / "l.csv", [("s6", "bad"), ("s2", "bad")]))
    assert new_parts["train"].tolist() == [0, 1, 2, 6]
    assert new_parts["val"].tolist() == [3] and new_parts["adapt"].tolist() == [7]
    assert new_parts["test"].tolist() == [4, 5]
    assert new_ex.labels.tolist() == [0, 0, 1, 0, 0, 0, 1, 0] and ex.labels.sum() == 0
    with pytest.raises(ConfigError) as e:
        labeled.merge(ex, parts, write_labels(tmp_path / "t.csv", [("s6", "ok"), ("s5", "ok")]))
    assert e.value.key == "dataset.extra_train" and "s5" in str(e.value)
    with pytest.raises(ConfigError, match="not in this dataset"):
        labeled.merge(ex, parts, write_labels(tmp_path / "u.csv", [("zz", "ok")]))


# --- the pipeline on a tiny registered model ------------------------------------------------

@pytest.fixture(scope="module")
def prod(tmp_path_factory):
    """digits_tiny trained, registered as `digits` v1 (production); its split."""
    from ftlab import train
    from ftlab.predict import write_reference
    tmp = tmp_path_factory.mktemp("retrain")
    cfg = compose_cfg(*TINY)
    train.run(cfg, tmp / "run")
    root = tmp / "reg"
    registry.register(root, tmp / "run", name="digits", aliases=["production"],
                      parent=None, reference_fn=write_reference)
    split = load_split(cfg.dataset)
    return {"tmp": tmp, "root": root, "cfg": cfg, "ex": split.examples, "parts": split.parts}


def oracle(prod, part: str, rows: slice, name: str) -> Path:
    ex = prod["ex"]
    idx = prod["parts"][part][rows]
    return write_labels(prod["tmp"] / name,
                        [(ex.ids[i], ex.class_names[ex.labels[i]]) for i in idx])


def test_test_rows_are_refused_before_training(prod, monkeypatch):
    monkeypatch.setattr("ftlab.train.run", lambda *a, **k: pytest.fail("training started"))
    bad = oracle(prod, "test", slice(0, 2), "with_test.csv")
    app = RetrainAppConfig(ref="digits", registry=str(prod["root"]), labels=str(bad),
                           out=str(prod["tmp"] / "refused"))
    with pytest.raises(ConfigError) as e:
        retrain.run_app(app)
    assert e.value.key == "dataset.extra_train" and "test split" in str(e.value)
    assert not (prod["root"] / "digits" / retrain.POOL).exists()  # bad labels not kept
    assert [v["version"] for v in registry.versions(prod["root"], "digits")] == [1]


@pytest.mark.parametrize("app, key", [
    ({"gate": GateConfig(metric="auc")}, "gate.metric"),
    ({"gate": GateConfig(split="train")}, "gate.split"),
    ({"ref": "digits@production"}, "ref"),
    ({"ref": "nope"}, "ref"),
    ({"baseline": "staging"}, "ref"),
])
def test_bad_config_fails_before_training(prod, monkeypatch, app, key):
    monkeypatch.setattr("ftlab.train.run", lambda *a, **k: pytest.fail("training started"))
    labels = oracle(prod, "val", slice(0, 2), "ok.csv")
    with pytest.raises(ConfigError) as e:
        retrain.run_app(RetrainAppConfig(**{"ref": "digits", "registry": str(prod["root"]),
                                            "labels": str(labels), **app}))
    assert e.value.key == key


def test_retrain_gate_keeps_production_then_promotes_and_rolls_back(prod, monkeypatch):
    """Two real retrains: the first candidate cannot meet an impossible margin (production
    stays; the candidate is registered with its lineage and labels; the report says why);
    the second gets the first's labels too, is judged better (comparison stubbed: which
    model wins 3 steps of training is chance) and promoted; rollback restores v1."""
    root = prod["root"]
    first = oracle(prod, "val", slice(0, 6), "first.csv")
    res = retrain.run_app(RetrainAppConfig(
        ref="digits", registry=str(root), labels=str(first), out=str(prod["tmp"] / "r1"),
        gate=GateConfig(margin=1.0)))
    assert not res["passed"] and not res["promoted"] and "margin 1.0" in res["reason"]
    assert registry.locate("digits", root)[2] == "1"
    assert registry.locate("digits@candidate", root)[2] == "2"
    assert registry.show(root, "digits:2")["lineage"] == [2, 1]
    report = (prod["tmp"] / "r1" / "report.md").read_text()
    assert "**Not promoted**" in report and "margin 1.0" in report
    assert json.loads((prod["tmp"] / "r1" / "retrain.json").read_text())["compare"]["n"] > 0
    # the candidate trained with production's config but for extra_train, and the labeled
    # val rows moved into its train split; its test split is production's, row for row
    base_cfg, cand_cfg = load_config(registry.locate("digits", root)[0]), load_config(
        registry.locate("digits:2", root)[0])
    assert cand_cfg.dataset.extra_train == str(prod["tmp"] / "r1" / "labels.csv")
    assert cand_cfg.optimizer == base_cfg.optimizer and cand_cfg.schedule == base_cfg.schedule
    base_m, cand_m = (load_split(c.dataset).parts for c in (base_cfg, cand_cfg))
    assert np.array_equal(base_m["test"], cand_m["test"])
    assert set(prod["parts"]["val"][:6]) <= set(cand_m["train"])

    # The second retrain: its labels are the first's plus its own, though v2 was refused.
    second = oracle(prod, "val", slice(6, 9), "second.csv")
    monkeypatch.setattr(retrain, "compare", lambda *a, **k: {
        "n": 10, "ids": [], "baseline": {"accuracy": 0.5, "macro_f1": 0.5},
        "candidate": {"accuracy": 0.9, "macro_f1": 0.9},
        "mcnemar": {"only_baseline_right": 0, "only_candidate_right": 4, "p_value": 0.125}})
    res = retrain.run_app(RetrainAppConfig(ref="digits", registry=str(root),
                                           labels=str(second), out=str(prod["tmp"] / "r2")))
    assert res["promoted"] and res["total_labels"] == 9 and res["new_labels"] == 3
    assert registry.locate("digits", root)[2] == "3"
    assert registry.show(root, "digits:3")["lineage"] == [3, 1]  # production's child
    registry.rollback(root, "digits")
    assert registry.locate("digits", root)[2] == "1"


def test_cli_exit_status_and_one_line_error(prod, tmp_path):
    exe = Path(sys.executable).parent / "ftlab-retrain"
    r = subprocess.run([str(exe), "ref=digits", f"registry={prod['root']}",
                        f"labels={tmp_path / 'none.csv'}"], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: dataset.extra_train:")
    assert len(r.stderr.strip().splitlines()) == 1
