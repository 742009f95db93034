"""Study definitions: a YAML search-space file, read with a safe loader and validated in full
before Ray starts (unknown keys, bad values, empty grids, a key in both grid and search).

    name: fig3_1                       # experiment name in MLflow: a letter or digit, then [A-Za-z0-9_.-]
    description: ...
    trial: {dataset: teacher, depth: 6}    # fixed TrialConfig fields
    grid: {bn: [affine, none], seed: [0, 1, 2]}   # full cartesian product
    search:                            # optional Optuna search (grid keys become categorical)
      algorithm: optuna
      metric: nc_score
      mode: max
      num_samples: 40
      space: {weight_decay: {loguniform: [1.0e-4, 1.0e-2]}}
    resources: {cpu: 1, gpu: 0}        # per trial; gpu may be fractional
    checkpoint_every: 3                # evaluations between trial checkpoints
    max_failures: 2                    # retries of a trial whose worker or node dies
    pack: 1                            # grid cells trained together as one Ray trial: K or auto

Packing (`pack: K`, grid studies only): cells that may share one batched model
(study.packed: same `pack_key`, differing only in MEMBER_FIELDS such as seed and
weight_decay) are grouped, in `--dry-run` order, into packs of at most K (`packs`); each
pack is one Ray trial on one trial's resources, and each of its cells keeps its own MLflow
run, as if unpacked (docs/mlflow_layout.md). `auto` means 1 on CPU-only trials
(resources.gpu == 0) and AUTO_PACK_GPU with a GPU. Measured on the shared 2-core CPU box
(study/bench_pack.py, fig3_1's shape): a pack trains each member only about 15 % faster
than an unpacked trial on 1 thread, too little for a Ray trial that runs K times as long
and loses K trials' progress to one killed worker. On a GPU one small MLP's kernels leave
the device mostly idle and a pack fills it; 8 is a starting point, not measured here.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import FIELD_NAMES, FIELDS_HINT, ConfigError, TrialConfig, did_you_mean, from_flags

TOP_KEYS = ("name", "description", "trial", "grid", "search", "resources", "checkpoint_every", "max_failures",
            "pack")
MAX_TRIALS = 100_000   # a larger grid is a mistake more often than a plan; split it into studies
# TrialConfig fields whose validity depends on other fields: their combinations are checked
# cell by cell; every other grid axis is checked value by value
COUPLED = ("dataset", "data_path", "data_root", "num_classes", "conic_kind", "model", "lr_milestones")
SEARCH_KEYS = ("algorithm", "metric", "mode", "num_samples", "space", "seed")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
ALGORITHMS = ("optuna",)
AUTO_PACK_GPU = 8      # `pack: auto` with resources.gpu > 0 (1 without; see the module docstring)
MEMBERS = "members"    # a packed Ray trial's config: the shared fields, and MEMBERS: [grid cell, ...]


class SpaceError(ValueError):
    """A search-space file problem: names the file, the key and the fix."""


@dataclass(frozen=True)
class Search:
    metric: str
    mode: str
    num_samples: int
    space: dict[str, tuple[str, list]]   # key -> (distribution, arguments)
    algorithm: str = "optuna"
    seed: int = 0


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    search: Search | None = None
    cpu: float = 1.0
    gpu: float = 0.0
    checkpoint_every: int = 3
    max_failures: int = 2
    pack: int | str = 1      # K, or "auto"

    @property
    def pack_size(self) -> int:
        """At most this many grid cells per Ray trial: `pack`, with auto resolved on the
        trial's resources (AUTO_PACK_GPU with a GPU, else 1); 1 for a search."""
        if self.search:
            return 1
        if self.pack == "auto":
            return AUTO_PACK_GPU if self.gpu > 0 else 1
        return int(self.pack)

    @property
    def n_cells(self) -> int:
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return n

    @property
    def n_trials(self) -> int:
        return self.search.num_samples if self.search else self.n_cells

    def cells(self):
        """Every grid cell as a dict of grid values (one empty cell without a grid)."""
        keys = list(self.grid)
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            yield dict(zip(keys, combo))

    def fingerprint(self) -> str:
        """Short hash of everything that decides which trials run (not resources)."""
        search = None
        if self.search:
            search = [self.search.metric, self.search.mode, self.search.num_samples,
                      sorted((k, v[0], v[1]) for k, v in self.search.space.items()), self.search.seed]
        blob = json.dumps([self.name, sorted(self.fixed.items()), sorted(self.grid.items()), search],
                          sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def load_study(path: str | Path, overrides: dict[str, str] | None = None) -> Study:
    """Read and validate a study file; `overrides` (from --set) replace fixed fields."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: no such search-space file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise SpaceError(f"{path}: not valid YAML{line}; fix the syntax") from None
    return parse_study(raw, path, overrides or {})


def parse_study(raw: Any, path: Path, overrides: dict[str, str]) -> Study:
    def fail(message: str) -> SpaceError:
        return SpaceError(f"{path}: {message}")

    if not isinstance(raw, dict):
        raise fail("expected a mapping with keys name, trial, grid, ...")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; "
                   f"{did_you_mean(unknown[0], TOP_KEYS, 'allowed: ' + ', '.join(TOP_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise fail(f"'name' must start with a letter or digit and use only letters, digits, '_', '-' "
                   f"and '.' (at most 100), got {name!r}")
    fixed = _mapping(raw.get("trial") or {}, "trial", fail)
    grid = _mapping(raw.get("grid") or {}, "grid", fail)
    for key in list(fixed) + list(grid):
        if key not in FIELD_NAMES:
            section = "trial" if key in fixed else "grid"
            raise fail(f"{section}.{key}: not a trial config key; {did_you_mean(key, FIELD_NAMES, FIELDS_HINT)}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise fail(f"grid.{key}: must be a non-empty list of values, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise fail(f"grid.{key}: repeated values {values!r}; list each value once")
        if key in fixed:
            raise fail(f"{key!r} is both a fixed trial field and a grid axis; keep one")
    for key, value in overrides.items():
        if key not in FIELD_NAMES:
            raise SpaceError(f"--set {key}={value}: not a trial config key; "
                             f"{did_you_mean(key, FIELD_NAMES, FIELDS_HINT)}")
        if key in grid:
            raise SpaceError(f"--set {key}={value}: {key!r} is a grid axis in {path}; edit the grid instead")
    fixed = {**_resolve_paths(fixed, path.parent), **_resolve_paths(overrides, Path.cwd())}
    grid = {k: [_resolve_path(v, path.parent) for v in vs] if k in PATH_FIELDS else vs
            for k, vs in grid.items()}

    n_cells = 1
    for values in grid.values():
        n_cells *= len(values)
    if n_cells > MAX_TRIALS:
        raise fail(f"the grid has {n_cells:,} cells, more than {MAX_TRIALS:,} trials in one study; "
                   "split it into several studies or search it with `search:`")
    search = _parse_search(raw.get("search"), grid, fixed, fail)
    resources = _mapping(raw.get("resources") or {}, "resources", fail)
    bad = [k for k in resources if k not in ("cpu", "gpu")]
    if bad:
        raise fail(f"resources.{bad[0]}: unknown; use cpu and gpu")
    cpu, gpu = resources.get("cpu", 1), resources.get("gpu", 0)
    if not _number(cpu) or cpu <= 0:
        raise fail(f"resources.cpu must be a number > 0, got {cpu!r}")
    if not _number(gpu) or gpu < 0:
        raise fail(f"resources.gpu must be a number >= 0 (fractions allowed), got {gpu!r}")
    every = raw.get("checkpoint_every", 3)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise fail(f"checkpoint_every must be a whole number >= 1, got {every!r}")
    retries = raw.get("max_failures", 2)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise fail(f"max_failures must be a whole number >= 0, got {retries!r}")
    pack = raw.get("pack", 1)
    if pack != "auto" and (not isinstance(pack, int) or isinstance(pack, bool) or pack < 1):
        raise fail(f"pack must be a whole number >= 1 (grid cells per Ray trial) or auto, got {pack!r}")
    if pack != 1 and search is not None:
        raise fail(f"pack: {pack} trains several grid cells as one Ray trial, but search: gives each trial "
                   "one configuration of its own; remove pack (or set pack: 1) to search with Optuna")
    description = raw.get("description") or ""
    study = Study(name=name, path=path, description=str(description).strip(), fixed=fixed,
                  grid=grid, search=search, cpu=float(cpu), gpu=float(gpu), checkpoint_every=every,
                  max_failures=retries, pack=pack)
    _validate_trials(study, overrides, fail)
    return study


def _parse_search(raw: Any, grid: dict, fixed: dict, fail) -> Search | None:
    if raw is None:
        return None
    raw = _mapping(raw, "search", fail)
    unknown = [k for k in raw if k not in SEARCH_KEYS]
    if unknown:
        raise fail(f"search.{unknown[0]}: unknown key; "
                   f"{did_you_mean(unknown[0], SEARCH_KEYS, 'allowed: ' + ', '.join(SEARCH_KEYS))}")
    algorithm = raw.get("algorithm", "optuna")
    if algorithm not in ALGORITHMS:
        raise fail(f"search.algorithm={algorithm!r} is not supported; use optuna")
    metric, mode = raw.get("metric"), raw.get("mode", "max")
    if not isinstance(metric, str) or not metric:
        raise fail("search.metric: name the metric to optimise, e.g. nc_score")
    if mode not in ("max", "min"):
        raise fail(f"search.mode must be max or min, got {mode!r}")
    num_samples = raw.get("num_samples")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise fail(f"search.num_samples must be a whole number >= 1, got {num_samples!r}")
    space_raw = _mapping(raw.get("space") or {}, "search.space", fail)
    if not space_raw:
        raise fail("search.space is empty; give at least one key, e.g. weight_decay: {loguniform: [1.0e-4, 1.0e-2]}")
    space = {}
    for key, spec in space_raw.items():
        where = f"search.space.{key}"
        if key not in FIELD_NAMES:
            raise fail(f"{where}: not a trial config key; {did_you_mean(key, FIELD_NAMES, FIELDS_HINT)}")
        if key in grid:
            raise fail(f"{key!r} is in both grid and search.space; keep it in one of them")
        if key in fixed:
            raise fail(f"{key!r} is both a fixed trial field and in search.space; keep one")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise fail(f"{where}: expected one of {{{'|'.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise fail(f"{where}: unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            raise fail(f"{where}.{dist}: expected a list, got {args!r}")
        if dist != "choice":
            if len(args) != 2 or not all(_number(a) for a in args) or not args[0] < args[1]:
                raise fail(f"{where}.{dist}: expected [low, high] with low < high, got {args!r}")
            if dist == "loguniform" and args[0] <= 0:
                raise fail(f"{where}.loguniform: bounds must be > 0, got {args!r}")
            if dist == "randint" and not all(isinstance(a, int) for a in args):
                raise fail(f"{where}.randint: bounds must be whole numbers, got {args!r}")
        space[key] = (dist, list(args))
    seed = raw.get("seed", 0)
    return Search(metric=metric, mode=mode, num_samples=num_samples, space=space,
                  algorithm=algorithm, seed=int(seed))


def _validate_trials(study: Study, overrides: dict[str, str], fail) -> None:
    """Build the configs that can fail so that a bad value fails now, naming its key and
    where it came from (a --set flag or the file), rather than inside a trial. A field whose
    check involves no other field is tried once per value of its axis; the coupled fields
    (COUPLED) in every combination they take; the search's corner values likewise."""
    coupled = {k: v for k, v in study.grid.items() if k in COUPLED}
    single = {k: v for k, v in study.grid.items() if k not in COUPLED}
    base = {k: v[0] for k, v in single.items()}
    cells = [dict(zip(coupled, combo)) for combo in itertools.product(*coupled.values())]
    cells += [{**cells[0], k: value} for k, values in single.items() for value in values[1:]]
    corners = [{}]
    if study.search:
        lows = {k: args[0] for k, (dist, args) in study.search.space.items()}
        corners = [lows]
        for key, (dist, args) in study.search.space.items():
            values = args if dist == "choice" else [args[1] - 1 if dist == "randint" else args[1]]
            corners += [{**lows, key: v} for v in values]
    for cell in cells:
        for corner in corners:
            try:
                TrialConfig.from_dict({**study.fixed, **base, **cell, **corner})
            except ConfigError as exc:
                if exc.key in overrides:
                    raise SpaceError(str(from_flags(exc, overrides))) from None
                shown = {k: v for k, v in {**cell, **corner}.items()
                         if k in coupled or k == exc.key or k in corner}
                raise fail(f"{_describe(shown, {})}: {exc}") from None


def distinct_configs(study: Study) -> list[dict]:
    """One config dict per combination of the coupled fields (data, classes, model), the rest
    at their first value: what a driver-side data check has to look at."""
    coupled = {k: v for k, v in study.grid.items() if k in COUPLED}
    base = {k: v[0] for k, v in study.grid.items() if k not in COUPLED}
    corner = {k: args[0] for k, (dist, args) in study.search.space.items()} if study.search else {}
    return [{**study.fixed, **base, **dict(zip(coupled, combo)), **corner}
            for combo in itertools.product(*coupled.values())]


def packs(study: Study, slots: int = 1, skip: frozenset[int] = frozenset()) -> list[list[int]]:
    """The grid's cells grouped into Ray trials, as positions in `study.cells()` order; the
    positions in `skip` (cells MLflow already holds as trained, runner.execute) left out.

    Cells that share a `pack_key` (study.packed: everything but MEMBER_FIELDS) form a kind,
    in `--dry-run` order. A kind of n cells is cut into ceil(n / pack_size) packs of nearly
    equal size (first packs one larger), each the next run of its kind's cells, so no pack
    is a short straggler. With `slots` > 1 (how many packs the cluster runs at once) the
    number of packs is then raised to a multiple of `slots` where the kinds allow it, by
    cutting the kind with the largest packs once more, so that the last round of packs
    keeps every slot busy. Packs come in the order of their first cell. A cell whose model
    is not an MLP (PackedTrainer batches MLPs only) is a pack of its own. Without packing:
    one cell each."""
    cells = list(study.cells())
    size = study.pack_size
    if size == 1:
        return [[i] for i in range(len(cells)) if i not in skip]
    from .packed import pack_key   # torch: only for a packed study
    kinds: dict = {}
    singles: list[list[int]] = []
    for i, cell in enumerate(cells):
        if i in skip:
            continue
        cfg = TrialConfig.from_dict({**study.fixed, **cell})
        if cfg.model != "mlp":
            singles.append([i])
        else:
            kinds.setdefault(pack_key(cfg), []).append(i)
    cuts = {key: -(-len(members) // size) for key, members in kinds.items()}
    total = sum(cuts.values()) + len(singles)
    while slots > 1 and total % slots:
        splittable = [key for key in kinds if cuts[key] < len(kinds[key])]
        if not splittable:
            break
        widest = max(splittable, key=lambda key: len(kinds[key]) / cuts[key])
        cuts[widest] += 1
        total += 1
    groups = list(singles)
    for key, members in kinds.items():
        base, extra = divmod(len(members), cuts[key])
        start = 0
        for j in range(cuts[key]):
            stop = start + base + (j < extra)
            groups.append(members[start:stop])
            start = stop
    return sorted(groups, key=lambda group: group[0])


def local_packs(study: Study) -> list[list[int]]:
    """`packs` balanced for this machine's cores, as an embedded Ray runs the study (the
    dry run's listing; a cluster balances for its own totals in runner.execute)."""
    return packs(study, parallel_slots(os.cpu_count() or 1, 0, study))


def parallel_slots(cpus: float, gpus: float, study: Study) -> int:
    """How many trials (or packs) of `study` a cluster with these totals runs at once."""
    counts = [int(cpus // study.cpu)] if study.cpu > 0 else []
    if study.gpu > 0:
        counts.append(int(gpus // study.gpu))
    return max(1, min(counts, default=1))


def member_name(i: int) -> str:
    """The key of member i's part of a pack's Tune result (trainable.run_pack): member00, ..."""
    return f"member{i:02d}"


def members_of(config: dict) -> list[dict]:
    """The trial config dicts a Ray trial trains: its own config, or for a pack
    ({shared fields, MEMBERS: [cell, ...]}) each cell over the shared fields: the very dict
    the unpacked trial of that cell would get."""
    if MEMBERS not in config:
        return [config]
    shared = {k: v for k, v in config.items() if k != MEMBERS}
    return [{**shared, **cell} for cell in config[MEMBERS]]


def _describe(cell: dict, corner: dict) -> str:
    items = {**cell, **corner}
    return "in trial " + ", ".join(f"{k}={v}" for k, v in items.items()) if items else "in every trial"


PATH_FIELDS = ("data_path", "data_root")


def _resolve_paths(values: dict, base: Path) -> dict:
    """data_path and data_root in a study file are relative to the file; from --set, to the
    working folder. Made absolute because Ray runs each trial in a folder of its own."""
    return {k: _resolve_path(v, base) if k in PATH_FIELDS else v for k, v in values.items()}


def _resolve_path(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value:
        return str((base / Path(value).expanduser()).resolve())
    return value


def _mapping(value: Any, where: str, fail) -> dict:
    if not isinstance(value, dict):
        raise fail(f"{where}: expected a mapping of key: value, got {type(value).__name__}")
    return dict(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
