"""`ftlab-predict`: a model version (registered, or a run dir) scores a dataset split or a
folder / CSV of new inputs and appends one row per input to the prediction log
(ftlab/predlog.py): class probabilities, confidence, and the embedding the head sees,
projected onto the model's drift reference.

The reference (`<model dir>/reference.npz`) is the model's validation split scored the same
way: the registry writes it at registration (`write_reference`); a run dir gets one the
first time it predicts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ftlab import predlog, tasks
from ftlab.app_schema import PredictAppConfig
from ftlab.data.batches import ArrayData, batches
from ftlab.schema import Config, ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "adapt", "all")
TABLES = (".csv", ".jsonl", ".ndjson", ".parquet")
REFERENCE = "reference.npz"


@dataclasses.dataclass
class Inputs:
    """What is scored: model-ready arrays and, per row, what the log records about it."""
    data: ArrayData
    ids: list[str]
    inputs: list[str | None] | None  # image path or text, for annotators
    envs: list[str | None] | None = None
    labels: np.ndarray | None = None  # the dataset's labels (dataset inputs only)


def model_outputs(model: nnx.Module, data: ArrayData, batch_size: int,
                  task_specs: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities of the primary task, pooled embeddings the head sees) per row of
    `data`, in order: one jitted pass per batch runs the backbone once and the head on its
    output. The model is put in inference mode."""
    from ftlab.step import set_modes
    if len(data) == 0:
        raise ValueError("model_outputs: `data` has no rows")
    set_modes(model, None)
    graphdef, state = nnx.split(model)
    head = len(model.stage_prefixes()) - 1

    @jax.jit
    def step(state, batch):
        m = nnx.merge(graphdef, state)
        emb = m.forward(batch, 0, head)
        logits = tasks.primary(m.forward({**batch, "hidden": emb}, head, head + 1), task_specs)
        return jax.nn.softmax(logits.astype(np.float32), -1), emb.astype(np.float32)

    probs, embs = [], []
    for b in batches(data, batch_size, np.arange(len(data))):
        keep = b.pop("weight") > 0
        p, e = jax.device_get(step(state, b))
        probs.append(p[keep])
        embs.append(e[keep])
    emb = np.concatenate(embs)
    if emb.ndim != 2:
        raise ValueError(f"model_outputs: expected (rows, dim) before the head, got "
                         f"{emb.shape}; the model's last backbone stage must pool")
    return np.concatenate(probs), emb


def write_reference(model_dir: Path, checkpoint: str = "best", model=None) -> Path:
    """Score the validation split of a run-dir-shaped `model_dir` (a run, or a registry
    version) and save its drift reference to `<model_dir>/reference.npz`; returns the path.
    `model`: that dir's model, already loaded (else it is loaded at `checkpoint`)."""
    from ftlab.runs import load_config, load_model, open_split
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    src = open_split(cfg, model_dir, None, "val", keep=("val",))
    if model is None:
        model, _ = load_model(cfg, model_dir, src.data.num_classes, checkpoint, src.data.tasks)
    val = src.data.parts["val"]
    probs, emb = model_outputs(model, val, cfg.trainer.eval_batch_size, src.data.tasks)
    ref = predlog.fit_reference(src.data.class_names, probs, val.arrays["label"], emb)
    path = model_dir / REFERENCE
    tmp = model_dir / f"reference.tmp-{os.getpid()}.npz"  # readers never see half a file
    predlog.save_reference(tmp, ref)
    os.replace(tmp, path)
    log.info("drift reference: %d val rows, %d axes -> %s", len(emb), len(ref.axes), path)
    return path


def check(app: PredictAppConfig) -> None:
    """Checks that need neither the model nor the data."""
    if (app.dataset is None) == (app.inputs is None):
        raise ConfigError("dataset", "give exactly one of dataset=<config> (with split=) "
                                     "and inputs=<folder of images | CSV>")
    if app.dataset is not None and app.split not in SPLITS:
        raise ConfigError("split", f"'{app.split}' is not one of: {', '.join(SPLITS)}")
    if app.checkpoint not in ("best", "latest"):
        raise ConfigError("checkpoint", f"'{app.checkpoint}' is not one of: best, latest")
    if app.batch_size < 1:
        raise ConfigError("batch_size", "must be >= 1")
    if app.limit is not None and app.limit < 1:
        raise ConfigError("limit", "must be >= 1, or null for every input")
    if app.env is not None and app.dataset is None:
        raise ConfigError("env", "filters a dataset's rows by environment; give dataset=...")
    if app.inputs is not None:
        path = Path(app.inputs)
        if not path.exists():
            raise ConfigError("inputs", f"{path} does not exist; give a folder of images "
                                        "or a CSV file")
        if path.is_file() and path.suffix.lower() not in TABLES:
            raise ConfigError("inputs", f"{path}: unsupported file '{path.suffix}'; give a "
                                        f"folder of images or a table ({', '.join(TABLES)})")


def _specs_and_classes(model_dir: Path) -> tuple[list | None, list[str]]:
    """The dir's fitted task specs (tasks.json) and primary class names, without its data."""
    from ftlab.runs import class_names_of
    specs = tasks.load(model_dir / "tasks.json")
    classes = list(specs[0].classes) if specs else class_names_of(model_dir)
    if classes is None:
        raise ConfigError("ref", f"{model_dir} has neither tasks.json nor "
                                   "data_summary.json; it is not a finished ftlab run")
    return specs, classes


def dataset_inputs(app: PredictAppConfig, cfg: Config, model_dir: Path) -> Inputs:
    """A split of `app.dataset`, prepared exactly as the model's training data (its image
    size and token length win over the dataset config's)."""
    from ftlab.runs import open_split
    dcfg = dataclasses.replace(app.dataset, image_size=cfg.dataset.image_size,
                               max_length=cfg.dataset.max_length)
    src = open_split(cfg, model_dir, dcfg, app.split, keep=(app.split,))
    keep = np.arange(len(src.rows[app.split]))
    envs = None if dcfg.env is None else \
        np.asarray(src.columns[dcfg.env])[src.rows[app.split]].astype(str)
    if app.env is not None:
        if envs is None:
            raise ConfigError("env", f"dataset '{dcfg.name}' has no environment column; set "
                                     "dataset.env=<column> or drop env=")
        if app.env not in set(envs):
            raise ConfigError("env", f"'{app.env}' is not a {dcfg.env} value of split "
                                     f"'{app.split}'; values: {', '.join(sorted(set(envs)))}")
        keep = np.flatnonzero(envs == app.env)
    keep = keep[:app.limit]
    rows = src.rows[app.split][keep]
    data = ArrayData({k: v[keep] for k, v in src.data.parts[app.split].arrays.items()})
    ids = [str(i) for i in np.asarray(src.data.ids[app.split])[keep]]
    if src.texts is not None:
        shown = [src.texts[i] for i in rows]
    elif dcfg.name == "folder":
        from ftlab.models.loading import resolve_path
        root = resolve_path(dcfg.path, "dataset.path")
        shown = [str(root / i) for i in ids]
    elif "path" in src.columns:  # e.g. ELPV's image files, for annotators to open
        shown = [str(v) for v in np.asarray(src.columns["path"])[rows]]
    else:
        shown = None
    return Inputs(data, ids, shown, None if envs is None else envs[keep].tolist(),
                  data.arrays["label"])


def _input_column(app: PredictAppConfig, header: list[str], kind: str, cfg: Config,
                  path: Path) -> str:
    if app.input_column is not None:
        if app.input_column not in header:
            raise ConfigError("input_column", f"{path} has no column '{app.input_column}'; "
                                              f"columns: {', '.join(header)}")
        return app.input_column
    own = cfg.dataset.text_column if kind == "text" else cfg.dataset.image_column
    names = [c for c in (own, *(("text",) if kind == "text" else ("path", "file", "image")))
             if c]
    found = [c for c in names if c in header]
    if not found:
        raise ConfigError("input_column", f"{path} has none of the columns {names} the "
                                          f"model's {kind} inputs are looked for in; set "
                                          f"input_column=<one of {', '.join(header)}>")
    return found[0]


def table_inputs(app: PredictAppConfig, cfg: Config, kind: str) -> tuple[list, list, list]:
    """(ids, texts or image paths, what the log shows) of the rows of a CSV / JSONL /
    Parquet file; no label column needed."""
    from ftlab.data.user import DataError, read_rows
    path = Path(app.inputs)
    rows = read_rows(path)
    if not rows:
        raise ConfigError("inputs", f"{path} has no rows")
    header = list(rows[0])
    col = _input_column(app, header, kind, cfg, path)
    if app.id_column is not None and app.id_column not in header:
        raise ConfigError("id_column", f"{path} has no column '{app.id_column}'; columns: "
                                       f"{', '.join(header)}")
    rows = rows[:app.limit]
    empty = [i + 2 for i, r in enumerate(rows) if r.get(col) in (None, "")]
    if empty:
        raise DataError(f"{path}: column '{col}' is empty in rows {empty[:5]}; fill or drop them")
    id_col = app.id_column or ("id" if "id" in header else None)
    values = [str(r[col]) for r in rows]
    if id_col is not None:
        ids = [str(r[id_col]) for r in rows]
    else:
        ids = values if kind == "image" else [str(i) for i in range(len(rows))]
    if len(set(ids)) != len(ids):
        raise ConfigError("id_column", f"{path}: sample ids repeat; name a column of unique "
                                       "ids (id_column=...)")
    if kind == "image":
        files = [str(path.parent / v) for v in values]
        return ids, files, files
    return ids, values, values


def folder_inputs(app: PredictAppConfig) -> tuple[list, list, list]:
    """(ids: paths relative to the folder, image files, the same as shown) of every image
    under `app.inputs`."""
    from ftlab.data.user import IMAGE_SUFFIXES
    root = Path(app.inputs)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError("inputs", f"no images under {root} (looked for "
                                    f"{', '.join(IMAGE_SUFFIXES)}, in subfolders too)")
    files = files[:app.limit]
    return [p.relative_to(root).as_posix() for p in files], files, [str(p) for p in files]


def new_inputs(app: PredictAppConfig, cfg: Config) -> Inputs:
    """A folder of images or a table of texts / image paths, preprocessed with the model's
    own image size or tokenizer (as ftlab.data.user and ftlab.data.prepare do)."""
    from ftlab import models
    from ftlab.data.examples import Examples
    from ftlab.data.prepare import inputs as model_inputs
    from ftlab.data.user import read_image
    kind = models.ARCHS[cfg.model.arch].inputs
    path = Path(app.inputs)
    if path.is_dir():
        if kind != "image":
            raise ConfigError("inputs", f"{path} is a folder of images but the model reads "
                                        "text; give a CSV with a text column")
        ids, values, shown = folder_inputs(app)
    else:
        ids, values, shown = table_inputs(app, cfg, kind)
    if kind == "image":
        arrays = {"image": np.stack([read_image(Path(f), cfg.dataset.image_size) for f in values])}
    else:
        if models.tokenizer_of(cfg.model) is None:
            raise ConfigError("inputs", f"the model reads the token ids of dataset "
                                        f"'{cfg.dataset.name}' and has no tokenizer for new "
                                        "text; predict over dataset=... instead")
        ex = Examples(np.asarray(ids), np.zeros(len(ids), np.int64), [], texts=values)
        arrays, _ = model_inputs(ex, cfg.dataset, cfg.model)
    return Inputs(ArrayData(dict(arrays)), ids, shown)


def _reference(model_dir: Path, checkpoint: str, model) -> predlog.Reference:
    path = model_dir / REFERENCE
    if not path.exists():
        log.info("%s has no drift reference yet: scoring its val split", model_dir)
        write_reference(model_dir, "best", model if checkpoint == "best" else None)
    elif checkpoint != "best":
        log.warning("the drift reference is the best checkpoint's; predicting with latest")
    return predlog.load_reference(path)


def run_app(app: PredictAppConfig) -> dict:
    """Score `app.dataset`'s split or `app.inputs` with `app.ref` and append the rows to
    the prediction log (with the dataset's labels when `app.labels`)."""
    from ftlab.runs import load_config, load_model
    t0 = time.perf_counter()
    check(app)
    from ftlab.registry import locate
    model_dir, name, version = locate(app.ref, app.registry)
    cfg = load_config(model_dir)
    specs, classes = _specs_and_classes(model_dir)
    if app.dataset is not None:
        got = dataset_inputs(app, cfg, model_dir)
        stream = app.stream or f"{app.dataset.name}:{app.split}"
    else:
        got = new_inputs(app, cfg)
        stream = app.stream or str(Path(app.inputs).resolve())
    if len(got.ids) == 0:
        raise ConfigError("split", f"split '{app.split}' of '{app.dataset.name}' is empty")
    model, _ = load_model(cfg, model_dir, len(classes), app.checkpoint, specs)
    ref = _reference(model_dir, app.checkpoint, model)
    if ref.class_names != classes:
        raise ConfigError("ref", f"{model_dir / REFERENCE} has classes {ref.class_names}, "
                                   f"the model {classes}; delete it to rewrite it")
    probs, emb = model_outputs(model, got.data, app.batch_size, specs)
    if ref.mean.shape != emb.shape[1:]:
        raise ConfigError("ref", f"{model_dir / REFERENCE} is of {ref.mean.shape[0]}-dim "
                                   f"embeddings, the model's are {emb.shape[1]}-dim; delete "
                                   "it to rewrite it")
    log_path = Path(app.log) if app.log else Path(app.registry) / "predictions.db"
    n = predlog.append(log_path, model=name, version=version, stream=stream,
                       class_names=classes, sample_ids=got.ids, probs=probs,
                       proj=ref.project(emb), inputs=got.inputs, envs=got.envs)
    labeled = 0
    if app.labels and got.labels is not None:
        known = got.labels >= 0
        labeled = predlog.add_labels(log_path, stream, np.asarray(got.ids)[known],
                                     got.labels[known])
    pred = probs.argmax(-1)
    return {"n": n, "log": str(log_path), "model": name, "version": version,
            "model_dir": str(model_dir), "stream": stream, "labels": labeled,
            "class_mix": {c: int((pred == i).sum()) for i, c in enumerate(classes)},
            "mean_confidence": float(probs.max(-1).mean()),
            "seconds": round(time.perf_counter() - t0, 2)}


def summary(res: dict) -> str:
    """What ftlab-predict prints."""
    who = res["model"] if res["version"] == "run" else f"{res['model']} v{res['version']}"
    mix = ", ".join(f"{c} {k}" for c, k in res["class_mix"].items())
    labels = f"; {res['labels']} labels arrived" if res["labels"] else ""
    return (f"{who}: {res['n']} predictions on {res['stream']} in {res['seconds']:.1f} s, "
            f"mean confidence {res['mean_confidence']:.3f}{labels}\n"
            f"predicted classes: {mix}; log: {res['log']}")
