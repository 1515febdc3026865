"""Shared pieces of the benchmarks: a MiniLM train step per trainable set, and timing."""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from ftlab import models, optim
from ftlab.models.bert import BertClassifier
from ftlab.schema import ModelConfig, OptimizerConfig, PhaseConfig, TaskConfig
from ftlab.step import make_train_step, split_for_training


# MiniLM's last-2 fine-tuning: the head and encoder layers 4 and 5 trainable.
LAST2 = re.compile(r"(head|layers/[45])/.*")


def emit(name: str, value: float, unit: str, ratio_to: str | None = None, **extra) -> None:
    """One JSON line per figure."""
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit,
                      "ratio_to": ratio_to, **extra}), flush=True)


def child_result(script: str, args: list[str], env: dict | None = None
                 ) -> tuple[dict | None, str]:
    """Run `python <script> <args>` (a benchmark's child: one measurement in a fresh process;
    `env`: its environment, default this one's) and read its `RESULT {json}` line: (that
    dict, "") or (None, its last stderr line)."""
    p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                       cwd=Path(script).resolve().parent, env=env)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT ")), ""
    return None, (p.stderr.strip().splitlines() or [f"exit {p.returncode}, no output"])[-1]


def minilm(num_classes: int = 5) -> nnx.Module:
    return models.build(ModelConfig(variant="minilm-l6"), num_classes, seed=0)


def lite0(num_classes: int = 2) -> nnx.Module:
    return models.build(ModelConfig(arch="efficientnet_lite", variant="lite0"), num_classes,
                        seed=0)


def image_batch(batch: int, size: int, num_classes: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, num_classes, batch, dtype=np.int32),
            "weight": np.ones(batch, np.float32)}


def token_batch(batch: int, seq: int, num_classes: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, 30000, (batch, seq), dtype=np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "label": rng.integers(0, num_classes, batch, dtype=np.int32),
            "weight": np.ones(batch, np.float32)}


def conf_xla_options(model) -> dict:
    """The XLA compiler options ftlab's config gives this model's train step
    (conf/model/minilm.yaml or efficientnet_lite0.yaml `xla_options`), as ftlab-train
    compiles it."""
    name = "minilm" if isinstance(model, BertClassifier) else "efficientnet_lite0"
    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{name}.yaml")
    return dict(conf.get("xla_options") or {})


def ftlab_step(model, paths: set[str], start: int = 0, xla_options: dict | None = None):
    """ftlab's own step for `paths` trainable: (step_fn, (trainable, opt_state, stats), rest).
    `xla_options`: the step's XLA compiler options, by default the model config's."""
    graphdef, trainable, stats, rest = split_for_training(model, paths)
    # The step donates its carry; copy so the model keeps its own arrays for the next variant.
    trainable, stats = jax.tree.map(jnp.copy, (trainable, stats))
    ones = {p: 1.0 for p in paths}
    tx = optim.build(OptimizerConfig(), PhaseConfig(lr=1e-4), 1000, trainable, ones, ones)
    step = make_train_step(graphdef, tx, TaskConfig(), start, compiler_options=(
        conf_xla_options(model) if xla_options is None else xla_options))
    return step, (trainable, tx.init(trainable), stats), rest


def time_steps(step_fn, carry: tuple, rest, batch, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds per step after `warmup` steps (which include compilation)."""
    return interleaved({"step": (step_fn, list(carry), rest)}, batch, repeats, warmup)["step"]


def interleaved(steps: dict, batch, repeats: int = 5, warmup: int = 2,
                block: int = 1) -> dict[str, float]:
    """Median s/step of each name -> (step_fn, carry list, rest), `block` steps of each in
    turn (so a drifting CPU load falls on all alike; see in_turns); each carry is updated in
    place."""
    return in_turns({k: step_call(*v, batch) for k, v in steps.items()}, repeats, warmup, block)


def step_call(fn, carry: list, rest, batch):
    """A train step as a callable of the turn `i` (its dropout key), updating `carry` in place
    and waiting for the result."""
    key = jax.random.key(0)

    def one(i: int) -> None:
        *carry[:], m = fn(*carry, rest, batch, jax.random.fold_in(key, i))
        jax.block_until_ready((carry, m))
    return one


def in_turns(calls: dict, repeats: int = 5, warmup: int = 2, block: int = 1) -> dict[str, float]:
    """Median seconds of each name -> callable of the call index (which returns when its
    work is done), `block` calls of each in turn. With block > 1 the first call of each
    turn is not timed: the steady state, as a training loop runs (on a VM that hands memory
    freed for over ~2 s back to its host, the first call after another framework's turn
    pays to fault its memory back in; see benchmarks/vs_torch.py)."""
    times, n = {k: [] for k in calls}, 0
    for i in range(warmup + repeats):
        for name, fn in calls.items():
            for j in range(block):
                t0 = time.perf_counter()
                fn(n)
                n += 1
                if i >= warmup and (j or block == 1):
                    times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run(main) -> None:
    """A benchmark's entry point: the process set up as ftlab's commands set up theirs
    (ftlab/launch.py: glibc's malloc tunables, inherited by child processes), then `main`."""
    from ftlab.launch import reexec_with_malloc_tunables
    reexec_with_malloc_tunables()
    main()
