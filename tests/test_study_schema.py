"""study.schema owns the MLflow record: what the real writer (study.tracking) puts in a SQLite
store, analysis.load reads back under the same names; no other module spells the record's
tags; the schema is importable without torch or MLflow; the `nc-study` command is
assembled above study/ and analysis/ without an import cycle."""
from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from analysis.load import load_study, parse_key
from study import schema
from study.config import TrialConfig
from study.schema import (CONVERGED, DIVERGED, EPOCH, ERROR, HEADLINE, KIND_STUDY, KIND_TRIAL, TAG_ERROR,
                          TAG_FINGERPRINT, TAG_KIND, TAG_NOTE, TAG_PARENT, TAG_STATUS, TAG_STUDY, TAG_TRIAL_ID,
                          TAG_TRIAL_KEY, TIME_WALL, layer_key, mlflow_metrics, parse_layer_key)
from study.spaces import load_study as load_space
from study.tracking import (TrialRuns, ensure_experiment, ensure_parent_run, find_runs, layer_table, open_client,
                            report_metrics)

REPO = Path(__file__).resolve().parents[1]
DEPTH = 3                                   # hidden blocks 1, 2: keys layer01/…, layer02/…
EPOCHS = (5, 10)


def plain_report(epoch: int, scale: float) -> dict[str, float]:
    """One evaluation as the trainer yields it: plain names, per-layer keys by layer_key."""
    out = {EPOCH: float(epoch), "lr": 0.05, "train_loss": 0.5 / epoch, "train_acc": min(1.0, 0.8 + epoch / 50),
           "effective_depth": 2.0, "loss_gap": 0.01 * scale, "nc_score": 0.3 * scale + epoch / 100,
           "nc1": 0.2 / epoch, "ncc_acc": 0.99, TIME_WALL: 1.5 * epoch}
    for l in range(1, DEPTH):
        out |= {layer_key(l, "nc_score"): 0.1 * l * scale + epoch / 100, layer_key(l, "ncc_acc"): 0.9 + 0.01 * l}
    return out


@pytest.fixture(scope="session")   # once per worker under `pytest -n`, whose tests interleave modules
def written(tmp_path_factory):
    """A study of three trials (converged, diverged, error) written through TrialRuns, the
    writer's own path: start, one log per evaluation, finish."""
    root = tmp_path_factory.mktemp("schema")
    space = root / "tiny.yaml"
    space.write_text(f"name: tiny\ndescription: three trials\ntrial: {{dataset: teacher, depth: {DEPTH}}}\n"
                     "grid: {weight_decay: [0.0001, 0.001, 0.01]}\n")
    study = load_space(space)
    uri = f"sqlite:///{root}/mlflow.db"
    client = open_client(uri)
    exp_id = ensure_experiment(client, study.name, uri)
    parent = ensure_parent_run(client, exp_id, study)
    runs = TrialRuns(client, exp_id, parent, study.name)
    outcomes = {"k_conv": CONVERGED, "k_div": DIVERGED, "k_err": ERROR}
    logged = {}
    for i, (key, status) in enumerate(outcomes.items()):
        cfg = TrialConfig.from_dict({"dataset": "teacher", "depth": DEPTH, "weight_decay": [1e-4, 1e-3, 1e-2][i]})
        runs.apply({"op": "start", "key": key, "trial_id": f"ray_{i}", "params": cfg.to_params(),
                    "name": f"tiny-{i:03d}", "start_ms": 1_000})
        for epoch in EPOCHS:
            result = {**mlflow_metrics(plain_report(epoch, i + 1)), "status": "running", "node_id": "n"}
            runs.apply({"op": "log", "key": key, "step": epoch, "metrics": report_metrics(result),
                        "ts_ms": 2_000 + epoch})
        logged[key] = result
        runs.apply({"op": "finish", "key": key, "status": status, "layers_csv": layer_table(result),
                    "error": "boom" if status == ERROR else "", "end_ms": 3_000, "description": f"{status} note"})
    return {"uri": uri, "client": client, "study": study, "exp_id": exp_id, "parent": parent,
            "outcomes": outcomes, "logged": logged, "runs": runs}


def test_writer_tags_are_the_schema_names(written):
    client, parent = written["client"], written["parent"]
    tags = client.get_run(parent).data.tags
    assert tags[TAG_KIND] == KIND_STUDY and tags[TAG_STUDY] == "tiny"
    assert tags[TAG_FINGERPRINT] == written["study"].fingerprint() and tags[TAG_NOTE] == "three trials"
    trials = find_runs(client, written["exp_id"], KIND_TRIAL)
    assert len(trials) == 3
    for run in trials:
        t = run.data.tags
        key = t[TAG_TRIAL_KEY]
        assert t[TAG_PARENT] == parent and t[TAG_KIND] == KIND_TRIAL and t[TAG_TRIAL_ID].startswith("ray_")
        assert t[TAG_STATUS] == written["outcomes"][key] and t[TAG_NOTE] == f"{t[TAG_STATUS]} note"
        assert (t.get(TAG_ERROR) == "boom") == (key == "k_err")
        assert run.info.status == ("FAILED" if key == "k_err" else "FINISHED")
        assert set(run.data.metrics) == set(report_metrics(written["logged"][key]))
    # a new writer (a resumed study) finds each trial's run again by its key, at its last epoch
    again = TrialRuns(client, written["exp_id"], parent, "tiny")
    assert again.run_ids == written["runs"].run_ids
    assert set(again.last_step.values()) == {EPOCHS[-1]}


@pytest.mark.parametrize("backend", ["sqlite", "client"])
def test_reader_reads_what_the_writer_wrote(written, backend):
    loaded = load_study(["tiny"], written["uri"], cache_dir=None, backend=backend, full_layers=True)
    assert loaded.skipped.empty
    assert loaded.parents["tiny"].kind == KIND_STUDY and loaded.parents["tiny"].run_id == written["parent"]
    frame = loaded.frame
    by_trial = frame.drop_duplicates("run_id").set_index("trial")["status"].to_dict()
    assert by_trial == {"tiny-000": CONVERGED, "tiny-001": DIVERGED, "tiny-002": ERROR}
    # every metric name the writer logged comes back under its plain name, nothing else
    keys = set(report_metrics(written["logged"]["k_conv"]))
    assert set(frame.attrs["metrics"]) == {parse_key(k)[1] for k in keys} - {EPOCH}
    assert {"nc_score", "train_acc"} <= set(frame.attrs["metrics"]) and set(HEADLINE) <= set(frame.attrs["metrics"])
    assert sorted(frame["epoch"].unique()) == list(EPOCHS) and sorted(frame["layer"].unique()) == list(range(DEPTH))
    last = frame[(frame.trial == "tiny-000") & (frame.epoch == EPOCHS[-1])].set_index("layer")
    plain = plain_report(EPOCHS[-1], 1)
    assert last.loc[0, "nc_score"] == pytest.approx(plain["nc_score"])
    for l in range(1, DEPTH):
        assert last.loc[l, "ncc_acc"] == pytest.approx(plain[layer_key(l, "ncc_acc")])
        assert last.loc[l, "nc_score"] == pytest.approx(plain[layer_key(l, "nc_score")])


def test_layer_keys_and_layer_table():
    assert layer_key(3, "nc1") == "layer03/nc1" and parse_layer_key("layer03/nc1") == (3, "nc1")
    assert parse_layer_key(layer_key(12, "raw_nc_score")) == (12, "raw_nc_score")
    for other in ("nc1", "headline/nc_score", "last_block/nc1", "layerx/nc1", "layer03", "system/cpu"):
        assert parse_layer_key(other) is None
    table = layer_table(mlflow_metrics(plain_report(5, 1))).splitlines()
    assert table[0] == "layer,nc_score,ncc_acc" and [r.split(",")[0] for r in table[1:]] == ["1", "2"]


def test_sqlite_path_one_definition():
    import study.tracking
    assert study.tracking.sqlite_path is schema.sqlite_path
    assert schema.sqlite_path("sqlite:////abs/m.db") == Path("/abs/m.db")
    assert schema.sqlite_path("sqlite:///rel/m.db?mode=ro") == Path("rel/m.db")
    assert schema.sqlite_path(schema.DEFAULT_URI) == Path("mlflow.db")
    for none in ("sqlite://", "sqlite:///", "sqlite:///:memory:", "http://host:5000", "postgresql://h/db", "/x.db"):
        assert schema.sqlite_path(none) is None


def test_server_problem():
    assert schema.server_problem("http://127.0.0.1:1", timeout=2)      # nothing listens there

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    for handler in (Handler, type("Missing", (Handler,), {"do_GET": lambda self: self.send_error(404)})):
        server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:   # any HTTP answer counts: what it says about the API is the client's to report
            assert schema.server_problem(f"http://127.0.0.1:{server.server_port}/") is None
        finally:
            server.shutdown()
            server.server_close()


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_only_schema_spells_the_record_tags():
    literals = ("nc_study.kind", "nc_study.fingerprint", "mlflow.parentRunId")
    offenders = [f"{path.relative_to(REPO)}: {word}" for path in sources("study", "analysis")
                 if path != REPO / "study" / "schema.py"
                 for word in literals if word in path.read_text()]
    assert not offenders, "spell these with study.schema's names:\n" + "\n".join(offenders)


def test_no_import_cycle_between_the_command_lines():
    imports_study_cli = re.compile(r"^\s*(from study\.cli import|import study\.cli\b|from study import cli\b)", re.M)
    assert not [p for p in sources("analysis") if imports_study_cli.search(p.read_text())]
    assert not re.search(r"^\s*(from|import) analysis\b", (REPO / "study" / "cli.py").read_text(), re.M)


def test_schema_is_torch_and_mlflow_free_and_the_command_is_whole():
    code = ("import sys, study.schema; heavy = {'torch', 'mlflow', 'ray'} & set(sys.modules); "
            "assert not heavy, heavy\n"
            "from study.entry import build_parser\n"
            "sub = next(a for a in build_parser()._actions if a.dest == 'command')\n"
            "print(','.join(sub.choices))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["train,measure,run,status,analyze,recheck,export,import"]


def test_a_dataset_input_is_logged_once_per_run(written):
    """data.dataset_input's record goes to the run's inputs; sent again (a resumed trial's
    first report), it adds nothing."""
    from study.data import dataset_input, load_dataset
    cfg = TrialConfig.from_dict({"dataset": "teacher", "depth": DEPTH, "n_samples": 200})
    record = dataset_input(cfg, load_dataset(cfg))
    runs, client = written["runs"], written["client"]
    assert runs.log_input("k_conv", record) is True
    runs.apply({"op": "input", "key": "k_conv", "dataset": record})     # the writer's path: no second input
    (logged,) = client.get_run(runs.run_ids["k_conv"]).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("teacher depth=3 width=300 seed=0", record["digest"])
    assert logged.dataset.source_type == "code" and logged.tags[0].value == "train"
    reseeded = TrialConfig.from_dict({"dataset": "teacher", "depth": DEPTH, "n_samples": 200, "data_seed": 1})
    other = dataset_input(reseeded, load_dataset(reseeded))
    assert other["digest"] != record["digest"] and other["name"].endswith("seed=1")
