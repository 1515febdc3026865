"""Parameter-efficient fine-tuning: LoRA on dense / 1x1 kernels (merged for deployment) and
bottleneck adapters on the output of chosen projections (kept as modules).

`apply_lora` and `apply_adapters` swap each matched `nnx.Linear` (or EfficientNet
`Pointwise`) for a wrapper that keeps the base `kernel` / `bias` Variables under the same
names, so pretrained loading, param paths and param-group rules are unchanged; only
`.../lora_a`, `.../lora_b` and `.../adapter/{down,up}/{kernel,bias}` are new. Which params
train is the schedule's business (e.g. `conf/schedule/minilm_lora.yaml`,
`minilm_adapters.yaml`). BitFit needs no module at all: it is a schedule that trains only
`.*/bias` and the head.

At the end of a run `export` writes the adapter params alone (`lora.safetensors`,
`adapters.safetensors`; `load_adapters` reads them back strictly) and, with `peft.merge`,
`merged.safetensors`: every weight with LoRA folded in (`load_weights` reads it).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftlab.models.dropout import Dropout
from ftlab.models.efficientnet import Pointwise
from ftlab.models.heads import ACTIVATIONS
from ftlab.models.loading import WEIGHTS, LoadError, read_tensors
from ftlab.models.precision import matmul
from ftlab.schema import AdapterRule, ConfigError, LoraRule, PeftConfig

DENSE = (nnx.Linear, Pointwise)  # modules whose `kernel` is (in, out) and forward x @ kernel
LORA_FILE, ADAPTERS_FILE, MERGED_FILE = \
    "lora.safetensors", "adapters.safetensors", "merged.safetensors"
# Torch's default Linear init (Kaiming uniform, a=sqrt(5)).
TORCH_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _dense(x, kernel, bias, dtype: str = "float32"):
    y = matmul(x, kernel[...], dtype)
    return y if bias is None else y + bias[...]


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
        self.lora_a = nnx.LoRAParam(TORCH_INIT(rngs.params(), (cin, rank), jnp.float32))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, cout), jnp.float32))
        self.scale = alpha / rank
        self.compute_dtype = "float32"  # the base matmul's; see ftlab.models.precision
        self.dropout = Dropout(dropout, deterministic=True,
                                   rngs=rngs if dropout > 0 else None)

    def delta(self):
        """The kernel update the adapter stands for, (in, out)."""
        return self.lora_a[...] @ self.lora_b[...] * self.scale

    def __call__(self, x):
        y = _dense(x, self.kernel, self.bias, self.compute_dtype)
        return y + (self.dropout(x) @ self.lora_a[...]) @ self.lora_b[...] * self.scale

    def merged(self) -> nnx.Module:
        """A module of the base class with `kernel + delta()`: same graph, size and speed."""
        state = {"kernel": nnx.Param(self.kernel[...] + self.delta().astype(self.kernel.dtype))}
        if self.bias is not None:
            state["bias"] = nnx.Param(self.bias[...])
        return nnx.merge(self.base_def, nnx.State(state))


class AdapterParam(nnx.Param):
    """A bottleneck adapter's weight: a Param (trainable, checkpointed) that `adapter_state`
    can select apart from the model's own."""


class _AdapterDense(nnx.Module):
    def __init__(self, kernel):
        self.kernel = AdapterParam(kernel)
        self.bias = AdapterParam(jnp.zeros(kernel.shape[1:], kernel.dtype))

    def __call__(self, x):
        return _dense(x, self.kernel, self.bias)


class Bottleneck(nnx.Module):
    """Houlsby et al. 2019's adapter, `y + up(act(down(y)))` (features -> size -> features);
    `up` starts at zero, so at first it is exactly the identity."""

    def __init__(self, features: int, size: int, activation: str, rngs: nnx.Rngs):
        self.down = _AdapterDense(TORCH_INIT(rngs.params(), (features, size), jnp.float32))
        self.up = _AdapterDense(jnp.zeros((size, features), jnp.float32))
        self.activation = ACTIVATIONS[activation]

    def __call__(self, y):
        return y + self.up(self.activation(self.down(y)))


class AdapterLinear(nnx.Module):
    """`adapter(base(x))`: a bottleneck adapter on a dense / 1x1 module's output, before the
    model's dropout, residual add and LayerNorm. Holds the base `kernel` (and `bias`)
    Variables under their own names. Not mergeable: the adapter is nonlinear."""

    def __init__(self, base: nnx.Module, size: int, activation: str, rngs: nnx.Rngs):
        self.kernel = base.kernel
        self.bias = getattr(base, "bias", None)
        self.adapter = Bottleneck(base.kernel.shape[1], size, activation, rngs)
        self.compute_dtype = "float32"  # the base matmul's; see ftlab.models.precision

    def __call__(self, x):
        return self.adapter(_dense(x, self.kernel, self.bias, self.compute_dtype))


def _join(path) -> str:
    return "/".join(map(str, path))


def _modules(model: nnx.Module, kinds) -> dict[str, nnx.Module]:
    return {_join(p): m for p, m in nnx.iter_modules(model) if isinstance(m, kinds) and p}


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


def _match(rules: Mapping, modules: Mapping[str, nnx.Module], section: str) -> dict:
    """rule name -> the module paths its pattern fully matches; a bad regex, a rule matching
    nothing, or a module matched twice is a ConfigError naming `peft.<section>.<name>`."""
    matched, owner = {}, {}
    for name, rule in rules.items():
        key = f"peft.{section}.{name}"
        try:
            rx = re.compile(rule.pattern)
        except re.error as e:
            raise ConfigError(f"{key}.pattern", f"bad regex: {e}") from None
        matched[name] = [p for p in modules if rx.fullmatch(p)]
        if not matched[name]:
            raise ConfigError(key, f"pattern '{rule.pattern}' matches no Dense/1x1 kernel; "
                                   f"kernels are under: {_families(modules)}")
        for p in matched[name]:
            if p in owner:
                raise ConfigError(key, f"also matched by rule '{owner[p]}' on '{p}'; "
                                       "make the patterns disjoint")
            owner[p] = name
    return matched


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
    for name, rule in rules.items():
        if rule.rank < 1:
            raise ConfigError(f"peft.lora.{name}.rank", f"must be >= 1, got {rule.rank}")
        if not 0.0 <= rule.dropout < 1.0:
            raise ConfigError(f"peft.lora.{name}.dropout",
                              f"must be in [0, 1), got {rule.dropout}")
    dense = _modules(model, DENSE)
    matched = _match(rules, dense, "lora")
    rngs = nnx.Rngs(params=seed + 1, dropout=seed + 2)
    for name, paths in matched.items():
        r = rules[name]
        for p in paths:
            _replace(model, p, LoRALinear(dense[p], r.rank, r.alpha, r.dropout, rngs))
    return matched


def apply_adapters(model: nnx.Module, rules: Mapping[str, AdapterRule], *,
                   seed: int = 0) -> dict[str, list[str]]:
    """Put a bottleneck adapter on the output of every dense / 1x1 module whose module path
    fully matches a rule (for BERT: `layers/N/attention/out` and `layers/N/fc2`).

    Args:
      model: mutated in place; apply LoRA first (a module cannot carry both).
      rules: name -> AdapterRule; errors name `peft.adapters.<name>`.
      seed: for the `down` projections' init.
    Returns:
      rule name -> the module paths it wrapped.
    """
    for name, rule in rules.items():
        if rule.size < 1:
            raise ConfigError(f"peft.adapters.{name}.size", f"must be >= 1, got {rule.size}")
        if rule.activation not in ACTIVATIONS:
            raise ConfigError(f"peft.adapters.{name}.activation",
                              f"'{rule.activation}' is not one of: {', '.join(ACTIVATIONS)}")
    modules = _modules(model, (*DENSE, LoRALinear))
    matched = _match(rules, modules, "adapters")
    for name, paths in matched.items():
        for p in paths:
            if isinstance(modules[p], LoRALinear):
                raise ConfigError(f"peft.adapters.{name}", f"'{p}' already has LoRA "
                                  "(peft.lora); make the two sets of patterns disjoint")
    rngs = nnx.Rngs(params=seed + 3)
    for name, paths in matched.items():
        r = rules[name]
        for p in paths:
            _replace(model, p, AdapterLinear(modules[p], r.size, r.activation, rngs))
    return matched


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every LoRA adapter into its kernel, in place: without bottleneck adapters the
    model is then the base architecture again (same param paths, count and forward cost).
    Returns `model`."""
    for p in _modules(model, LoRALinear):
        _replace(model, p, _module_at(model, p).merged())
    return model


def lora_state(model: nnx.Module) -> nnx.State:
    """Just the LoRA params (`.../lora_a`, `.../lora_b`): small, saved on their own."""
    return nnx.state(model, nnx.LoRAParam)


def adapter_state(model: nnx.Module) -> nnx.State:
    """Just the bottleneck adapters' params (`.../adapter/{down,up}/{kernel,bias}`)."""
    return nnx.state(model, AdapterParam)


PEFT_PARAMS = nnx.Any(nnx.LoRAParam, AdapterParam)


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {_join(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def _save(state: nnx.State, path: Path) -> dict[str, np.ndarray]:
    """Write a state to a safetensors file under '/'-joined names."""
    from safetensors.numpy import save_file
    tensors = _flat(state)
    save_file(tensors, str(path))
    return tensors


def save_lora(model: nnx.Module, path: Path) -> dict[str, np.ndarray]:
    return _save(lora_state(model), path)


def save_adapters(model: nnx.Module, path: Path) -> dict[str, np.ndarray]:
    return _save(adapter_state(model), path)


def save_weights(model: nnx.Module, path: Path) -> dict[str, np.ndarray]:
    """Every weight (params and BatchNorm statistics), e.g. of a merged model."""
    return _save(nnx.state(model, WEIGHTS), path)


def _load_strict(model: nnx.Module, kind, tensors: Mapping[str, np.ndarray], source: str,
                 hint: str) -> list[str]:
    """Write `tensors` into the model's variables of `kind`; every one of them must be in
    `tensors` with the same shape and every tensor must be used, else one LoadError names
    them all. Returns the names loaded."""
    state = nnx.state(model, kind)
    variables = {_join(p): v for p, v in nnx.to_flat_state(state)}
    problems = [f"'{n}' missing" for n in variables if n not in tensors]
    problems += [f"'{n}': shape {tuple(tensors[n].shape)} in the file, "
                 f"{tuple(v.shape)} in the model"
                 for n, v in variables.items() if n in tensors and
                 tuple(tensors[n].shape) != tuple(v.shape)]
    problems += [f"'{n}' is not in the model" for n in tensors if n not in variables]
    if problems:
        raise LoadError(f"{source}: {len(problems)} mismatch(es): {'; '.join(problems)}; "
                        f"{hint}")
    for n, v in variables.items():
        v.set_value(jnp.asarray(tensors[n], v.dtype))
    nnx.update(model, state)
    return list(variables)


def load_adapters(model: nnx.Module, path: Path | str) -> list[str]:
    """Load a run's saved LoRA / bottleneck adapter params into `model`, built with the
    same `peft` config (its base weights come from elsewhere: the pretrained source).

    Args:
      path: a run dir (reads its lora.safetensors and adapters.safetensors) or one file.
        Strict: every adapter param of the model must be loaded with its shape, every
        tensor read must be used; one LoadError names each that is not.
    Returns:
      the param paths loaded.
    """
    path = Path(path)
    if path.is_dir():
        files = [path / n for n in (LORA_FILE, ADAPTERS_FILE) if (path / n).is_file()]
        if not files:
            raise LoadError(f"{path}: no {LORA_FILE} or {ADAPTERS_FILE}; give the dir of a "
                            "run with peft.lora or peft.adapters, or one of those files")
    elif path.is_file():
        files = [path]
    else:
        raise LoadError(f"{path} does not exist; give a run dir or its {LORA_FILE} / "
                        f"{ADAPTERS_FILE}")
    tensors = {}
    for f in files:
        tensors.update(read_tensors(f))
    return _load_strict(model, PEFT_PARAMS, tensors, " + ".join(map(str, files)),
                        "build the model with the run's peft config (its config.yaml) "
                        "and give the run dir to load both files")


def load_weights(model: nnx.Module, path: Path | str) -> list[str]:
    """Load a full weights file (`merged.safetensors`) into `model` (concrete or
    `nnx.eval_shape`), strictly: every weight present with its shape, nothing extra."""
    return _load_strict(model, WEIGHTS, read_tensors(Path(path)), str(path),
                        "build the model with the run's model config and, if the run had "
                        "bottleneck adapters, its peft.adapters (LoRA is already merged)")


UNMERGED = ("bottleneck adapters are nonlinear, so not merged: they are in "
            f"{ADAPTERS_FILE} and stay as .../adapter/* tensors in {MERGED_FILE} "
            "(load it into a model built with the same peft.adapters)")


def export(model: nnx.Module, cfg: PeftConfig, run_dir: Path, predict) -> dict:
    """End of a PEFT run: save the LoRA and adapter params alone (`lora.safetensors`,
    `adapters.safetensors`); with `cfg.merge`, fold LoRA into a copy, save all its weights
    (`merged.safetensors`) and report its test accuracy and how far its logits move.

    Args:
      predict: model -> (test logits, labels) as numpy arrays.
    """
    run_dir = Path(run_dir)
    has_lora = bool(_flat(lora_state(model)))
    out = {}
    if has_lora:
        save_lora(model, run_dir / LORA_FILE)
    if _flat(adapter_state(model)):
        save_adapters(model, run_dir / ADAPTERS_FILE)
        out["peft/unmerged"] = UNMERGED
    if not cfg.merge:
        return out
    merged = merge_lora(nnx.clone(model))
    save_weights(merged, run_dir / MERGED_FILE)
    if has_lora:
        ref, labels = predict(model)
        logits, _ = predict(merged)
        out.update({"merged/test/accuracy": float((logits.argmax(-1) == labels).mean()),
                    "merged/test/max_abs_logit_diff": float(np.abs(logits - ref).max())})
    return out
