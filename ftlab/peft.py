"""Parameter-efficient fine-tuning: LoRA adapters on dense / 1x1 kernels, merged for deployment.

`apply_lora` swaps each matched `nnx.Linear` (or EfficientNet `Pointwise`) for a `LoRALinear`
that keeps the base `kernel` / `bias` Variables under the same names, so pretrained loading,
param paths and param-group rules are unchanged; only `.../lora_a` and `.../lora_b` are new.
Which params train is the schedule's business (e.g. `conf/schedule/minilm_lora.yaml`).
BitFit needs no module at all: it is a schedule that trains only `.*/bias` and the head.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftlab.models.efficientnet import Pointwise
from ftlab.schema import ConfigError, LoraRule, PeftConfig

DENSE = (nnx.Linear, Pointwise)  # modules whose `kernel` is (in, out) and forward x @ kernel


class LoRALinear(nnx.Module):
    """`base(x) + dropout(x) @ lora_a @ lora_b * alpha / rank`, with `lora_b` zero at start
    so the wrapped model computes exactly what the base did.

    Holds the base module's own `kernel` (and `bias`) Variables and its graphdef, so
    `merged()` rebuilds a module of the base class and configuration.

    Dropout draws from its own 'dropout' stream (the models do not pass `rngs` to dense
    layers); like every Dropout here it is on only while this module holds trainable params.
    """

    def __init__(self, base: nnx.Module, rank: int, alpha: float, dropout: float,
                 rngs: nnx.Rngs):
        cin, cout = base.kernel.shape
        self.base_def = nnx.graphdef(base)
        self.kernel = base.kernel
        self.bias = getattr(base, "bias", None)  # nnx.Linear(use_bias=False) holds None
        init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # torch Kaiming
        self.lora_a = nnx.LoRAParam(init(rngs.params(), (cin, rank), jnp.float32))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, cout), jnp.float32))
        self.scale = alpha / rank
        self.dropout = nnx.Dropout(dropout, deterministic=True,
                                   rngs=rngs if dropout > 0 else None)

    def delta(self):
        """The kernel update the adapter stands for, (in, out)."""
        return self.lora_a[...] @ self.lora_b[...] * self.scale

    def __call__(self, x):
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y + (self.dropout(x) @ self.lora_a[...]) @ self.lora_b[...] * self.scale

    def merged(self) -> nnx.Module:
        """A module of the base class with `kernel + delta()`: same graph, size and speed."""
        state = {"kernel": nnx.Param(self.kernel[...] + self.delta().astype(self.kernel.dtype))}
        if self.bias is not None:
            state["bias"] = nnx.Param(self.bias[...])
        return nnx.merge(self.base_def, nnx.State(state))


def _join(path) -> str:
    return "/".join(map(str, path))


def _dense_paths(model: nnx.Module) -> dict[str, nnx.Module]:
    return {_join(p): m for p, m in nnx.iter_modules(model) if isinstance(m, DENSE) and p}


def _families(paths) -> str:
    """Module paths with numbers folded (`layers/*/fc1`), for error messages."""
    seen = sorted({re.sub(r"(?<=/)\d+(?=/|$)|^\d+(?=/)", "*", p) for p in paths})
    return ", ".join(seen[:20]) + (", ..." if len(seen) > 20 else "")


def _module_at(model: nnx.Module, path: str) -> nnx.Module:
    node = model
    for part in filter(None, path.split("/")):
        node = node[int(part)] if isinstance(node, nnx.List) else getattr(node, part)
    return node


def _replace(model: nnx.Module, path: str, new: nnx.Module) -> None:
    parent, _, leaf = path.rpartition("/")
    node = _module_at(model, parent)
    if isinstance(node, nnx.List):
        node[int(leaf)] = new
    else:
        setattr(node, leaf, new)


def apply_lora(model: nnx.Module, rules: Mapping[str, LoraRule], *,
               seed: int = 0) -> dict[str, list[str]]:
    """Wrap every dense / 1x1 module whose '/'-joined module path fully matches a rule.

    Args:
      model: mutated in place (a concrete or an `nnx.eval_shape` model).
      rules: name -> LoraRule; a rule matching no module, or a module matched by two
        rules, is a ConfigError naming `peft.lora.<name>`.
      seed: for the `lora_a` init (and the adapter's dropout stream).
    Returns:
      rule name -> the module paths it wrapped.
    """
    dense = _dense_paths(model)
    matched, owner = {}, {}
    for name, rule in rules.items():
        key = f"peft.lora.{name}"
        if rule.rank < 1:
            raise ConfigError(f"{key}.rank", f"must be >= 1, got {rule.rank}")
        if not 0.0 <= rule.dropout < 1.0:
            raise ConfigError(f"{key}.dropout", f"must be in [0, 1), got {rule.dropout}")
        try:
            rx = re.compile(rule.pattern)
        except re.error as e:
            raise ConfigError(f"{key}.pattern", f"bad regex: {e}") from None
        matched[name] = [p for p in dense if rx.fullmatch(p)]
        if not matched[name]:
            raise ConfigError(key, f"pattern '{rule.pattern}' matches no Dense/1x1 kernel; "
                                   f"kernels are under: {_families(dense)}")
        for p in matched[name]:
            if p in owner:
                raise ConfigError(key, f"also matched by rule '{owner[p]}' on '{p}'; "
                                       "make the patterns disjoint")
            owner[p] = name
    rngs = nnx.Rngs(params=seed + 1, dropout=seed + 2)
    for name, paths in matched.items():
        r = rules[name]
        for p in paths:
            _replace(model, p, LoRALinear(dense[p], r.rank, r.alpha, r.dropout, rngs))
    return matched


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel, in place: the model is then the base architecture
    again (same param paths, count and forward cost). Returns `model`."""
    wrapped = [_join(p) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]
    for p in wrapped:
        _replace(model, p, _module_at(model, p).merged())
    return model


def lora_state(model: nnx.Module) -> nnx.State:
    """Just the adapter params (`.../lora_a`, `.../lora_b`): small, saved on their own."""
    return nnx.state(model, nnx.LoRAParam)


def save_lora(model: nnx.Module, path: Path) -> dict[str, np.ndarray]:
    """Write the adapter params to a safetensors file under '/'-joined names."""
    from safetensors.numpy import save_file
    tensors = {_join(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(lora_state(model))}
    save_file(tensors, str(path))
    return tensors


def export(model: nnx.Module, cfg: PeftConfig, run_dir: Path, predict) -> dict[str, float]:
    """End of a LoRA run: save the adapters alone to `run_dir/lora.safetensors`; with
    `cfg.merge`, merge a copy and report its test accuracy and how far its logits move.

    Args:
      predict: model -> (test logits, labels) as numpy arrays.
    """
    save_lora(model, Path(run_dir) / "lora.safetensors")
    if not cfg.merge:
        return {}
    ref, labels = predict(model)
    out, _ = predict(merge_lora(nnx.clone(model)))
    return {"merged/test/accuracy": float((out.argmax(-1) == labels).mean()),
            "merged/test/max_abs_logit_diff": float(np.abs(out - ref).max())}
