"""Int8 models of a finished run: which weights (regex rules over param paths), static
activation scales from val batches, a per-layer sensitivity report, quantization-aware
fine-tuning, and the int8 artifact (`model.safetensors` + `quantized.json`) that
`load_quantized` turns back into a model without the fp32 checkpoint.

Rules work like param groups (`schedule.groups`): a dict of named, anchored regexes over
'/'-joined param paths, here matched against the weights int8 can replace (dense, 1x1, stem
and depthwise kernels, embedding tables). A rule matching none of them is an error; `fp32`
rules exclude what they match and win over the others; two quantizing rules may not
overlap; weights no rule matches stay fp32. The layers are in `ftlab.models.int8`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from ftlab import metrics, optim, param_groups, peft, tasks
from ftlab.data.augment import augment_fn
from ftlab.data.batches import ArrayData, batches, num_batches
from ftlab.loop import predict, train_epoch
from ftlab.models import int8
from ftlab.models.loading import LoadError, param_paths, read_tensors
from ftlab.app_schema import QatConfig, QuantizeConfig
from ftlab.schema import Config, ConfigError, PhaseConfig
from ftlab.step import make_eval_step, make_train_step, set_modes, trainable_filter

log = logging.getLogger(__name__)

WEIGHTS_FILE, META_FILE, FORMAT = "model.safetensors", "quantized.json", "ftlab-int8/1"
SAVED = nnx.Any(nnx.Param, nnx.BatchStat, int8.Int8Weight, int8.QuantScale)


def check(cfg: QuantizeConfig) -> None:
    """Config checks that need no model or data."""
    if not cfg.rules:
        raise ConfigError("quantize.rules", "no rules; pick a rules file (quantize=default) "
                                            "or add `all: {pattern: '.*', mode: w8a8}`")
    for name, rule in cfg.rules.items():
        if rule.mode not in int8.MODES:
            raise ConfigError(f"quantize.rules.{name}.mode",
                              f"'{rule.mode}' is not one of: {', '.join(int8.MODES)}")
    if cfg.activations not in int8.ACTIVATIONS:
        raise ConfigError("quantize.activations", f"'{cfg.activations}' is not one of: "
                                                  f"{', '.join(int8.ACTIVATIONS)}")
    if cfg.calibration_batches < 1:
        raise ConfigError("quantize.calibration_batches", "must be >= 1")
    if cfg.sensitivity_batches is not None and cfg.sensitivity_batches < 1:
        raise ConfigError("quantize.sensitivity_batches", "must be >= 1, or null for all")
    if cfg.onnx and cfg.weight_only:
        raise ConfigError("quantize.onnx", "ONNX Runtime's int8 quantizes weights and "
                                           "activations; weight_only has no counterpart there: "
                                           "set one of them false")
    q = cfg.qat
    if q.epochs < 0 or q.lr <= 0:
        raise ConfigError("quantize.qat", "epochs must be >= 0 (0: no QAT) and lr > 0")
    if q.schedule not in ("cosine", "constant", "linear"):
        raise ConfigError("quantize.qat.schedule",
                          f"'{q.schedule}' is not one of: cosine, constant, linear")


def _join(path) -> str:
    return "/".join(map(str, path))


def quantizable(model: nnx.Module) -> dict[str, nnx.Module]:
    """param path -> module, for every weight int8 can replace."""
    return {f"{_join(path)}/{int8.weight_only(m) or 'kernel'}": m
            for path, m in nnx.iter_modules(model)
            if path and (isinstance(m, (*int8.DENSE, int8.FakeQuantDense))
                         or int8.weight_only(m))}


def plan(model: nnx.Module, cfg: QuantizeConfig) -> dict[str, str]:
    """param path -> mode (w8a8 | w8 | fp32) of every quantizable weight of `model`."""
    check(cfg)
    weights = quantizable(model)
    hits = {}
    for name, rule in cfg.rules.items():
        key = f"quantize.rules.{name}"
        try:
            hits[name] = param_groups.select(weights, rule.pattern, key)
        except ConfigError as e:
            if "bad regex" in str(e):
                raise ConfigError(f"{key}.pattern", str(e).split(": ", 1)[1]) from None
            raise ConfigError(key, f"pattern '{rule.pattern}' matches no quantizable weight "
                                   f"(dense / conv kernels, embedding tables); they are: "
                                   f"{peft._families(weights)}") from None
    quant = [n for n in hits if cfg.rules[n].mode != "fp32"]
    for i, a in enumerate(quant):
        for b in quant[i + 1:]:
            both = sorted(hits[a] & hits[b])
            if both:
                raise ConfigError(f"quantize.rules.{a}", f"overlaps rule '{b}' on {len(both)} "
                                  f"weights (e.g. '{both[0]}'); make the patterns disjoint "
                                  "(fp32 rules may overlap: they win)")
    modes = dict.fromkeys(weights, "fp32")
    for name in quant:
        modes.update(dict.fromkeys(hits[name], cfg.rules[name].mode))
    for name in set(hits) - set(quant):
        modes.update(dict.fromkeys(hits[name], "fp32"))
    for p, mode in modes.items():  # tables, depthwise kernels: no dot, so weight-only
        if mode == "w8a8" and (cfg.weight_only or int8.weight_only(weights[p])):
            modes[p] = "w8"
    if all(m == "fp32" for m in modes.values()):
        raise ConfigError("quantize.rules", "every weight is excluded (fp32); nothing to "
                                            "quantize")
    return modes


def _swap(model: nnx.Module, modes: dict[str, str], make) -> nnx.Module:
    weights = quantizable(model)
    for p, mode in modes.items():
        if mode != "fp32":
            new = make(weights[p], mode)
            if new is not None:
                peft._replace(model, p.rpartition("/")[0], new)
    return model


def _set_weight(m: nnx.Module, value) -> None:
    getattr(m, int8.weight_only(m))[...] = value


def fake_quantized(model: nnx.Module, modes: dict[str, str], static: bool) -> nnx.Module:
    """A copy of `model` computing what its int8 twin computes, in float: quantized dense
    layers become `FakeQuantDense` (same params); weight-only ones (tables, depthwise
    kernels) hold their int8 values dequantized (a value is all it takes)."""
    return _swap(nnx.clone(model), modes, lambda m, mode: _set_weight(m, int8.round_trip(
        m)) if int8.weight_only(m) else int8.FakeQuantDense(m, mode, static))


def to_int8(model: nnx.Module, modes: dict[str, str],
            static: bool = False) -> nnx.Module:
    """A copy of `model` (plain or fake-quantized) with int8 layers per `modes`; a plain
    model's static activation scales start at 1 (loading fills them)."""
    scale = 1.0 if static else None
    return _swap(nnx.clone(model), modes, lambda m, mode: int8.to_int8(m, mode, scale))


def logits(model: nnx.Module, data: ArrayData, batch_size: int, limit: int | None = None,
           specs=None, eval_fn=None) -> tuple[np.ndarray, np.ndarray]:
    """(primary-task logits, labels) of `model` in inference mode; `eval_fn`: a compiled
    `make_eval_step` of the same graph to reuse."""
    set_modes(model, None)
    eval_fn = eval_fn or make_eval_step(nnx.graphdef(model))
    out, labels = predict(eval_fn, nnx.state(model), data, batch_size, limit)
    return np.asarray(tasks.primary(out, specs)), labels


def calibrate(model: nnx.Module, data: ArrayData, batch_size: int, n: int) -> dict[str, float]:
    """Static activation scales of a fake-quantized model's w8a8 layers, set in place: the
    mean over `n` batches of max |input| / 127 (qwix's moving average of absmax)."""
    layers = {_join(p): m for p, m in nnx.iter_modules(model)
              if isinstance(m, int8.FakeQuantDense) and m.act_scale is not None}
    if not layers:
        return {}
    for m in layers.values():
        m.observing = True
    set_modes(model, None)
    graphdef, state = nnx.split(model)

    @jax.jit
    def observe(state, batch):
        m = nnx.merge(graphdef, state)
        m.forward(batch)
        return nnx.state(m, int8.ActStat)

    sums, count = defaultdict(float), 0
    for b in batches(data, batch_size, np.arange(len(data)), limit=n):
        for p, v in nnx.to_flat_state(observe(state, b)):
            sums[_join(p[:-1])] += float(v[...])
        count += 1
    scales = {}
    for p, m in layers.items():
        m.observing = False
        scales[p] = max(sums[p] / max(count, 1) / int8.QMAX, 1e-8)
        m.act_scale[...] = np.float32(scales[p])
    return scales


def _switch(weights: dict[str, nnx.Module], fp32: dict[str, nnx.Module], p: str,
            on: bool) -> None:
    m, ref = weights[p], fp32[p]
    if int8.weight_only(m):
        _set_weight(m, int8.round_trip(ref) if on else getattr(ref, int8.weight_only(ref))[...])
    else:
        m.on[...] = np.float32(on)


def sensitivity(model: nnx.Module, reference: nnx.Module, modes: dict[str, str],
                data: ArrayData, class_names, batch_size: int, limit: int | None,
                specs=None) -> dict:
    """Per quantized weight (`layers`, worst first), val metrics with only that layer in
    int8 (simulated), next to all fp32 (`baseline`: `reference`'s). `model` is `reference`
    fake-quantized: switching its layers on one at a time, one compiled program serves
    every layer."""
    weights, fp32 = quantizable(model), quantizable(reference)
    live = [p for p, mode in modes.items() if mode != "fp32"]
    for p in live:
        _switch(weights, fp32, p, False)
    set_modes(model, None)
    eval_fn = make_eval_step(nnx.graphdef(model))
    ref, labels = logits(model, data, batch_size, limit, specs, eval_fn)
    base = metrics.classification(ref, labels, class_names)
    rows = []
    for p in live:
        _switch(weights, fp32, p, True)
        out, _ = logits(model, data, batch_size, limit, specs, eval_fn)
        _switch(weights, fp32, p, False)
        rows.append(sensitivity_row(p, modes[p], base, out, ref, labels, class_names))
    for p in live:
        _switch(weights, fp32, p, True)
    return ranked(base, len(labels), rows)


def sensitivity_row(weight: str, mode: str, base: dict, out, ref, labels, class_names) -> dict:
    """One layer's row: its metrics (`out`: logits with only it int8) next to `base`'s (the
    fp32 metrics; `ref` their logits)."""
    got = metrics.classification(out, labels, class_names)
    return {"weight": weight, "mode": mode, "accuracy": got["accuracy"],
            "macro_f1": got["macro_f1"], "accuracy_drop": base["accuracy"] - got["accuracy"],
            "macro_f1_drop": base["macro_f1"] - got["macro_f1"],
            "max_abs_logit_diff": float(np.abs(out - ref).max())}


def ranked(base: dict, n: int, rows: list[dict]) -> dict:
    """A sensitivity result: the fp32 baseline and the rows, worst first."""
    return {"baseline": {k: base[k] for k in ("accuracy", "macro_f1")}, "n": n,
            "layers": sorted(rows, key=lambda r: (-r["accuracy_drop"],
                                                  -r["max_abs_logit_diff"]))}


def qat_paths(cfg: Config, qcfg: QatConfig, model: nnx.Module) -> set[str]:
    """Params QAT trains: `quantize.qat.train` (regex) or what the run's last phase trained."""
    shapes = param_paths(model)
    if qcfg.train is not None:
        return param_groups.select(shapes, qcfg.train, "quantize.qat.train")
    groups = param_groups.assign(shapes, tasks.groups(cfg), cfg.schedule.phases)
    return groups.trainable(len(cfg.schedule.phases) - 1)


def qat(cfg: Config, qcfg: QatConfig, model: nnx.Module, paths: set[str], data,
        seed_phase: int = 1000) -> list[dict]:
    """Fine-tune a fake-quantized model in place (straight-through gradients) on the train
    split with the run's optimizer, task losses and augmentation; one phase of
    `qcfg.epochs`, BatchNorm statistics fixed. Returns per-epoch train metrics."""
    from ftlab.train import epoch_order
    t = cfg.trainer
    train = data.parts["train"]
    steps = num_batches(len(train), t.batch_size, t.limit_train_batches)
    # BatchNorm keeps its running statistics (Jacob et al. 2018 freeze them for QAT too):
    # re-estimating them from fake-quant train batches cost ELPV 2 points of test accuracy.
    set_modes(model, paths)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            m.use_running_average = True
    graphdef, trainable, stats, rest = nnx.split(model, trainable_filter(paths),
                                                 nnx.BatchStat, ...)
    set_modes(model, None)
    # The step donates its carry: copies, so arrays shared with the fp32 model survive.
    trainable, stats = jax.tree.map(jnp.copy, (trainable, stats))
    phase = PhaseConfig(qcfg.epochs, qcfg.lr, qcfg.schedule, qcfg.warmup)
    ones = dict.fromkeys(paths, 1.0)
    tx = optim.build(cfg.optimizer, phase, qcfg.epochs * steps, trainable, ones, ones)
    step_fn = make_train_step(graphdef, tx, data.tasks, 0,
                              augment=augment_fn(cfg.dataset.augment, data.special_tokens),
                              compiler_options=dict(cfg.model.xla_options))
    carry, rs = (trainable, tx.init(trainable), stats), SimpleNamespace(step=0, batch=0)
    key, history = jax.random.key(t.seed + seed_phase), []
    for epoch in range(qcfg.epochs):
        it = batches(train, t.batch_size, epoch_order(cfg, train, seed_phase, epoch),
                     limit=t.limit_train_batches)
        rs.batch = 0
        carry, m, _ = train_epoch(step_fn, carry, rest, it, key, rs, steps, None,
                                  f"qat {epoch + 1}/{qcfg.epochs}", t.progress)
        history.append({"epoch": epoch + 1, **{f"train/{k}": v for k, v in m.items()}})
        log.info("qat epoch %d: %s", epoch + 1, history[-1])
    nnx.update(model, carry[0], carry[2])
    set_modes(model, None)
    return history


def save_int8(model: nnx.Module, out_dir: Path, meta: dict) -> Path:
    """`out_dir/model.safetensors` (every saved variable under its '/'-joined path: int8
    weights, their scales, fp32 rest) and `out_dir/quantized.json` (config and modes)."""
    from safetensors.numpy import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {_join(p): np.asarray(v[...]) for p, v in
               nnx.to_flat_state(nnx.state(model, SAVED))}
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
    return out_dir / WEIGHTS_FILE


def deploy_config(cfg: Config) -> Config:
    """The run's config for the int8 model's skeleton, buildable from this config alone: no
    pretrained source (the artifact holds every weight), what the source decided pinned
    (input normalisation and size), no LoRA (merged before quantizing). Resolves the
    source's metadata, so call it where the run's source is at hand (ftlab-quantize)."""
    from ftlab import models
    meta = models.pretrained_meta(cfg.model)

    def pin(v):
        return None if v is None else [float(x) for x in np.atleast_1d(v)]

    model = dataclasses.replace(cfg.model, source=None, keep_head=None, mean=pin(meta.mean),
                                std=pin(meta.std), image_size=meta.input_size,
                                tokenizer=meta.tokenizer)
    return dataclasses.replace(cfg, model=model, peft=dataclasses.replace(cfg.peft, lora={}))


@dataclasses.dataclass
class QuantizedModel:
    """An int8 model loaded from its artifact: `logits(batch)` on prepared inputs (the run's
    tokenizer / image size, see `config`)."""
    model: nnx.Module
    config: Config
    meta: dict

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def logits(self, batch: dict) -> np.ndarray:
        if not hasattr(self, "_fn"):
            set_modes(self.model, None)
            self._fn = make_eval_step(nnx.graphdef(self.model))
            self._state = nnx.state(self.model)
        keep = {k: v for k, v in batch.items() if k not in ("label", "weight")}
        return np.asarray(tasks.primary(self._fn(self._state, keep), self.meta.get("tasks")))


def load_quantized(path: Path | str) -> QuantizedModel:
    """The int8 model saved by `save_int8` in `path` (e.g. `<run>/quantize/ptq`), built from
    its own config and tensors only: no fp32 checkpoint, no pretrained weights. Strict:
    every variable loaded with its shape and dtype, every tensor used."""
    from ftlab.train import build_model
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise LoadError(f"{path}: no {META_FILE} + {WEIGHTS_FILE}; give a folder written by "
                        "ftlab-quantize (<run>/quantize/ptq or .../qat)")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise LoadError(f"{path / META_FILE}: format {meta.get('format')!r}, expected {FORMAT}")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), meta["config"]))
    specs = tasks.load(path / "tasks.json") if (path / "tasks.json").is_file() else None
    model = nnx.eval_shape(lambda: to_int8(
        build_model(cfg, len(meta["class_names"]), task_specs=specs), meta["modes"],
        meta["activations"] == "static"))
    peft._load_strict(model, SAVED, read_tensors(path / WEIGHTS_FILE), str(path),
                      "the file and quantized.json must come from the same ftlab-quantize run")
    meta["tasks"] = specs
    return QuantizedModel(model, cfg, meta)
