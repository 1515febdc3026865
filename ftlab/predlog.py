"""The prediction log and a model's drift reference: the data `ftlab-predict` writes and
`ftlab-monitor` / `ftlab-select` / `ftlab-retrain` read.

The log is one SQLite file (stdlib, no server, safe for concurrent writers in WAL mode):
`predictions` is append-only (never updated), one row per input scored, with the model
version and a UTC timestamp; labels that arrive later go to `labels`, keyed by (stream,
sample_id), and are joined on read. Each row keeps the class probabilities and the input's
embedding projected onto the reference's principal axes (a few numbers, enough for drift
tests), not the full embedding.

A model's reference (`reference.npz` in its dir) is its validation split scored the same way
at registration: the distribution a window of the log is compared against.
"""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path
from typing import Sequence

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  ts REAL NOT NULL,              -- unix seconds
  model TEXT NOT NULL,           -- registry name, or the run dir
  version TEXT NOT NULL,         -- registry version ('3'), or 'run'
  stream TEXT NOT NULL,          -- where the inputs came from (dataset:split, a folder, ...)
  sample_id TEXT NOT NULL,
  input TEXT,                    -- image path or text, for annotators
  env TEXT,                      -- the input's environment, where known
  pred INTEGER NOT NULL,
  pred_name TEXT NOT NULL,
  confidence REAL NOT NULL,      -- top class probability
  margin REAL NOT NULL,          -- top - second probability
  entropy REAL NOT NULL,         -- of the class probabilities, nats
  probs TEXT NOT NULL,           -- JSON list, one per class
  proj TEXT NOT NULL             -- JSON list: embedding on the reference's principal axes
);
CREATE INDEX IF NOT EXISTS predictions_model ON predictions (model, version, stream, ts);
CREATE TABLE IF NOT EXISTS labels (
  stream TEXT NOT NULL,
  sample_id TEXT NOT NULL,
  label INTEGER NOT NULL,
  ts REAL NOT NULL,
  PRIMARY KEY (stream, sample_id)
);
"""


def connect(path: str | Path) -> sqlite3.Connection:
    """The log at `path` (created with its tables if new), in WAL mode with a generous lock
    timeout, so several writers and readers can share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60.0)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA)
    return con


def uncertainty(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of class probabilities: confidence (top probability), margin (top minus
    second) and entropy (nats). Lower confidence / margin and higher entropy: less sure."""
    p = np.asarray(probs, np.float64)
    top2 = np.sort(p, axis=-1)[:, -2:] if p.shape[1] > 1 else np.concatenate(
        [np.zeros_like(p), p], axis=1)
    ent = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(-1)
    return {"confidence": top2[:, 1], "margin": top2[:, 1] - top2[:, 0], "entropy": ent}


def append(path: str | Path, *, model: str, version: str, stream: str, class_names: Sequence[str],
           sample_ids: Sequence[str], probs: np.ndarray, proj: np.ndarray,
           inputs: Sequence[str | None] | None = None, envs: Sequence[str | None] | None = None,
           ts: float | None = None) -> int:
    """Append one row per input in one transaction; returns the number of rows."""
    n = len(sample_ids)
    probs, proj = np.asarray(probs, np.float64), np.asarray(proj, np.float64)
    if probs.shape[0] != n or proj.shape[0] != n:
        raise ValueError(f"{n} sample ids but {probs.shape[0]} probability rows and "
                         f"{proj.shape[0]} projection rows")
    u = uncertainty(probs)
    pred = probs.argmax(-1)
    ts = time.time() if ts is None else ts
    inputs = inputs if inputs is not None else [None] * n
    envs = envs if envs is not None else [None] * n
    rows = [(ts, model, str(version), stream, str(sample_ids[i]), inputs[i], envs[i],
             int(pred[i]), class_names[pred[i]], float(u["confidence"][i]),
             float(u["margin"][i]), float(u["entropy"][i]),
             json.dumps([round(float(v), 6) for v in probs[i]]),
             json.dumps([round(float(v), 6) for v in proj[i]])) for i in range(n)]
    con = connect(path)
    try:
        with con:
            con.executemany(
                "INSERT INTO predictions (ts, model, version, stream, sample_id, input, env, "
                "pred, pred_name, confidence, margin, entropy, probs, proj) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    finally:
        con.close()
    return n


def add_labels(path: str | Path, stream: str, sample_ids: Sequence[str],
               labels: Sequence[int], ts: float | None = None) -> int:
    """Record labels that arrived for logged inputs (a later label for the same input
    replaces the earlier one); returns the number recorded."""
    ts = time.time() if ts is None else ts
    con = connect(path)
    try:
        with con:
            con.executemany("INSERT OR REPLACE INTO labels (stream, sample_id, label, ts) "
                            "VALUES (?, ?, ?, ?)",
                            [(stream, str(s), int(y), ts) for s, y in zip(sample_ids, labels)])
    finally:
        con.close()
    return len(sample_ids)


@dataclasses.dataclass
class Window:
    """Rows of the log, oldest first, as arrays; `label` is -1 where none has arrived."""
    id: np.ndarray
    ts: np.ndarray
    version: np.ndarray  # str
    stream: np.ndarray  # str
    sample_id: np.ndarray  # str
    input: np.ndarray  # object (str or None)
    env: np.ndarray  # object (str or None)
    pred: np.ndarray
    pred_name: np.ndarray  # str
    confidence: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    probs: np.ndarray  # (n, classes)
    proj: np.ndarray  # (n, k)
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.id)


def read(path: str | Path, *, model: str | None = None, version: str | None = None,
         stream: str | None = None, since: float | None = None,
         last: int | None = None) -> Window:
    """The rows matching every filter given (`since`: unix seconds; `last`: the newest N),
    oldest first, with arrived labels joined."""
    if not Path(path).exists():
        raise FileNotFoundError(f"log: {path} does not exist; ftlab-predict writes it")
    where, args = [], []
    for col, val in (("p.model", model), ("p.version", version), ("p.stream", stream)):
        if val is not None:
            where.append(f"{col} = ?")
            args.append(str(val))
    if since is not None:
        where.append("p.ts >= ?")
        args.append(float(since))
    sql = ("SELECT p.id, p.ts, p.version, p.stream, p.sample_id, p.input, p.env, p.pred, "
           "p.pred_name, p.confidence, p.margin, p.entropy, p.probs, p.proj, l.label "
           "FROM predictions p "
           "LEFT JOIN labels l ON l.stream = p.stream AND l.sample_id = p.sample_id"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY p.id DESC")
    if last is not None:
        sql += f" LIMIT {int(last)}"
    con = connect(path)
    try:
        rows = con.execute(sql, args).fetchall()[::-1]
    finally:
        con.close()
    col = list(zip(*rows)) if rows else [[] for _ in range(15)]
    probs = [json.loads(s) for s in col[12]]
    proj = [json.loads(s) for s in col[13]]
    return Window(
        id=np.asarray(col[0], np.int64), ts=np.asarray(col[1], np.float64),
        version=np.asarray(col[2], str), stream=np.asarray(col[3], str),
        sample_id=np.asarray(col[4], str), input=np.asarray(col[5], object),
        env=np.asarray(col[6], object), pred=np.asarray(col[7], np.int64),
        pred_name=np.asarray(col[8], str), confidence=np.asarray(col[9], np.float64),
        margin=np.asarray(col[10], np.float64), entropy=np.asarray(col[11], np.float64),
        probs=np.asarray(probs, np.float64).reshape(len(rows), -1 if rows else 0),
        proj=np.asarray(proj, np.float64).reshape(len(rows), -1 if rows else 0),
        label=np.asarray([-1 if y is None else y for y in col[14]], np.int64))


@dataclasses.dataclass
class Reference:
    """A model's validation split scored at registration: what drift is measured against.
    `mean` and `axes` (k principal axes of the validation embeddings, unit rows) define the
    projection every logged embedding goes through."""
    class_names: list[str]
    probs: np.ndarray  # (n, classes)
    labels: np.ndarray  # (n,)
    proj: np.ndarray  # (n, k)
    mean: np.ndarray  # (d,)
    axes: np.ndarray  # (k, d)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        return (np.asarray(embeddings, np.float64) - self.mean) @ self.axes.T


def fit_reference(class_names: Sequence[str], probs: np.ndarray, labels: np.ndarray,
                  embeddings: np.ndarray, k: int = 4) -> Reference:
    """The reference from validation outputs: principal axes by SVD of the centred
    embeddings (sign fixed so each axis' largest coordinate is positive: deterministic)."""
    emb = np.asarray(embeddings, np.float64)
    mean = emb.mean(0)
    _, _, vt = np.linalg.svd(emb - mean, full_matrices=False)
    axes = vt[:min(k, len(vt))]
    axes = axes * np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(1)])[:, None]
    ref = Reference(list(class_names), np.asarray(probs, np.float64),
                    np.asarray(labels, np.int64), np.zeros((len(emb), len(axes))), mean, axes)
    ref.proj = ref.project(emb)
    return ref


def save_reference(path: str | Path, ref: Reference) -> None:
    np.savez(path, class_names=np.asarray(ref.class_names, str), probs=ref.probs,
             labels=ref.labels, proj=ref.proj, mean=ref.mean, axes=ref.axes)


def load_reference(path: str | Path) -> Reference:
    with np.load(path) as z:
        return Reference([str(c) for c in z["class_names"]], z["probs"], z["labels"],
                         z["proj"], z["mean"], z["axes"])
