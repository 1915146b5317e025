"""A hyperparameter search space the way the course teaches it, and its coarse-to-fine narrowing.

A space maps dotted config fields to one distribution each, written as in a search YAML:

- ``loguniform(low, high)``: ``10**u``, u uniform in [log10 low, log10 high] -- learning rates,
  weight decay: every decade gets the same share of trials (``lr = 10**(-4*r)`` for (1e-4, 1));
- ``uniform(low, high)``; ``int(low, high)``: an integer in [low, high], both included;
- ``one_minus_loguniform(low, high)``: a beta-like value in [low, high] (0 < low < high < 1),
  sampled as ``1 - 10**r`` so that 1 - beta is log-uniform: 0.9 to 0.99 gets as many trials as
  0.99 to 0.999, where a uniform draw would spend 90% of them below 0.99;
- ``choice([a, b, ...])``: one of the listed values (YAML literals: numbers, strings, lists).

Sampling is random search, not a grid: with n trials every numeric field takes n distinct values,
so when only one of two fields matters, n trials try n values of it where an n-point grid tries
sqrt(n) (Bergstra & Bengio 2012). Draws come from one seeded generator in a fixed field order, so
a seed names its configurations.

Narrowing (one coarse-to-fine round): keep the best ``keep`` share of the finished trials (at least
two); each numeric field's new range is the span of the kept trials' values in the field's sampling
scale (log10 for loguniform, log10(1 - x) for one_minus_loguniform, linear otherwise), widened on
each side by ``margin`` times that span (or, when the kept values coincide, by ``margin`` times
the old range), and clipped to the old range; a choice keeps the values the kept trials used.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from schemas.errors import ConfigError

KINDS = ("loguniform", "uniform", "int", "one_minus_loguniform", "choice")
_SPEC = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.S)


@dataclass(frozen=True)
class Dim:
    """One field's distribution. ``low``/``high`` are in the field's own units."""

    field: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    # -- the sampling scale: uniform draws happen in it ------------------------------------------
    def _to(self, x: float) -> float:
        if self.kind == "loguniform":
            return math.log10(x)
        if self.kind == "one_minus_loguniform":
            return math.log10(1.0 - x)
        return float(x)

    def _from(self, u: float):
        if self.kind == "loguniform":
            return 10.0 ** u
        if self.kind == "one_minus_loguniform":
            return 1.0 - 10.0 ** u
        if self.kind == "int":
            return int(round(u))
        return u

    def bounds(self) -> tuple[float, float]:
        a, b = self._to(self.low), self._to(self.high)
        if self.kind == "int":  # every integer in [low, high] equally likely after rounding
            a, b = a - 0.5 + 1e-9, b + 0.5 - 1e-9
        return min(a, b), max(a, b)

    def sample(self, rng: np.random.Generator):
        if self.kind == "choice":
            return self.choices[int(rng.integers(len(self.choices)))]
        lo, hi = self.bounds()
        return self._from(float(rng.uniform(lo, hi)))

    def extremes(self) -> tuple:
        """The values at both ends of the sampling range (every choice of a choice): a config that
        takes these takes any draw."""
        if self.kind == "choice":
            return self.choices
        lo, hi = self.bounds()
        return self._from(lo), self._from(hi)

    @property
    def log_scale(self) -> bool:
        return self.kind in ("loguniform", "one_minus_loguniform")

    def __str__(self) -> str:
        if self.kind == "choice":
            return f"choice({list(self.choices)})"
        return f"{self.kind}({self.low:.6g}, {self.high:.6g})"


def parse(field: str, text: Any) -> Dim:
    """``field``'s distribution from its YAML text, e.g. ``loguniform(1e-4, 1)``.

    Raises:
        ConfigError: an unknown distribution, malformed arguments, an empty range, low >= high, or a
            log range touching 0 (or, for one_minus_loguniform, reaching 1).
    """
    where = f"search.space.{field}={text}"
    m = _SPEC.match(str(text))
    if not m or m.group(1) not in KINDS:
        raise ConfigError(f"{where}: not a distribution; write one of {', '.join(k + '(...)' for k in KINDS)}, "
                          "e.g. loguniform(1e-4, 1)")
    kind, body = m.groups()
    try:
        args = ast.literal_eval(f"({body},)") if body.strip() else ()
    except (ValueError, SyntaxError):
        raise ConfigError(f"{where}: cannot read the arguments; numbers for ranges, a [list] for choice") from None
    if kind == "choice":
        values = args[0] if len(args) == 1 and isinstance(args[0], list) else None
        if not values:
            raise ConfigError(f"{where}: choice needs a non-empty list, e.g. choice([32, 64, 128])")
        return Dim(field, kind, choices=tuple(tuple(v) if isinstance(v, list) else v for v in values))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: {kind} takes two numbers (low, high)")
    low, high = float(args[0]), float(args[1])
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{where}: an empty range (low {low:g} must be below high {high:g}); swap or widen it")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: a log range must stay above 0 (low is {low:g}); use e.g. loguniform(1e-5, {high:g})")
    if kind == "one_minus_loguniform" and not (0 < low and high < 1):
        raise ConfigError(f"{where}: beta-like values must lie strictly between 0 and 1, e.g. one_minus_loguniform(0.9, 0.999)")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ConfigError(f"{where}: int takes whole numbers, e.g. int(2, 10)")
    return Dim(field, kind, low, high)


def sample(space: dict[str, Dim], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configurations drawn at random; the same (space, n, seed) gives the same list."""
    rng = np.random.default_rng(seed)
    fields = sorted(space)
    return [{f: space[f].sample(rng) for f in fields} for _ in range(n)]


def narrow(space: dict[str, Dim], trials: list[tuple[dict[str, Any], float]], mode: str = "max",
           keep: float = 0.25, margin: float = 0.25) -> dict[str, Dim]:
    """The next round's space around the best trials (the rule of the module docstring).

    Args:
        trials: (sampled values, score) of every finished trial of the round.
        mode: ``max`` or ``min``: which end of the score is best.
    """
    ranked = sorted(trials, key=lambda t: t[1], reverse=(mode == "max"))
    top = ranked[: max(2, int(math.ceil(keep * len(ranked))))]
    out = {}
    for field, dim in space.items():
        values = [t[0][field] for t in top]
        if dim.kind == "choice":
            used = [c for c in dim.choices if c in values]
            out[field] = replace(dim, choices=tuple(used))
            continue
        lo, hi = dim.bounds()
        scaled = [dim._to(v) for v in values]
        a, b = min(scaled), max(scaled)
        pad = margin * ((b - a) or (hi - lo))
        a, b = max(lo, a - pad), min(hi, b + pad)
        new_low, new_high = sorted((dim._from(a), dim._from(b))) if dim.kind != "int" else (
            int(math.ceil(a)), int(math.floor(b)))
        if dim.kind == "int":
            new_low, new_high = max(int(dim.low), new_low), min(int(dim.high), max(new_high, new_low))
        out[field] = replace(dim, low=new_low, high=new_high)
    return out
