"""Counting XLA compilations: how many, of which functions, how long, how many came from the
persistent compilation cache. A run reports these per phase (results.json `compiles`), so a
recompiling step (a shape or a static argument changing every batch) shows up at once.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from ftlab.schema import ConfigError

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_active: list["CompileLog"] = []


@dataclasses.dataclass
class CompileLog:
    count: int = 0
    seconds: float = 0.0
    cache_hits: int = 0
    by_function: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __enter__(self) -> "CompileLog":
        _install()
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)

    def summary(self) -> dict:
        return {"count": self.count, "seconds": round(self.seconds, 3),
                "cache_hits": self.cache_hits, "by_function": dict(self.by_function)}


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE:
        for log in _active:
            log.count += 1
            log.seconds += duration
            log.by_function[kwargs.get("fun_name", "?")] += 1


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT:
        for log in _active:
            log.cache_hits += 1


_installed = False


def _install() -> None:
    """Register the listeners once per process (jax keeps them for its lifetime)."""
    global _installed
    if not _installed:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _installed = True


def enable_persistent_cache(directory: str) -> None:
    """Compile once per machine: every program (not only those slower than 1 s to compile,
    jax's default) is written to and read from `directory`. A model's many small init
    programs otherwise recompile on every start (EfficientNet-Lite0: 17 s -> 2 s warm)."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def checked_options(key: str, options: Mapping) -> dict:
    """XLA compiler options as jax.jit takes them, tried on a one-op program first, so a wrong
    name or value fails here with the config key named, not at a train step's compile."""
    options = dict(options)
    if options:
        try:
            jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
        except Exception as e:  # jax's runtime error: "INVALID_ARGUMENT: No such ..."
            msg = str(e).split(": ", 1)[-1].splitlines()[0]
            raise ConfigError(key, f"{msg} (XLA's debug options: xla/debug_options_flags.cc, "
                                   "or `XLA_FLAGS=--helpfull`)") from None
    return options
