"""Every published report's verdicts in one table: `python -m analysis.glance [DIR] [--write FILE | --check FILE]`.

Each report folder under DIR (default docs/results) holds the conjectures.json that
`nc-study analyze` wrote; a folder `<name>_acc999` is the same studies under the ≥ 99.9 %
convergence rule. The table has a row per report, with the two rules side by side where
they differ, and takes every cell from the reports' own `summary` strings, so it can say
nothing the reports do not.

`--write FILE` puts the table into FILE between the two marker lines below (a page that
quotes it: docs/results/README.md); `--check FILE` exits 1 when the table there is not the
one the reports give now, so a re-published report cannot leave the page behind.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from study.errors import UsageError

START = "<!-- glance: written by `python -m analysis.glance --write`; do not edit by hand -->"
END = "<!-- /glance -->"
STRICT_SUFFIX = "_acc999"
COLUMNS = [                     # (where in conjectures.json, column title)
    (("tests", "conjecture_3_1_1"), "3.1.1: NC improves with log λ"),
    (("tests", "conjecture_3_2_1"), "3.2.1: NC sharpens with depth"),
    (("tests", "conjecture_3_2_2"), "3.2.2: effective depth falls with λ"),
    (("claims", "alpha_vs_lambda"), "alpha shrinks with λ"),
    (("claims", "data_complexity"), "§1.4: data complexity"),
]


def load_reports(results_dir: Path) -> list[tuple[str, dict, dict | None]]:
    """(name, report at the 100 % rule, its ≥ 99.9 % twin or None) for every report folder, by name."""
    found = {p.parent.name: p for p in results_dir.glob("*/conjectures.json")}
    if not found:
        raise UsageError(f"{results_dir}: no report folder (no */conjectures.json); give the folder "
                         "that `nc-study analyze --out` wrote reports into")
    rows = []
    for name in sorted(n for n in found if not n.endswith(STRICT_SUFFIX)):
        twin = found.get(name + STRICT_SUFFIX)
        rows.append((name, _read(found[name]), _read(twin) if twin else None))
    return rows


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not a readable conjectures.json ({err}); re-make it with `nc-study analyze`")


def _summary(report: dict, where: tuple[str, str]) -> str:
    return report.get(where[0], {}).get(where[1], {}).get("summary", "not tested")


def _cell(report: dict, strict: dict | None, where: tuple[str, str]) -> str:
    text = _summary(report, where)
    if strict is not None and _summary(strict, where) != text:
        text += f"<br>≥ 99.9 %: {_summary(strict, where)}"
    return text


def glance_table(rows: list[tuple[str, dict, dict | None]]) -> str:
    """The markdown table: report, trials, converged under each rule, then a column per conjecture or claim."""
    head = ["report", "trials", "converged (100 % / ≥ 99.9 %)"] + [title for _, title in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, report, strict in rows:
        link = f"[{name}]({name}/report.md)"
        converged = f"{report['n_converged']} / {strict['n_converged'] if strict else '—'}"
        cells = [link, str(report["n_trials"]), converged] + [_cell(report, strict, w) for w, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _split(page: str, path: Path) -> tuple[str, str, str]:
    """(before, table, after) of a page that quotes the table between the markers."""
    if page.count(START) != 1 or page.count(END) != 1 or page.index(START) > page.index(END):
        raise UsageError(f"{path}: needs the line {START!r} and, below it, {END!r} once each, "
                         "where the table goes")
    before, rest = page.split(START + "\n", 1)
    table, after = rest.split(END, 1)
    return before, table, after


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.glance", description=__doc__.splitlines()[0])
    p.add_argument("results_dir", nargs="?", default="docs/results", type=Path)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", type=Path, metavar="FILE", help="put the table into FILE between the markers")
    mode.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE's table is not the current one")
    args = p.parse_args(argv)
    try:
        table = glance_table(load_reports(args.results_dir))
        page_path = args.write or args.check
        if page_path is None:
            print(table, end="")
            return 0
        page = page_path.read_text()
        before, quoted, after = _split(page, page_path)
    except (UsageError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        if quoted == table:
            print(f"{page_path}: the verdict table is the reports' own")
            return 0
        print(f"{page_path}: the verdict table differs from the reports under {args.results_dir}; "
              f"run `python -m analysis.glance {args.results_dir} --write {page_path}`", file=sys.stderr)
        return 1
    page_path.write_text(before + START + "\n" + table + END + after)
    print(f"{page_path}: verdict table written ({table.count(chr(10)) - 2} reports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
