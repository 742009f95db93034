"""`nc-study recheck REPORT_DIR`: re-make a published report from its study records alone.

A report folder (report.md, conjectures.json, figures) is what `nc-study analyze` wrote from
an MLflow store; the store itself may be gone with the machine it ran on, but each study's
record (`nc-study export`, docs/results/records/<study>.jsonl.gz) holds every run. This command
imports the records the report names into a new SQLite store in a temporary folder, runs the
analysis there with the report's own settings (convergence rule, tolerances τ, the effective
depth's ε) and compares the two: report.md line by line and conjectures.json value by value
(floats to 1e-12 relative). Only what names the store is set aside: its URI, the time the
report was made, and MLflow run ids, which an import assigns afresh. Figures are not compared
(their pixels depend on the plotting library's version); they come from the same numbers.

Exit 0 when both match, 1 with the first differences listed when not, 2 for bad input (no
conjectures.json, a missing record).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
from pathlib import Path

from study.errors import UsageError

RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")           # an MLflow run id: a new one for every import
SET_ASIDE = {"tracking_uri", "generated"}           # conjectures.json keys that name the store or the hour
REL_TOL = 1e-12
MAX_SHOWN = 10


def add_recheck_parser(sub) -> None:
    """Register `recheck` on the subparsers object of `nc-study`."""
    p = sub.add_parser(
        "recheck", help="re-make a published report from its study records alone and compare",
        description="Import the study records a report names into a new SQLite store, analyze them with the "
                    "report's own settings, and compare report.md and conjectures.json with the published ones "
                    "(the store's URI, the time and MLflow run ids set aside; floats to 1e-12). Exit 1 on a "
                    "difference.")
    p.add_argument("report", type=Path, metavar="REPORT_DIR",
                   help="a folder `nc-study analyze` wrote (holds conjectures.json), e.g. docs/results/fig3_1")
    p.add_argument("--records", type=Path, default=None, metavar="DIR",
                   help="where the records <study>.jsonl.gz are (default: REPORT_DIR/../records)")
    p.set_defaults(func=cmd_recheck)


def published_settings(report: Path) -> tuple[dict, list[str], dict]:
    """(conjectures.json, its experiments, the analyze() keywords that re-make it)."""
    path = report / "conjectures.json"
    if not path.is_file():
        raise UsageError(f"{path} not found: name a folder `nc-study analyze` wrote (it holds conjectures.json)")
    published = json.loads(path.read_text())
    settings = published.get("settings", {})
    epsilons = sorted({g["epsilon"] for g in published.get("tests", {}).get("conjecture_3_2_2", {}).get("groups", [])
                       if g.get("epsilon") is not None})
    kwargs = {"taus": settings.get("taus"), "min_train_acc": settings.get("min_train_acc", 1.0),
              "n_perm": settings.get("n_perm", 9999), "seed": settings.get("seed", 0)}
    if epsilons:
        kwargs["epsilons"] = epsilons
    return published, list(published["experiments"]), kwargs


def differences(published, remade, path: str = "$") -> list[str]:
    """Where two conjectures.json trees differ, as 'path: published != re-made'."""
    if isinstance(published, dict) and isinstance(remade, dict):
        out = [f"{path}.{k}: only in the {'published' if k in published else 're-made'} report"
               for k in sorted(set(published) ^ set(remade)) if k not in SET_ASIDE]
        for key in published:
            if key in remade and key not in SET_ASIDE:
                out += differences(published[key], remade[key], f"{path}.{key}")
        return out
    if isinstance(published, list) and isinstance(remade, list):
        if len(published) != len(remade):
            return [f"{path}: {len(published)} items != {len(remade)}"]
        return [d for i, (a, b) in enumerate(zip(published, remade)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(published, str) and isinstance(remade, str):
        same = RUN_ID.sub("<run id>", published) == RUN_ID.sub("<run id>", remade)
    elif isinstance(published, (int, float)) and isinstance(remade, (int, float)) \
            and not isinstance(published, bool) and not isinstance(remade, bool):
        same = (math.isnan(published) and math.isnan(remade)) or \
            math.isclose(published, remade, rel_tol=REL_TOL, abs_tol=REL_TOL)
    else:
        same = published == remade
    return [] if same else [f"{path}: {published!r} != {remade!r}"]


def report_lines(text: str, uri: str) -> list[str]:
    """report.md's lines with the store's URI and run ids set aside."""
    return RUN_ID.sub("<run id>", text.replace(uri, "<store>") if uri else text).splitlines()


def line_differences(published: list[str], remade: list[str]) -> list[str]:
    out = [f"line {i}: {a!r} != {b!r}" for i, (a, b) in enumerate(zip(published, remade), start=1) if a != b]
    if len(published) != len(remade):
        out.append(f"{len(published)} lines != {len(remade)}")
    return out


def recheck(report: Path, records: Path | None = None, say=print) -> list[str]:
    """Re-make `report` from its records in a temporary store; the differences (empty: the same)."""
    from analysis.report import analyze
    from study.transfer import import_record

    report = Path(report)
    published, experiments, kwargs = published_settings(report)
    records = Path(records) if records is not None else report.parent / "records"
    files = [records / f"{name}.jsonl.gz" for name in experiments]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"no record of {', '.join(missing)}: a report is re-made from the records of every study "
                         f"it analyses (`nc-study export STUDY --out …`); pass --records DIR where they are")
    if not (report / "report.md").is_file():
        raise UsageError(f"{report / 'report.md'} not found beside its conjectures.json")
    with tempfile.TemporaryDirectory(prefix="nc-recheck-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'recheck.db'}"
        for f in files:
            say(f"importing {f} into a new store")
            import_record(f, uri)
        say(f"analyzing {' '.join(experiments)} with the report's settings")
        remade = analyze(experiments, uri, Path(tmp) / "report", cache_dir=None, log_to_mlflow=False,
                         warn=lambda message: None, **kwargs)
        new_json = json.loads((remade.parent / "conjectures.json").read_text())
        found = line_differences(report_lines((report / "report.md").read_text(), published.get("tracking_uri", "")),
                                 report_lines(remade.read_text(), uri))
        found = [f"report.md {d}" for d in found]
        found += [f"conjectures.json {d}" for d in differences(published, new_json)]
    return found


def cmd_recheck(args: argparse.Namespace) -> int:
    found = recheck(args.report, args.records, say=lambda message: print(message, flush=True))
    if not found:
        print(f"{args.report}: report.md and conjectures.json re-made from the records alone are the same "
              "(store, time and run ids aside; floats to 1e-12)")
        return 0
    print(f"{args.report}: the report re-made from its records differs in {len(found)} place(s):")
    for line in found[:MAX_SHOWN]:
        print(f"  {line}")
    if len(found) > MAX_SHOWN:
        print(f"  … {len(found) - MAX_SHOWN} more")
    return 1
