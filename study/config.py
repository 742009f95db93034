"""One frozen, typed configuration per trial (docs/science.md §1–4).

A config is built from a plain dict (a search-space cell, `--set key=value` flags, MLflow
params read back); an unknown key or a bad value raises `ConfigError` naming the key.
Everything here is logged whole as MLflow params, so every knob of a trial is visible.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, get_type_hints

BN_KINDS = ("affine", "nonaffine", "none")
BN_PLACEMENTS = ("every", "last")
SYNTHETIC_DATASETS = ("teacher", "conic")
FOLDER_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")  # read from data_root
DATASETS = SYNTHETIC_DATASETS + ("npz", "digits", "mnist1d") + FOLDER_DATASETS
SYNTHETIC_NUM_CLASSES = 4
MODELS = ("mlp", "cnn", "resnet")
CONIC_KINDS = ("auto", "hyperplanes", "directions")
OPTIMIZERS = ("sgd", "adam")
BN_STATS = ("exact", "running")
DEVICES = ("auto", "cpu", "cuda")
CHOICES = {"dataset": DATASETS, "conic_kind": CONIC_KINDS, "model": MODELS, "bn": BN_KINDS,
           "bn_placement": BN_PLACEMENTS, "optimizer": OPTIMIZERS, "bn_stats": BN_STATS, "device": DEVICES}
EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
FIELDS_HINT = "run `nc-study train --help` for the fields"


class ConfigError(ValueError):
    """A trial config key or value a user can fix; `key` names the field it is about, so a
    caller can say where that value came from (a `--set` flag, a study file)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class TrialConfig:
    """Data fields (docs/datasets.md):

    - `data_path`: the .npz file of dataset=npz; `data_root`: the folder holding the official
      files of mnist, fashion_mnist, cifar10 and cifar100.
    - `n_samples`, `input_dim`: how many samples the generators draw (teacher, conic, mnist1d)
      and their dimension (teacher, conic); sets read from files ignore both, as before.
    - `subset`: the size of a class-balanced subset drawn with `data_seed` from any data set;
      0 (the default) uses the whole set. A field of its own rather than a new meaning of
      `n_samples`: every existing trial record logs n_samples=10000, npz trials included,
      where it meant "ignored", so reading it as a subset size would change what those
      records say; and a per-dataset default would travel stale through `replace()`.
    - `num_classes`: C. 0 (the default) means "not given": teacher and conic then use 4,
      stored as 4 so their configs and records read as before; sets with labels infer
      C = 1 + the largest label when read (`study.data.resolve_num_classes`). When given,
      labels outside 0..C-1 or empty classes are refused.
    """
    # data (§2, docs/datasets.md)
    dataset: str = "teacher"
    data_path: str = ""
    data_root: str = ""
    n_samples: int = 10_000
    subset: int = 0
    input_dim: int = 16
    num_classes: int = 0
    data_seed: int = 0
    teacher_depth: int = 3
    teacher_width: int = 300
    teacher_center: bool = True    # centre the teacher's logits over the sample before the argmax
    teacher_bias: bool = True      # the teacher's linear layers have (random) biases
    conic_kind: str = "auto"
    # model (§1)
    model: str = "mlp"
    depth: int = 6
    width: int = 300
    bn: str = "affine"
    bn_placement: str = "every"
    bias: bool = False
    # training (§3)
    optimizer: str = "sgd"
    lr: float = 0.0679
    momentum: float = 0.9
    lr_milestones: tuple[float, ...] = (1 / 3, 2 / 3)
    lr_decay: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs: int = 300
    seed: int = 0
    # measurement (§4)
    eval_every: int = 10
    ncc_epsilon: float = 0.01
    bn_stats: str = "exact"
    device: str = "auto"

    def __post_init__(self) -> None:
        for key, choices in CHOICES.items():
            _check_choice(key, getattr(self, key), choices)
        self._check_data()
        _check_min("teacher_depth", self.teacher_depth, 1)
        _check_min("teacher_width", self.teacher_width, 1)
        _check_min("depth", self.depth, 2)
        _check_min("width", self.width, 1)
        _check_min("batch_size", self.batch_size, 2)
        _check_min("epochs", self.epochs, 1)
        _check_min("eval_every", self.eval_every, 1)
        _check_min("seed", self.seed, 0)
        _check_min("data_seed", self.data_seed, 0)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}", "lr")
        for key in ("weight_decay", "momentum"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key} must be a number >= 0, got {value}", key)
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr_decay must be in (0, 1], got {self.lr_decay}", "lr_decay")
        if not 0 <= self.ncc_epsilon < 1:
            raise ConfigError(f"ncc_epsilon must be in [0, 1), got {self.ncc_epsilon}", "ncc_epsilon")
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ConfigError(
                f"lr_milestones are fractions of training and must lie in (0, 1), "
                f"got {list(self.lr_milestones)}", "lr_milestones")
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ConfigError(f"lr_milestones must be increasing, got {list(self.lr_milestones)}",
                              "lr_milestones")

    def _check_data(self) -> None:
        if self.dataset == "npz" and not self.data_path:
            raise ConfigError("dataset=npz needs data_path: set data_path=/path/to/file.npz", "dataset")
        if self.dataset in FOLDER_DATASETS and not self.data_root:
            raise ConfigError(f"dataset={self.dataset} needs data_root: set data_root to the folder holding "
                              "its official files (docs/datasets.md lists them)", "dataset")
        _check_min("n_samples", self.n_samples, 2)
        if self.dataset == "mnist1d" and (self.n_samples < 10 or self.n_samples % 10):
            raise ConfigError(f"dataset=mnist1d draws n_samples/10 signals of each of its 10 digits, so "
                              f"n_samples must be a multiple of 10, got {self.n_samples}", "n_samples")
        _check_min("input_dim", self.input_dim, 1)
        if self.num_classes == 0 and self.dataset in SYNTHETIC_DATASETS:
            object.__setattr__(self, "num_classes", SYNTHETIC_NUM_CLASSES)  # frozen: fill the default once
        if self.num_classes < 0 or self.num_classes == 1:
            raise ConfigError(f"num_classes must be >= 2, or 0 to infer it from the labels, "
                              f"got {self.num_classes}", "num_classes")
        if self.subset < 0 or self.subset == 1:
            raise ConfigError(f"subset must be 0 (the whole data set) or >= 2, got {self.subset}", "subset")
        if 0 < self.subset < self.num_classes:
            raise ConfigError(f"subset={self.subset} cannot hold one sample of each of the "
                              f"{self.num_classes} classes; use subset >= {self.num_classes} or 0", "subset")

    # derived values are properties, not knobs
    @property
    def milestone_epochs(self) -> tuple[int, ...]:
        """Epochs (0-based) at whose start the lr is multiplied by lr_decay."""
        return tuple(max(1, round(m * self.epochs)) for m in self.lr_milestones)

    def lr_at(self, epoch: int) -> float:
        """Learning rate used during 0-based `epoch`."""
        drops = sum(epoch >= m for m in self.milestone_epochs)
        return self.lr * self.lr_decay ** drops

    @property
    def eval_epochs(self) -> tuple[int, ...]:
        """1-based epochs after which the model is measured (always the last one)."""
        epochs = set(range(self.eval_every, self.epochs + 1, self.eval_every))
        epochs.add(self.epochs)
        return tuple(sorted(epochs))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrialConfig":
        """Build from a flat dict; values may be strings (CLI flags, MLflow params)."""
        hints = get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown trial config key {unknown[0]!r}; "
                              f"{did_you_mean(unknown[0], FIELD_NAMES, FIELDS_HINT)}", unknown[0])
        kwargs = {key: coerce(key, value, hints[key]) for key, value in values.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "TrialConfig":
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_params(self) -> dict[str, str]:
        """Flat string params for MLflow (milestones as a comma list); floats keep their
        shortest exact repr, so `from_dict(to_params())` gives back the same config."""
        out = {}
        for key, value in self.to_dict().items():
            if isinstance(value, (tuple, list)):
                value = ",".join(repr(float(v)) for v in value)
            out[key] = str(value)
        return out


FIELD_NAMES = tuple(f.name for f in fields(TrialConfig))


def did_you_mean(word: Any, known: Iterable[str], hint: str) -> str:
    """'did you mean X?' for the entry of `known` closest to `word`, else the short `hint`."""
    close = difflib.get_close_matches(str(word), list(known), n=1)
    return f"did you mean {close[0]!r}?" if close else hint


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert `value` to the declared type of `key`, or raise ConfigError naming it."""
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        # tuple[float, ...]
        if isinstance(value, str):
            items = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        expected = EXPECTED.get(hint, "a comma-separated list of numbers")
        raise ConfigError(f"{key} must be {expected}, got {value!r}", key) from None


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = did_you_mean(value, choices, "")
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}" + (f"; {close}" if close else ""),
                          key)


def _check_min(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}", key)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """`["epochs=5", "bn=none"]` -> dict; a pair without '=' raises ConfigError."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def from_flags(error: ConfigError, overrides: dict[str, str]) -> ConfigError:
    """`error` prefixed with the `--set KEY=VALUE` flag it came from, if it came from one."""
    if error.key in overrides:
        return ConfigError(f"--set {error.key}={overrides[error.key]}: {error}", error.key)
    return error
