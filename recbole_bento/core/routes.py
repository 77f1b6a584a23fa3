"""Which models a server answers with, and which one answers a request: the routes (variants with
weights, an optional shadow), the sticky assignment of a request to a variant, and the registry
that holds the loaded variants as one immutable snapshot. No HTTP here.

A routes file (``RECBOLE_BENTO_ROUTES``, YAML or JSON; or the JSON body of ``POST /admin/routes``)::

    variants:
      control:   {model: "sasrec-ml-100k:v1", weight: 90}
      treatment: {model: "sasrec-ml-100k:v2", weight: 10}
    shadow: "gru4rec-ml-100k:v3"   # optional: scored off the request path, never returned
    salt: "exp-42"                 # optional: a new salt reshuffles every key

It is untrusted input (a file anyone with access to the host may have written, or a request body):
size-capped, every type checked, names and tags restricted, nothing but plain data parsed.

Assignment is a pure function of (salt, key, weights): sha256 of the salt and the key, read as a
number in [0, 1) and placed on the cumulative weights. Never Python's ``hash()``, which is salted
per process: the same key gets the same variant in every worker, on every replica, after restarts.

The registry swaps variants by replacing one ``Snapshot``: a request takes the snapshot of its
arrival once and finishes on it, so a swap never mixes two models in one answer.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import bentoml
import yaml

from .planner import Planner, RequestError

MAX_ROUTES_BYTES = 64 * 1024  # a routes file names a few models: anything larger is not one
MAX_VARIANTS = 16
MAX_SALT = 256
DEFAULT_VARIANT = "default"  # the one variant of a server started without a routes file
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_KEYS = {"variants", "shadow", "salt"}
_VARIANT_KEYS = {"model", "weight"}


class RoutesError(ValueError):
    """Routes that cannot be served as written; the message names the field and what to change."""


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # a BentoML tag, as written (``name`` alone: its latest version at load time)
    weight: float


@dataclass(frozen=True)
class Routes:
    variants: tuple[Variant, ...]
    shadow: str | None = None
    salt: str = ""

    def names(self) -> list[str]:
        return [v.name for v in self.variants]

    def assign(self, key: str | None) -> str:
        """The variant for *key* (sticky: the same key, salt and weights, the same variant);
        without a key, a random draw with the same proportions."""
        point = random.random() if key is None else bucket(self.salt, key)
        total = sum(v.weight for v in self.variants)
        running = 0.0
        for variant in self.variants:
            running += variant.weight
            if point * total < running:
                return variant.name
        return next(v.name for v in reversed(self.variants) if v.weight > 0)  # rounding at 1.0

    def as_dict(self) -> dict[str, Any]:
        """The routes as a routes file says them (the shared state file, logs)."""
        out: dict[str, Any] = {
            "variants": {v.name: {"model": v.model, "weight": v.weight} for v in self.variants}
        }
        if self.shadow:
            out["shadow"] = self.shadow
        if self.salt:
            out["salt"] = self.salt
        return out


def bucket(salt: str, key: str) -> float:
    """*key*'s point in [0, 1): the first 8 bytes of sha256(salt NUL key)."""
    digest = hashlib.sha256(salt.encode() + b"\0" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def single(model: str) -> Routes:
    """A server without a routes file: one variant, ``default``, with every request."""
    return Routes((Variant(DEFAULT_VARIANT, model, 1.0),))


def read(path: str | Path) -> Routes:
    """The routes in the file at *path* (``RoutesError`` for anything else)."""
    where = Path(path)
    try:
        if not where.is_file():
            raise RoutesError(f"routes file {where}: not a file")
        with open(where, "rb") as handle:  # never more than the cap, whatever the file became
            data = handle.read(MAX_ROUTES_BYTES + 1)
    except OSError as exc:
        raise RoutesError(f"routes file {where}: {exc.strerror or exc}") from None
    return parse(data, str(where))


def parse(data: bytes | str, source: str = "routes") -> Routes:
    """Routes from YAML or JSON text (JSON is read as YAML's subset)."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_ROUTES_BYTES:
        raise RoutesError(f"{source}: larger than {MAX_ROUTES_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RoutesError(f"{source}: not UTF-8 text") from None
    try:
        obj = yaml.safe_load(text)  # JSON is read as YAML's subset
    except (ValueError, yaml.YAMLError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise RoutesError(f"{source}: neither YAML nor JSON ({reason})") from None
    return from_mapping(obj, source)


def from_mapping(obj: Any, source: str = "routes") -> Routes:
    """Routes from already-parsed data (a JSON body), every field checked."""
    if not isinstance(obj, Mapping):
        raise RoutesError(f"{source}: expected a mapping with 'variants', got {type(obj).__name__}")
    unknown = set(map(str, obj)) - _KEYS
    if unknown:
        raise RoutesError(f"{source}: unknown field(s) {sorted(unknown)}; use variants, shadow, salt")
    variants = obj.get("variants")
    if not isinstance(variants, Mapping) or not variants:
        raise RoutesError(f"{source}: 'variants' must map variant names to {{model, weight}}")
    if len(variants) > MAX_VARIANTS:
        raise RoutesError(f"{source}: at most {MAX_VARIANTS} variants, got {len(variants)}")
    parsed = tuple(_variant(source, name, spec) for name, spec in variants.items())
    total = sum(v.weight for v in parsed)
    if not total > 0:
        raise RoutesError(f"{source}: the variants' weights must add up to more than 0")
    shadow = obj.get("shadow")
    if shadow is not None:
        shadow = _tag(f"{source}: shadow", shadow)
    salt = obj.get("salt", "")
    if not isinstance(salt, str) or len(salt) > MAX_SALT:
        raise RoutesError(f"{source}: salt must be a string of at most {MAX_SALT} characters")
    return Routes(parsed, shadow, salt)


def _variant(source: str, name: Any, spec: Any) -> Variant:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RoutesError(f"{source}: variant name {name!r} must be 1-64 characters of a-z A-Z 0-9 _ -")
    where = f"{source}: variant {name!r}"
    if isinstance(spec, str):  # `name: tag`, weight 1
        spec = {"model": spec}
    if not isinstance(spec, Mapping):
        raise RoutesError(f"{where}: expected {{model, weight}}, got {type(spec).__name__}")
    unknown = set(map(str, spec)) - _VARIANT_KEYS
    if unknown:
        raise RoutesError(f"{where}: unknown field(s) {sorted(unknown)}; use model, weight")
    if "model" not in spec:
        raise RoutesError(f"{where}: no model (a BentoML tag, name:version)")
    weight = spec.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise RoutesError(f"{where}: weight must be a number, got {weight!r}")
    if weight < 0:
        raise RoutesError(f"{where}: weight must be >= 0, got {weight}")
    return Variant(name, _tag(f"{where}: model", spec["model"]), float(weight))


def _tag(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 128:
        raise RoutesError(f"{where} must be a BentoML tag (name:version), got {value!r:.80}")
    try:
        tag = bentoml.Tag.from_str(value)
    except Exception as exc:  # BentoML raises ValueError or BentoMLException for a bad tag
        raise RoutesError(f"{where}: {value!r} is not a BentoML tag ({exc})") from None
    return str(tag) if tag.version else tag.name


# ---------------------------------------------------------------------------------------- registry

M = TypeVar("M")


class SwapError(Exception):
    """A model of new routes could not be served: *model* and *reason* say which and why."""

    def __init__(self, model: str, reason: str, *, budget: bool = False) -> None:
        super().__init__(f"{model}: {reason}")
        self.model, self.reason = model, reason
        self.budget = budget  # refused by the memory budget, not by the model itself


@dataclass(frozen=True)
class Loaded(Generic[M]):
    """One model ready to answer: its resolved tag, planner, ranking handle and memory estimate."""

    tag: str
    planner: Planner
    model: M
    bytes: int  # the estimated memory of one copy in a process that holds it
    loaded_at: float  # time.time()
    load_seconds: float


@dataclass(frozen=True)
class Served(Generic[M]):
    name: str
    weight: float
    loaded: Loaded[M]

    @property
    def tag(self) -> str:
        return self.loaded.tag

    @property
    def planner(self) -> Planner:
        return self.loaded.planner


@dataclass(frozen=True)
class Snapshot(Generic[M]):
    """The routes in force and their loaded models: never changed, only replaced."""

    generation: int
    routes: Routes
    variants: dict[str, Served[M]]
    shadow: Loaded[M] | None = None
    models: dict[str, Loaded[M]] = field(default_factory=dict)  # by resolved tag, shadow included

    def pick(self, key: str | None, pin: str | None = None) -> Served[M]:
        """The variant that answers: the pinned one (``RequestError`` if unknown), else *key*'s."""
        if pin is not None:
            served = self.variants.get(pin)
            if served is None:
                known = ", ".join(self.variants)
                raise RequestError(f"variant {pin!r} is not served; the variants are: {known}")
            return served
        return self.variants[self.routes.assign(key)]


class Registry(Generic[M]):
    """The current snapshot. Replaced whole (one reference assignment), read once per request."""

    def __init__(self, snapshot: Snapshot[M]) -> None:
        self.current = snapshot

    def publish(self, snapshot: Snapshot[M]) -> Snapshot[M]:
        """Serve *snapshot* from now on; returns the one it replaces."""
        previous, self.current = self.current, snapshot
        return previous


def build(
    routes: Routes,
    generation: int,
    load: Callable[[str], Loaded[M]],
    *,
    resolve: Callable[[str], str],
    estimate: Callable[[str], int],
    previous: Snapshot[M] | None = None,
    budget_bytes: int = 0,
) -> Snapshot[M]:
    """A snapshot serving *routes*: models already in *previous* are reused, the others loaded
    with *load* (tag -> Loaded; it verifies and warms). *resolve* turns a tag as written into the
    stored one (``SwapError`` when there is none); *estimate* gives a model's memory. With a
    *budget_bytes*, refused (``SwapError``) before loading anything when the old models and the new
    ones together, the peak of a swap, would not fit."""
    wanted = [v.model for v in routes.variants] + ([routes.shadow] if routes.shadow else [])
    resolved = {tag: resolve(tag) for tag in dict.fromkeys(wanted)}
    kept = previous.models if previous is not None else {}
    new = [tag for tag in dict.fromkeys(resolved.values()) if tag not in kept]
    if budget_bytes:
        sizes = {tag: estimate(tag) for tag in new}
        peak = sum(m.bytes for m in kept.values()) + sum(sizes.values())
        if peak > budget_bytes:
            biggest = max(sizes, key=sizes.__getitem__) if sizes else resolved[wanted[0]]
            raise SwapError(
                biggest,
                f"the swap would hold ~{peak / 2**20:.0f} MiB of models at its peak (the old ones and "
                f"the new ones), over the budget of {budget_bytes / 2**20:.0f} MiB "
                "(RECBOLE_BENTO_MEMORY_BUDGET_MB)",
                budget=True,
            )
    models = {tag: kept[tag] for tag in resolved.values() if tag in kept}
    for tag in new:
        models[tag] = load(tag)
    variants = {v.name: Served(v.name, v.weight, models[resolved[v.model]]) for v in routes.variants}
    shadow = models[resolved[routes.shadow]] if routes.shadow else None
    return Snapshot(generation, routes, variants, shadow, models)


def timed_load(tag: str, load: Callable[[], tuple[Planner, M]], nbytes: int) -> Loaded[M]:
    """``Loaded`` for the model *load* returns, with the time it took."""
    start = time.perf_counter()
    planner, model = load()
    return Loaded(tag, planner, model, nbytes, time.time(), time.perf_counter() - start)
