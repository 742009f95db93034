"""`nc-study status [STUDY]`: where a recorded study stands, read from MLflow alone (no Ray,
and nothing written), from any machine that reaches its tracking store:

    study fig3_1 in sqlite:///…/mlflow.db: 96 of 240 trials ended (61 converged, 35 not converged,
      0 diverged, 0 failed), 16 running, 128 not started
    run by alice@node1 (pid 4242, since 2026-11-24 02:52 UTC, last heard 8 s ago)
    last hour: 32 trials ended; about 4h30m00s left at that pace
    epochs of the open trials (last report): fig3_1-119 200/300, fig3_1-120 200/300, …
    browse it: …

The driver is the lease a running `nc-study run` keeps on the study's parent run
(study/lease.py); a study that no live driver holds says how to go on with it. Without a
STUDY, one line for each study the store holds:

    studies in sqlite:///…/mlflow.db:
      depth_sweep: 40 of 40 trials ended (19 converged, 21 not converged, 0 diverged, 0 failed); complete
      conic_wd: 16 of 240 trials ended (…), 16 running, 208 not started; run by alice@node1 (pid 4242, …)
"""
from __future__ import annotations

import argparse
import time

from .errors import StoreDown, UsageError
from .progress import clock
from .schema import (CONVERGED, DEFAULT_URI, DIVERGED, EPOCH, ERROR, INTERRUPTED, KIND_STUDY, KIND_TRIAL,
                     NOT_CONVERGED, RUNNING, TAG_STATUS, planned_trials, unfinished_import)

PACE_WINDOW_S = 3600.0
MAX_SHOWN = 4           # open trials whose epochs are listed
ENDED_WORDS = ((CONVERGED, "converged"), (NOT_CONVERGED, "not converged"), (DIVERGED, "diverged"), (ERROR, "failed"))
ENDED = frozenset(status for status, _ in ENDED_WORDS)


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="where a recorded study stands: trials by status, its driver, time left",
                       description="Where a recorded study stands, read from MLflow alone (nothing is written): "
                                   "its trials by status out of those it defines, the driver running it or that "
                                   "none does, the pace of the last hour (or since its driver started) and the "
                                   "time left at it. Without a study: one line for every study in the store.")
    p.add_argument("study", nargs="?", default=None,
                   help="the study's name (its MLflow experiment); without it, one line for every study in the store")
    p.add_argument("--tracking-uri", default=None,
                   help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI} here)")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from .lease import TAG_DRIVER, parse
    from .runner import browse_lines
    from .tracking import TrackingError, check_uri, fail_fast, find_runs, first_line, open_client, resolve_uri
    fail_fast(retries=1)                        # a look, not a job
    uri = resolve_uri(args.tracking_uri)
    try:
        check_uri(uri, must_exist=True)
    except TrackingError as exc:
        raise UsageError(str(exc)) from None
    client = open_client(uri)
    if args.study is None:
        for line in overview_lines(client, uri):
            print(line)
        return 0
    try:
        experiment = client.get_experiment_by_name(args.study)
        if experiment is None or experiment.lifecycle_stage == "deleted":
            names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
            raise UsageError(f"no study {args.study!r} in {uri} (it holds: {', '.join(names) or 'none'}); "
                             "`nc-study run` records one, or pass its --tracking-uri")
        parents = find_runs(client, experiment.experiment_id, KIND_STUDY)
        runs = find_runs(client, experiment.experiment_id, KIND_TRIAL)
    except UsageError:
        raise
    except Exception as exc:   # noqa: BLE001 - a store that stopped answering after check_uri
        raise StoreDown(f"tracking store {uri} failed while reading study {args.study!r} ({first_line(exc)}); "
                        "try again once it answers") from None
    if not parents:
        raise UsageError(f"experiment {args.study!r} in {uri} holds no study of nc-study (no parent run)")
    parent = parents[0]
    unfinished = unfinished_import(parent.data.tags, args.study, uri)
    if unfinished:
        raise UsageError(unfinished)
    trials = [(run.data.tags.get(TAG_STATUS, RUNNING), run.info.end_time) for run in runs]
    for line in status_lines(args.study, uri, planned_trials(parent.data.params), trials,
                             parse(parent.data.tags.get(TAG_DRIVER))):
        print(line)
    open_runs = sorted((run for run in runs if run.data.tags.get(TAG_STATUS, RUNNING) == RUNNING),
                       key=lambda run: -run.data.metrics.get(EPOCH, 0))
    progress = [f"{(run.info.run_name or run.info.run_id).split(' ')[0]} {int(run.data.metrics.get(EPOCH, 0))}/"
                f"{run.data.params.get('epochs', '?')}" for run in open_runs]
    if progress:
        more = f", … ({len(progress)} in all)" if len(progress) > MAX_SHOWN else ""
        print(f"epochs of the open trials (last report): {', '.join(progress[:MAX_SHOWN])}{more}")
    for line in browse_lines(uri, experiment.experiment_id):
        print(line)
    return 0


def overview_lines(client, uri: str, now: float | None = None) -> list[str]:
    """One line for each study of nc-study in the store (experiments without a study's parent
    run are left out), by name: its trials by status and its driver, or that it is complete."""
    from .lease import TAG_DRIVER, describe, is_live, parse
    from .tracking import find_runs, first_line
    now = time.time() if now is None else now
    lines = []
    try:
        experiments = sorted((e for e in client.search_experiments() if e.lifecycle_stage != "deleted"),
                             key=lambda e: e.name)
        for experiment in experiments:
            parents = find_runs(client, experiment.experiment_id, KIND_STUDY)
            if not parents:
                continue
            tags, params = parents[0].data.tags, parents[0].data.params
            if unfinished_import(tags, experiment.name, uri):
                lines.append(f"  {experiment.name}: an import cut short (`nc-study import` it again)")
                continue
            trials = [run.data.tags.get(TAG_STATUS, RUNNING)
                      for run in find_runs(client, experiment.experiment_id, KIND_TRIAL)]
            lease = parse(tags.get(TAG_DRIVER))
            live = is_live(lease, now)
            counts, complete = trial_counts(planned_trials(params), trials, live)
            state = "complete" if complete else f"run by {describe(lease, now)}" if live else "no driver is running it"
            lines.append(f"  {experiment.name}: {counts}; {state}")
    except Exception as exc:   # noqa: BLE001 - a store that stopped answering after check_uri
        raise StoreDown(f"tracking store {uri} failed while listing its studies ({first_line(exc)}); "
                        "try again once it answers") from None
    if not lines:
        return [f"no study in {uri}: `nc-study run SPACE.yaml --tracking-uri {uri}` records one"]
    return [f"studies in {uri}:"] + lines


def trial_counts(planned: int | None, statuses: list[str], live: bool) -> tuple[str, bool]:
    """("96 of 240 trials ended (61 converged, …), 16 running, 128 not started", complete) from
    the trial runs' status tags; open runs are running under a live driver, else stopped part-way."""
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    ended = sum(counts.get(s, 0) for s in ENDED)
    open_runs = counts.get(RUNNING, 0) + counts.get(INTERRUPTED, 0)
    of = f" of {planned}" if planned is not None else ""
    outcome = ", ".join(f"{counts.get(s, 0)} {word}" for s, word in ENDED_WORDS)
    rest = []
    if open_runs:
        rest.append(f"{open_runs} running" if live else f"{open_runs} stopped part-way")
    if planned is not None and planned > ended + open_runs:
        rest.append(f"{planned - ended - open_runs} not started")
    complete = planned is not None and ended >= planned and not open_runs
    return f"{ended}{of} trials ended ({outcome})" + "".join(f", {r}" for r in rest), complete


def status_lines(name: str, uri: str, planned: int | None, trials: list[tuple[str, int | None]],
                 lease: dict | None, now: float | None = None) -> list[str]:
    """The report: `trials` as (status tag, end time in ms or None) per trial run, `lease` the
    parent run's driver lease (parsed) or None."""
    from .lease import describe, is_live
    from .runner import OUTAGE_LIMIT_S as OUTAGE_NOTE_S
    now = time.time() if now is None else now
    live = is_live(lease, now)
    counts, complete = trial_counts(planned, [status for status, _ in trials], live)
    ended = sum(1 for status, _ in trials if status in ENDED)
    lines = [f"study {name} in {uri}: {counts}"]
    if complete:
        lines.append(f"complete; next: nc-study analyze {name} --tracking-uri {uri}")
        return lines
    if live:
        lines.append(f"run by {describe(lease, now)}")
        # the pace over the last hour, or since this driver started if that is shorter (its
        # first trials end only after they ran, so an hour would count time it did not run)
        window = min(PACE_WINDOW_S, max(1.0, now - float(lease.get("started", now - PACE_WINDOW_S))))
        since = "last hour" if window >= PACE_WINDOW_S else f"since this driver started ({clock(window)} ago)"
        recent = sum(1 for status, end in trials if end and status in ENDED
                     and now - end / 1000 <= window)
        if recent and planned is not None:
            left = (planned - ended) * window / recent
            lines.append(f"{since}: {recent} trial{'s' if recent != 1 else ''} ended; about {clock(left)} "
                         "left at that pace")
        elif not recent:
            lines.append(f"{since}: no trial ended yet (a trial or pack may take longer; see its runs' epochs)")
    else:
        gone = f"its last driver, {describe(lease, now)}, is gone; " if lease else ""
        if lease and now - float(lease["beat"]) < OUTAGE_NOTE_S:
            gone = (f"its last driver, {describe(lease, now)}, fell silent: gone, or cut off from this store "
                    f"(a driver rides out outages and stops if another takes its study over); ")
        lines.append(f"no driver is running it: {gone}run `nc-study run` on its search-space file again "
                     f"(the same --tracking-uri) to go on where it stopped")
    return lines
