"""What a study shows while it runs: a live status line on a terminal, plain lines in a log,
and a first line before the slow imports."""
import io
import os
import pty
import subprocess
import sys
from pathlib import Path

from study.progress import CLEAR, HEARTBEAT_S, LIVE_PERIOD_S, Progress

ROOT = Path(__file__).resolve().parents[1]


def test_a_log_gets_plain_lines_at_the_heartbeat():
    out = io.StringIO()
    progress = Progress(out)            # a StringIO is not a terminal
    assert not progress.live and progress.period == HEARTBEAT_S
    progress.status("  … 0m30s: 2 running")
    progress.line("  [  1/6] converged  smoke-001")
    progress.close()
    assert out.getvalue() == "  … 0m30s: 2 running\n  [  1/6] converged  smoke-001\n"
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_one_status_line_redrawn_under_the_events():
    out = io.StringIO()
    progress = Progress(out, live=True)
    assert progress.period == LIVE_PERIOD_S
    progress.status("1 running")
    progress.status("2 running")
    progress.line("[1/6] converged")
    progress.close()
    text = out.getvalue()
    assert text == CLEAR + "1 running" + CLEAR + "2 running" + CLEAR + "[1/6] converged\n2 running" + CLEAR
    # what the terminal ends up showing: each \r returns to column 0, each line once
    shown = [segment.split(CLEAR)[-1] for segment in text.split("\n")]
    assert shown == ["[1/6] converged", ""]


def test_a_status_longer_than_the_terminal_is_cut_to_its_width():
    out = io.StringIO()
    progress = Progress(out, live=True)
    os.environ["COLUMNS"] = "40"
    try:
        progress.status("x" * 100)
    finally:
        del os.environ["COLUMNS"]
    assert len(progress.shown) == 39 and progress.shown.endswith("…")


def test_a_pseudo_terminal_is_detected_as_live():
    leader, follower = pty.openpty()
    code = "from study.progress import Progress; import sys; print(Progress().live, file=sys.stderr)"
    proc = subprocess.run([sys.executable, "-c", code], stdout=follower, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT, timeout=60)
    os.close(leader)
    os.close(follower)
    assert proc.stderr.strip() == "True"


def test_run_prints_its_first_line_before_the_slow_imports(tmp_path):
    """The start line comes before MLflow, torch and Ray are imported (they take seconds)."""
    bad = tmp_path / "not_a_db.db"
    bad.write_text("not a database")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "study", "run", "search_spaces/smoke.yaml",
                           "--tracking-uri", f"sqlite:///{bad}"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("study smoke: 6 trials;"))
    heavy = [i for i, line in enumerate(lines) if line.startswith("import time:")
             and line.rsplit("|", 1)[-1].strip() in ("mlflow", "torch", "ray")]
    assert heavy and start < min(heavy)
    assert proc.returncode == 2 and "not a database" in lines[-1]
