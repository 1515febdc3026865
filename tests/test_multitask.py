"""Multi-task heads on one backbone: masked labels, loss weighting schemes, per-task metrics,
and the domain-shift split / sampling options."""
import csv
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import compose_cfg
from ftlab import param_groups, tasks
from ftlab.checkpoint import Checkpoints
from ftlab.data.prepare import load_split, prepare
from ftlab.models.loading import WEIGHTS, param_paths
from ftlab.runs import evaluate_run
from ftlab.app_schema import EvalAppConfig
from ftlab.schema import ConfigError, TaskConfig
from ftlab.tasks import Task, task_loss
from ftlab.train import build_model, epoch_order, run
from test_user_data import make_folder

TINY = ("experiment=elpv_tiny", "debug=smoke", "dataset.image_size=16", "logger.mode=disabled",
        "eval.baselines=false", "eval.latency=false", "eval.plots=false")


def make_table(tmp_path, n=24):
    """32 images in two classes with extra labels: `shape` (a class, every 4th row
    missing), `score` (a number, every 3rd missing), `a`/`b` (0/1 tags) and `site`."""
    make_folder(tmp_path / "imgs", n=n)
    rows = []
    for c in ("ok", "scratch"):
        for i in range(n):
            rows.append({"file": f"imgs/{c}/{i:03d}.png", "label": c,
                         "shape": "" if i % 4 == 0 else ["round", "square", "long"][i % 3],
                         "score": "" if i % 3 == 0 else f"{i / n + (c == 'scratch'):.3f}",
                         "a": str(i % 2), "b": str((i // 2) % 2), "site": ["x", "y"][i % 2]})
    with open(tmp_path / "data.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return tmp_path / "data.csv"


TOY_TASKS = {"defect": TaskConfig(label="label"), "shape": TaskConfig(label="shape"),
             "score": TaskConfig(type="regression", label="score", loss="huber"),
             "tags": TaskConfig(type="multi_label", columns=["a", "b"])}


def multitask_cfg(path, *extra, monitor_weights=None):
    """Tasks come from config files (conf/tasks/*.yaml: OmegaConf cannot add a typed dict
    entry from the command line); here they are set on the composed config."""
    cfg = compose_cfg(*TINY, "dataset=table", f"dataset.path={path}",
                      "dataset.image_column=file", "dataset.env=site", *extra)
    trainer = dataclasses.replace(cfg.trainer, monitor_weights=monitor_weights or {})
    return dataclasses.replace(cfg, tasks=dict(TOY_TASKS), trainer=trainer)


# ---- masked labels ----

@pytest.mark.parametrize("kind", ["classification", "regression", "multi_label"])
def test_masked_labels_contribute_zero_loss_and_gradient(kind):
    rng = np.random.default_rng(0)
    n = 6
    if kind == "classification":
        task = Task("t", kind, "y", ("a", "b", "c"), "xent")
        out = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
        y = jnp.asarray([0, -1, 2, 1, -1, 0])
        missing = np.asarray(y) < 0
    elif kind == "regression":
        task = Task("t", kind, "y", None, "mse", mean=0.5, std=2.0)
        out = jnp.asarray(rng.normal(size=(n, 1)), jnp.float32)
        y = jnp.asarray([0.1, np.nan, 1.0, -2.0, np.nan, 0.3], jnp.float32)
        missing = np.isnan(np.asarray(y))
    else:
        task = Task("t", kind, "y", ("a", "b"), "bce")
        out = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
        y = jnp.asarray([[1, 0], [-1, -1], [0, 1], [1, 1], [-1, -1], [0, 0]], jnp.float32)
        missing = (np.asarray(y) < 0).all(1)
    w = jnp.ones(n)
    loss, count = task_loss(task, out, y, w)
    keep = ~missing
    ref, _ = task_loss(task, out[keep], y[keep], w[keep])
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    grad = jax.grad(lambda o: task_loss(task, o, y, w)[0])(out)
    assert np.all(np.asarray(grad)[missing] == 0.0)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.abs(np.asarray(grad)[keep]).sum() > 0
    # A batch with no label at all for this task: zero loss, zero gradient, no NaN.
    none = jnp.full_like(y, np.nan if kind == "regression" else -1)
    assert float(task_loss(task, out, none, w)[0]) == 0.0
    assert not np.asarray(jax.grad(lambda o: task_loss(task, o, none, w)[0])(out)).any()


def test_dwa_weights_follow_loss_ratios():
    assert np.allclose(tasks.dwa_weights([[1.0, 2.0]], 2.0, 2), 1.0)  # < 2 epochs
    w = tasks.dwa_weights([[1.0, 1.0], [0.5, 0.9]], 2.0, 2)
    assert w.sum() == pytest.approx(2.0) and w[1] > w[0]  # the slower task gets more
    r = np.array([0.5, 0.9])
    expect = 2 * np.exp(r / 2) / np.exp(r / 2).sum()
    np.testing.assert_allclose(w, expect, rtol=1e-6)


# ---- configs ----

@pytest.mark.parametrize("override, key", [
    ("tasks.main.type=ranking", "tasks.main.type"),
    ("tasks.main.loss=mse", "tasks.main.loss"),
    ("weighting.scheme=gradnorm", "weighting.scheme"),
    ("trainer.monitor=val/extra/macro_f1", "trainer.monitor"),
    ("+trainer.monitor_weights={val/nothing: 1.0}", "trainer.monitor_weights"),
])
def test_bad_task_config_is_rejected_naming_the_key(override, key):
    from ftlab.train import check_config
    with pytest.raises(ConfigError) as e:
        check_config(compose_cfg("experiment=digits_tiny", override))
    assert e.value.key == key


def test_task_rules_that_need_the_task_list():
    cfg = compose_cfg("experiment=digits_tiny")
    other = dataclasses.replace(cfg, tasks={"other": TaskConfig(type="regression",
                                                                label="score")})
    with pytest.raises(ConfigError, match="primary") as e:
        tasks.validate(other)
    assert e.value.key == "tasks.other.label"
    tags = dataclasses.replace(cfg, tasks={**cfg.tasks, "tags": TaskConfig(type="multi_label")})
    with pytest.raises(ConfigError) as e:
        tasks.validate(tags)
    assert e.value.key == "tasks.tags.columns"


# ---- end to end ----

def test_multitask_run_learns_uncertainty_weights_in_their_own_group(tmp_path):
    path = make_table(tmp_path)
    cfg = multitask_cfg(path, "weighting=uncertainty", "trainer.monitor=val/combined",
                        "trainer.limit_train_batches=4", "trainer.max_epochs_per_phase=2",
                        monitor_weights={"val/defect/macro_f1": 0.5, "val/score/mae": -0.5})
    split = load_split(cfg.dataset)
    data = prepare(split.examples, split.parts, cfg.dataset, cfg.model, cfg)
    assert [t.name for t in data.tasks] == ["defect", "shape", "score", "tags"]
    shape = data.tasks[1]
    assert shape.classes == ("long", "round", "square")
    model = build_model(cfg, 2, abstract=True, task_specs=data.tasks)
    groups = param_groups.assign(param_paths(model), tasks.groups(cfg), cfg.schedule.phases)
    assert groups.assignment["loss_weights/log_var"] == "loss_weights"
    assert [p for p, g in groups.assignment.items() if g == "loss_weights"] == \
        ["loss_weights/log_var"]
    assert groups.rules["loss_weights"].wd_mult == 0.0
    shapes = param_paths(model)
    assert {"head/defect/layers/0/kernel", "head/score/layers/0/kernel",
            "head/tags/layers/0/bias"} <= set(shapes)
    assert [shapes[f"head/{t}/layers/0/kernel"][-1] for t in TOY_TASKS] == [2, 3, 1, 2]

    results = run(cfg, tmp_path / "run")
    c = Checkpoints(tmp_path / "run" / "ckpt", cfg.trainer.monitor, cfg.trainer.monitor_mode, 1)
    params, _ = c.restore_latest(nnx.state(model, WEIGHTS))
    c.close()
    log_var = np.asarray(params["loss_weights"]["log_var"][...])
    assert log_var.shape == (4,) and np.all(log_var != 0.0)  # learned, from zeros
    for name, metric in [("defect", "macro_f1"), ("shape", "accuracy"), ("score", "mae"),
                         ("tags", "micro_f1")]:
        assert f"test/{name}/{metric}" in results
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert {"val/score/r2", "val/combined", "train/shape/loss", "task_weight/tags"} <= set(last)
    assert last["val/combined"] == pytest.approx(
        0.5 * last["val/defect/macro_f1"] - 0.5 * last["val/score/mae"])
    # the monitored value at the best checkpoint is a result: a sweep's objective
    best = [r for r in rows if r["step"] == results["best_step"]][-1]
    assert results["val/combined"] == pytest.approx(best["val/combined"])
    ev = json.loads((tmp_path / "run" / "eval" / "test" / "eval.json").read_text())
    assert set(ev["tasks"]) == {"defect", "shape", "score", "tags"}
    assert set(ev["tasks"]["score"]["slices"]["site"]) == {"x", "y"}
    assert ev["tasks"]["shape"]["n"] < ev["n"]  # masked rows are not scored
    assert "## Tasks" in (tmp_path / "run" / "eval" / "test" / "report.md").read_text()

    # ftlab-eval on the finished run reproduces every task's test metrics.
    again, _ = evaluate_run(EvalAppConfig(run_dir=str(tmp_path / "run"), split="test",
                                          out=str(tmp_path / "again")))
    for name in ev["tasks"]:
        assert again["tasks"][name]["metrics"] == pytest.approx(ev["tasks"][name]["metrics"])


def test_dwa_run_logs_weights_and_resumes(tmp_path):
    path = make_table(tmp_path)
    cfg = multitask_cfg(path, "weighting=dwa", "trainer.limit_train_batches=2",
                        "trainer.max_epochs_per_phase=3")
    results = run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    w = [[r[f"task_weight/{t}"] for t in ("defect", "shape", "score", "tags")] for r in rows]
    assert w[0] == pytest.approx([1.0] * 4) and w[1] == pytest.approx([1.0] * 4)
    assert sum(w[2]) == pytest.approx(4.0) and w[2] != pytest.approx([1.0] * 4)
    assert "test/tags/macro_f1" in results


# ---- domain shift: source environments, balanced sampling ----

def test_source_envs_restrict_train_val_and_pool_the_rest_for_adaptation(tmp_path):
    path = make_table(tmp_path, n=40)
    base = (*TINY, "dataset=table", f"dataset.path={path}", "dataset.image_column=file",
            "dataset.env=site")
    full = load_split(compose_cfg(*base).dataset)
    split = load_split(compose_cfg(*base, "dataset.source_envs=[x]").dataset)
    site = split.examples.columns["site"]
    assert set(site[split.parts["train"]]) == {"x"} and set(site[split.parts["val"]]) == {"x"}
    assert np.array_equal(split.parts["test"], full.parts["test"])  # every env, unchanged
    assert set(site[split.parts["adapt"]]) == {"y"}
    assert np.array_equal(np.sort(np.concatenate([split.parts[s] for s in
                                                  ("train", "val", "adapt")])),
                          np.sort(np.concatenate([full.parts["train"], full.parts["val"]])))
    with pytest.raises(ConfigError) as e:
        load_split(compose_cfg(*base, "dataset.source_envs=[z]").dataset)
    assert e.value.key == "dataset.source_envs" and "x, y" in str(e.value)


def test_balance_envs_draws_every_environment_equally(tmp_path):
    path = make_table(tmp_path, n=40)
    cfg = compose_cfg(*TINY, "dataset=table", f"dataset.path={path}",
                      "dataset.image_column=file", "dataset.env=site", "dataset.balance_envs=true",
                      "dataset.subset=null")
    split = load_split(cfg.dataset)
    keep = split.parts["train"]
    keep = keep[(split.examples.columns["site"][keep] == "x") |
                (np.arange(len(keep)) % 3 == 0)]  # make site y rare
    data = prepare(split.examples, {"train": keep}, cfg.dataset, cfg.model)
    train = data.parts["train"]
    env = train.arrays["env"]
    assert np.bincount(env)[0] > 2 * np.bincount(env)[1]
    idx = epoch_order(cfg, train, 0, 0)
    counts = np.bincount(env[idx])
    assert counts[0] == counts[1] == np.bincount(env).max()
    assert np.array_equal(idx, epoch_order(cfg, train, 0, 0))  # a pure function: resumable
