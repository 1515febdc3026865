"""Param groups: named, anchored regex rules over '/'-joined param paths.

Every param is matched by exactly one rule; a rule that matches nothing and rules that
overlap are errors naming the rule. A group trains from its `train_from` phase onward.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

from ftlab.schema import ConfigError, GroupRule, PhaseConfig


@dataclasses.dataclass(frozen=True)
class Groups:
    assignment: dict[str, str]  # param path -> rule name
    shapes: dict[str, tuple[int, ...]]
    rules: Mapping[str, GroupRule]
    phases: list[str]

    def trainable(self, phase: int) -> set[str]:
        """Param paths trained in phase number `phase` (0-based)."""
        live = {name for name, r in self.rules.items()
                if r.train_from is not None and self.phases.index(r.train_from) <= phase}
        return {p for p, g in self.assignment.items() if g in live}

    def multipliers(self, paths, attr: str) -> dict[str, float]:
        return {p: getattr(self.rules[self.assignment[p]], attr) for p in paths}

    def table(self) -> str:
        rows = [("group", "pattern", "tensors", "params", "lr_mult", "wd_mult", "trains from")]
        for name, r in self.rules.items():
            paths = [p for p, g in self.assignment.items() if g == name]
            count = sum(math.prod(self.shapes[p]) for p in paths)
            rows.append((name, r.pattern, str(len(paths)), f"{count:,}", f"{r.lr_mult:g}",
                         f"{r.wd_mult:g}", r.train_from or "frozen"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def _prefixes(paths, depth: int = 2) -> str:
    seen = sorted({"/".join(p.split("/")[:depth]) + "/" for p in paths})
    return ", ".join(seen[:20]) + (", ..." if len(seen) > 20 else "")


def assign(shapes: dict[str, tuple[int, ...]], rules: Mapping[str, GroupRule],
           phases: Mapping[str, PhaseConfig]) -> Groups:
    """Match every param path to exactly one rule; raise ConfigError naming the culprit."""
    if not rules:
        raise ConfigError("schedule.groups", "no param groups; add at least one rule")
    if not phases:
        raise ConfigError("schedule.phases", "no phases; add at least one")
    for name, p in phases.items():
        if p.epochs < 1:
            raise ConfigError(f"schedule.phases.{name}.epochs", "must be >= 1")
        from ftlab.optim import SCHEDULES
        if p.schedule not in SCHEDULES:
            raise ConfigError(f"schedule.phases.{name}.schedule",
                              f"'{p.schedule}' is not one of: {', '.join(SCHEDULES)}")
    compiled = {}
    for name, r in rules.items():
        if r.train_from is not None and r.train_from not in phases:
            raise ConfigError(f"schedule.groups.{name}.train_from",
                              f"no phase '{r.train_from}'; phases: {', '.join(phases)}")
        try:
            compiled[name] = re.compile(r.pattern)
        except re.error as e:
            raise ConfigError(f"schedule.groups.{name}.pattern", f"bad regex: {e}") from None
    matches = {name: {p for p in shapes if rx.fullmatch(p)} for name, rx in compiled.items()}
    for name, hit in matches.items():
        if not hit:
            raise ConfigError(f"schedule.groups.{name}",
                              f"pattern '{rules[name].pattern}' matches no parameter; "
                              f"param paths start with: {_prefixes(shapes)}")
    names = list(matches)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = sorted(matches[a] & matches[b])
            if both:
                raise ConfigError(f"schedule.groups.{a}",
                                  f"overlaps group '{b}' on {len(both)} params "
                                  f"(e.g. '{both[0]}'); make the patterns disjoint")
    assignment = {p: n for n, hit in matches.items() for p in hit}
    missing = sorted(set(shapes) - set(assignment))
    if missing:
        raise ConfigError("schedule.groups",
                          f"{len(missing)} params match no group (under {_prefixes(missing, 3)}); "
                          "add a rule (train_from: null freezes them)")
    groups = Groups(assignment, dict(shapes), dict(rules), list(phases))
    for i, name in enumerate(phases):
        if not groups.trainable(i):
            raise ConfigError(f"schedule.phases.{name}",
                              "trains no parameter; set some group's train_from to it")
    return groups


def select(paths, pattern: str, key: str) -> set[str]:
    """The paths `pattern` fully matches (the same anchored matching as group rules);
    a bad regex or one matching nothing is a ConfigError naming `key`."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(key, f"bad regex: {e}") from None
    hit = {p for p in paths if rx.fullmatch(p)}
    if not hit:
        raise ConfigError(key, f"pattern '{pattern}' matches no parameter; param paths "
                               f"start with: {_prefixes(paths)}")
    return hit
