"""What `model.source` points at: nothing (random init), a weights file with the files
published next to it (config.json, preprocessing, tokenizer, model card), or the run dir of
an earlier ftlab run (chaining: its best checkpoint, read only)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ftlab.models import hub
from ftlab.models.loading import find_file
from ftlab.schema import ConfigError

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # (0.485, 0.456, 0.406) x 255
IMAGENET_STD = (58.395, 57.12, 57.375)
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL codes


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # none | file | run
    spec: str | None = None
    path: Path | None = None  # the weights file, or the run dir
    root: Path | None = None  # the directory published with the weights
    config: dict | None = None  # its config.json


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "ckpt").is_dir()


def open_source(spec: str | None, weight_files: Sequence[str],
                key: str = "model.source") -> Source:
    if spec is None:
        return Source("none")
    if not hub.is_hub(spec) and not spec.startswith("pkg://"):
        path = Path(spec).expanduser()
        if path.is_dir() and is_run_dir(path):
            return Source("run", spec, path, path)
        if path.is_dir() and (path / "config.yaml").is_file():
            raise ConfigError(key, f"{path} looks like a run dir without checkpoints (no "
                                   "ckpt/); finish that run first (rerun ftlab-train with its "
                                   "overrides)")
    path = find_file(spec, weight_files, key)
    return Source("file", spec, path, path.parent, read_json(path.parent / "config.json"))


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("model.source", f"{path} is not valid JSON ({e})") from None


def image_meta(root: Path | None) -> dict[str, Any]:
    """Input size, normalisation (0-255 scale) and resampling published with the weights:
    HF `preprocessor_config.json`, or the `pretrained_cfg` of a timm `config.json`."""
    if root is None:
        return {}
    out: dict[str, Any] = {}
    pre = read_json(root / "preprocessor_config.json") or {}
    if "image_mean" in pre and "image_std" in pre:
        out["mean"] = tuple(round(v * 255, 4) for v in pre["image_mean"])
        out["std"] = tuple(round(v * 255, 4) for v in pre["image_std"])
    size = pre.get("size")
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    if isinstance(size, int):
        out["input_size"] = size
    if pre.get("resample") in _RESAMPLE:
        out["interpolation"] = _RESAMPLE[pre["resample"]]
    timm = (read_json(root / "config.json") or {}).get("pretrained_cfg") or {}
    if "mean" in timm and "std" in timm:
        out["mean"] = tuple(round(v * 255, 4) for v in timm["mean"])
        out["std"] = tuple(round(v * 255, 4) for v in timm["std"])
    if "input_size" in timm:
        out["input_size"] = int(timm["input_size"][-1])
    for k in ("interpolation", "crop_pct", "license"):
        if timm.get(k) is not None:
            out["licence" if k == "license" else k] = timm[k]
    return out


def card_licence(root: Path | None) -> str | None:
    """`license:` from the model card's YAML front matter (README.md), if any."""
    card = None if root is None else root / "README.md"
    if card is None or not card.is_file():
        return None
    head = card.read_text(errors="replace")[:4000]
    m = re.search(r"^---\s*$(.*?)^---\s*$", head, re.S | re.M)
    hit = m and re.search(r"^license:\s*(\S+)", m.group(1), re.M)
    return hit.group(1).strip("'\"") if hit else None


def tokenizer_file(root: Path | None) -> str | None:
    """The tokenizer published with the weights (`tokenizer.json`, else BERT's `vocab.txt`)."""
    for name in ("tokenizer.json", "vocab.txt"):
        if root is not None and (root / name).is_file():
            return str(root / name)
    return None


def run_classes(run_dir: Path) -> list[str]:
    """The class names a run trained on (its data_summary.json)."""
    summary = read_json(Path(run_dir) / "data_summary.json")
    if not summary or "classes" not in summary:
        raise ConfigError("model.source", f"{run_dir} has no data_summary.json with classes: "
                                          "not a run dir of ftlab-train")
    return list(summary["classes"])


def run_config(run_dir: Path):
    from ftlab.runs import load_config
    return load_config(run_dir)


def run_weights(run_dir: Path) -> tuple[dict[str, np.ndarray], int]:
    """({param path: array}, step) of a run's best checkpoint: its params and BatchNorm
    statistics as the run's own model holds them, LoRA folded into the kernels."""
    from flax import nnx

    from ftlab import peft, runs, tasks
    from ftlab.models.loading import WEIGHTS
    cfg = runs.load_config(run_dir)
    specs = tasks.load(Path(run_dir) / "tasks.json")
    model, step = runs.load_model(cfg, run_dir, len(run_classes(run_dir)), "best", specs)
    if cfg.peft.lora:
        peft.merge_lora(model)
    flat = nnx.to_flat_state(nnx.state(model, WEIGHTS))
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in flat}, step

