"""`nc-study analyze EXPERIMENT [EXPERIMENT …] [--tracking-uri URI] [--out DIR]`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from study.errors import UsageError
from study.schema import DEFAULT_URI


def add_analyze_parser(sub) -> None:
    """Register `analyze` on the subparsers object of `nc-study`."""
    p = sub.add_parser(
        "analyze", help="test the thesis' conjectures on a finished study; write a report, JSON and figures",
        description="Read the study's runs from MLflow, test Conjectures 3.1.1, 3.2.1, 3.2.2 and "
                    "Theorem 2.3.1 (docs/science.md §6), write DIR/report.md (and report.html), DIR/conjectures.json and PNGs, "
                    "and log them under analysis/ on the study's parent run.")
    p.add_argument("experiments", nargs="+", metavar="EXPERIMENT", help="MLflow experiment name(s): the study name(s)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI})")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output directory (default: reports/<first experiment>)")
    p.add_argument("--epsilons", default="0.001,0.01,0.05", metavar="E1,E2,…",
                   help="NCC error bounds of the effective depth for Conjecture 3.2.2 (default 0.001,0.01,0.05)")
    p.add_argument("--min-train-acc", type=float, default=1.0, metavar="A",
                   help="count a trial as converged when its final training accuracy is at least A "
                        "(default 1: the thesis' rule; e.g. 0.999 to see how much the strict rule decides)")
    p.add_argument("--tau", action="append", default=[], metavar="[CONJ=]T",
                   help="tolerance of a conjecture's ε, fixed before looking at the data: --tau 0.1 sets "
                        "Conjecture 3.1.1's, --tau 3.2.1=0.05 or --tau 3.2.2=0.5 the others' (repeatable; "
                        "defaults 0.1, 0.05, 0.5: the report says why)")
    p.add_argument("--cache-dir", type=Path, default=Path(".nc_cache"), metavar="DIR",
                   help="where run histories are cached between runs (default .nc_cache)")
    p.add_argument("--no-cache", action="store_true", help="re-read every run; read and write no cache")
    p.add_argument("--no-log", action="store_true", help="do not log the outputs on the parent run")
    p.set_defaults(func=cmd_analyze)


def parse_epsilons(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--epsilons expects numbers separated by commas, got {text!r}") from None


def parse_taus(values: list[str]) -> dict[str, float]:
    """['0.1', '3.2.2=0.5'] -> {'conjecture_3_1_1': 0.1, 'conjecture_3_2_2': 0.5}; a name may
    also be spelt as conjectures.json's key (conjecture_3_2_2=0.5)."""
    from .verdict import TAUS
    out = {}
    for text in values:
        name, _, value = text.rpartition("=")
        name = (name or "3.1.1").strip()
        key = "conjecture_" + name.removeprefix("conjecture_").replace(".", "_")
        if key not in TAUS:
            raise UsageError(f"--tau {text}: unknown conjecture {name!r}; use 3.1.1, 3.2.1 or 3.2.2, "
                             "e.g. --tau 3.2.2=0.5")
        try:
            out[key] = float(value)
        except ValueError:
            raise UsageError(f"--tau expects a number or CONJECTURE=NUMBER (e.g. --tau 3.2.2=0.5), got {text!r}") from None
    return out


def cmd_analyze(args: argparse.Namespace) -> int:
    from analysis.report import analyze
    start = time.perf_counter()
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    out = args.out or Path("reports") / args.experiments[0]

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:5.1f}s] {message}", flush=True)

    report = analyze(args.experiments, uri, out, parse_epsilons(args.epsilons),
                     cache_dir=None if args.no_cache else args.cache_dir, taus=parse_taus(args.tau),
                     log_to_mlflow=not args.no_log, progress=say, min_train_acc=args.min_train_acc,
                     warn=lambda m: print(f"nc-study analyze: warning: {m}", file=sys.stderr, flush=True))
    print(f"report: {report}  (with conjectures.json and figures in {report.parent}/)", flush=True)
    return 0
