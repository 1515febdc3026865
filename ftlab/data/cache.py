"""Decoded inputs cached on disk, so a run does not decode a whole image dataset again
(ELPV, and `dataset=folder`).

ELPV ships 2624 PNGs: decoding and resizing all of them took ~6 s of every ELPV run on this
CPU (a `debug=smoke` run and its 120 images included, since near-duplicate grouping and the
splits see every image). The result is kept as one .npy per (dataset, key) under
`$FTLAB_DATA_CACHE` (default `~/.cache/ftlab/data`; empty disables). The key names what the
array depends on (source files' sizes and times, image size, the resize method), so a
changed source or setting builds a new entry; a file that cannot be read is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    d = os.environ.get("FTLAB_DATA_CACHE", os.path.expanduser("~/.cache/ftlab/data"))
    return Path(d) if d else None


def file_key(path: Path | str) -> dict:
    """What identifies a source file's content cheaply: its path, size and mtime."""
    st = Path(path).stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 over arrays' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def cached(name: str, key: dict, build: Callable[[], np.ndarray]) -> np.ndarray:
    """`build()`'s array, from `<cache dir>/<name>-<hash of key>.npy` when it is there."""
    root = cache_dir()
    if root is None:
        return build()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = root / f"{name}-{digest}.npy"
    if path.exists():
        try:
            return np.load(path)
        except (OSError, ValueError) as e:  # truncated or foreign: rebuild it
            log.warning("rebuilding %s (%s)", path, e)
    array = build()
    if array.dtype.isbuiltin != 1:  # e.g. bfloat16: np.load would not give it back
        return array
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)  # atomic: a concurrent run reads the old file or the new one
    except OSError as e:  # a read-only home still trains, only slower
        log.warning("could not cache %s: %s", path, e)
    return array
