"""How many seeds a Conjecture 3.1.1 study needs: the chance of each verdict against τ as a
function of the seed count, by simulation under a pilot study's seed means and seed SD.

    python -m analysis.power                  # the pilots behind fig3_1 and conic_wd
    python -m analysis.power --tau 0.1 --seeds 3,5,8
    python -m analysis.power --study conic_wd --tracking-uri sqlite:///…/mlflow.db --seeds 10,20,40

A pilot is the per-λ seed means and the pooled within-λ seed SD of an earlier run (the
numbers below are from the published fig3_1 and paper_data reports before the exact-BN
re-run). The design is chosen as the smallest seed count whose chance of a decisive verdict
(consistent or violated) reaches 80 % in the BN groups, and never fewer than 5.

`--study` takes the pilot from a recorded study instead, each test group of Conjecture 3.1.1
as the analysis sees it (`--min-train-acc` as in `nc-study analyze`): per λ, the converged
seeds' mean and SD of the final nc_score and the share of its trials trained to their end
that converged. Each simulated study draws how many of its n seeds converge at each λ
(binomially, at that share), their scores from a normal around that mean with that SD (a λ
with one converged seed takes the group's median SD), and leaves out a λ with fewer than 2
converged seeds, as the analysis does. A plug-in projection: it takes the observed means as the truth, so where the observed
ε̂ sits near τ the chance of a decisive verdict is low at any seed count.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from . import bounds

THESIS_LAMBDAS = np.array([1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 5e-3, 7e-3, 1e-2])

# Pilot seed means of the final nc_score (λ: mean), linearly interpolated in log λ onto the
# thesis' grid, and pooled within-λ seed SDs (fig3_1 at >= 99.9 % training accuracy).
PILOTS = {
    "fig3_1 affine (depth 6, BN every block, teacher)":
        ({1e-4: 0.420, 3e-4: 0.788, 5e-4: 0.945, 1e-3: 1.069, 3e-3: 1.171, 5e-3: 1.168, 7e-3: 1.199,
          1e-2: 1.125}, 0.021),
    "fig3_1 nonaffine":
        ({1e-4: 0.042, 3e-4: 0.099, 5e-4: 0.188, 1e-3: 0.331, 3e-3: 0.639, 5e-3: 0.617, 7e-3: 0.660,
          1e-2: 0.680}, 0.064),
    "conic affine (paper_data: BN last, conic.npz)":
        ({1e-4: 0.948, 1e-3: 1.222, 5e-3: 1.221, 1e-2: 1.206}, 0.015),
    "conic nonaffine":
        ({1e-4: 0.845, 1e-3: 1.100, 5e-3: 1.159, 1e-2: 1.188}, 0.062),
}


def pilot_means(points: dict[float, float], lambdas=THESIS_LAMBDAS) -> np.ndarray:
    x = np.log(sorted(points))
    return np.interp(np.log(lambdas), x, [points[k] for k in sorted(points)])


def verdict_rates(means, sd: float, n_seeds: int, tau: float, n_studies: int = 400,
                  lambdas=THESIS_LAMBDAS, seed: int = 0) -> dict[str, float]:
    """Share of simulated studies (n_seeds per λ, normal seeds with SD `sd` around `means`)
    ending in each verdict of `bounds.pair_bound`."""
    rng = np.random.default_rng(seed)
    w = bounds.log_lambda_weights(lambdas)
    means = np.asarray(means, float)
    counts = {bounds.CONSISTENT: 0, bounds.VIOLATED: 0, bounds.INCONCLUSIVE: 0}
    for _ in range(n_studies):
        strata = [m + sd * rng.standard_normal(n_seeds) for m in means]
        counts[bounds.pair_bound(strata, w, tau)["bound_state"]] += 1
    return {k: v / n_studies for k, v in counts.items()}


@dataclass
class Pilot:
    """One group's per-λ truth for a simulation: the λ (increasing), the converged seeds'
    mean and SD of the final score, and the chance that a seed converges."""
    lambdas: np.ndarray
    means: np.ndarray
    sds: np.ndarray
    converge: np.ndarray


def study_rates(pilot: Pilot, n_seeds: int, tau: float, n_studies: int = 400, seed: int = 0) -> dict[str, float]:
    """Share of simulated studies ending in each verdict of `bounds.pair_bound`, under `pilot`
    with `n_seeds` seeds a λ (see the module docstring); too few λ with 2 converged seeds to
    compare counts as inconclusive."""
    rng = np.random.default_rng(seed)
    counts = {bounds.CONSISTENT: 0, bounds.VIOLATED: 0, bounds.INCONCLUSIVE: 0}
    for _ in range(n_studies):
        k = rng.binomial(n_seeds, pilot.converge)
        keep = k >= 2
        if keep.sum() < 2:
            counts[bounds.INCONCLUSIVE] += 1
            continue
        strata = [m + sd * rng.standard_normal(n) for m, sd, n in zip(pilot.means[keep], pilot.sds[keep], k[keep])]
        counts[bounds.pair_bound(strata, bounds.log_lambda_weights(pilot.lambdas[keep]), tau)["bound_state"]] += 1
    return {key: v / n_studies for key, v in counts.items()}


def study_pilots(experiments: list[str], tracking_uri: str, min_train_acc: float = 1.0) -> dict[str, Pilot]:
    """The pilot of each Conjecture 3.1.1 test group of a recorded study (module docstring)."""
    from study.schema import TRAINED

    from .frame import CONVERGED, by_group, regroup, relax_convergence
    from .load import load_study
    from .wd import final_scores, role
    frame = regroup(relax_convergence(load_study(experiments, tracking_uri, cache_dir=None).frame, min_train_acc))
    pilots = {}
    for group, rows in by_group(final_scores(frame, "nc_score")):
        rows = rows[(rows["weight_decay"] > 0) & rows["status"].isin(TRAINED)]   # trained to their end
        if role(rows) != "test" or rows.empty:
            continue
        lambdas, means, sds, converge = [], [], [], []
        for lam, at in rows.groupby("weight_decay"):
            scores = at.loc[at["status"] == CONVERGED, "nc_score"].dropna().to_numpy(float)
            lambdas.append(float(lam))
            means.append(scores.mean() if len(scores) else np.nan)
            sds.append(scores.std(ddof=1) if len(scores) > 1 else np.nan)
            converge.append(len(scores) / len(at))
        sds = np.array(sds)
        fallback = np.nanmedian(sds) if np.isfinite(sds).any() else 0.0
        pilots[group] = Pilot(np.array(lambdas), np.nan_to_num(np.array(means)),
                              np.where(np.isfinite(sds), sds, fallback), np.array(converge))
    return pilots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--seeds", default="3,4,5,6,8,10")
    parser.add_argument("--studies", type=int, default=400)
    parser.add_argument("--study", action="append", default=[], metavar="EXPERIMENT",
                        help="take the pilots from this recorded study (repeatable) instead of the built-in ones")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="the store of --study (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--min-train-acc", type=float, default=1.0, metavar="A",
                        help="the convergence rule of --study's analysis (default 1, the thesis' rule)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.study:
        import os

        from study.errors import UsageError
        from study.schema import DEFAULT_URI
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
        try:
            pilots = study_pilots(args.study, uri, args.min_train_acc)
        except UsageError as exc:
            raise SystemExit(f"python -m analysis.power: {exc}") from None
        print(f"P(verdict) for Conjecture 3.1.1 at τ = {args.tau:g}, pilots from {', '.join(args.study)} "
              f"(min train acc {args.min_train_acc:g}), {args.studies} simulated studies each")
        print(f"{'group':30s} " + " ".join(f"{n:>14d}" for n in seeds) + "   (seeds per λ: consistent/violated)")
        for name, pilot in pilots.items():
            cells = [study_rates(pilot, n, args.tau, args.studies) for n in seeds]
            print(f"{name[:30]:30s} " + " ".join(f"{r[bounds.CONSISTENT]:.2f}/{r[bounds.VIOLATED]:.2f}".rjust(14)
                                                for r in cells))
            print(f"{'':30s} converged share per λ: " + ", ".join(
                f"{lam:g}: {c:.0%}" for lam, c in zip(pilot.lambdas, pilot.converge)))
        return
    print(f"P(verdict) for Conjecture 3.1.1 at τ = {args.tau:g}, 8 λ, {args.studies} simulated studies each")
    print(f"{'pilot':50s} " + " ".join(f"{n:>14d}" for n in seeds) + "   (seeds per λ: consistent/violated)")
    for name, (means, sd) in PILOTS.items():
        cells = []
        for n in seeds:
            r = verdict_rates(pilot_means(means), sd, n, args.tau, args.studies)
            cells.append(f"{r[bounds.CONSISTENT]:.2f}/{r[bounds.VIOLATED]:.2f}".rjust(14))
        print(f"{name[:50]:50s} " + " ".join(cells))


if __name__ == "__main__":
    main()
