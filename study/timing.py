"""Where a study's time went, from what its trials logged to MLflow.

    python -m study.timing EXPERIMENT [--tracking-uri URI] [--slots N]

Each report of a trial carries `time_train_s`, `time_measure_s` (the training loop's own
clocks) and `time_wall_s` (the trial's wall clock since it started or resumed). A resumed
trial restarts those clocks, so each is summed over its segments (a drop in the history
starts a new one). The study's span runs from the first trial's start to the last one's
end. Its running time leaves out the stretches of 2 minutes or more when no trial ran at
all (the study was stopped, then resumed): each trial segment runs from its first report's
time minus its wall clock there to its last report. With `slots` trials able to run at once, slots ×
running time is the capacity, and what the trials did not use of it is start-up,
scheduling and idle time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass

from .schema import KIND_TRIAL, TAG_STATUS, TIME_MEASURE, TIME_TRAIN, TIME_WALL, TRAINED
from .tracking import find_runs, open_client, resolve_uri

CLOCKS = (TIME_TRAIN, TIME_MEASURE, TIME_WALL)
STOPPED_GAP_S = 120.0   # no trial running for this long: the study was stopped, not slow


def segments(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(start, end) in seconds of each segment of one trial, from its (timestamp_s, wall clock)
    reports in step order. A packed member's clock runs at 1/K of real time (trainable.run_pack),
    so the clock is first put back on real time by its median rate between reports. A segment
    ends where the clock drops (a restart) or where more real time passed between two reports
    than the clock says, by STOPPED_GAP_S or more (the trial was stopped, and its clock had
    passed the old value again by the first report that a resume logged)."""
    rates = [(c2 - c1) / (t2 - t1) for (t1, c1), (t2, c2) in zip(points, points[1:]) if t2 > t1 and c2 > c1]
    rate = statistics.median(rates) if rates else 1.0
    out, first, last = [], None, None
    for stamp, clock in points:
        real = clock / rate
        if last is not None and (real < last[1] or (stamp - last[0]) - (real - last[1]) >= STOPPED_GAP_S):
            out.append((first[0] - first[1], last[0]))
            first = None
        first = first or (stamp, real)
        last = (stamp, real)
    if first is not None:
        out.append((first[0] - first[1], last[0]))
    return out


def stopped_time(intervals: list[tuple[float, float]], min_gap_s: float = STOPPED_GAP_S) -> float:
    """Total length of the gaps of at least `min_gap_s` between the (start, end) intervals:
    stretches when no trial ran at all. Shorter gaps are the study's own start-up and
    scheduling and stay counted."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is not None and start - reach >= min_gap_s:
            total += start - reach
        reach = end if reach is None else max(reach, end)
    return total


def segment_total(values: list[float]) -> float:
    """Total of a clock that restarts from zero on resume: the sum of each segment's last value."""
    total, last = 0.0, 0.0
    for value in values:
        if value < last:
            total += last
        last = value
    return total + last


@dataclass(frozen=True)
class Timing:
    trials: int
    span_s: float
    running_s: float
    train_s: float
    measure_s: float
    wall_s: float
    slots: int

    @property
    def per_hour(self) -> float:
        return self.trials / (self.running_s / 3600) if self.running_s > 0 else 0.0

    def lines(self) -> list[str]:
        capacity = self.slots * self.running_s
        stopped = self.span_s - self.running_s
        other = self.wall_s - self.train_s - self.measure_s
        outside = capacity - self.wall_s
        share = lambda x, of: f"{100 * x / of:.1f} %" if of > 0 else "n/a"  # noqa: E731
        return [
            f"trials finished: {self.trials}; running {self.running_s / 3600:.2f} h "
            f"(span {self.span_s / 3600:.2f} h, of which {stopped / 3600:.2f} h with no trial running); "
            f"{self.per_hour:.1f} trials per hour",
            f"inside trials ({self.wall_s / 3600:.2f} trial-hours): training {share(self.train_s, self.wall_s)}, "
            f"measurement {share(self.measure_s, self.wall_s)}, reporting and checkpoints {share(other, self.wall_s)}",
            f"of {self.slots} slots × running time ({capacity / 3600:.2f} slot-hours): inside trials "
            f"{share(self.wall_s, capacity)}; start-up, scheduling and idle {share(outside, capacity)}",
        ]


def study_timing(uri: str, experiment: str, slots: int) -> Timing:
    client = open_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} in {uri}")
    runs = [r for r in find_runs(client, found.experiment_id, KIND_TRIAL)
            if r.data.tags.get(TAG_STATUS) in TRAINED]
    if not runs:
        raise SystemExit(f"experiment {experiment!r} has no finished trials")
    totals = dict.fromkeys(CLOCKS, 0.0)
    active = []
    for run in runs:
        for key in CLOCKS:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            totals[key] += segment_total([m.value for m in history])
            if key == TIME_WALL:
                active += segments([(m.timestamp / 1000, m.value) for m in history])
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    running = span - stopped_time(active)
    return Timing(len(runs), span, running, totals[TIME_TRAIN], totals[TIME_MEASURE], totals[TIME_WALL], slots)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--slots", type=int, default=os.cpu_count(),
                        help="trials that could run at once (default: this machine's cores)")
    args = parser.parse_args(argv)
    timing = study_timing(resolve_uri(args.tracking_uri), args.experiment, args.slots)
    print("\n".join(timing.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
