"""Active learning on toy logs: the three uncertainty orderings, diversity across clusters,
labeled rows skipped, one row per sample, the annotators' CSV."""
import csv

import numpy as np
import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

from ftlab import active, predlog
from ftlab.app_schema import SelectAppConfig
from ftlab.schema import ConfigError, from_omegaconf

CLASSES = ["a", "b", "c"]
# confidence, margin, entropy (nats) of each row, by hand:
PROBS = np.array([[0.50, 0.25, 0.25],   # 0.50, 0.25, 1.040
                  [0.40, 0.39, 0.21],   # 0.40, 0.01, 1.061
                  [0.45, 0.45, 0.10],   # 0.45, 0.00, 0.949
                  [0.90, 0.05, 0.05],   # 0.90, 0.85, 0.394
                  [0.36, 0.33, 0.31]])  # 0.36, 0.03, 1.097


def log_rows(log, probs, ids, proj=None, stream="s", ts=None):
    proj = np.zeros((len(ids), 2)) if proj is None else proj
    predlog.append(log, model="m", version="run", stream=stream, class_names=CLASSES,
                   sample_ids=ids, probs=probs, proj=proj, inputs=[f"img/{i}.png" for i in ids],
                   envs=["mono"] * len(ids), ts=ts)


@pytest.fixture
def window(tmp_path):
    log = tmp_path / "log.db"
    log_rows(log, PROBS, [f"r{i}" for i in range(5)])
    return predlog.read(log)


@pytest.mark.parametrize("strategy, order", [("least_confidence", [4, 1, 2, 0, 3]),
                                             ("margin", [2, 1, 4, 0, 3]),
                                             ("entropy", [4, 1, 0, 2, 3])])
def test_orderings_match_hand_computed(window, strategy, order):
    assert list(active.select(window, 5, strategy)) == order
    assert list(active.select(window, 2, strategy)) == order[:2]


def test_scores(window):
    assert active.scores(window, "entropy")[0] == pytest.approx(1.5 * np.log(2))
    assert active.scores(window, "margin")[3] == pytest.approx(0.15)
    assert active.scores(window, "least_confidence")[4] == pytest.approx(0.64)
    with pytest.raises(ConfigError, match="strategy"):
        active.scores(window, "random")
    with pytest.raises(ConfigError, match="^n:"):
        active.select(window, 0, "margin")


def test_diversity_covers_both_clusters(tmp_path):
    """20 rows near (0, 0), slightly less sure, and 20 near (10, 10): plain margin takes
    only the first cluster; k-center greedy takes both."""
    rng = np.random.default_rng(0)
    m = np.concatenate([rng.uniform(0.0, 0.02, 20), rng.uniform(0.03, 0.05, 20)])
    top = (1 + m) / 3 + 0.02
    probs = np.stack([top, top - m, 1 - 2 * top + m], 1)
    proj = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(10, 0.1, (20, 2))])
    log = tmp_path / "log.db"
    log_rows(log, probs, [f"x{i}" for i in range(40)], proj)
    win = predlog.read(log)
    plain = active.select(win, 4, "margin")
    assert (plain < 20).all()
    picked = active.select(win, 4, "margin", diversity=True, pool=10)
    assert len(set(picked)) == 4 and (picked < 20).any() and (picked >= 20).any()
    assert picked[0] == plain[0]  # starts from the most uncertain
    assert (active.select(win, 4, "margin", diversity=True, pool=1) < 20).all()  # pool = n


def test_labeled_skipped_and_one_row_per_sample(tmp_path):
    log = tmp_path / "log.db"
    log_rows(log, PROBS, [f"r{i}" for i in range(5)])
    log_rows(log, np.array([[0.98, 0.01, 0.01]]), ["r4"])  # r4 again, now sure of it
    predlog.add_labels(log, "s", ["r2"], [1])
    win = predlog.read(log)
    ids = list(win.sample_id[active.select(win, 10, "margin")])
    assert ids == ["r1", "r0", "r3", "r4"]  # r2 labeled; r4 once, with its newest scores
    ids = list(win.sample_id[active.select(win, 10, "margin", include_labeled=True)])
    assert ids == ["r2", "r1", "r0", "r3", "r4"]


def test_run_app_writes_the_csv(tmp_path):
    log = tmp_path / "log.db"
    log_rows(log, PROBS, [f"r{i}" for i in range(5)])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.yaml").touch()  # a run dir, for ftlab.registry.locate
    out = tmp_path / "queue" / "q.csv"
    # the rows above were logged as model "m": log some under the run dir too
    predlog.append(log, model=str(model.resolve()), version="run", stream="s2",
                   class_names=CLASSES, sample_ids=["a", "b", "c"], probs=PROBS[:3],
                   proj=np.zeros((3, 2)))
    app = SelectAppConfig(ref=str(model.resolve()), log=str(log), n=2, strategy="entropy",
                          out=str(out), registry=str(tmp_path / "reg"))
    res = active.run_app(app)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(active.COLUMNS)
    assert [r["sample_id"] for r in rows] == ["b", "a"] and [r["rank"] for r in rows] == ["1", "2"]
    assert rows[0]["pred_name"] == "a" and rows[0]["stream"] == "s2" and rows[0]["label"] == ""
    assert float(rows[0]["score"]) == pytest.approx(float(rows[0]["entropy"]))
    assert res["selected"] == 2 and res["eligible"] == 3 and str(out) in active.summary(res)
    for bad, key in (({"strategy": "random"}, "strategy"), ({"n": 0}, "n"),
                     ({"log": str(tmp_path / "none.db")}, "log"),
                     ({"stream": "nope"}, "stream")):
        with pytest.raises(ConfigError) as e:
            active.run_app(SelectAppConfig(**{**vars(app), **bad}))
        assert e.value.key == key


def test_select_config_composes():
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("select", overrides=["n=7", "strategy=entropy"])
    with pytest.raises(ConfigError, match="^ref: is required"):
        from_omegaconf(cfg)
    cfg.ref = "m"
    app = from_omegaconf(cfg)
    assert isinstance(app, SelectAppConfig) and app.n == 7 and app.strategy == "entropy"
