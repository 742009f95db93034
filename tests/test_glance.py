"""The verdict table of docs/results/README.md against the reports it quotes (analysis.glance)."""
from __future__ import annotations

import json
from pathlib import Path

from analysis import glance

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def test_the_published_verdict_table_is_what_the_reports_say():
    """A report re-published without `python -m analysis.glance --write` fails here."""
    page = RESULTS / "README.md"
    assert glance.main([str(RESULTS), "--check", str(page)]) == 0
    rows = glance.load_reports(RESULTS)
    assert len(rows) >= 7 and all(strict is not None for _, _, strict in rows)


def _report(folder: Path, n_converged: int, summary_3_1_1: str) -> None:
    folder.mkdir(parents=True)
    summaries = {"conjecture_3_1_1": summary_3_1_1, "conjecture_3_2_1": "inconclusive in 2 of 2 groups"}
    folder.joinpath("conjectures.json").write_text(json.dumps({
        "n_trials": 12, "n_converged": n_converged,
        "tests": {k: {"summary": v, "groups": []} for k, v in summaries.items()},
        "claims": {"alpha_vs_lambda": {"summary": "supported in 2 of 2 groups"}}}))


def test_the_table_quotes_each_rule_and_the_check_catches_a_stale_page(tmp_path, capsys):
    results = tmp_path / "results"
    _report(results / "toy", 9, "consistent in 1 of 2 groups, control (no verdict) in 1")
    _report(results / "toy_acc999", 11, "inconclusive in 1 of 2 groups, control (no verdict) in 1")
    _report(results / "solo", 3, "inconclusive in 1 of 1 group")
    table = glance.glance_table(glance.load_reports(results))
    lines = table.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| [solo](solo/report.md)", "| [toy](toy/report.md)"]
    toy = lines[3].split(" | ")
    assert toy[1:3] == ["12", "9 / 11"]
    assert toy[3] == ("consistent in 1 of 2 groups, control (no verdict) in 1"
                      "<br>≥ 99.9 %: inconclusive in 1 of 2 groups, control (no verdict) in 1")
    assert toy[4] == "inconclusive in 2 of 2 groups"          # the same under both rules: said once
    assert toy[7] == "not tested |"                            # a claim the report does not have
    assert lines[2].split(" | ")[2] == "3 / —"                 # no ≥ 99.9 % twin

    page = tmp_path / "page.md"
    page.write_text(f"# Results\n\nbefore\n\n{glance.START}\nold table\n{glance.END}\n\nafter\n")
    assert glance.main([str(results), "--check", str(page)]) == 1
    assert "--write" in capsys.readouterr().err
    assert glance.main([str(results), "--write", str(page)]) == 0
    written = page.read_text()
    assert written.startswith("# Results\n\nbefore\n\n") and written.endswith(f"{glance.END}\n\nafter\n")
    assert glance.main([str(results), "--check", str(page)]) == 0
    page.write_text(written.replace("9 / 11", "9 / 10"))       # one number edited by hand
    assert glance.main([str(results), "--check", str(page)]) == 1


def test_a_page_without_markers_or_a_folder_without_reports_is_refused_in_one_line(tmp_path, capsys):
    results = tmp_path / "results"
    _report(results / "toy", 9, "consistent in 2 of 2 groups")
    page = tmp_path / "page.md"
    page.write_text("# no markers here\n")
    assert glance.main([str(results), "--write", str(page)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "page.md" in err and glance.END in err
    assert page.read_text() == "# no markers here\n"
    assert glance.main([str(tmp_path / "empty"), "--check", str(page)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no report folder" in err
