"""The model registry (`ftlab-registry`): numbered versions of finished runs, and aliases
(`production`, `candidate`, ...) that point at them.

A local store, no server: `<root>/registry.db` (SQLite, WAL) holds the versions, the alias
pointers and every alias change; `<root>/<name>/v<N>/` holds a self-contained, run-dir-shaped
copy of the run (its config, data manifest, results and only the best checkpoint), so the
code that reads run dirs (`ftlab.runs.load_config` / `load_model`) reads a version unchanged.

Every change is one `BEGIN IMMEDIATE` transaction, so concurrent writers queue instead of
losing updates. A version is copied into `<root>/.tmp/` first and renamed into place inside
the transaction that numbers it: a crash never leaves half a version visible.
An alias's history is a stack: `promote` pushes, `rollback` pops.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from ftlab.schema import ConfigError

DB = "registry.db"
PRODUCTION = "production"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
ALIAS = re.compile(r"[a-z][a-z0-9_-]*")
RESERVED = ("logs",)  # <root>/logs: the Hydra outputs of ftlab-predict / monitor / retrain
REF = re.compile(r"(?P<name>[^@:]+)(?:@(?P<alias>[^@:]+)|:v?(?P<version>\d+))?")
# What a version keeps of its run dir (the first three are required), besides the checkpoint.
FILES = ("config.yaml", "manifest.csv", "results.json", "tasks.json", "data_summary.json",
         "model.json", "run_info.json", "metrics.jsonl")
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS versions (
        name TEXT NOT NULL, version INTEGER NOT NULL, created TEXT NOT NULL,
        run_dir TEXT NOT NULL, step INTEGER NOT NULL, metrics TEXT NOT NULL,
        config_sha256 TEXT NOT NULL, data_sha256 TEXT NOT NULL, parent INTEGER,
        note TEXT NOT NULL DEFAULT '', wandb TEXT, PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS aliases (
        name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
        PRIMARY KEY (name, alias))""",
    # action: promote (a push; `popped` once a rollback undid it) or rollback.
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, name TEXT NOT NULL,
        alias TEXT NOT NULL, action TEXT NOT NULL, from_version INTEGER,
        to_version INTEGER NOT NULL, popped INTEGER NOT NULL DEFAULT 0)""",
)


def default_root() -> Path:
    """`$FTLAB_REGISTRY`, else `registry/` (relative to the working directory)."""
    return Path(os.environ.get("FTLAB_REGISTRY") or "registry")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- the database -------------------------------------------------------------------------

def _root(root) -> Path:
    return default_root() if root is None else Path(root)


@contextlib.contextmanager
def _db(root: Path, create: bool = True):
    """A connection in autocommit mode (transactions are explicit), closed on exit; None
    when `create` is false and there is no registry yet (readers never create one)."""
    path = Path(root) / DB
    if not create and not path.exists():
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60, isolation_level=None)
    con.row_factory = sqlite3.Row
    try:
        if create:
            con.execute("PRAGMA journal_mode=WAL")  # readers never block the one writer
            with _write(con):
                for stmt in SCHEMA:
                    con.execute(stmt)
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def _write(con: sqlite3.Connection):
    """One write transaction, taken before any read so concurrent writers queue."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _names(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT DISTINCT name FROM versions ORDER BY name")]


def _numbers(con, name: str) -> list[int]:
    return [r[0] for r in con.execute(
        "SELECT version FROM versions WHERE name = ? ORDER BY version", (name,))]


def _aliases(con, name: str) -> dict[str, int]:
    return {r[0]: r[1] for r in con.execute(
        "SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,))}


def _record(con, root: Path, row) -> dict:
    rec = dict(row)
    rec["metrics"] = json.loads(rec["metrics"])
    rec["aliases"] = [a for a, v in _aliases(con, rec["name"]).items() if v == rec["version"]]
    rec["dir"] = str(version_dir(root, rec["name"], rec["version"]))
    return rec


def version_dir(root, name: str, version: int) -> Path:
    return Path(root) / name / f"v{int(version)}"


# --- resolving references -----------------------------------------------------------------

def _resolve(con, ref: str, key: str = "ref") -> tuple[str, int]:
    """(name, version) of `name`, `name@alias` or `name:N`; errors list what exists."""
    m = REF.fullmatch(ref)
    if m is None:
        raise ConfigError(key, f"'{ref}' is neither a run dir nor a registry ref; give "
                               "<name> (its production), <name>@<alias> or <name>:<version>")
    name = m["name"]
    names = _names(con) if con is not None else []
    if name not in names:
        where = (f"registered: {', '.join(names)}" if names else "the registry is empty: "
                 "register a run with `ftlab-registry register RUN_DIR`")
        what = "neither a run dir nor a registered model" if key == "ref" else \
            "not a registered model"
        raise ConfigError(key, f"'{name}' is {what} ({where})")
    numbers = _numbers(con, name)
    if m["version"] is not None:
        if int(m["version"]) not in numbers:
            raise ConfigError(key, f"{name} has no version {m['version']}; versions: "
                                   f"{', '.join(map(str, numbers))}")
        return name, int(m["version"])
    alias = m["alias"] or PRODUCTION
    aliases = _aliases(con, name)
    if alias not in aliases:
        have = ", ".join(f"{a} -> v{v}" for a, v in aliases.items()) or "none"
        raise ConfigError(key, f"{name} has no alias '{alias}' (aliases: {have}; versions: "
                               f"{', '.join(map(str, numbers))}); give {name}:<version> or "
                               f"`ftlab-registry promote {name} <version> --alias {alias}`")
    return name, aliases[alias]


def locate(ref: str, root=None) -> tuple[Path, str, str]:
    """(model dir, model name, version) of a user's `ref=` value: a run dir (version
    "run"), or a registry ref `name` (its production version), `name@alias`, `name:N`."""
    ref = str(ref)
    path = Path(ref)
    if path.is_dir() and (path / "config.yaml").exists():
        return path, str(path), "run"
    if "/" in ref or os.sep in ref:
        raise ConfigError("ref", f"{ref} is not a run dir (no config.yaml there); give "
                                   "the dir ftlab-train printed, or a registry ref "
                                   "<name>[@alias|:version]")
    root = _root(root)
    with _db(root, create=False) as con:
        name, version = _resolve(con, ref)
    vdir = version_dir(root, name, version)
    if not (vdir / "config.yaml").exists():
        raise ConfigError("ref", f"{name}:{version} is registered but {vdir} is missing; "
                                   f"was {root} moved or edited by hand?")
    return vdir, name, str(version)


def show(root, ref: str) -> dict:
    """The version a registry ref names: its record, its aliases and its lineage (its
    version, its parent, the parent's parent, ...)."""
    root = _root(root)
    with _db(root, create=False) as con:
        name, version = _resolve(con, str(ref), "ref")
        rec = _record(con, root, con.execute(
            "SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone())
        lineage, parent = [version], rec["parent"]
        while parent is not None and parent not in lineage:
            lineage.append(parent)
            row = con.execute("SELECT parent FROM versions WHERE name = ? AND version = ?",
                              (name, parent)).fetchone()
            parent = row[0] if row else None
    rec["lineage"] = lineage
    return rec


def versions(root=None, name: str | None = None) -> list[dict]:
    """Every version (of `name`, or of every model), oldest first, with its aliases."""
    root = _root(root)
    with _db(root, create=False) as con:
        names = [] if con is None else _names(con)
        if name is not None and name not in names:
            raise ConfigError("name", f"no registered model '{name}' (registered: "
                                      f"{', '.join(names) or 'none'})")
        if con is None:
            return []
        rows = con.execute("SELECT * FROM versions WHERE ? IS NULL OR name = ? "
                           "ORDER BY name, version", (name, name)).fetchall()
        return [_record(con, root, r) for r in rows]


def history(root, name: str, alias: str | None = None) -> list[dict]:
    """Every promote / rollback of `name`'s aliases (or of `alias`), oldest first."""
    with _db(_root(root), create=False) as con:
        if con is None or name not in _names(con):
            raise ConfigError("name", f"no registered model '{name}'")
        rows = con.execute("SELECT * FROM events WHERE name = ? AND (? IS NULL OR alias = ?) "
                           "ORDER BY id", (name, alias, alias)).fetchall()
    return [{"id": r["id"], "time": r["time"], "alias": r["alias"], "action": r["action"],
             "from": r["from_version"], "to": r["to_version"], "popped": bool(r["popped"])}
            for r in rows]


# --- changes ------------------------------------------------------------------------------

def _check_alias(alias: str) -> None:
    if not ALIAS.fullmatch(alias):
        raise ConfigError("alias", f"'{alias}' is not a valid alias: lower-case letters, "
                                   "digits, '_' and '-', starting with a letter "
                                   "(e.g. production, candidate)")


def _point(con, name: str, alias: str, version: int) -> dict:
    """Move `alias` to `version` (one row) and push the move onto its history."""
    old = _aliases(con, name).get(alias)
    if old == version:
        return {"name": name, "alias": alias, "from": old, "to": version, "changed": False}
    con.execute("INSERT INTO aliases (name, alias, version) VALUES (?, ?, ?) ON CONFLICT "
                "(name, alias) DO UPDATE SET version = excluded.version", (name, alias, version))
    con.execute("INSERT INTO events (time, name, alias, action, from_version, to_version) "
                "VALUES (?, ?, ?, 'promote', ?, ?)", (_now(), name, alias, old, version))
    return {"name": name, "alias": alias, "from": old, "to": version, "changed": True}


def promote(root, name: str, version: int, alias: str = PRODUCTION,
            wandb: bool = False) -> dict:
    """Point `name@alias` at `version`: {name, alias, from, to, changed}."""
    _check_alias(alias)
    root = _root(root)
    with _db(root) as con, _write(con):
        _resolve(con, f"{name}:{int(version)}", "version")
        out = _point(con, name, alias, int(version))
    if wandb and out["changed"]:
        out["wandb"] = _wandb_alias(root, name, out["to"], alias)
    return out


def rollback(root, name: str, alias: str = PRODUCTION, wandb: bool = False) -> dict:
    """Point `name@alias` back where it was before its latest (not yet undone) promotion."""
    _check_alias(alias)
    root = _root(root)
    with _db(root) as con, _write(con):
        _resolve(con, f"{name}@{alias}", "alias")
        last = con.execute(
            "SELECT id, from_version, to_version FROM events WHERE name = ? AND alias = ? "
            "AND action = 'promote' AND popped = 0 ORDER BY id DESC LIMIT 1",
            (name, alias)).fetchone()
        if last is None or last["from_version"] is None:
            raise ConfigError("rollback", f"{name}@{alias} has no earlier version to roll back "
                                          f"to: v{_aliases(con, name)[alias]} is the first "
                                          "it pointed at (or every later promotion is rolled "
                                          "back already)")
        back = last["from_version"]
        con.execute("UPDATE aliases SET version = ? WHERE name = ? AND alias = ?",
                    (back, name, alias))
        con.execute("UPDATE events SET popped = 1 WHERE id = ?", (last["id"],))
        con.execute("INSERT INTO events (time, name, alias, action, from_version, to_version) "
                    "VALUES (?, ?, ?, 'rollback', ?, ?)",
                    (_now(), name, alias, last["to_version"], back))
    out = {"name": name, "alias": alias, "from": last["to_version"], "to": back,
           "changed": True}
    if wandb:
        out["wandb"] = _wandb_alias(root, name, back, alias)
    return out


def finished(run_dir: Path) -> dict:
    """The run's results.json, checked to describe a finished run with its best checkpoint;
    reads only, so an unfinished run is refused before anything is copied."""
    run_dir = Path(run_dir)
    for f in FILES[:3]:
        if not (run_dir / f).exists():
            why = ("the run has not finished; rerun ftlab-train with the same overrides "
                   "to finish it" if f == "results.json" else
                   "give the dir ftlab-train printed (runs/<name>/<overrides>)")
            raise ConfigError("run_dir", f"{run_dir} has no {f}: {why}")
    results = json.loads((run_dir / "results.json").read_text())
    step = results.get("best_step")
    ckpt = run_dir / "ckpt" / "best" / str(step)
    if step is None or not (ckpt / "_CHECKPOINT_METADATA").exists():
        raise ConfigError("run_dir", f"{run_dir} has no best checkpoint (ckpt/best/{step}); "
                                     "rerun ftlab-train with the same overrides")
    return results


def _copy(run_dir: Path, dest: Path, step: int) -> None:
    """The run-dir-shaped copy: its files and only the best checkpoint's step dir (params
    and the metrics Orbax's best_fn reads)."""
    dest.mkdir(parents=True)
    for f in FILES:
        if (run_dir / f).exists():
            shutil.copy2(run_dir / f, dest / f)
    shutil.copytree(run_dir / "ckpt" / "best" / str(step), dest / "ckpt" / "best" / str(step))


def _publish(con, root: Path, tmp: Path, name: str, parent, aliases: list[str],
             fields: dict) -> int:
    """In the write transaction: number the private copy `tmp`, record it, point its
    aliases and rename it into place; returns its version."""
    numbers = _numbers(con, name)
    version = (numbers[-1] if numbers else 0) + 1
    if parent is ...:
        parent = _aliases(con, name).get(PRODUCTION)
    elif parent is not None and int(parent) not in numbers:
        raise ConfigError("parent", f"{name} has no version {parent}; versions: "
                                    f"{', '.join(map(str, numbers)) or 'none'}")
    row = dict(name=name, version=version, **fields,
               config_sha256=_sha256(tmp / "config.yaml"),
               data_sha256=_sha256(tmp / "manifest.csv"),
               parent=None if parent is None else int(parent))
    con.execute(f"INSERT INTO versions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()))
    for a in aliases:
        _point(con, name, a, version)
    (tmp / "version.json").write_text(json.dumps(
        {**row, "metrics": json.loads(row["metrics"])}, indent=2))
    dest = version_dir(root, name, version)
    if dest.exists():  # renamed by a process that crashed before its commit: never listed
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, dest)
    return version


def register(root, run_dir, name: str | None = None, aliases: Iterable[str] = (),
             parent=..., note: str = "",
             reference_fn: Callable[[Path], object] | None = None,
             wandb: bool = False) -> dict:
    """Register a finished run's best checkpoint as the next version of `name` (default:
    the run config's `name`) and point `aliases` at it.

    Args:
      parent: the version it descends from; `...` (default): `name`'s production version
        at registration, None for none.
      reference_fn: called on the private copy before it becomes visible (e.g.
        `ftlab.predict.write_reference`); if it raises, nothing is registered.
      wandb: also log the version as a W&B model artifact with its aliases.
    Returns the version's record (as `show`)."""
    root, run_dir = _root(root), Path(run_dir)
    results = finished(run_dir)
    if name is None:
        from omegaconf import OmegaConf
        name = str(OmegaConf.load(run_dir / "config.yaml").get("name") or "")
    if not NAME.fullmatch(name) or name in RESERVED:
        raise ConfigError("name", f"'{name}' is not a valid model name: letters, digits, "
                                  f"'_' and '-' (not {', '.join(RESERVED)}); give --name")
    aliases = list(dict.fromkeys(aliases))
    for a in aliases:
        _check_alias(a)
    step = int(results["best_step"])
    metrics = {k: v for k, v in results.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    fields = dict(created=_now(), run_dir=str(run_dir.resolve()), step=step,
                  metrics=json.dumps(metrics), note=note)
    with _db(root) as con:
        tmp = root / ".tmp" / f"{name}-{uuid.uuid4().hex[:12]}"
        try:
            _copy(run_dir, tmp, step)
            if reference_fn is not None:
                reference_fn(tmp)
            with _write(con):
                version = _publish(con, root, tmp, name, parent, aliases, fields)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    mirrored = _wandb_log(root, name, version, aliases) if wandb else None
    rec = show(root, f"{name}:{version}")
    if mirrored and mirrored.startswith("failed"):
        rec["wandb"] = mirrored
    return rec


def table(records: list[dict]) -> str:
    """`ftlab-registry list`: one row per version, grouped by model."""
    head = ("name", "version", "created", "aliases", "test acc", "test F1", "parent", "run dir")
    rows = [(r["name"], f"v{r['version']}", r["created"], ",".join(r["aliases"]) or "-",
             *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-"
               for k in ("test/accuracy", "test/macro_f1")),
             "-" if r["parent"] is None else f"v{r['parent']}", r["run_dir"]) for r in records]
    width = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, width)).rstrip()
                     for row in (head, *rows)) + "\n"


# --- the W&B mirror -----------------------------------------------------------------------

def _wandb_log(root: Path, name: str, version: int, aliases: list[str]) -> str:
    """Log the version dir as a W&B model artifact aliased `ftlab-v<N>` and `aliases`
    (offline unless the run's logger or $WANDB_MODE says online); returns its W&B path, or
    why it failed (the version is registered already: the local registry is the truth)."""
    from omegaconf import OmegaConf
    vdir = version_dir(root, name, version)
    logger = OmegaConf.load(vdir / "config.yaml").get("logger") or {}
    mode = os.environ.get("WANDB_MODE") or (
        "online" if logger.get("mode") == "online" else "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
        run = wandb.init(project=logger.get("project") or "ftlab", entity=logger.get("entity"),
                         job_type="register", name=f"register-{name}-v{version}", mode=mode,
                         dir=os.environ.get("WANDB_DIR") or str(root))
        try:
            art = wandb.Artifact(name, type="model", metadata=json.loads(
                (vdir / "version.json").read_text()))
            art.add_dir(str(vdir))
            run.log_artifact(art, aliases=[f"ftlab-v{version}", *aliases])
            path = "/".join(p for p in (run.entity, run.project, name) if p)
        finally:
            run.finish()
    except Exception as e:  # noqa: BLE001 (network, auth)
        return f"failed: {type(e).__name__}: {e}"
    with _db(root) as con, _write(con):
        con.execute("UPDATE versions SET wandb = ? WHERE name = ? AND version = ?",
                    (path, name, version))
    return path


def _wandb_alias(root: Path, name: str, version: int, alias: str) -> str:
    """Move the W&B artifact's `alias` to `version` (needs W&B online: the public API);
    the local change is already made, so a failure here is reported, not raised."""
    with _db(root, create=False) as con:
        path = con.execute("SELECT wandb FROM versions WHERE name = ? AND version = ?",
                           (name, version)).fetchone()[0]
    if not path:
        return f"skipped: {name}:{version} was not registered with --wandb"
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return f"skipped: WANDB_MODE={os.environ['WANDB_MODE']}; rerun online to mirror"
    try:
        import wandb
        art = wandb.Api().artifact(f"{path}:ftlab-v{version}", type="model")
        if alias not in art.aliases:
            art.aliases.append(alias)  # W&B moves it off the version that held it
            art.save()
    except Exception as e:  # noqa: BLE001 (network, auth: the local registry is the truth)
        return f"failed: {type(e).__name__}: {e}"
    return f"{path}:ftlab-v{version} is now {alias}"
