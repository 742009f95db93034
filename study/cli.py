"""`nc-study train` and `nc-study measure`, and how every `nc-study` subcommand ends on a
mistake a user can fix: one line on stderr and exit status 2. The command itself (these two,
`run` and `analyze`) is assembled in study/entry.py; this module imports nothing of analysis/."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import get_type_hints

from .config import CHOICES, ConfigError, TrialConfig, from_flags, parse_overrides
from .errors import EXIT_STORE_DOWN, DataError, StoreDown, UsageError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE, what a shell reports for a tool cut off by `| head`


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; a UsageError, ConfigError or DataError
    becomes one line on stderr and EXIT_USAGE, Ctrl-C EXIT_INTERRUPTED."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, DataError) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreDown as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_STORE_DOWN
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:   # the reader stopped reading (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # so the exit's flush is silent
        return EXIT_BROKEN_PIPE


def add_train_parser(sub) -> None:
    """Register `train` on the subparsers object of `nc-study`."""
    p = sub.add_parser("train", help="train one bare trial (no Ray, no MLflow) and print its evaluations",
                       description="Train one trial bare (no Ray, no MLflow) and print a row per evaluation.",
                       epilog=fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="trial config field, e.g. --set epochs=20 --set bn=none (repeatable)")
    p.add_argument("--all", action="store_true", help="print every metric of each evaluation as JSON lines")
    p.set_defaults(func=cmd_train)


def add_measure_parser(sub) -> None:
    """Register `measure` on the subparsers object of `nc-study`."""
    p = sub.add_parser("measure", help="NC metrics of features exported from any model")
    p.add_argument("features", type=Path, help=".npz with y (N,), layer01..layerNN (N, D_l), optional W (C, D), b (C,)")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics to this file")
    p.add_argument("--epsilon", type=float, default=0.01, help="NCC error bound of the effective depth")
    p.set_defaults(func=cmd_measure)


# ------------------------------------------------------------------------------ train

# (metric, format); each column is as wide as its name, and at least 8 characters
TABLE = (("epoch", ".0f"), ("lr", ".4g"), ("train_loss", ".4f"), ("train_acc", ".4f"), ("nc_score", ".3f"),
         ("intra_min", ".3f"), ("inter_max", ".3f"), ("nc1", ".3g"), ("ncc_acc", ".3f"),
         ("effective_depth", ".0f"), ("loss_gap", ".4f"))
COLUMN_WIDTH = 8
TYPE_NAMES = {bool: "true/false", int: "integer", float: "number", str: "text"}


def fields_help() -> str:
    """The trial config fields with their defaults and valid values, for `train --help`."""
    hints = get_type_hints(TrialConfig)
    lines = ["trial config fields (--set KEY=VALUE; the same keys go under trial:/grid: in a study file):",
             f"  {'KEY':<16} {'DEFAULT':<14} VALUES"]
    for field in dataclasses.fields(TrialConfig):
        default = field.default
        if isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, tuple):
            shown = ",".join(f"{v:.4g}" for v in default)
        else:
            shown = str(default) if default != "" else '""'
        values = ("one of " + ", ".join(CHOICES[field.name]) if field.name in CHOICES
                  else TYPE_NAMES.get(hints[field.name], "numbers in (0, 1), comma-separated"))
        lines.append(f"  {field.name:<16} {shown:<14} {values}")
    return "\n".join(lines)


def table_header() -> str:
    return " ".join(f"{name:>{max(len(name), COLUMN_WIDTH)}}" for name, _ in TABLE)


def table_row(metrics: dict[str, float]) -> str:
    return " ".join(f"{metrics.get(name, math.nan):>{max(len(name), COLUMN_WIDTH)}{fmt}}" for name, fmt in TABLE)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer
    overrides = parse_overrides(args.overrides)
    try:
        cfg = TrialConfig.from_dict(overrides)
        trainer = Trainer(cfg)
    except ConfigError as exc:
        raise from_flags(exc, overrides) from None
    print(f"# {cfg.dataset} data, depth {cfg.depth}, width {cfg.width}, bn={cfg.bn}/{cfg.bn_placement}, "
          f"weight_decay={cfg.weight_decay:g}, {cfg.epochs} epochs on {trainer.device}", flush=True)
    if not args.all:
        print(table_header(), flush=True)
    for metrics in trainer.run():  # a row as soon as each evaluation is done
        print(json.dumps(metrics) if args.all else table_row(metrics), flush=True)
    print(f"# status: {trainer.status}; train {trainer.seconds['train']:.1f}s, "
          f"measure {trainer.seconds['measure']:.1f}s", flush=True)
    return 0


# ------------------------------------------------------------------------------ measure

def read_features(path: Path) -> dict:
    """Load and validate an exported-features .npz (see `nc-study measure --help`)."""
    import numpy as np
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise UsageError(f"{path}: not a readable .npz file ({exc})") from None
    if "y" not in arrays:
        raise UsageError(f"{path}: missing array 'y' (N,) of integer class labels")
    layers = sorted(k for k in arrays if k.startswith("layer"))
    if not layers:
        raise UsageError(f"{path}: no feature arrays; name them layer01, layer02, ... (N, D_l)")
    expected = [f"layer{l:02d}" for l in range(1, len(layers) + 1)]
    if layers != expected:
        raise UsageError(f"{path}: feature arrays must be named {', '.join(expected)} without gaps, got {', '.join(layers)}")
    y = arrays["y"]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer)
                           or (np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all())):
        raise UsageError(f"{path}: 'y' must be a 1-D array of integer labels, got dtype {y.dtype} shape {y.shape}")
    if len(y) < 2:
        raise UsageError(f"{path}: 'y' holds {len(y)} labels; need samples of at least 2 classes")
    if y.min() < 0:
        raise UsageError(f"{path}: 'y' has negative labels; use 0..C-1")
    for key in layers + [k for k in ("W", "b") if k in arrays]:
        a = arrays[key]
        if not _real(a) or not np.isfinite(a).all():
            raise UsageError(f"{path}: array {key!r} holds NaN/inf or non-numbers (need real numbers)")
    for key in layers:
        if arrays[key].ndim != 2 or len(arrays[key]) != len(y) or arrays[key].shape[1] < 1:
            raise UsageError(f"{path}: {key} must be (N, D) with N = len(y) = {len(y)} and D >= 1, "
                             f"got {arrays[key].shape}")
    if "W" in arrays:
        W, D = arrays["W"], arrays[layers[-1]].shape[1]
        if W.ndim != 2 or W.shape[1] != D or W.shape[0] <= y.max():
            raise UsageError(f"{path}: W must be (C, {D}) with C > max label {int(y.max())}, got {W.shape}")
        if "b" in arrays and arrays["b"].shape != (W.shape[0],):
            raise UsageError(f"{path}: b must be ({W.shape[0]},), got {arrays['b'].shape}")
    elif "b" in arrays:
        raise UsageError(f"{path}: 'b' given without 'W'")
    arrays["y"] = y.astype(np.int64)
    return arrays


def _real(a) -> bool:
    """Integer or floating point, not bool or complex (torch would drop an imaginary part)."""
    import numpy as np
    return np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)


def measure_file(path: Path, epsilon: float = 0.01) -> dict[str, float]:
    import torch
    from .metrics import measure
    arrays = read_features(path)
    layers = sorted(k for k in arrays if k.startswith("layer"))
    y = torch.from_numpy(arrays["y"])
    W = torch.from_numpy(arrays["W"]) if "W" in arrays else None
    b = torch.from_numpy(arrays["b"]) if "b" in arrays else None
    C = W.shape[0] if W is not None else int(y.max()) + 1
    try:
        return measure((torch.from_numpy(arrays[k]) for k in layers), y, W, b,
                       num_classes=C, epsilon=epsilon)
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None


def cmd_measure(args: argparse.Namespace) -> int:
    metrics = measure_file(args.features, args.epsilon)
    text = json.dumps(metrics, indent=2, allow_nan=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0
