"""Typed config schemas: the shape of every config group, checked at compose time.

Plain dataclasses (no Hydra import): `ftlab.cli` registers them in Hydra's ConfigStore,
so an unknown key or a wrongly typed value fails before any work starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class HeadConfig:
    """New classifier head: `hidden` sizes give 1-3 dense layers in all."""
    hidden: List[int] = field(default_factory=list)
    activation: str = "gelu"
    dropout: float = 0.1
    num_classes: Optional[int] = None  # None: sized from the dataset's classes


@dataclass
class ModelConfig:
    arch: str = "bert"
    variant: str = "minilm-l6"
    # Weights: a dir or file (safetensors, torch .bin/.pth/.pt, Flax .msgpack), pkg://,
    # a hub id (hf://org/name, timm://name) or an earlier run's dir (runs/<name>/<overrides>).
    source: Optional[str] = None
    tokenizer: Optional[str] = None  # tokenizer.json / vocab.txt; None: the source's own
    keep_head: Optional[bool] = None  # the source's classifier as the head (True) or a new
    # head (False); None: False for a run dir, model.skip decides for published weights
    image_size: Optional[int] = None  # ViT position grid; None: the pretraining resolution
    mean: Optional[List[float]] = None  # input normalisation (0-255 scale; one value or one
    std: Optional[List[float]] = None  # per channel); None: from the model's metadata
    pooling: str = "mean"  # mean | cls
    compute_dtype: str = "float32"  # float32 | bfloat16 (bf16 matmuls, f32 accumulate/params)
    dropout: float = 0.1
    attention_dropout: float = 0.1
    skip: List[str] = field(default_factory=list)  # source tensors deliberately unused
    # XLA compiler options for this model's train steps (jax.jit's compiler_options), e.g.
    # {xla_cpu_experimental_ynn_fusion_type: LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT}
    xla_options: Dict[str, Any] = field(default_factory=dict)
    new: List[str] = field(default_factory=lambda: ["head/.*"])  # params not in the source
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class SplitConfig:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    seed: int = 0


@dataclass
class AugmentConfig:
    """Training-time augmentation (off for eval). Any nonzero setting disables caching of
    frozen stages, since their inputs change every step."""
    rotate_deg: float = 0.0
    hflip: bool = False
    vflip: bool = False
    brightness: float = 0.0  # fraction of the 0-255 range
    contrast: float = 0.0
    noise: float = 0.0
    token_dropout: float = 0.0  # text: fraction of real tokens replaced by [MASK]

    @property
    def image(self) -> bool:
        return bool(self.rotate_deg or self.hflip or self.vflip or self.brightness
                    or self.contrast or self.noise)

    @property
    def active(self) -> bool:
        return self.image or bool(self.token_dropout)


@dataclass
class DatasetConfig:
    name: str = "bbc_news"  # bbc_news | digits | elpv | mnist_5k | folder | table
    label: Optional[str] = None  # which label column; None: the source's default
    path: Optional[str] = None  # folder / table: the images folder or the table file
    text_column: Optional[str] = None  # table: a text column ...
    image_column: Optional[str] = None  # ... or a column of image paths (relative to the table)
    classes: Optional[List[str]] = None  # the class list (order = label ids); None: sorted
    max_length: int = 128  # text: tokens per sample
    image_size: int = 128  # images: square side in pixels after resizing
    subset: Optional[int] = None  # keep this many samples (stratified) before splitting
    split: SplitConfig = field(default_factory=SplitConfig)
    group: Optional[str] = None  # column whose groups never span splits (e.g. a patient id)
    env: Optional[str] = None  # environment column, summarised per split (e.g. cell_type)
    duplicates: str = "fail"  # fail | warn | group: exact / near duplicates across splits
    near_distance: int = 4  # perceptual-hash bits within which images are near duplicates
    class_weights: str = "none"  # none | balanced | sqrt: per-class loss weights
    oversample: bool = False  # resample minority classes up to the majority each epoch
    # Domain shift: train and val keep only rows whose `env` value is listed; test keeps
    # every environment (per-env metrics show in- and out-of-distribution), and the other
    # environments' train/val rows become the unlabeled split `adapt` (test-time adaptation).
    source_envs: Optional[List[str]] = None
    balance_envs: bool = False  # each epoch draws every environment equally (oversampling)
    # Newly labeled samples (a CSV of sample_id,label: an annotated ftlab-select queue) move
    # into train from the split that held them; test samples are refused (ftlab/data/labeled.py).
    extra_train: Optional[str] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class GroupRule:
    """A named param group: an anchored regex over '/'-joined param paths."""
    pattern: str = "MISSING"
    lr_mult: float = 1.0
    wd_mult: float = 1.0
    train_from: Optional[str] = None  # phase name from which it trains; None: frozen


@dataclass
class PhaseConfig:
    epochs: int = 1
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | constant | linear | stlr (ULMFiT) | step (BiT)
    warmup: float = 0.1  # fraction of the phase's steps (stlr: its rising part, cut_frac)


@dataclass
class ScheduleConfig:
    groups: Dict[str, GroupRule] = field(default_factory=dict)
    phases: Dict[str, PhaseConfig] = field(default_factory=dict)  # run in this order


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adam | sgd
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.01
    clip_norm: Optional[float] = 1.0  # over the trainable params only


@dataclass
class TaskConfig:
    """One head on the shared backbone. The first task is the primary one: its label is the
    dataset's label (`label`), and the evaluation report's slices / errors / baselines are
    about it. Missing labels (empty, NaN, -1) mask that sample out of this task only."""
    type: str = "classification"  # classification | regression | multi_label
    label: str = "label"  # column: `label` = the dataset's label; else a dataset column
    columns: List[str] = field(default_factory=list)  # multi_label: one 0/1 column per label
    weight: float = 1.0  # scales this task's loss under every weighting scheme
    loss: Optional[str] = None  # classification: xent; regression: mse | huber | l1; multi_label: bce
    label_smoothing: float = 0.0
    hidden: Optional[List[int]] = None  # head hidden sizes; None: model.head.hidden


@dataclass
class WeightingConfig:
    """How task losses combine: static (sum of weight * loss), uncertainty (Kendall, Gal &
    Cipolla 2018: learned log-variances in their own param group `loss_weights`, no weight
    decay) or dwa (Dynamic Weight Averaging, Liu, Johns & Davison 2019)."""
    scheme: str = "static"  # static | uncertainty | dwa
    temperature: float = 2.0  # dwa: softmax temperature over loss ratios
    lr_mult: float = 1.0  # uncertainty: the log-variances' LR multiplier (group loss_weights)


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = None  # evaluations without improvement that end a phase
    min_delta: float = 0.0


@dataclass
class PlateauConfig:
    patience: Optional[int] = None  # evaluations without improvement before LR drops
    factor: float = 0.5
    min_scale: float = 0.01


@dataclass
class CheckpointConfig:
    keep_best: int = 1


@dataclass
class TrainerConfig:
    seed: int = 0
    batch_size: int = 32
    eval_batch_size: int = 64
    monitor: str = "val/macro_f1"
    monitor_mode: str = "max"  # max | min
    # val/combined = sum of weight * metric over these val keys (e.g. per-task macro-F1s);
    # set monitor: val/combined to select checkpoints and stop early on it.
    monitor_weights: Dict[str, float] = field(default_factory=dict)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    max_epochs_per_phase: Optional[int] = None
    cache_frozen: bool = True  # run frozen leading stages once per phase, not every step
    halt_after_steps: Optional[int] = None  # save and stop as if preempted (tests, debugging)
    devices: Optional[int] = None  # data parallel over this many devices; null: all local ones
    progress: bool = True


@dataclass
class LoggerConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "ftlab"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoraRule:
    """LoRA on every dense / 1x1 kernel whose '/'-joined MODULE path fully matches `pattern`."""
    pattern: str = "MISSING"
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input


@dataclass
class AdapterRule:
    """A bottleneck adapter (Houlsby et al. 2019), `y + up(act(down(y)))`, on the output of
    every dense / 1x1 module whose '/'-joined MODULE path fully matches `pattern`."""
    pattern: str = "MISSING"
    size: int = 64  # bottleneck width
    activation: str = "gelu"  # gelu | relu | tanh


@dataclass
class PeftConfig:
    lora: Dict[str, LoraRule] = field(default_factory=dict)  # empty: no LoRA
    merge: bool = True  # at the end, fold LoRA into the kernels, check and save merged weights
    adapters: Dict[str, AdapterRule] = field(default_factory=dict)  # never merged (nonlinear)


@dataclass
class CostConfig:
    """Binary tasks: pick the decision threshold minimising
    false_negative * FN + false_positive * FP on the val split, and report test at it."""
    positive: Optional[str] = None  # the positive class (e.g. defective); None: the rarer one
    false_negative: float = 1.0
    false_positive: float = 1.0


@dataclass
class EvalConfig:
    """The evaluation report written at the end of training and by `ftlab-eval`."""
    slices: List[str] = field(default_factory=list)  # columns to slice by, besides dataset.env
    top_errors: int = 10  # most confident mistakes / least confident correct exported
    calibration_bins: int = 15
    baselines: bool = True  # linear probe on pretrained features + a non-deep baseline
    latency: bool = True
    latency_batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    latency_iters: int = 30  # timed calls per batch size, after warm-up
    plots: bool = True
    cost: CostConfig = field(default_factory=CostConfig)


@dataclass
class LrFindConfig:
    """LR range test (`ftlab-lr-find`): per param group, LR grows geometrically from
    min_lr to max_lr over `steps` steps; stops early once the loss diverges."""
    phase: Optional[str] = None  # whose trainable groups to test; None: the first phase
    min_lr: float = 1e-7
    max_lr: float = 1.0
    steps: int = 100
    smooth: float = 0.9  # EMA factor on the loss
    diverge: float = 4.0  # stop when the smoothed loss exceeds this multiple of its minimum


@dataclass
class AdaptConfig:
    """Test-time adaptation on unlabeled target inputs (`ftlab-adapt`; after training when
    `method` is not none). `tent` (Wang et al. 2021) minimises the mean prediction entropy,
    updating only the params matched by `params` (normalisation scale / bias) with BatchNorm
    normalising by each batch's statistics; `norm` only re-estimates BatchNorm statistics on
    the target. Either ends with BatchNorm statistics re-estimated on the target pool."""
    method: str = "none"  # none | norm | tent
    # Anchored regex over '/'-joined param paths: BatchNorm (bn, bn0-2) and LayerNorm
    # (norm, *_norm) scale and bias of ftlab's EfficientNet-Lite and BERT.
    params: str = r"(.*/)?(bn[0-9]*|norm|[a-z_]+_norm)/(scale|bias)"
    optimizer: str = "adam"  # adam | sgd (with `momentum`)
    lr: float = 1e-3
    momentum: float = 0.9
    epochs: int = 1  # passes over the target pool ...
    steps: Optional[int] = None  # ... or exactly this many steps (overrides epochs)
    batch_size: int = 64  # capped at the pool size; every batch holds real rows only
    split: str = "adapt"  # the unlabeled target pool; 'adapt' absent: the evaluated split
    seed: int = 0  # batch order


@dataclass
class QuantRule:
    """Int8 for the quantizable weights (dense / conv kernels, embedding tables) whose
    '/'-joined param path fully matches `pattern`. Tables and depthwise kernels are always
    weight-only (w8): they are looked up or multiplied elementwise, not in a dot."""
    pattern: str = "MISSING"
    mode: str = "w8a8"  # w8a8 (int8 weights + activations) | w8 (weights only) | fp32 (excluded)


@dataclass
class QatConfig:
    """Quantization-aware fine-tuning: one phase from the run's checkpoint with fake-quant
    in the forward pass (straight-through gradients), then converted to int8 like PTQ."""
    epochs: int = 1  # 0: no QAT
    lr: float = 1.0e-5
    schedule: str = "cosine"  # cosine | constant | linear
    warmup: float = 0.1
    train: Optional[str] = None  # regex over param paths that train; None: the run's last phase's


@dataclass
class QuantizeConfig:
    """What `ftlab-quantize` quantizes and how. Rules are named like schedule.groups; fp32
    rules exclude (and win over overlapping rules); unmatched weights stay fp32."""
    rules: Dict[str, QuantRule] = field(default_factory=dict)
    activations: str = "static"  # static: per-tensor scales calibrated on val | dynamic: per row
    calibration_batches: int = 8  # val batches whose mean max |x| sets static scales
    weight_only: bool = False  # every w8a8 rule becomes w8: 4x smaller, not faster on CPU
    sensitivity: bool = True  # per layer: val accuracy with only that layer quantized
    sensitivity_batches: Optional[int] = None  # val batches per layer; None: all of val
    qat: QatConfig = field(default_factory=QatConfig)
    # Also export to ONNX and quantize there with ONNX Runtime (EfficientNet-Lite, BERT;
    # single task): table rows onnx_fp32 / onnx_ptq (ftlab.onnx_export)
    onnx: bool = False


@dataclass
class ClaimConfig:
    """A run's part in a reproduced claim (conf/experiment/claims/, one arm per conf/arm/
    file): `ftlab-results` groups the runs of claim `id` by `arm` and seed, and compares
    them on `metric` (docs/results.md). Not a claim run while `id` is None."""
    id: Optional[str] = None
    arm: Optional[str] = None  # this run's arm (set by its conf/arm/ file)
    statement: str = ""  # what is claimed, in words
    source: str = ""  # the paper (authors year) or "seed"
    adapted: str = ""  # how the recipe was adapted to the shipped models and data
    metric: str = "test/accuracy"  # a results.json key, compared in points (x100)
    extra_metrics: List[str] = field(default_factory=list)  # shown next to it, not judged
    kind: str = "difference"  # difference: treatment - baseline in `expect`; value: the
    #                           treatment's metric in `expect`; curve: metric over arms' `x`
    baseline: Optional[str] = None  # the arm compared against (difference)
    treatment: Optional[str] = None  # the arm the claim is about (difference, value)
    expect: List[float] = field(default_factory=list)  # [low, high] in points
    # More of the claim: results.json key -> [low, high] in points, each judged like the claim
    # (a difference claim: treatment - baseline on that key; otherwise the treatment arm's
    # value, e.g. quantize/ptq/size_ratio: [10, 25]).
    checks: Dict[str, List[float]] = field(default_factory=dict)
    x: Optional[float] = None  # curve: this arm's position (e.g. examples per class)


@dataclass
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    tasks: Dict[str, TaskConfig] = field(default_factory=dict)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    claim: ClaimConfig = field(default_factory=ClaimConfig)
    # After training: int8 models of the best checkpoint, as `ftlab-quantize` makes them
    # (conf/quantize/<rules>.yaml: `quantize=elpv_defect`); headline numbers join results.json
    # under quantize/<variant>/. None: no quantization.
    quantize: Optional[QuantizeConfig] = None


class ConfigError(ValueError):
    """A bad config value, reported as one line: `key: what is wrong; how to fix it`."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def _extra_keys(obj, prefix: str = ""):
    """Keys set on a schema object that its dataclass does not declare (e.g. via `+key=`)."""
    if dataclasses.is_dataclass(obj):
        names = {f.name for f in dataclasses.fields(obj)}
        for key, value in vars(obj).items():
            if key not in names:
                yield f"{prefix}{key}", sorted(names)
            else:
                yield from _extra_keys(value, f"{prefix}{key}.")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _extra_keys(value, f"{prefix}{key}.")


def from_omegaconf(cfg) -> Config:
    """The typed Config of a composed DictConfig; keys the schema lacks are an error
    (struct mode already rejects `key=v`; this catches `+key=v` too)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError
    try:
        for key in sorted(OmegaConf.missing_keys(cfg)):
            raise ConfigError(key, f"is required; set it on the command line: {key}=...")
        obj = OmegaConf.to_object(cfg)
    except InterpolationResolutionError as e:  # a resolver's own ConfigError, unwrapped
        cause = e
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    for key, known in _extra_keys(obj):
        raise ConfigError(key, f"unknown key; known keys here: {', '.join(known)}")
    return obj
