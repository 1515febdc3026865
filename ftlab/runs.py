"""Finished run dirs as inputs: their config, their model at a checkpoint, their split.

`ftlab-eval` (and later the registry) start here; nothing in a run dir is written.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from ftlab import evaluate, tasks
from ftlab.checkpoint import restore_params
from ftlab.data.prepare import load_split, prepare
from ftlab.models.loading import WEIGHTS
from ftlab.app_schema import EvalAppConfig
from ftlab.schema import Config, ConfigError, DatasetConfig


def load_config(run_dir: Path) -> Config:
    """The run's resolved config (config.yaml), typed; fails if it is not a run dir."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError("run_dir", f"{run_dir} has no config.yaml; give the directory "
                                     "ftlab-train printed (runs/<name>/<overrides>)")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config),
                                               OmegaConf.load(path)))


def load_model(cfg: Config, run_dir: Path, num_classes: int, which: str = "best",
               task_specs: list | None = None):
    """(model, step): the run's architecture (with its adapters and, given `task_specs`
    from `open_split(...).data.tasks`, its task heads) and checkpointed weights."""
    from ftlab.train import build_model
    model = build_model(cfg, num_classes, abstract=True, task_specs=task_specs)
    step, params = restore_params(Path(run_dir) / "ckpt", which, nnx.state(model, WEIGHTS),
                                  cfg.trainer.monitor, cfg.trainer.monitor_mode)
    nnx.update(model, params)
    return model, step


def manifest(run_dir: Path) -> dict[str, list[str]]:
    """split -> sample ids, as the run wrote them."""
    out: dict[str, list[str]] = {}
    with open(Path(run_dir) / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["split"], []).append(row["sample_id"])
    return out


def class_names_of(run_dir: Path) -> list[str] | None:
    import json
    path = Path(run_dir) / "data_summary.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("classes")


def open_split(cfg: Config, run_dir: Path, dataset: DatasetConfig | None, split: str,
               keep: Sequence[str] | None = None) -> evaluate.Source:
    """The run's dataset (or another with the same classes) prepared for the run's model.

    `split` must exist (`all`: every sample); on the run's own data its rows must equal the
    run's manifest.csv. `keep` limits which splits are prepared (tokenized / resized)."""
    own = dataset is None
    dcfg = cfg.dataset if own else dataset
    data = load_split(dcfg)
    ex = data.examples
    classes = class_names_of(run_dir)
    if classes is not None and list(classes) != list(ex.class_names):
        raise ConfigError("dataset", f"classes {ex.class_names} differ from the run's "
                                     f"{classes}; pick a dataset with the same classes "
                                     "(dataset.classes / dataset.label)")
    parts = dict(data.parts)
    if split == "all":
        parts["all"] = np.arange(len(ex))
    elif split not in parts:
        raise ConfigError("split", f"'{split}' is not a split of dataset '{dcfg.name}'; "
                                   f"splits: {', '.join([*parts, 'all'])}")
    elif own:
        saved = manifest(run_dir).get(split, [])
        if list(ex.ids[parts[split]]) != saved:
            raise ConfigError("dataset", f"the {split} split no longer matches the "
                                         f"run's manifest.csv (data or code changed since "
                                         "training); evaluate with split=all instead")
    if keep is not None:
        parts = {k: v for k, v in parts.items() if k in keep}
    fitted = tasks.load(Path(run_dir) / "tasks.json")
    if fitted is None and "train" not in parts:
        fitted, _ = tasks.resolve(cfg, ex, data.parts)  # runs made before tasks.json
    return evaluate.Source(prepare(ex, parts, dcfg, cfg.model, cfg, fitted), parts,
                           ex.columns, ex.texts)


def evaluate_run(app: EvalAppConfig) -> tuple[dict, Path]:
    """Evaluate a run dir's checkpoint on its own split, or on every sample (`split=all`)
    or a split of another dataset config with the same classes."""
    run_dir = Path(app.run_dir)
    cfg = load_config(run_dir)
    own = app.dataset is None
    dcfg = cfg.dataset if own else app.dataset
    ecfg = app.eval or cfg.eval
    if app.split not in ("train", "val", "test", "all"):
        raise ConfigError("split", f"'{app.split}' is not one of: train, val, test, all")
    if app.checkpoint not in ("best", "latest"):
        raise ConfigError("checkpoint", f"'{app.checkpoint}' is not one of: best, latest")
    src = open_split(cfg, run_dir, app.dataset, app.split)
    evaluate.check(ecfg, src.data.class_names)
    env = dcfg.env
    if not own:  # baselines fit on the run's own train split only
        src.data.parts.pop("train", None)
        ecfg = dataclasses.replace(ecfg, baselines=False)
    model, step = load_model(cfg, run_dir, src.data.num_classes, app.checkpoint,
                             src.data.tasks)
    suffix = "" if own else f"-{dcfg.name}"
    out = Path(app.out) if app.out else run_dir / "eval" / f"{app.split}{suffix}"
    ev = evaluate.evaluate_model(
        cfg, model, src, app.split, out, ecfg=ecfg, env=env,
        ckpt_dir=run_dir / "ckpt" / app.checkpoint / str(step),
        curves=evaluate.read_curves(run_dir), checkpoint=f"{app.checkpoint} (step {step})",
        title=f"{cfg.name}: {app.split} split of {dcfg.name}, {app.checkpoint} checkpoint "
              f"(step {step})")
    return ev, out

