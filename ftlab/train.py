"""The fine-tuning run: phases of progressive unfreezing over a pure jitted step.

Host-side state (phase, data position, early stopping, plateau) lives in `RunState` and is
checkpointed with the params, so a restarted run continues exactly where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from ftlab import (evaluate, logs, models, optim, parallel, param_groups, peft, provenance,
                   tasks)
from ftlab.checkpoint import Checkpoints, check_dir, latest_meta
from ftlab.compiles import CompileLog, checked_options
from ftlab.preempt import Preemption
from ftlab.resume import RunState, check_resumable
from ftlab.data import splits
from ftlab.data.batches import batches, num_batches, order
from ftlab.data.prepare import Prepared, load_split, prepare
from ftlab.data.augment import augment_fn
from ftlab.data.balance import oversample_order
from ftlab.data.summary import write_data_report
from ftlab.logs import MetricLog
from ftlab.loop import Monitor, cache_prefix, predict, train_epoch
from ftlab.loop import evaluate as evaluate_split
from ftlab.schema import Config, ConfigError
from ftlab.models.loading import WEIGHTS
from ftlab.models.precision import set_compute_dtype
from ftlab.step import (first_trainable_stage, make_eval_step, make_train_step, set_modes,
                        split_for_training, stages_key)

log = logging.getLogger(__name__)

def check_config(cfg: Config) -> None:
    """Checks that need no data or weights."""
    optim.validate(cfg.optimizer)
    logs.validate(cfg.logger)
    tasks.validate(cfg)
    from ftlab import adapt
    adapt.check(cfg.adapt)
    if cfg.quantize is not None:
        from ftlab import quantize
        quantize.check(cfg.quantize)
    t = cfg.trainer
    if t.monitor_mode not in ("max", "min"):
        raise ConfigError("trainer.monitor_mode", f"'{t.monitor_mode}' is not one of: max, min")
    known = tasks.monitor_keys(cfg)
    for key in t.monitor_weights:
        if key not in known - {"val/combined"}:
            raise ConfigError("trainer.monitor_weights", f"'{key}' is not a val metric; "
                                                         f"known: {', '.join(sorted(known))}")
    if t.monitor not in known:
        raise ConfigError("trainer.monitor",
                          f"'{t.monitor}' is not one of: {', '.join(sorted(known))}")
    if t.batch_size < 1 or t.eval_batch_size < 1:
        raise ConfigError("trainer.batch_size", "batch sizes must be >= 1")
    parallel.data_mesh(t.devices, t.batch_size)
    checked_options("model.xla_options", cfg.model.xla_options)


def build_model(cfg: Config, num_classes: int, *, abstract: bool = False,
                task_specs: list | None = None):
    """The model (`abstract`: shapes only, no weights) with its task heads and cfg.peft's
    LoRA and bottleneck adapters in place, so param groups, checkpoints and training all see
    the same param paths. `task_specs` (tasks.resolve) are needed for multi-task configs;
    without them the model has the plain single head (enough for backbone features)."""
    model = models.abstract(cfg.model, num_classes) if abstract else \
        models.build(cfg.model, num_classes, cfg.trainer.seed)
    if task_specs is not None and not tasks.is_single(cfg):
        tasks.attach(model, cfg, task_specs, cfg.trainer.seed)
    if cfg.peft.lora:
        wrapped = peft.apply_lora(model, cfg.peft.lora, seed=cfg.trainer.seed)
        log.info("LoRA on %s", {k: len(v) for k, v in wrapped.items()})
    if cfg.peft.adapters:
        placed = peft.apply_adapters(model, cfg.peft.adapters, seed=cfg.trainer.seed)
        log.info("bottleneck adapters on %s", {k: len(v) for k, v in placed.items()})
    set_compute_dtype(model, cfg.model.compute_dtype)
    return model


def run(cfg: Config, run_dir: Path) -> dict:
    """Train, keep the best checkpoint, evaluate it on the test split; returns results."""
    run_dir = Path(run_dir)
    check_dir(run_dir / "ckpt")
    run_dir.mkdir(parents=True, exist_ok=True)
    check_config(cfg)
    # Before anything is written: a run dir holding another config's run stays untouched.
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    meta = latest_meta(run_dir / "ckpt")
    check_resumable(meta, resolved, run_dir)
    split = load_split(cfg.dataset)
    ex, parts = split.examples, split.parts
    evaluate.check(cfg.eval, ex.class_names)
    evaluate.slice_columns(cfg.eval, cfg.dataset.env, ex.columns)
    write_data_report(cfg.dataset, split, run_dir)
    num_classes = len(ex.class_names)
    specs, _ = tasks.resolve(cfg, ex, parts)
    abstract = build_model(cfg, num_classes, abstract=True, task_specs=specs)  # checks weights
    groups = param_groups.assign(models.loading.param_paths(abstract), tasks.groups(cfg),
                                 cfg.schedule.phases)
    log.info("param groups:\n%s", groups.table())
    if cfg.quantize is not None:  # bad int8 rules fail before training, not after it
        from ftlab import quantize_report
        quantize_report.check_training_config(cfg, num_classes, specs)
    ckpts = Checkpoints(run_dir / "ckpt", cfg.trainer.monitor, cfg.trainer.monitor_mode,
                        cfg.trainer.checkpoint.keep_best)
    splits.write_manifest(run_dir / "manifest.csv", ex.ids, ex.labels, ex.class_names, parts)
    meta_model = models.pretrained_meta(cfg.model)
    provenance.write(run_dir, OmegaConf.to_yaml(resolved),
                     None if meta_model is None else dataclasses.asdict(meta_model))
    data = prepare(ex, parts, cfg.dataset, cfg.model, cfg)
    tasks.save(data.tasks, run_dir / "tasks.json")
    aug = cfg.dataset.augment
    if aug.image and "image" not in data.parts["train"].arrays:
        raise ConfigError("dataset.augment", "image augmentation is set but dataset "
                                             f"'{cfg.dataset.name}' has no images")
    if aug.token_dropout and data.special_tokens is None:
        raise ConfigError("dataset.augment.token_dropout", "needs text tokenized by the "
                                                           "model's tokenizer")
    source = evaluate.Source(data, parts, ex.columns, ex.texts)
    metric_log = MetricLog(run_dir, cfg.logger, resolved, cfg.name)
    try:
        results = Trainer(cfg, groups, source, ckpts, metric_log, resolved, run_dir).fit(meta)
    finally:
        metric_log.close()
        ckpts.close()
    if results.get("halted"):
        return results
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    if cfg.quantize is not None:
        from ftlab import quantize_report
        results.update(quantize_report.after_training(cfg, run_dir))
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def epoch_order(cfg: Config, train, phase: int, epoch: int) -> np.ndarray:
    """This epoch's sample order: shuffled, or balanced by oversampling classes
    (dataset.oversample), environments (dataset.balance_envs) or both ((env, class) cells)."""
    d = cfg.dataset
    if d.oversample or d.balance_envs:
        label = train.arrays["label"].astype(np.int64)
        cell = label if d.oversample else np.zeros_like(label)
        if d.balance_envs:
            cell = train.arrays["env"].astype(np.int64) * (label.max(initial=0) + 1) + cell
        return oversample_order(cell, cfg.trainer.seed, phase, epoch)
    return order(len(train), cfg.trainer.seed, phase, epoch)


def _sizes(trainable, opt_state, groups) -> dict:
    """What a phase trains and what its optimizer holds (the price of what it unfreezes)."""
    n = sum(int(np.size(x)) for x in jax.tree.leaves(trainable))
    total = sum(math.prod(s) for s in groups.shapes.values())
    return {"trainable_params": n, "trainable_fraction": round(n / max(total, 1), 6),
            "optimizer_state_bytes": sum(int(x.nbytes) for x in jax.tree.leaves(opt_state))}


class Trainer:
    def __init__(self, cfg, groups, source: evaluate.Source, ckpts, metric_log,
                 resolved, run_dir: Path):
        data: Prepared = source.data
        self.cfg, self.tasks, self.groups, self.data = cfg, data.tasks, groups, data
        self.source = source
        self.compiles: dict[str, dict] = {}  # phase -> compilations in this process
        self.preempt = Preemption()  # SIGUSR2 / SIGTERM: save at the next step, stop
        self.mesh = parallel.data_mesh(cfg.trainer.devices, cfg.trainer.batch_size)
        self.ckpts, self.metric_log, self.resolved = ckpts, metric_log, resolved
        self.run_dir = Path(run_dir)
        self.phases = list(cfg.schedule.phases.items())
        self.cache = None  # (stage, train inputs, val inputs) of the always-frozen prefix
        self.starts: list[int] = []  # first trainable stage of each phase
        for t in self.tasks:
            if t.class_weights is not None:
                log.info("class weights of %s: %s", t.name, np.round(t.class_weights, 3).tolist())

    def _model(self, meta: dict | None):
        if meta is None:
            return build_model(self.cfg, self.data.num_classes, task_specs=self.tasks), RunState()
        state = RunState(**meta["run_state"])
        model = build_model(self.cfg, self.data.num_classes, abstract=True,
                            task_specs=self.tasks)
        params, _ = self.ckpts.restore_latest(nnx.state(model, WEIGHTS))
        nnx.update(model, params)
        return model, state

    def fit(self, meta: dict | None) -> dict:
        t = self.cfg.trainer
        model, rs = self._model(meta)
        cache = t.cache_frozen and not self.cfg.dataset.augment.active  # inputs must be fixed
        self.starts = [first_trainable_stage(model, self.groups.trainable(i)) if cache else 0
                       for i in range(len(self.phases))]
        key = jax.random.key(t.seed)
        start = time.perf_counter()
        with self.preempt:
            while not rs.done and rs.phase < len(self.phases):
                name = self.phases[rs.phase][0]
                with CompileLog() as compiles:
                    halted = self._phase(model, rs, key, meta)
                self.compiles[name] = compiles.summary()
                log.info("phase %s compiled %d programs in %.1f s (%d from the cache): %s",
                         name, compiles.count, compiles.seconds, compiles.cache_hits,
                         dict(compiles.by_function))
                if halted:
                    return {"halted": True, "step": rs.step, "preempted": self.preempt.name}
                meta = None
        with CompileLog() as compiles:
            out = self._finish(model, rs, time.perf_counter() - start)
        self.compiles["final_evaluation"] = compiles.summary()
        out["compiles"] = self.compiles
        self.metric_log.summary({"compiles/count": sum(c["count"] for c in
                                                       self.compiles.values())})
        return out

    def _phase(self, model, rs: RunState, key, meta) -> bool:
        """Run the rest of phase `rs.phase`; True when halted."""
        t = self.cfg.trainer
        name, phase = self.phases[rs.phase]
        paths = self.groups.trainable(rs.phase)
        start = self.starts[rs.phase]
        train, val = self._inputs(model, rs.phase)
        steps_per_epoch = num_batches(len(self._order(train, rs.phase, 0)), t.batch_size,
                                      t.limit_train_batches)
        epochs = min(phase.epochs, t.max_epochs_per_phase or phase.epochs)
        graphdef, trainable, stats, rest = split_for_training(model, paths)
        eval_fn = make_eval_step(nnx.graphdef(model), start)
        tx = optim.build(self.cfg.optimizer, phase, epochs * steps_per_epoch, trainable,
                         self.groups.multipliers(paths, "lr_mult"),
                         self.groups.multipliers(paths, "wd_mult"))
        opt_state = jax.jit(tx.init)(trainable)  # one program, not one per leaf shape
        if meta is not None and rs.opt_phase == rs.phase:
            _, opt_state = self.ckpts.restore_latest(nnx.state(model, WEIGHTS),
                                                     jax.eval_shape(lambda: opt_state))
        rs.opt_phase = rs.phase
        trainable, opt_state, stats, rest = parallel.replicate(
            self.mesh, (trainable, opt_state, stats, rest))
        rs.sizes[name] = _sizes(trainable, opt_state, self.groups)
        log.info("phase %s: %d epochs x %d steps, training %d tensors from stage %d; %s",
                 name, epochs, steps_per_epoch, len(paths), start, rs.sizes[name])
        stop = Monitor(t.monitor_mode, t.early_stopping.min_delta, **rs.stop)
        plateau = Monitor(t.monitor_mode, 0.0, **rs.plateau)
        train_step = make_train_step(graphdef, tx, self.tasks, start,
                                     augment=augment_fn(self.cfg.dataset.augment,
                                                        self.data.special_tokens),
                                     scheme=self.cfg.weighting.scheme,
                                     compiler_options=dict(self.cfg.model.xla_options))
        while rs.epoch < epochs:
            dyn = self._dyn(rs)
            step_fn = self._sharded(train_step, dyn)
            idx = self._order(train, rs.phase, rs.epoch)
            it = batches(train, t.batch_size, idx, start=rs.batch, limit=t.limit_train_batches)
            (trainable, opt_state, stats), train_m, halted = train_epoch(
                step_fn, (trainable, opt_state, stats), rest, it, key, rs, steps_per_epoch,
                t.halt_after_steps, desc=f"{name} {rs.epoch + 1}/{epochs}", progress=t.progress,
                stop=lambda: self.preempt.requested)
            if halted:
                self._save_latest(model, (trainable, stats), opt_state, rs)
                log.info("halted at step %d; rerun the same command to resume", rs.step)
                return True
            nnx.update(model, trainable, stats)
            val_m = evaluate_split(eval_fn, nnx.state(model), val, t.eval_batch_size,
                                   self.tasks, t.limit_eval_batches)
            rs.batch, rs.epoch = 0, rs.epoch + 1
            metrics = {**{f"train/{k}": v for k, v in train_m.items()},
                       **{f"val/{k}": v for k, v in val_m.items()},
                       **self._task_weights(model, dyn),
                       "phase": rs.phase, "lr_scale": rs.lr_scale}
            if t.monitor_weights:
                metrics["val/combined"] = sum(w * metrics[k] for k, w in t.monitor_weights.items())
            if len(self.tasks) > 1:
                rs.task_losses = [*rs.task_losses[-1:],
                                  [train_m[f"{x.name}/loss"] for x in self.tasks]]
            self.metric_log.write(rs.step, metrics)
            log.info("step %d %s", rs.step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                     if k.startswith("val/") and
                                                     "recall/" not in k))
            value = metrics[t.monitor]
            stop.update(value)
            stopped = t.early_stopping.patience is not None and \
                stop.bad > t.early_stopping.patience
            if not plateau.update(value) and t.plateau.patience is not None and \
                    plateau.bad > t.plateau.patience:
                rs.lr_scale = max(rs.lr_scale * t.plateau.factor, t.plateau.min_scale)
                plateau.bad = 0
                opt_state = optim.set_lr_scale(opt_state, rs.lr_scale)
                log.info("plateau: lr scale now %g", rs.lr_scale)
            rs.stop, rs.plateau = stop.state(), plateau.state()
            self.ckpts.save_best(rs.step, nnx.state(model, WEIGHTS),
                                 {k: v for k, v in metrics.items() if k.startswith("val/")})
            if stopped:
                log.info("early stopping phase %s after %d evaluations without improvement",
                         name, stop.bad)
                break
            if rs.epoch < epochs:
                self._save_latest(model, (), opt_state, rs)
        rs.phase, rs.epoch, rs.batch, rs.lr_scale = rs.phase + 1, 0, 0, 1.0
        rs.stop, rs.plateau = {}, {}
        rs.done = rs.phase >= len(self.phases)
        self._save_latest(model, (trainable, stats), opt_state, rs)
        return False

    def _sharded(self, train_step, dyn):
        """The step on batches split over the data mesh (unchanged on one device)."""
        mesh, dyn = self.mesh, parallel.replicate(self.mesh, dyn)

        def step(trainable, opt_state, stats, rest, batch, key):
            return train_step(trainable, opt_state, stats, rest,
                              parallel.shard_batch(mesh, batch), key, dyn=dyn)
        return step

    def _dyn(self, rs: RunState):
        """This epoch's host-side task weights: DWA's from the last two epochs, else ones."""
        w = self.cfg.weighting
        n = len(self.tasks)
        return jnp.asarray(tasks.dwa_weights(rs.task_losses, w.temperature, n)
                           if w.scheme == "dwa" else np.ones(n, np.float32))

    def _task_weights(self, model, dyn) -> dict:
        scheme = self.cfg.weighting.scheme
        if scheme == "static":
            return {}
        log_var = model.loss_weights.log_var[...] if scheme == "uncertainty" else None
        return {f"task_weight/{k}": v for k, v in
                tasks.effective_weights(self.tasks, scheme, dyn, log_var).items()}

    def _order(self, train, phase: int, epoch: int) -> np.ndarray:
        return epoch_order(self.cfg, train, phase, epoch)

    def _inputs(self, model, phase: int):
        """Train and val inputs for phase number `phase`, which starts at stage starts[phase].

        Unfreezing only moves earlier, so the stages before the earliest start of this and
        every later phase stay frozen for the rest of the run: their output is computed
        once (dropout off) and kept; each phase then runs only its own frozen stages on it.
        """
        t, data = self.cfg.trainer, self.data.parts
        start, base = self.starts[phase], min(self.starts[phase:])
        if start == 0:
            return data["train"], data["val"]
        set_modes(model, None)
        graphdef, state = nnx.graphdef(model), nnx.state(model)
        if base > 0 and (self.cache is None or self.cache[0] != base):
            began = time.perf_counter()
            prefix, key = make_eval_step(graphdef, 0, base), stages_key(model, 0, base)
            self.cache = (base, cache_prefix(prefix, state, data["train"], t.eval_batch_size,
                                             key=key),
                          cache_prefix(prefix, state, data["val"], t.eval_batch_size,
                                       t.limit_eval_batches, key=key))
            log.info("cached frozen stages 0-%d for %d train + %d val rows (%.0f MB, %.1f s)",
                     base - 1, len(self.cache[1]), len(self.cache[2]),
                     sum(c.arrays["hidden"].nbytes for c in self.cache[1:]) / 2**20,
                     time.perf_counter() - began)
        src, train, val = self.cache if base > 0 else (0, data["train"], data["val"])
        if start > src:
            mid, key = make_eval_step(graphdef, src, start), stages_key(model, src, start)
            train = cache_prefix(mid, state, train, t.eval_batch_size, key=key)
            val = cache_prefix(mid, state, val, t.eval_batch_size, t.limit_eval_batches, key=key)
        return train, val

    def _predict_test(self, model):
        """(primary task's test logits, labels) of `model`."""
        t = self.cfg.trainer
        outs, labels = predict(make_eval_step(nnx.graphdef(model)), nnx.state(model),
                               self.data.parts["test"], t.eval_batch_size, t.limit_eval_batches)
        return tasks.primary(outs, self.tasks), labels

    def _save_latest(self, model, updates: tuple, opt_state, rs: RunState) -> None:
        """Checkpoint the model (after applying `updates`: states newer than it) and run."""
        if updates:
            nnx.update(model, *updates)
        params = nnx.state(model, WEIGHTS)
        meta = {"run_state": dataclasses.asdict(rs), "config": self.resolved}
        self.ckpts.save_latest(rs.step, params, opt_state, meta)

    def _finish(self, model, rs: RunState, seconds: float) -> dict:
        """Restore the best checkpoint; score val; write the test split's full report."""
        t = self.cfg.trainer
        best_step, params = self.ckpts.restore_best(nnx.state(model, WEIGHTS))
        nnx.update(model, params)
        set_modes(model, None)
        ev = evaluate.evaluate_model(
            self.cfg, model, self.source, "test", self.run_dir / "eval" / "test",
            ckpt_dir=self.ckpts.best.directory / str(best_step), env=self.cfg.dataset.env,
            curves=evaluate.read_curves(self.run_dir),
            title=f"{self.cfg.name}: test split, best checkpoint (step {best_step})")
        out = {f"val/{k}": v for k, v in ev["val_metrics"].items()}
        # what the best checkpoint was chosen by (val/combined, per-task metrics): the value
        # ftlab-train returns to a sweep, an Optuna study's objective
        out.setdefault(self.cfg.trainer.monitor,
                       self.ckpts.best_metrics().get(self.cfg.trainer.monitor))
        out.update(evaluate.headline(ev, "test"))
        if self.cfg.peft.lora or self.cfg.peft.adapters:
            out.update(peft.export(model, self.cfg.peft, self.run_dir, self._predict_test))
        if self.cfg.adapt.method != "none":
            from ftlab import adapt
            res = adapt.run(self.cfg, model, self.source, self.run_dir / "adapt")
            out.update(res["headline"])
            out["adapt_table"] = res["table"]
            log.info("test-time adaptation (%s) on '%s':\n%s", res["method"], res["pool"],
                     res["table"])
        out.update({"best_step": int(best_step), "steps": rs.step, "train_seconds": seconds,
                    "phases": rs.sizes, "report": str(self.run_dir / "eval" / "test" /
                                                       "report.md")})
        self.metric_log.summary(out)
        self.metric_log.images(self.run_dir / "eval" / "test")
        return out
