"""LoRA and bottleneck adapters: frozen base stays bit-identical, merging is exact, saved
adapters and merged weights load back, rules fail loudly."""
import dataclasses
import json
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import compose_cfg
from ftlab import models, param_groups
from ftlab.checkpoint import Checkpoints
from ftlab.models import efficientnet
from ftlab.models.loading import WEIGHTS, param_paths
from ftlab.models.loading import LoadError
from ftlab.peft import (AdapterLinear, LoRALinear, apply_adapters, apply_lora, export,
                        load_adapters, load_weights, lora_state, merge_lora)
from ftlab.schema import (AdapterRule, ConfigError, GroupRule, LoraRule, PhaseConfig,
                          ScheduleConfig)
from ftlab.train import build_model, run

FAST = ("experiment=digits_tiny", "dataset.subset=400", "trainer.batch_size=32",
        "trainer.progress=false")
QV = r"layers/[01]/attention/(query|value)"
SUBLAYERS = r"layers/\d+/(attention/out|fc2)"
NOT_LORA = r"(?!.*/lora_[ab]$)"


def lora_cfg(groups: dict, phases: dict, **rule):
    cfg = compose_cfg(*FAST)
    cfg.peft.lora = {"qv": LoraRule(pattern=QV, **rule)}
    cfg.schedule = ScheduleConfig(groups={k: GroupRule(**v) for k, v in groups.items()},
                                  phases={k: PhaseConfig(**v) for k, v in phases.items()})
    return cfg


ADAPTERS_ONLY = {"lora": {"pattern": ".*/lora_[ab]", "train_from": "train"},
                 "head": {"pattern": "head/.*", "train_from": "train"},
                 "frozen": {"pattern": f"(?!head/){NOT_LORA}.*", "train_from": None}}


def flat(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def randomize_adapters(model, seed: int = 0) -> None:
    """Move LoRA's `lora_b` and the bottleneck adapters' `up` off their zero init."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoRALinear):
            m.lora_b[...] = rng.normal(0, 0.5, m.lora_b.shape).astype(np.float32)
        elif isinstance(m, AdapterLinear):
            m.adapter.up.kernel[...] = rng.normal(0, 0.5, m.adapter.up.kernel.shape
                                                  ).astype(np.float32)


def tokens_batch(n: int = 4, t: int = 64):
    ids = np.random.default_rng(0).integers(0, 64, (n, t)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones((n, t), np.int32)}


def test_training_changes_only_adapters_and_head(tmp_path):
    cfg = lora_cfg(ADAPTERS_ONLY, {"train": {"epochs": 2, "lr": 1e-2}})
    results = run(cfg, tmp_path)
    ckpts = Checkpoints(tmp_path / "ckpt", cfg.trainer.monitor, cfg.trainer.monitor_mode, 1)
    target = build_model(cfg, 10, abstract=True)
    after = flat(ckpts.restore_latest(nnx.state(target, WEIGHTS))[0])
    ckpts.close()
    before = flat(nnx.state(models.build(cfg.model, 10, cfg.trainer.seed), nnx.Param))
    base = [p for p in before if not p.startswith("head/")]
    assert len(base) > 30 and set(before) < set(after)
    for p in base:
        assert np.array_equal(before[p], after[p]), p
    lora_b = [p for p in after if p.endswith("/lora_b")]
    assert len(lora_b) == 4 and all(np.abs(after[p]).max() > 0 for p in lora_b)
    saved = (tmp_path / "lora.safetensors")
    from safetensors.numpy import load_file
    adapters = load_file(str(saved))
    assert sorted(adapters) == sorted(p for p in after if re.search(r"/lora_[ab]$", p))
    assert set(load_file(str(tmp_path / "merged.safetensors"))) == set(before)
    assert results["merged/test/max_abs_logit_diff"] < 1e-4
    assert results["merged/test/accuracy"] == pytest.approx(results["test/accuracy"], abs=0.01)
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_merged_model_equals_unmerged_and_is_the_base_architecture():
    cfg = compose_cfg(*FAST)
    base = models.build(cfg.model, 10, 0)
    model = models.build(cfg.model, 10, 0)
    wrapped = apply_lora(model, {"qv": LoraRule(pattern=QV, rank=4, alpha=8.0)})
    assert wrapped == {"qv": [f"layers/{i}/attention/{n}" for i in (0, 1)
                              for n in ("query", "value")]}
    batch = tokens_batch()
    assert np.array_equal(model(batch), base(batch))  # lora_b starts at zero
    randomize_adapters(model)
    unmerged = np.asarray(model(batch))
    assert np.abs(unmerged - base(batch)).max() > 1e-3
    assert sum(np.size(v) for v in flat(lora_state(model)).values()) == 4 * 4 * (32 + 32)
    merged = merge_lora(model)
    np.testing.assert_allclose(np.asarray(merged(batch)), unmerged, atol=1e-5)
    shapes = param_paths(merged)
    assert shapes == param_paths(base)
    assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(merged))
    assert type(merged.layers[0].attention.query) is nnx.Linear


def test_rule_matching_no_kernel_is_a_config_error():
    model = models.build(compose_cfg(*FAST).model, 10, 0)
    with pytest.raises(ConfigError) as e:
        apply_lora(model, {"attn": LoraRule(pattern="layers/[01]/attention/q")})
    assert e.value.key == "peft.lora.attn"
    assert "matches no Dense/1x1 kernel" in str(e.value) and "layers/*/fc1" in str(e.value)
    assert "\n" not in str(e.value)


def test_lora_composes_with_progressive_unfreezing(tmp_path):
    groups = {"lora": {"pattern": ".*/lora_[ab]", "train_from": "adapters"},
              "head": {"pattern": "head/.*", "train_from": "adapters"},
              "top": {"pattern": f"{NOT_LORA}layers/1/.*", "lr_mult": 0.5, "train_from": "top"},
              "rest": {"pattern": f"{NOT_LORA}(embeddings|layers/0)/.*", "train_from": None}}
    phases = {"adapters": {"epochs": 1, "lr": 1e-2}, "top": {"epochs": 1, "lr": 1e-2}}
    cfg = lora_cfg(groups, phases, dropout=0.1)
    shapes = param_paths(build_model(cfg, 10, abstract=True))
    g = param_groups.assign(shapes, cfg.schedule.groups, cfg.schedule.phases)
    assert set(g.assignment) == set(shapes)
    assert {p for p in g.trainable(1) - g.trainable(0)} == \
        {p for p in shapes if p.startswith("layers/1/") and "lora_" not in p}
    results = run(cfg, tmp_path)
    assert results["steps"] > 0 and results["merged/test/max_abs_logit_diff"] < 1e-4


def test_lora_composes_with_multitask_heads(tmp_path):
    from ftlab.schema import TaskConfig
    from ftlab.tasks import load as load_tasks
    groups = {"lora": {"pattern": ".*/lora_[ab]", "train_from": "train"},
              "head": {"pattern": "head/.*", "train_from": "train"},
              "frozen": {"pattern": f"(?!head/|loss_weights/){NOT_LORA}.*", "train_from": None}}
    cfg = lora_cfg(groups, {"train": {"epochs": 2, "lr": 1e-2}})
    cfg.tasks = {"digit": TaskConfig(), "parity": TaskConfig(label="parity"),
                 "ink": TaskConfig(type="regression", label="ink")}
    cfg.weighting.scheme = "uncertainty"
    results = run(cfg, tmp_path)
    specs = load_tasks(tmp_path / "tasks.json")
    target = build_model(cfg, 10, abstract=True, task_specs=specs)
    shapes = param_paths(target)
    assert {"head/parity/layers/1/kernel", "loss_weights/log_var"} <= set(shapes)
    assert sum(p.endswith("/lora_b") for p in shapes) == 4
    ckpts = Checkpoints(tmp_path / "ckpt", cfg.trainer.monitor, cfg.trainer.monitor_mode, 1)
    after = flat(ckpts.restore_latest(nnx.state(target, WEIGHTS))[0])
    ckpts.close()
    before = flat(nnx.state(models.build(cfg.model, 10, cfg.trainer.seed), nnx.Param))
    base = [p for p in before if not p.startswith("head/")]
    for p in base:
        assert np.array_equal(before[p], after[p]), p
    assert all(np.abs(after[p]).max() > 0 for p in after if p.endswith("/lora_b"))
    assert np.all(after["loss_weights/log_var"] != 0)
    assert {"test/parity/accuracy", "test/ink/mae"} <= set(results)
    assert results["merged/test/max_abs_logit_diff"] < 1e-4


def test_lora_on_efficientnet_pointwise_convs():
    size = efficientnet.VARIANTS["tiny"]
    build = lambda: efficientnet.EfficientNetLite(size, 3, rngs=nnx.Rngs(0))
    base, model = build(), build()
    wrapped = apply_lora(model, {"project": LoraRule(pattern=r"blocks/\d+/project", rank=2)})
    assert len(wrapped["project"]) == len(model.blocks)
    assert set(param_paths(base)) < set(param_paths(model))  # base paths kept, adapters added
    randomize_adapters(model)
    batch = {"image": np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)}
    unmerged = np.asarray(model(batch))
    merged = merge_lora(model)
    np.testing.assert_allclose(np.asarray(merged(batch)), unmerged, atol=1e-5)
    assert param_paths(merged) == param_paths(base)
    count = lambda m: sum(math.prod(s) for s in param_paths(m).values())
    assert count(merged) == count(base)
    assert type(merged.blocks[1].project) is efficientnet.Pointwise


def test_adapter_dropout_follows_the_trainable_set():
    from ftlab.step import set_modes
    model = models.build(compose_cfg(*FAST).model, 10, 0)
    apply_lora(model, {"qv": LoraRule(pattern=QV, dropout=0.2)})
    set_modes(model, {"layers/0/attention/query/lora_a"})
    on = {"/".join(map(str, p)) for p, m in nnx.iter_modules(model)
          if isinstance(m, nnx.Dropout) and not m.deterministic}
    assert "layers/0/attention/query/dropout" in on
    assert "layers/1/attention/query/dropout" not in on
    out = model.forward(tokens_batch(), rngs=nnx.Rngs(dropout=jax.random.key(1)))
    assert np.isfinite(np.asarray(out)).all()


def test_adapter_dropout_mask_changes_every_step():
    """The adapter's own dropout stream is reseeded from the step key (not a fixed mask)."""
    import optax
    from ftlab.step import make_train_step, split_for_training
    cfg = compose_cfg(*FAST, "model.dropout=0.0")  # only the adapters' dropout is random
    model = models.build(cfg.model, 10, 0)
    apply_lora(model, {"qv": LoraRule(pattern=QV, dropout=0.5)})
    randomize_adapters(model)
    paths = {p for p in param_paths(model) if "lora_" in p}
    graphdef, trainable, stats, rest = split_for_training(model, paths)
    step = make_train_step(graphdef, optax.sgd(0.0), cfg.tasks["main"])
    batch = {**tokens_batch(), "label": np.zeros(4, np.int32), "weight": np.ones(4, np.float32)}
    losses = set()
    for k in range(3):
        t = jax.tree.map(lambda x: x.copy(), trainable)
        *_, m = step(t, optax.sgd(0.0).init(t), jax.tree.map(lambda x: x, stats), rest, batch,
                     jax.random.key(k))
        losses.add(float(m["loss"]))
    assert len(losses) == 3


def test_merged_weights_file_has_the_base_names_and_loads_into_a_plain_model(tmp_path):
    """Deployment needs no adapter code: merged.safetensors holds exactly the base model's
    weights (no lora_*), and a plain model loaded from it computes the merged outputs."""
    cfg = compose_cfg(*FAST)
    base = models.build(cfg.model, 10, 0)
    model = models.build(cfg.model, 10, 0)
    apply_lora(model, {"qv": LoraRule(pattern=QV, rank=4)})
    randomize_adapters(model)
    batch = tokens_batch()
    logits = lambda m: np.asarray(m(batch))
    out = export(model, cfg.peft, tmp_path, lambda m: (logits(m), np.zeros(4)))
    from safetensors.numpy import load_file
    names = set(load_file(str(tmp_path / "merged.safetensors")))
    assert names == set(param_paths(base, WEIGHTS))
    assert not any("lora_" in n for n in names)
    plain = models.abstract(cfg.model, 10)  # no weights of its own
    load_weights(plain, tmp_path / "merged.safetensors")
    np.testing.assert_array_equal(logits(plain), logits(merge_lora(nnx.clone(model))))
    np.testing.assert_allclose(logits(plain), logits(model), atol=1e-5)
    assert out["merged/test/max_abs_logit_diff"] < 1e-5 and "peft/unmerged" not in out


def test_bottleneck_adapters_start_as_identity_after_attention_out_and_fc2():
    cfg = compose_cfg(*FAST)
    base = models.build(cfg.model, 10, 0)
    model = models.build(cfg.model, 10, 0)
    placed = apply_adapters(model, {"sub": AdapterRule(pattern=SUBLAYERS, size=8)})
    assert sorted(placed["sub"]) == ["layers/0/attention/out", "layers/0/fc2",
                                     "layers/1/attention/out", "layers/1/fc2"]
    batch = tokens_batch()
    assert np.array_equal(model(batch), base(batch))  # `up` starts at zero
    shapes, base_shapes = param_paths(model), param_paths(base)
    assert {p: shapes[p] for p in base_shapes} == base_shapes  # base kept under its paths
    assert {p: s for p, s in shapes.items() if p.startswith("layers/0/fc2/")} == {
        "layers/0/fc2/kernel": (64, 32), "layers/0/fc2/bias": (32,),
        "layers/0/fc2/adapter/down/kernel": (32, 8), "layers/0/fc2/adapter/down/bias": (8,),
        "layers/0/fc2/adapter/up/kernel": (8, 32), "layers/0/fc2/adapter/up/bias": (32,)}
    randomize_adapters(model)
    assert np.abs(np.asarray(model(batch)) - base(batch)).max() > 1e-3


def test_adapter_rule_matching_nothing_is_a_config_error():
    model = models.build(compose_cfg(*FAST).model, 10, 0)
    with pytest.raises(ConfigError) as e:
        apply_adapters(model, {"post": AdapterRule(pattern="layers/[01]/attention/output")})
    assert e.value.key == "peft.adapters.post"
    assert "matches no Dense/1x1 kernel" in str(e.value) and "layers/*/fc2" in str(e.value)
    with pytest.raises(ConfigError) as e:
        apply_adapters(model, {"post": AdapterRule(pattern=SUBLAYERS, activation="swish")})
    assert e.value.key == "peft.adapters.post.activation"


def test_adapters_schedule_trains_only_adapters_norms_and_head(tmp_path):
    cfg = compose_cfg(*FAST, "peft=adapters", "schedule=minilm_adapters",
                      "peft.adapters.sublayers.size=8", "schedule.phases.train.epochs=1",
                      "schedule.phases.train.lr=1e-2")
    results = run(cfg, tmp_path)
    ckpts = Checkpoints(tmp_path / "ckpt", cfg.trainer.monitor, cfg.trainer.monitor_mode, 1)
    after = flat(ckpts.restore_latest(nnx.state(build_model(cfg, 10, abstract=True),
                                                WEIGHTS))[0])
    ckpts.close()
    before = flat(nnx.state(models.build(cfg.model, 10, cfg.trainer.seed), nnx.Param))
    norms = [p for p in before if re.fullmatch(r"(?!head/).*norm/(scale|bias)", p)]
    frozen = [p for p in before if p not in norms and not p.startswith("head/")]
    assert len(norms) == 10 and len(frozen) > 20
    for p in frozen:
        assert np.array_equal(before[p], after[p]), p
    assert all(not np.array_equal(before[p], after[p]) for p in norms)
    adapters = sorted(p for p in after if "/adapter/" in p)
    assert len(adapters) == 4 * 4
    assert all(np.abs(after[p]).max() > 0 for p in adapters if "/up/" in p)
    from safetensors.numpy import load_file
    assert sorted(load_file(str(tmp_path / "adapters.safetensors"))) == adapters
    assert sorted(load_file(str(tmp_path / "merged.safetensors"))) == sorted(after)
    assert not (tmp_path / "lora.safetensors").exists()
    assert "not merged" in results["peft/unmerged"] and "merged/test/accuracy" not in results


def test_lora_and_adapters_compose_save_and_load_back(tmp_path):
    cfg = compose_cfg(*FAST, "peft=[lora_attention,adapters]", "peft.adapters.sublayers.size=8")
    base = models.build(cfg.model, 10, 0)
    model = build_model(cfg, 10)
    assert sum(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model)) == 4
    assert sum(isinstance(m, AdapterLinear) for _, m in nnx.iter_modules(model)) == 4
    batch = tokens_batch()
    assert np.array_equal(model(batch), base(batch))
    randomize_adapters(model)
    logits = lambda m: np.asarray(m(batch))
    out = export(model, cfg.peft, tmp_path, lambda m: (logits(m), np.zeros(4)))
    assert out["merged/test/max_abs_logit_diff"] < 1e-5 and "peft/unmerged" in out
    merged = load_weights(build_model(dataclasses.replace(cfg, peft=dataclasses.replace(
        cfg.peft, lora={})), 10, abstract=True), tmp_path / "merged.safetensors")
    assert any("/adapter/" in p for p in merged) and not any("lora_" in p for p in merged)
    fresh = build_model(cfg, 10)
    loaded = load_adapters(fresh, tmp_path)  # the run dir: both files
    assert len(loaded) == 4 * 2 + 4 * 4
    np.testing.assert_array_equal(logits(fresh), logits(model))
    # A module cannot carry both.
    with pytest.raises(ConfigError) as e:
        apply_adapters(model, {"qv": AdapterRule(pattern=QV)})
    assert e.value.key == "peft.adapters.qv" and "already has LoRA" in str(e.value)


def test_load_adapters_is_strict_and_names_every_mismatch(tmp_path):
    cfg = compose_cfg(*FAST, "peft=[lora_attention,adapters]", "peft.adapters.sublayers.size=8")
    export(build_model(cfg, 10), dataclasses.replace(cfg.peft, merge=False), tmp_path, None)
    with pytest.raises(LoadError) as e:  # one file only: the adapters are missing
        load_adapters(build_model(cfg, 10), tmp_path / "lora.safetensors")
    assert "'layers/1/fc2/adapter/up/kernel' missing" in str(e.value)
    other = dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, adapters={
        "mlp": AdapterRule(pattern=r"layers/\d+/fc2", size=4)}))
    with pytest.raises(LoadError) as e:  # other peft config: shapes and names differ
        load_adapters(build_model(other, 10), tmp_path)
    msg = str(e.value)
    assert "'layers/0/fc2/adapter/down/kernel': shape (32, 8) in the file, (32, 4) in " \
           "the model" in msg
    assert "'layers/0/attention/out/adapter/up/bias' is not in the model" in msg
    assert "\n" not in msg
