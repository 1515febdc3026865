"""Typed configs of the `ftlab-*` apps that act on finished runs and registered models
(eval, adapt, combine, quantize, predict, monitor, select, retrain); the training run's own
config is `ftlab.schema.Config`. Plain dataclasses, registered in Hydra's ConfigStore by
`ftlab.cli`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ftlab.schema import (AdaptConfig, DatasetConfig, EvalConfig, QatConfig,  # noqa: F401
                          QuantizeConfig, QuantRule)


@dataclass
class EvalAppConfig:
    """`ftlab-eval`: evaluate a finished run dir on one of its splits or on another dataset."""
    run_dir: str = "???"
    split: str = "test"  # train | val | test | all (all: every sample of `dataset`)
    checkpoint: str = "best"  # best | latest
    dataset: Optional[DatasetConfig] = None  # None: the run's dataset (and its split)
    eval: Optional[EvalConfig] = None  # None: the run's eval config
    out: Optional[str] = None  # None: <run_dir>/eval/<split>[-<dataset name>]


@dataclass
class AdaptAppConfig:
    """`ftlab-adapt`: test-time adaptation of a finished run's model, evaluated next to the
    source model."""
    run_dir: str = "???"
    checkpoint: str = "best"  # best | latest
    adapt: AdaptConfig = field(default_factory=lambda: AdaptConfig(method="tent"))
    dataset: Optional[DatasetConfig] = None  # None: the run's dataset; else a target dataset
    split: str = "test"  # the split evaluated (train | val | test | adapt | all)
    eval: Optional[EvalConfig] = None  # None: the run's eval config
    out: Optional[str] = None  # None: <run_dir>/adapt[-<dataset name>]; writes <out>/<method>/


@dataclass
class CombineAppConfig:
    """`ftlab-combine`: an ensemble (`mean` of class probabilities) or routing by
    environment (`route`: each row scored by the run registered for its `dataset.env`)."""
    runs: List[str] = field(default_factory=list)  # run dirs (mean; extra members for route)
    mode: str = "mean"  # mean | route
    route: Dict[str, str] = field(default_factory=dict)  # env value -> run dir
    split: str = "test"  # train | val | test | all
    checkpoint: str = "best"  # best | latest
    dataset: Optional[DatasetConfig] = None  # None: the runs' own dataset and split
    eval: Optional[EvalConfig] = None  # None: the first run's eval config
    out: str = "???"


@dataclass
class QuantizeAppConfig:
    """`ftlab-quantize`: int8 PTQ and QAT models of a finished run, compared with fp32."""
    run_dir: str = "???"
    checkpoint: str = "best"  # best | latest
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    out: Optional[str] = None  # None: <run_dir>/quantize (+ a section in eval/test/report.md)


@dataclass
class PredictAppConfig:
    """`ftlab-predict`: a registered model version (or a run dir) over a dataset split or a
    folder / CSV of new inputs, appending one row per input to the prediction log."""
    ref: str = "???"  # a run dir, or a registry ref: <name> (its production), <name>@<alias>, <name>:<version>
    registry: str = "registry"  # the registry root (ftlab-registry --root)
    log: Optional[str] = None  # the prediction log (SQLite); None: <registry>/predictions.db
    dataset: Optional[DatasetConfig] = None  # a dataset config (its split `split`) ...
    split: str = "test"  # train | val | test | adapt | all
    env: Optional[str] = None  # only the split's rows of this environment (dataset.env value)
    inputs: Optional[str] = None  # ... or a folder of images / a CSV of texts or image paths
    input_column: Optional[str] = None  # the CSV's text / path column; None: the model's kind
    id_column: Optional[str] = None  # the CSV's id column; None: the row's path / number
    stream: Optional[str] = None  # this stream's name in the log; None: dataset:split / inputs
    labels: bool = True  # also log the dataset's labels (they "arrive" with the inputs)
    checkpoint: str = "best"  # best | latest (a run dir's)
    batch_size: int = 64
    limit: Optional[int] = None  # at most this many inputs (the first ones)


@dataclass
class DriftThresholds:
    """A check flags drift when its effect size reaches its threshold AND its test gives
    p < `pvalue` / number of checks (KS for features, chi-square for the class mix, Fisher for
    accuracy): large windows then ignore tiny shifts, small ones PSI's noise (ftlab/drift.py)."""
    psi: float = 0.2  # population stability index, confidence and each embedding projection
    pvalue: float = 0.01  # chance an unshifted window raises any flag (Bonferroni over checks)
    class_mix_psi: float = 0.2  # PSI of the predicted-class mix
    accuracy_drop: float = 0.05  # where labels arrived: reference accuracy - window accuracy
    min_rows: int = 50  # a smaller window (labeled rows, for accuracy) is reported, never flagged


@dataclass
class MonitorAppConfig:
    """`ftlab-monitor`: a window of the prediction log against the model's reference (its
    validation split, recorded at registration); exit status 1 when drift is flagged."""
    ref: str = "???"  # registry ref or run dir whose rows (and reference) are compared
    registry: str = "registry"
    log: Optional[str] = None  # None: <registry>/predictions.db
    stream: Optional[str] = None  # only this stream's rows; None: every stream of the model
    last: Optional[int] = None  # the newest N rows of the window; None: all
    since: Optional[str] = None  # ISO time: rows logged at or after it
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    out: Optional[str] = None  # None: <log dir>/monitor/<ref>-<time>


@dataclass
class SelectAppConfig:
    """`ftlab-select`: the N logged inputs to label next (active learning), as a CSV for
    annotators."""
    ref: str = "???"  # registry ref or run dir whose logged rows are ranked
    registry: str = "registry"
    log: Optional[str] = None
    stream: Optional[str] = None
    n: int = 50
    strategy: str = "margin"  # least_confidence | margin | entropy
    diversity: bool = False  # k-center greedy over embedding projections among the uncertain
    pool: int = 5  # diversity: candidates = pool * n most uncertain
    include_labeled: bool = False  # rows whose label already arrived are skipped by default
    out: str = "label_queue.csv"


@dataclass
class GateConfig:
    """When a retrained candidate replaces production: on the same held-out rows it must beat
    production's `metric` by at least `margin` (and by more than nothing), and with
    `require_significance` McNemar's exact test on the paired predictions must give p < alpha."""
    metric: str = "accuracy"  # accuracy | macro_f1
    margin: float = 0.0
    require_significance: bool = False
    alpha: float = 0.05
    env: Optional[str] = None  # only rows whose dataset.env value is this (e.g. the new plant)
    split: str = "test"  # the held-out split both models are scored on (never trained on)


@dataclass
class RetrainAppConfig:
    """`ftlab-retrain`: newly labeled samples join production's training data; a candidate is
    fine-tuned with production's exact config, registered, compared with production on the
    same held-out rows, and promoted only if it passes the gate."""
    ref: str = "???"  # the registered model's name; its `baseline` alias is the reference
    baseline: str = "production"
    registry: str = "registry"
    labels: str = "???"  # annotated CSV (sample_id,label): ftlab-select's queue, label filled
    out: Optional[str] = None  # None: runs/<name>/retrain/<UTC time>
    promote: bool = True  # False: register the candidate and report, never promote
    gate: GateConfig = field(default_factory=GateConfig)
