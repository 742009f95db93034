"""Check in a real browser that the MLflow UI shows a trial's headline metrics first.

    make test-ui                                   # = the line below, after building .venv
    .venv/bin/python tests/ui/check_mlflow_ui.py --screenshots docs/screenshots

Not part of `make test` (pytest does not collect this file). It runs the smoke study
(search_spaces/smoke.yaml) into a temporary MLflow store, or reads an existing one with
`--store path/to/mlflow.db`, starts `mlflow ui` on a free port of 127.0.0.1, and opens in
headless Chromium:

1. the experiment's runs view: it expands the study's parent run and asserts that every
   trial run is listed by its name (`smoke-001 bn=affine wd=0.0001`, as the store holds
   it), that the Dataset column names the training set (`teacher depth=3 width=300 seed=0`),
   and that the Columns picker lists `headline/…` before any `layerNN/…`;
2. the first trial's run page: its Metrics table lists the five `headline/…` metrics before
   any `layerNN/…` one;
3. its "Model metrics" tab (the run's charts): the first chart section is `headline`, and
   `last_block` comes before every `layerNN` section (docs/mlflow_layout.md, Metric names).

It saves runs_view.png, trial_overview.png and trial_charts.png into --screenshots
(default: a new temporary folder), prints one line per check, and exits 0 when every check
holds, 1 when one fails, 2 when it cannot run. About 3 minutes on 2 busy cores, most of it
the study and `mlflow ui` starting.

Setup, once: the `ui` extra (`.venv/bin/pip install -e '.[ui]'`: playwright's Python API)
and a Chromium binary from the system, never playwright's own download:

    apt-get install -y chromium        # Debian; Ubuntu: chromium-browser, or Google Chrome

It looks for `chromium`, `chromium-browser`, `google-chrome` on PATH; `--chromium PATH` or
$CHROMIUM names another.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "search_spaces" / "smoke.yaml"
STUDY = "smoke"
RUN_NAME = re.compile(r"^smoke-\d{3}( \S+=\S+)+$")   # schema.run_name: study-index, then the grid cell
DATASET = "teacher depth=3 width=300 seed=0"         # data.dataset_input: the smoke study's set
HEADLINE = ("headline/nc_score", "headline/train_acc", "headline/train_loss", "headline/loss_gap",
            "headline/effective_depth")
LAYER = re.compile(r"^layer\d+(/|$)")
CLOSE_ASSISTANT = "button[data-component-id='mlflow.assistant.chat_panel.close']"
RUN_NAME_CELL = ".ag-row [col-id='attributes.`Run Name`']"
VIEWPORT = {"width": 1680, "height": 900}


class CannotRun(Exception):
    """Something missing to run the check (not a failed check)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--screenshots", type=Path, default=None, help="folder for the PNGs (default: a temp folder)")
    p.add_argument("--store", type=Path, default=None, help="an existing mlflow.db holding experiment 'smoke' "
                   "(default: run the smoke study into a temp folder)")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM"), help="the Chromium binary")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for `mlflow ui` to answer")
    args = p.parse_args(argv)
    try:
        chromium = find_chromium(args.chromium)
        shots = args.screenshots or Path(tempfile.mkdtemp(prefix="nc-ui-"))
        shots.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="nc-ui-store-") as tmp:
            db = args.store.resolve() if args.store else run_smoke_study(Path(tmp))
            if not db.is_file():
                raise CannotRun(f"--store {db}: no such file; pass the mlflow.db a study wrote")
            experiment_id, trials = read_store(db)
            with mlflow_ui(db, Path(tmp) / "mlflow_ui.log", args.timeout) as base:
                results = check_ui(base, experiment_id, trials, chromium, shots)
    except CannotRun as exc:
        print(f"cannot run the UI check: {exc}", file=sys.stderr)
        return 2
    for ok, what in results:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    print(f"screenshots in {shots}")
    return 0 if all(ok for ok, _ in results) else 1


# ------------------------------------------------------------------ setup

def find_chromium(named: str | None) -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise CannotRun("playwright is not installed; run `.venv/bin/pip install -e '.[ui]'`") from None
    for candidate in ([named] if named else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if path:
            return path
    raise CannotRun(f"no Chromium binary {'at ' + named if named else 'on PATH'}; install one "
                    "(`apt-get install -y chromium`) or pass --chromium PATH")


def run_smoke_study(folder: Path) -> Path:
    print(f"running the smoke study into {folder} (about a minute) ...", flush=True)
    done = subprocess.run([sys.executable, "-m", "study", "run", str(SMOKE)], cwd=folder,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise CannotRun(f"the smoke study failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return folder / "mlflow.db"


def read_store(db: Path) -> tuple[str, list[tuple[str, str]]]:
    """The experiment id of the smoke study and its trial runs (name, run id), by name."""
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(STUDY)
    if experiment is None:
        raise CannotRun(f"{db} holds no experiment {STUDY!r}; pass a store the smoke study wrote")
    runs = client.search_runs([experiment.experiment_id], "tags.`nc_study.kind` = 'trial'")
    if not runs:
        raise CannotRun(f"experiment {STUDY!r} in {db} has no trial runs")
    return experiment.experiment_id, sorted((r.info.run_name, r.info.run_id) for r in runs)


class mlflow_ui:
    """`mlflow ui` on a free port of 127.0.0.1 for the store `db`, stopped on exit."""

    def __init__(self, db: Path, log: Path, timeout: float) -> None:
        self.db, self.log_path, self.timeout = db, log, timeout

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                                      f"sqlite:///{self.db}", "--host", "127.0.0.1", "--port", str(port),
                                      "--workers", "1"], cwd=self.db.parent, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     # no background job consumers: nothing here submits jobs
                                     env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        base = f"http://127.0.0.1:{port}"
        print(f"starting mlflow ui at {base} ...", flush=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                raise CannotRun(f"mlflow ui exited ({self.proc.returncode}):\n{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        return base
            except OSError:
                time.sleep(2)
        self.__exit__()
        raise CannotRun(f"mlflow ui did not answer within {self.timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        """Stop the server's whole process group: `mlflow ui` leaves job consumers behind
        when only it ends, and they outlive a SIGTERM for a while."""
        group = self.proc.pid                             # start_new_session: the group's id
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            if not _group_alive(self.proc, group):
                break
            try:
                os.killpg(group, sig)
            except ProcessLookupError:                    # ended in between
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.proc, group):
                time.sleep(0.5)
        self.log.close()


def _group_alive(proc: subprocess.Popen, group: int) -> bool:
    proc.poll()                                           # reap the server itself once it ends
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


# ------------------------------------------------------------------ the checks

def check_ui(base: str, experiment_id: str, trials: list[tuple[str, str]], chromium: str,
             shots: Path) -> list[tuple[bool, str]]:
    from playwright.sync_api import sync_playwright
    results: list[tuple[bool, str]] = []
    ml = "workflowType=machine_learning"
    with sync_playwright() as pw:
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        browser = pw.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(90_000)
            name, run_id = trials[0]
            runs = f"{base}/#/experiments/{experiment_id}/runs"
            for url, check, args in (
                    (f"{runs}?{ml}", check_runs_view, ([n for n, _ in trials], shots / "runs_view.png")),
                    (f"{runs}/{run_id}?{ml}", check_overview, (name, shots / "trial_overview.png")),
                    (f"{runs}/{run_id}/model-metrics?{ml}", check_charts, (name, shots / "trial_charts.png"))):
                page.goto(url)
                try:
                    results += check(page, *args)
                except Exception as exc:  # noqa: BLE001 - a page that never shows what is checked
                    results.append((False, f"{check.__name__}: {str(exc).splitlines()[0]} (on {url})"))
                    page.screenshot(path=str(args[-1]))
        finally:
            browser.close()
    return results


def close_assistant(page) -> None:
    """The MLflow Assistant side panel takes a third of the window; shut it if it is open."""
    button = page.locator(CLOSE_ASSISTANT)
    if button.count():
        button.first.click()


def check_runs_view(page, names: list[str], shot: Path) -> list[tuple[bool, str]]:
    page.locator(RUN_NAME_CELL).filter(has_text=STUDY).first.wait_for()
    close_assistant(page)
    parent = page.locator(RUN_NAME_CELL).filter(has=page.get_by_role("link", name=STUDY, exact=True)).first
    parent.locator("button").first.click()                # the +/- that shows a parent's child runs
    page.get_by_role("link", name=names[0], exact=True).wait_for()
    shown = page.locator(f"{RUN_NAME_CELL} a").all_inner_texts()
    missing = sorted(set(names) - set(shown))
    out = [(not missing, f"runs view lists the {len(names)} trial runs by name"
            + (f"; missing {missing}, shown {shown}" if missing else f" ({names[0]!r}, ...)"))]
    bad = [n for n in names if not RUN_NAME.match(n)]
    out.append((not bad, "run names read `smoke-NNN key=value ...`" + (f"; not: {bad}" if bad else "")))
    datasets = page.get_by_text(DATASET).count()
    out.append((datasets > 0, f"Dataset column names the training set ({DATASET!r}"
                + (f", {datasets} cells)" if datasets else ": not shown)")))
    picker = column_picker(page)
    out.append((headline_first(picker), "Columns picker lists headline/ metrics before layerNN/ ones"
                + ("" if headline_first(picker) else f": {picker[:12]}")))
    settle(page)                                          # the table reloads with the new columns
    widen_run_names(page)
    page.screenshot(path=str(shot))
    return out


def settle(page, ms: int = 2_000) -> None:
    try:
        page.wait_for_load_state("networkidle", timeout=30_000)
    except Exception:   # noqa: BLE001 - a page that polls never idles; the pause below still helps
        pass
    page.wait_for_timeout(ms)


def column_picker(page) -> list[str]:
    """The metric names the runs table's Columns picker offers, in its order; ticks the
    headline nc_score and train_acc on the way, so that the screenshot shows them."""
    page.get_by_role("button", name="Columns", exact=True).click()
    dialog = page.locator("[role=dialog]").filter(has_text="Metrics (").first
    dialog.wait_for()
    items = [t.strip() for t in dialog.inner_text().splitlines()]
    start = next((i for i, t in enumerate(items) if t.startswith("Metrics (")), len(items))
    names = [t for t in items[start + 1:] if "/" in t or t.isidentifier()]
    for metric in ("headline/nc_score", "headline/train_acc"):
        try:
            dialog.get_by_text(metric, exact=True).first.click(timeout=5_000)
        except Exception:   # noqa: BLE001 - only the screenshot misses the columns
            pass
    page.keyboard.press("Escape")
    return names


def widen_run_names(page) -> None:
    """Fit the Run Name column to whole names (ag-grid's double click on the column's resize
    handle), so the screenshot shows them; cosmetic."""
    try:
        page.locator(".ag-header-cell[col-id='attributes.`Run Name`'] .ag-header-cell-resize").first \
            .dblclick(timeout=5_000)
        page.wait_for_timeout(1_000)
    except Exception:   # noqa: BLE001
        pass


def check_overview(page, name: str, shot: Path) -> list[tuple[bool, str]]:
    heading = page.get_by_text(re.compile(r"^Metrics \(\d+\)$")).first
    heading.wait_for()
    close_assistant(page)
    rows = heading.locator("xpath=..").locator("[role=table] [role=row]")
    listed = [rows.nth(i).locator("[role=cell]").first.inner_text().strip() for i in range(1, rows.count())]
    ok = all(k in listed for k in HEADLINE) and headline_first(listed)
    page.screenshot(path=str(shot))
    return [(ok, f"run page of {name!r} lists {', '.join(k.split('/')[1] for k in HEADLINE)} before any "
             f"per-layer metric" + ("" if ok else f"; listed first: {listed[:10]}"))]


def check_charts(page, name: str, shot: Path) -> list[tuple[bool, str]]:
    page.get_by_text("Add section").first.wait_for()
    close_assistant(page)
    headers = page.locator("[role=button][aria-expanded]").filter(has_text="Add chart")
    sections = [headers.nth(i).inner_text().split("\n")[0].strip() for i in range(headers.count())]
    layers = [i for i, s in enumerate(sections) if LAYER.match(s)]
    ok = bool(sections) and sections[0] == "headline" and "last_block" in sections and \
        all(sections.index("last_block") < i for i in layers)
    page.wait_for_timeout(3_000)                           # let the first section's charts draw
    page.screenshot(path=str(shot))
    return [(ok, f"Model metrics tab of {name!r} opens on the headline section, then last_block, then "
             f"the blocks: {sections}")]


def headline_first(names: list[str]) -> bool:
    """Every headline/ name in `names` comes before every layerNN/ name, and there is one."""
    heads = [i for i, n in enumerate(names) if n.startswith("headline/")]
    layers = [i for i, n in enumerate(names) if LAYER.match(n)]
    return bool(heads) and (not layers or max(heads) < min(layers))


if __name__ == "__main__":
    sys.exit(main())
