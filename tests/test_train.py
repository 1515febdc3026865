"""End-to-end training on tiny BERT + digits: freezing, pruned backward, exact resume."""
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import compose_cfg
from ftlab import models, optim, param_groups
from ftlab.checkpoint import Checkpoints
from ftlab.models.loading import WEIGHTS
from ftlab.optim import path_str
from ftlab.schema import ConfigError
from ftlab.step import make_train_step, split_for_training, trainable_filter
from ftlab.train import run

FAST = ("experiment=digits_tiny", "dataset.subset=400", "trainer.batch_size=32",
        "trainer.progress=false")


def latest_params(run_dir, cfg):
    c = Checkpoints(run_dir / "ckpt", cfg.trainer.monitor, cfg.trainer.monitor_mode, 1)
    model = models.abstract(cfg.model, 10)
    params, _ = c.restore_latest(nnx.state(model, WEIGHTS))
    c.close()
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}


def test_frozen_params_bit_identical_after_training(tmp_path):
    cfg = compose_cfg(*FAST, "schedule.groups.rest.train_from=null")  # embeddings + layer 0
    run(cfg, tmp_path)
    init = models.build(cfg.model, 10, cfg.trainer.seed)
    before = {"/".join(map(str, p)): np.asarray(v[...])
              for p, v in nnx.to_flat_state(nnx.state(init, nnx.Param))}
    after = latest_params(tmp_path, cfg)
    frozen = [p for p in before if re.fullmatch(cfg.schedule.groups["rest"].pattern, p)]
    assert len(frozen) == 21
    for p in before:
        assert np.array_equal(before[p], after[p]) == (p in frozen), p


def test_optimizer_state_only_for_trainable_params():
    cfg = compose_cfg(*FAST)
    model = models.build(cfg.model, 10, 0)
    groups = param_groups.assign(models.loading.param_paths(model), cfg.schedule.groups,
                                 cfg.schedule.phases)
    paths = groups.trainable(0)  # head only
    _, trainable, rest = nnx.split(model, trainable_filter(paths), ...)
    tx = optim.build(cfg.optimizer, cfg.schedule.phases["head"], 10, trainable,
                     groups.multipliers(paths, "lr_mult"), groups.multipliers(paths, "wd_mult"))
    state = tx.init(trainable)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    param_leaves = [path_str(k) for k, v in leaves if np.ndim(v) > 0]
    assert param_leaves and all(any(p.endswith("/" + t) for t in paths) for p in param_leaves)
    assert all(p.startswith("head/") for p in paths)
    sizes = sum(np.size(v) for _, v in leaves)
    head = sum(np.size(v[...]) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if _[0] == "head")
    assert sizes < 3 * head  # two Adam moments + scalars, nothing for the frozen backbone


def _compiled_step(cfg, phase: int, compiler_options=None) -> str:
    model = models.build(cfg.model, 10, 0)
    groups = param_groups.assign(models.loading.param_paths(model), cfg.schedule.groups,
                                 cfg.schedule.phases)
    paths = groups.trainable(phase)
    graphdef, trainable, stats, rest = split_for_training(model, paths)
    name, ph = list(cfg.schedule.phases.items())[phase]
    tx = optim.build(cfg.optimizer, ph, 10, trainable, groups.multipliers(paths, "lr_mult"),
                     groups.multipliers(paths, "wd_mult"))
    step = make_train_step(graphdef, tx, cfg.tasks["main"], compiler_options=compiler_options)
    batch = {"input_ids": np.ones((4, 64), np.int32), "attention_mask": np.ones((4, 64), np.int32),
             "label": np.zeros(4, np.int32), "weight": np.ones(4, np.float32)}
    return step.lower(trainable, tx.init(trainable), stats, rest, batch,
                      jax.random.key(0)).compile().as_text()


def _dots_in_compiled_step(cfg, phase: int) -> int:
    hlo = _compiled_step(cfg, phase)
    return len(re.findall(r"\bdot\(", hlo)) + len(re.findall(r"custom-call.*matmul", hlo))


def test_frozen_params_are_not_differentiated():
    """Head-only compiles to far fewer matmuls than full: the backbone backward is gone."""
    cfg = compose_cfg(*FAST)
    head_only, full = _dots_in_compiled_step(cfg, 0), _dots_in_compiled_step(cfg, 2)
    assert head_only < 0.6 * full, (head_only, full)


def test_model_xla_options_reach_the_train_step_compile_and_bad_ones_name_the_key(tmp_path):
    """model.xla_options go to the train step's compile: YNNPACK on the dots only takes the
    reductions (LayerNorm, softmax) that XLA's default hands it back to XLA's own loops."""
    ynn = "xla_cpu_experimental_ynn_fusion_type"
    cfg = compose_cfg(*FAST, f"+model.xla_options.{ynn}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    options = dict(cfg.model.xla_options)
    assert options == {ynn: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert dict(compose_cfg(*FAST).model.xla_options) == {}  # XLA's defaults

    def ynn_reductions(hlo: str) -> int:
        return len(re.findall(r"ynn_fusion[.\d]* = .*reduce", hlo))
    assert ynn_reductions(_compiled_step(cfg, 2)) > 0  # XLA's default
    assert ynn_reductions(_compiled_step(cfg, 2, options)) == 0
    for bad, words in (("+model.xla_options.xla_nope=1", "No such compile option: 'xla_nope'"),
                       (f"+model.xla_options.{ynn}=DOTS", "'DOTS' is not a valid enum value")):
        with pytest.raises(ConfigError) as e:
            run(compose_cfg(*FAST, bad), tmp_path / "run")
        assert e.value.key == "model.xla_options" and words in str(e.value), str(e.value)
    assert not (tmp_path / "run" / "ckpt").exists()


def test_resume_after_interruptions_equals_uninterrupted_run(tmp_path):
    over = (*FAST, "trainer.plateau.patience=0", "trainer.early_stopping.patience=5")
    ref = compose_cfg(*over)
    res_ref = run(ref, tmp_path / "ref")
    # Halt mid-epoch inside phase 2, then at the start of phase 3, then finish.
    for halt in (13, 19):
        out = run(compose_cfg(*over, f"trainer.halt_after_steps={halt}"), tmp_path / "cut")
        assert out == {"halted": True, "step": halt, "preempted": None}
        assert not (tmp_path / "cut" / "results.json").exists()
    res_cut = run(compose_cfg(*over), tmp_path / "cut")
    a, b = latest_params(tmp_path / "ref", ref), latest_params(tmp_path / "cut", ref)
    assert all(np.array_equal(a[p], b[p]) for p in a)
    drop = lambda r: {k: v for k, v in r.items()  # timings and where the report went differ
                      if k not in ("train_seconds", "report", "compiles")
                      and not k.startswith("latency/")}
    assert drop(res_ref) == drop(res_cut)
    lines = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert lines(tmp_path / "ref")[-1] == lines(tmp_path / "cut")[-1]
    # A finished run rerun in place trains no further: it re-evaluates the best checkpoint.
    again = run(compose_cfg(*over), tmp_path / "cut")
    assert drop(again) == drop(res_cut)


def test_resume_with_a_different_config_is_refused(tmp_path):
    run(compose_cfg(*FAST, "trainer.halt_after_steps=3"), tmp_path)
    saved = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError) as e:
        run(compose_cfg(*FAST, "optimizer.weight_decay=0.5"), tmp_path)
    assert e.value.key == "run_dir"
    assert saved == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}


def test_run_dir_records_provenance(tmp_path):
    cfg = compose_cfg(*FAST, "trainer.max_epochs_per_phase=1", "trainer.limit_train_batches=2")
    results = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results and "test/accuracy" in saved and "test/macro_f1" in saved
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["packages"]["jax"] and "sha" in info["git"] and "pretrained" in info
    rows = (tmp_path / "manifest.csv").read_text().splitlines()
    assert rows[0] == "sample_id,split,label" and len(rows) == 401
    assert {r.split(",")[1] for r in rows[1:]} == {"train", "val", "test"}
    assert "name: digits_tiny" in (tmp_path / "config.yaml").read_text()


def test_dropout_only_in_trainable_modules():
    from ftlab.step import set_modes
    cfg = compose_cfg(*FAST)
    model = models.build(cfg.model, 10, 0)
    drops = lambda: {"/".join(map(str, p)): m.deterministic for p, m in nnx.iter_modules(model)
                     if isinstance(m, nnx.Dropout)}
    assert all(drops().values())  # built in inference mode
    set_modes(model, {"head/layers/0/kernel", "layers/1/fc1/kernel",
                        "layers/1/attention/query/kernel"})
    on = {p for p, det in drops().items() if not det}
    assert on == {"head/dropout", "layers/1/dropout", "layers/1/attention/dropout"}
    set_modes(model, None)
    assert all(drops().values())


def test_batchnorm_statistics_fixed_in_frozen_blocks():
    from ftlab.step import set_modes

    class Net(nnx.Module):
        def __init__(self):
            self.frozen = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
            self.trained = nnx.BatchNorm(3, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.trained(self.frozen(x))

    net = Net()
    set_modes(net, {"trained/scale", "trained/bias"})
    net(np.random.default_rng(0).normal(3.0, 2.0, (16, 3)).astype(np.float32))
    assert np.array_equal(net.frozen.mean[...], np.zeros(3))  # running stats untouched
    assert not np.array_equal(net.trained.mean[...], np.zeros(3))


def test_results_report_trainable_size_and_optimizer_bytes_per_phase(tmp_path):
    cfg = compose_cfg(*FAST, "trainer.max_epochs_per_phase=1", "trainer.limit_train_batches=1")
    phases = run(cfg, tmp_path)["phases"]
    assert list(phases) == ["head", "top", "all"]
    sizes = [phases[p]["trainable_params"] for p in phases]
    assert sizes[0] < sizes[1] < sizes[2] and phases["all"]["trainable_fraction"] == 1.0
    for p in phases:  # two Adam moments per trainable float32 param, plus a few scalars
        assert 8 * phases[p]["trainable_params"] <= phases[p]["optimizer_state_bytes"] \
            < 8 * phases[p]["trainable_params"] + 1024


def test_one_train_step_compile_per_phase(tmp_path):
    results = run(compose_cfg(*FAST), tmp_path)
    phases = list(compose_cfg(*FAST).schedule.phases)
    assert set(results["compiles"]) == {*phases, "final_evaluation"}
    for name in phases:
        assert results["compiles"][name]["by_function"]["jit(train_step)"] == 1, name
    assert "jit(train_step)" not in results["compiles"]["final_evaluation"]["by_function"]


def test_run_dir_with_brackets_is_refused_before_any_work(tmp_path):
    """TensorStore writes but cannot read checkpoints under '[' / ']' (a list override in the
    run dir name): sweeps name dirs with parentheses, and such a dir is refused up front."""
    from ftlab.cli import run_dirname
    assert run_dirname("dataset.source_envs=[mono],seed=1") == "dataset.source_envs=(mono),seed=1"
    assert run_dirname("") == "default"
    with pytest.raises(ConfigError) as e:
        run(compose_cfg(*FAST), tmp_path / "source_envs=[mono]")
    assert e.value.key == "run_dir" and not (tmp_path / "source_envs=[mono]").exists()
