"""LoRA adapters: frozen base stays bit-identical, merging is exact, rules fail loudly."""
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
from ftlab.peft import LoRALinear, apply_lora, lora_state, merge_lora
from ftlab.schema import ConfigError, GroupRule, LoraRule, PhaseConfig, ScheduleConfig
from ftlab.train import build_model, run

FAST = ("experiment=digits_tiny", "dataset.subset=400", "trainer.batch_size=32",
        "trainer.progress=false")
QV = r"layers/[01]/attention/(query|value)"
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
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoRALinear):
            m.lora_b[...] = rng.normal(0, 0.5, m.lora_b.shape).astype(np.float32)


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
