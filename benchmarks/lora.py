"""What each PEFT recipe costs per MiniLM train step, next to full fine-tuning in the same run:
trainable params, their fraction, optimizer-state bytes and step time (median s/step after
warm-up), as ratios to full fine-tuning.

Each variant is a shipped config (`conf/peft/`, `conf/schedule/`) run through ftlab's own
path: `peft.apply_*`, `param_groups.assign`, `split_for_training`, `optim.build` (AdamW,
clipping over the trainable params) and `make_train_step`. Like the trainer
(trainer.cache_frozen=true) a step starts at the first stage holding a trainable param, on
that stage's cached input; where that is not stage 0, `uncached_seconds` is the step from the
tokens. Timed steps go round-robin over the variants (one step of each in turn), so load
drifting on a shared machine falls on all of them alike. MiniLM-L6 is random-init
(timing does not depend on the weights).

Run: python benchmarks/lora.py [--batch 16 --seq 128 --steps 3 --warmup 1]  (~2 min on a
2-core CPU; the README's table: --batch 32 --seq 128 --steps 5, ~3.5 min)
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import jax
from flax import nnx
from omegaconf import OmegaConf

from common import emit, ftlab_step, minilm, token_batch
from ftlab import param_groups, peft
from ftlab.models.loading import param_paths
from ftlab.schema import PeftConfig, ScheduleConfig
from ftlab.step import first_trainable_stage, set_modes

CONF = Path(__file__).resolve().parent.parent / "conf"
# name -> (peft config, schedule, phase whose trainable set is timed)
VARIANTS = {
    "full": ("none", "full", "train"),
    "last2": ("none", "minilm_head_top2", "top2"),
    "lora_qv_r8": ("lora_attention", "minilm_lora", "train"),
    "bitfit": ("none", "minilm_bitfit", "train"),
    "adapters_64": ("adapters", "minilm_adapters", "train"),
}


def load(schema, path: Path):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema),
                                               OmegaConf.load(path)))


def variant(peft_name: str, schedule_name: str, phase: str):
    """(model with the peft config applied, the phase's trainable param paths)."""
    cfg = load(PeftConfig, CONF / "peft" / f"{peft_name}.yaml")
    schedule = load(ScheduleConfig, CONF / "schedule" / f"{schedule_name}.yaml")
    model = minilm()
    peft.apply_lora(model, cfg.lora)
    peft.apply_adapters(model, cfg.adapters)
    groups = param_groups.assign(param_paths(model), schedule.groups, schedule.phases)
    return model, groups.trainable(list(schedule.phases).index(phase))


class Timed:
    """One variant's ftlab step from stage `start` (on that stage's cached input), its sizes,
    and the seconds of each timed call."""

    def __init__(self, model, paths: set[str], batch: dict, start: int):
        if start:
            set_modes(model, None)
            hidden = nnx.jit(lambda m, b: m.forward(b, 0, start))(model, batch)
            batch = {**batch, "hidden": hidden}
        self.step, self.carry, self.rest = ftlab_step(model, paths, start)
        self.batch, self.times, self.calls = batch, [], 0
        trainable, opt_state, _ = self.carry
        n = sum(x.size for x in jax.tree.leaves(trainable))
        total = sum(math.prod(s) for s in param_paths(model).values())
        self.sizes = {"trainable_params": n, "trainable_fraction": round(n / total, 6),
                      "optimizer_state_bytes": sum(x.nbytes for x in
                                                   jax.tree.leaves(opt_state))}

    def __call__(self, record: bool = True) -> None:
        key = jax.random.fold_in(jax.random.key(0), self.calls)
        t0 = time.perf_counter()
        *self.carry, m = self.step(*self.carry, self.rest, self.batch, key)
        jax.block_until_ready((self.carry, m))
        self.calls += 1
        if record:
            self.times.append(time.perf_counter() - t0)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    args = ap.parse_args()
    batch = token_batch(args.batch, args.seq)
    runs, uncached, specs = {}, {}, {}
    for name, spec in VARIANTS.items():
        model, paths = variant(*spec)
        start = first_trainable_stage(model, paths)
        specs[name] = {"peft": spec[0], "schedule": spec[1], "start_stage": start}
        runs[name] = Timed(model, paths, batch, start)
        if start:
            uncached[name] = Timed(model, paths, batch, 0)
    timed = [*runs.values(), *uncached.values()]
    for t in timed:  # compile
        for _ in range(1 + args.warmup):
            t(record=False)
    for _ in range(args.steps):  # round-robin: a shared CPU's load drifts onto every variant
        for t in timed:
            t()
    ref = runs["full"]
    for name, t in runs.items():
        extra = {**specs[name], **t.sizes}
        if name in uncached:
            extra["uncached_seconds"] = round(uncached[name].seconds, 4)
        if t is ref:
            emit("peft/full_step", t.seconds, "s/step", None, batch=args.batch, seq=args.seq,
                 **extra)
            continue
        emit(f"peft/{name}", t.seconds / ref.seconds, "x full step time", "peft/full_step",
             seconds=round(t.seconds, 4), optimizer_state_ratio=round(
                 t.sizes["optimizer_state_bytes"] / ref.sizes["optimizer_state_bytes"], 4),
             **extra)


if __name__ == "__main__":
    from common import run
    run(main)
