"""`ftlab-predict` on a real tiny image run: logged predictions equal the evaluation's,
the log only grows, the drift reference is deterministic and matches the logged val split,
new inputs (folder / CSV) need no labels, and bad inputs fail before any model loads."""
import csv
import shutil

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import CONF_DIR, compose_cfg
from ftlab import predlog
from ftlab.app_schema import EvalAppConfig, PredictAppConfig
from ftlab.predict import run_app, summary, write_reference
from ftlab.runs import load_config
from ftlab.schema import ConfigError, EvalConfig, from_omegaconf
from ftlab.train import run

TINY = ("experiment=elpv_tiny", "debug=smoke", "dataset=folder", "dataset.image_size=16",
        "schedule=full", "schedule.phases.train.epochs=2", "schedule.phases.train.lr=0.01",
        "eval.baselines=false", "eval.latency=false", "eval.plots=false")


def _images(root, n=20):
    """Two classes of 32 px greyscale images; 'dent' has a bright square."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ok", "dent")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = np.kron((rng.random((8, 8)) * 120).astype(np.uint8), np.ones((4, 4), np.uint8))
            if c:
                img[8:24, 8:24] = 250
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    root = _images(base / "parts")
    run_dir = base / "run"
    run(compose_cfg(*TINY, f"dataset.path={root}"), run_dir)
    return run_dir, root


def _app(run_dir, log, **kw):
    dataset = load_config(run_dir).dataset if "inputs" not in kw else None
    return PredictAppConfig(ref=str(run_dir), log=str(log), dataset=dataset, **kw)


def test_logged_split_equals_the_evaluation(tiny, tmp_path):
    from ftlab.runs import evaluate_run
    run_dir, _ = tiny
    res = run_app(_app(run_dir, tmp_path / "p.db", split="test", labels=False))
    rows = predlog.read(tmp_path / "p.db")
    assert res["n"] == len(rows) > 0 and res["version"] == "run"
    assert np.allclose(rows.probs.sum(1), 1.0, atol=1e-5)
    assert (rows.label == -1).all()  # labels=false: none arrived
    evaluate_run(EvalAppConfig(run_dir=str(run_dir), out=str(tmp_path / "e"),
                               eval=EvalConfig(baselines=False, latency=False, plots=False)))
    with open(tmp_path / "e" / "predictions.csv", newline="") as f:
        ev = {r["id"]: r for r in csv.DictReader(f)}
    assert set(ev) <= set(rows.sample_id) and ev
    names = ["dent", "ok"]
    for i, sid in enumerate(rows.sample_id):
        if sid in ev:
            assert names[rows.pred[i]] == ev[sid]["pred"], sid
            assert np.allclose(rows.probs[i], [float(ev[sid][f"p_{c}"]) for c in names],
                               atol=2e-6)
    assert all(p.endswith(s) for p, s in zip(rows.input, rows.sample_id))
    assert "predictions on folder:test" in summary(res)


def test_second_predict_appends(tiny, tmp_path):
    run_dir, _ = tiny
    log = tmp_path / "p.db"
    run_app(_app(run_dir, log, split="test", labels=False))
    first = predlog.read(log)
    run_app(_app(run_dir, log, split="val", labels=False))
    both = predlog.read(log)
    n = len(first)
    assert len(both) > n and (np.diff(both.id) > 0).all()
    for f in ("id", "ts", "sample_id", "probs", "proj", "version", "stream"):
        assert (getattr(both, f)[:n] == getattr(first, f)).all(), f
    assert set(both.version) == {"run"} and both.ts[n] >= both.ts[n - 1] > 0
    assert set(both.stream[n:]) == {"folder:val"}


def test_reference_is_deterministic_and_matches_logged_val(tiny, tmp_path):
    run_dir, _ = tiny
    ref1 = predlog.load_reference(write_reference(run_dir))
    ref2 = predlog.load_reference(write_reference(run_dir))
    for f in ("probs", "labels", "proj", "mean", "axes"):
        assert np.array_equal(getattr(ref1, f), getattr(ref2, f)), f
    res = run_app(_app(run_dir, tmp_path / "p.db", split="val"))  # labels arrive
    rows = predlog.read(tmp_path / "p.db")
    assert res["labels"] == len(rows) == len(ref1.labels)
    assert np.allclose(rows.proj, ref1.proj, atol=1e-5)
    assert np.allclose(rows.probs, ref1.probs, atol=1e-5)
    assert (rows.label == ref1.labels).all()


def test_registered_version_predicts_with_its_own_reference(tiny, tmp_path):
    from ftlab import registry
    run_dir, _ = tiny
    root = tmp_path / "reg"
    registry.register(root, run_dir, "tiny", ["production"], reference_fn=write_reference)
    res = run_app(PredictAppConfig(ref="tiny@production", registry=str(root),
                                   dataset=load_config(run_dir).dataset, split="val"))
    rows = predlog.read(root / "predictions.db")  # the default log: <registry>/predictions.db
    ref = predlog.load_reference(registry.version_dir(root, "tiny", 1) / "reference.npz")
    assert (res["model"], res["version"]) == ("tiny", "1") and set(rows.version) == {"1"}
    assert np.allclose(rows.proj, ref.proj, atol=1e-5)
    assert "tiny v1: " in summary(res)


def test_folder_and_csv_inputs_need_no_labels(tiny, tmp_path):
    run_dir, root = tiny
    new = tmp_path / "new"
    (new / "sub").mkdir(parents=True)
    shutil.copy(root / "ok" / "000.png", new / "a.png")
    shutil.copy(root / "dent" / "001.png", new / "sub" / "b.png")
    res = run_app(_app(run_dir, tmp_path / "p.db", inputs=str(new)))
    with open(tmp_path / "in.csv", "w", newline="") as f:
        f.write("file,note\nnew/a.png,x\nnew/sub/b.png,y\n")
    run_app(_app(run_dir, tmp_path / "p.db", inputs=str(tmp_path / "in.csv"), id_column="note"))
    # The same two images through the dataset path: identical preprocessing, identical rows.
    run_app(_app(run_dir, tmp_path / "p.db", split="all", labels=False))
    rows = predlog.read(tmp_path / "p.db")
    assert res["stream"] == str(new.resolve()) and res["n"] == 2
    assert list(rows.sample_id[:4]) == ["a.png", "sub/b.png", "x", "y"]
    assert (rows.label[:4] == -1).all()
    ds = {s: p for s, p in zip(rows.sample_id[4:], rows.probs[4:])}
    for i, sid in enumerate(["ok/000.png", "dent/001.png"]):
        assert np.allclose(rows.probs[i], ds[sid]) and np.allclose(rows.probs[i + 2], ds[sid])


def test_text_csv_is_tokenized_with_the_models_tokenizer_and_length(tmp_path):
    from ftlab.predict import new_inputs
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "solar", "cell", "crack", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "new.csv").write_text("id,body\n7,Solar cell cracks\n9,cell\n")
    cfg = compose_cfg("experiment=digits_tiny", f"model.tokenizer={tmp_path / 'vocab.txt'}",
                      "dataset.max_length=8")
    got = new_inputs(PredictAppConfig(ref="m", inputs=str(tmp_path / "new.csv"),
                                      input_column="body"), cfg)
    assert got.ids == ["7", "9"] and got.inputs == ["Solar cell cracks", "cell"]
    assert got.data.arrays["input_ids"].tolist() == [[2, 5, 6, 7, 8, 3, 0, 0],
                                                     [2, 6, 3, 0, 0, 0, 0, 0]]
    # digits' model reads pixel tokens: new text has no tokenizer to go through.
    with pytest.raises(ConfigError) as e:
        new_inputs(PredictAppConfig(ref="m", inputs=str(tmp_path / "new.csv"),
                                    input_column="body"), compose_cfg("experiment=digits_tiny"))
    assert e.value.key == "inputs"


def test_predict_yaml_composes_and_forces_the_models_image_size(tiny, tmp_path):
    run_dir, root = tiny
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("predict", overrides=["dataset=folder", f"dataset.path={root}",
                                            "split=val", f"log={tmp_path / 'p.db'}", "limit=3",
                                            f"ref={run_dir}"])
    app = from_omegaconf(cfg)
    assert app.dataset.image_size == 128  # folder.yaml's; the run used 16
    res = run_app(app)
    assert res["n"] == 3 and res["labels"] == 3 and sum(res["class_mix"].values()) == 3


@pytest.mark.parametrize("kw, key", [
    ({"dataset": False}, "dataset"),  # neither dataset nor inputs
    ({"inputs": "empty"}, "dataset"),  # both
    ({"ref": "nowhere/run"}, "ref"),
    ({"split": "holdout"}, "split"),
    ({"split": "adapt"}, "split"),  # a split name this dataset does not have
    ({"dataset": False, "inputs": "empty"}, "inputs"),
    ({"dataset": False, "inputs": "in.csv"}, "input_column"),  # no text / path column
    ({"dataset": False, "inputs": "in.csv", "input_column": "name"}, "input_column"),
    ({"dataset": False, "inputs": "ok.csv", "id_column": "nope"}, "id_column"),
    ({"env": "poly"}, "env"),  # this folder dataset has no environment column
    ({"dataset": False, "inputs": "ok.csv", "env": "poly"}, "env"),  # env filters datasets
])
def test_bad_inputs_name_the_key_before_loading_a_model(tiny, tmp_path, monkeypatch, kw, key):
    run_dir, _ = tiny
    monkeypatch.setattr("ftlab.runs.load_model", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "in.csv").write_text("a,b\n1,2\n")
    (tmp_path / "ok.csv").write_text("path\nx.png\n")
    kw = {"ref": str(run_dir), "log": str(tmp_path / "p.db"), **kw}
    kw["dataset"] = load_config(run_dir).dataset if kw.pop("dataset", True) else None
    if "inputs" in kw:
        kw["inputs"] = str(tmp_path / kw["inputs"])
    with pytest.raises(ConfigError) as e:
        run_app(PredictAppConfig(**kw))
    assert e.value.key == key, str(e.value)
    assert not (tmp_path / "p.db").exists()
