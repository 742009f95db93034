"""The paper's claims (arXiv 2309.04644 v3) and the thesis' §1.4 data-complexity claim, each a
trend test with trials as the independent units (docs/science.md §7). Only converged trials
enter; each family of p-values is Holm-adjusted; verdicts use `verdict.trend_state`:
`supported` (significant at `verdict.ALPHA` after adjustment, in the predicted direction),
`contradicted` (significant against it), `inconclusive`, or `insufficient` (too few trials).

(i) `alpha_vs_lambda` — the last-layer feature norm shrinks as λ grows. Per architecture
    group: Spearman ρ of the final `alpha` (root mean square feature norm of the last hidden
    block, docs/science.md §4) against log λ over trials, two-sided permutation p-value
    (predicted ρ < 0); Holm over the groups. Effect size: the least-squares slope of the
    per-λ seed mean of log alpha on log λ (d log alpha / d log λ, an elasticity), with a
    95 % t-interval from the residuals of that fit (K per-λ means, K − 2 degrees of freedom;
    none with K = 2). The interval is exact when the seed means lie on a line with equal
    variance; curvature widens it. No bootstrap. The slope and its interval carried over to the
    group's λ range give alpha's relative change there; when that interval lies within ±5 %
    (ALPHA_NEGLIGIBLE) the group is `negligible`, whatever the trend's p-value: a norm pinned
    by construction (an MLP's last non-affine BN: alpha = sqrt(width) but for BN's eps) may trend
    significantly by 0.01 %, and that is no shrinking.

(ii) `nc_vs_loss` — NC is stronger where the training loss is lower. Within each trial,
    Spearman ρ_i of nc_score against train_loss over its evaluations (the last hidden block;
    >= 3 evaluations with both finite). The evaluations of a trial are not independent, so
    ρ_i is only a summary; the test is across the trials of a group, the independent units:
    an exact two-sided sign test of the ρ_i (zeros dropped), predicted negative, Holm over
    the groups, and the mean ρ_i with a 95 % t-interval over trials as the effect size.

(iii) `data_complexity` — data of lower distribution complexity reach more NC (thesis §1.4).
    Complexity is ordered by the teacher's depth (teacher_depth 3 < 6 < 9: a deeper random
    teacher, more complex class boundaries); the trend is tested only across those levels.
    Conic-hull data are not placed on that scale: their classes are cones (sign patterns of
    log2 C hyperplanes through the origin, i.e. linear boundaries) and the study files expect
    them to be the least complex, but the generator differs from the teacher's in more than
    complexity (class balance, no centring), so conic enters descriptively only: its seed
    mean and the Welch difference conic − (lowest teacher depth) at each λ. Trials are split
    into comparison sets by their group label without `dataset` and `teacher_depth`; in each
    set and λ stratum the Jonckheere–Terpstra test of final nc_score (one value per trial,
    i.e. per seed) across the teacher depths (permutation p, predicted z < 0), Holm over every
    set × λ stratum; and per set one stratified JT (J summed over the λ strata, values
    permuted within strata), Holm over the sets, which gives the set's verdict.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.special import stdtrit

from . import stats
from .effects import welch_interval
from .frame import CONVERGED, by_group, exclusion_counts, final_values, join_label, label_parts, trials
from .verdict import (INCONCLUSIVE, INSUFFICIENT, NEGLIGIBLE, clean, excluded_note, interval, num, p_is,
                      trend_state,
                      summary)

ALPHA_TEST, LOSS_TEST, COMPLEXITY_TEST = "alpha_vs_lambda", "nc_vs_loss", "data_complexity"
CLAIMS = {ALPHA_TEST: "the last-layer feature norm alpha shrinks as weight decay λ grows (paper v3)",
          LOSS_TEST: "NC is stronger where the training loss is lower, along training (paper v3)",
          COMPLEXITY_TEST: "data of lower distribution complexity reach more NC (thesis §1.4): final nc_score "
                           "falls as the teacher's depth grows"}
MIN_TRIALS, MIN_LAMBDAS = 3, 2
MIN_EVALUATIONS = 3                   # per trial, for its ρ_i
MIN_SIGN_TRIALS = 6                   # fewest nonzero ρ_i for which a two-sided sign test can reach p < 0.05
LEVEL = 0.95
# Claim (i)'s practical tolerance, fixed before any data: a change of alpha by less than 5 % over the
# whole λ range a group covers is no shrinking in practice (e.g. a non-affine BN pins the norm).
ALPHA_NEGLIGIBLE = 0.05
COMPLEXITY_PARAMS = ("dataset", "teacher_depth")


# ------------------------------------------------------------------ small tools

def ols_slope(x, y, level: float = LEVEL) -> dict:
    """Least-squares slope of y on x with its t-interval (df = K − 2): slope, ci_low,
    ci_high, df, and no_interval_reason when K < 3 or the residuals vanish."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    K = len(x)
    out = {"slope": None, "ci_low": None, "ci_high": None, "df": K - 2, "no_interval_reason": None}
    sxx = float(((x - x.mean()) ** 2).sum()) if K else 0.0
    if K < 2 or sxx == 0:
        out["no_interval_reason"] = "fewer than 2 λ values"
        return out
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    out["slope"] = slope
    if K < 3:
        out["no_interval_reason"] = "2 λ values: no residual degrees of freedom"
        return out
    resid = y - y.mean() - slope * (x - x.mean())
    se = math.sqrt(float(resid @ resid) / (K - 2) / sxx)
    if se == 0:
        out["no_interval_reason"] = "the seed means lie exactly on a line"
        return out
    half = float(stdtrit(K - 2, 0.5 + level / 2)) * se
    out |= {"ci_low": slope - half, "ci_high": slope + half}
    return out


def mean_interval(values, level: float = LEVEL) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) with a t-interval over the values (n − 1 df); no interval for n < 2
    or no spread."""
    v = np.asarray(values, float)
    if not len(v):
        return None, None, None
    m = float(v.mean())
    if len(v) < 2 or np.ptp(v) == 0:
        return m, None, None
    half = float(stdtrit(len(v) - 1, 0.5 + level / 2)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, m - half, m + half


def sign_test(values) -> tuple[int, int, float]:
    """(n_negative, n_positive, exact two-sided binomial p) of the nonzero finite values."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v != 0)]
    neg, pos = int((v < 0).sum()), int((v > 0).sum())
    n = neg + pos
    if n == 0:
        return 0, 0, math.nan
    k = min(neg, pos)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return neg, pos, min(1.0, 2 * tail)


def stratified_jonckheere(strata: list[tuple[np.ndarray, np.ndarray]], n_perm: int = stats.N_PERM,
                          seed: int = 0) -> tuple[float, float, float]:
    """Jonckheere–Terpstra summed over strata, each (values, levels): (J, z, two-sided p),
    the null from permuting the values within each stratum independently (Monte Carlo,
    p >= 1/(1 + n_perm)); z > 0: values rise with the level. NaN when no stratum counts."""
    strata = [(np.asarray(v, float), np.asarray(l, float)) for v, l in strata]
    strata = [(v, l) for v, l in strata if len(v) >= 2 and len(np.unique(l)) >= 2]
    if not strata:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    J, mean, null = 0.0, 0.0, np.zeros(n_perm)
    for v, l in strata:
        J += float(stats.jonckheere_statistic(v, l)[0])
        counts = np.unique(l, return_counts=True)[1]
        mean += (len(v) ** 2 - float((counts ** 2).sum())) / 4
        null += stats.jonckheere_statistic(rng.permuted(np.tile(v, (n_perm, 1)), axis=1), l)
    sd = float(null.std())
    if sd == 0:
        return J, math.nan, math.nan
    extreme = int(np.count_nonzero(np.abs(null - mean) >= abs(J - mean) - 1e-12))
    return J, (J - mean) / sd, (1 + extreme) / (1 + n_perm)


def seeds_text(counts: list[int]) -> str:
    low, high = min(counts), max(counts)
    return f"{low}" if low == high else f"{low}–{high}"


def _adjust(results: list[dict], key: str = "p_value") -> None:
    for r, adjusted in zip(results, stats.holm([r.get(key) for r in results])):
        r[key + "_adjusted"] = adjusted


# ------------------------------------------------------------------ (i) alpha against λ

def alpha_group(rows: pd.DataFrame, n_perm: int = stats.N_PERM, seed: int = 0) -> dict:
    """Claim (i) on one group's trials (columns status, weight_decay, seed, alpha)."""
    ok = rows["status"] == CONVERGED
    excluded = exclusion_counts(rows)
    a_all = rows["alpha"].to_numpy(float)
    for reason, mask in (("weight_decay <= 0 (log λ undefined)", ok & (rows["weight_decay"] <= 0)),
                         ("no final alpha > 0", ok & ~(np.isfinite(a_all) & (a_all > 0)))):
        mask &= ok
        if mask.any():
            excluded[reason] = int(mask.sum())
            ok &= ~mask
    used = rows[ok].sort_values(["weight_decay", "seed"])
    lam, a = used["weight_decay"].to_numpy(float), used["alpha"].to_numpy(float)
    levels = np.unique(lam)
    strata = [a[lam == level] for level in levels]
    out = {"test": ALPHA_TEST, "metric": "alpha", "predicted": "rho < 0 (alpha falls as λ grows)",
           "n_converged": int(len(used)), "n_excluded": int(sum(excluded.values())), "excluded": excluded,
           "n_lambdas": int(len(levels)), "seeds_per_lambda": [int(len(s)) for s in strata],
           "statistic": None, "statistic_name": "Spearman rho of final alpha vs log λ (trials)", "p_value": None,
           "slope": None, "ci_low": None, "ci_high": None, "ci_level": LEVEL, "df": None,
           "ci_of": ("slope of the per-λ seed mean of log alpha on log λ (least squares over the λ values), "
                     "t-interval from the fit's residuals, K − 2 df"),
           "no_interval_reason": None, **range_change({"slope": None, "ci_low": None, "ci_high": None}, levels),
           "per_lambda": [{"weight_decay": float(level), "n": int(len(s)), "mean": float(s.mean()),
                           "mean_log": float(np.log(s).mean()), "sd": float(s.std(ddof=1)) if len(s) > 1 else None}
                          for level, s in zip(levels, strata)]}
    if len(used) < MIN_TRIALS or len(levels) < MIN_LAMBDAS:
        out["state"] = INSUFFICIENT
        out["verdict"] = (f"too few converged trials: {len(used)} across {len(levels)} λ value(s)"
                          f"{excluded_note(excluded)}; need >= {MIN_TRIALS} across >= {MIN_LAMBDAS}; no verdict")
        return out
    trend = stats.spearman_test(np.log(lam), a, n_perm, seed)
    fit = ols_slope(np.log(levels), [p["mean_log"] for p in out["per_lambda"]])
    out |= {"statistic": trend.statistic, "p_value": trend.p_value} | fit | range_change(fit, levels)
    out["state"] = "pending"
    return out


def range_change(fit: dict, levels: np.ndarray) -> dict:
    """The fitted relative change of alpha over the group's λ range, exp(slope · log(λ_max/λ_min)) − 1,
    with the slope interval carried over (None where the slope has none)."""
    change: dict = {"range_change_tolerance": ALPHA_NEGLIGIBLE}
    for key, slope in (("range_change", fit["slope"]), ("range_change_low", fit["ci_low"]),
                       ("range_change_high", fit["ci_high"])):
        change[key] = None if slope is None else math.expm1(slope * float(np.log(levels.max() / levels.min())))
    return change


def alpha_state(r: dict) -> str:
    """`negligible` when the interval of the fitted change over the λ range lies within
    ±ALPHA_NEGLIGIBLE (an equivalence finding, whatever the trend's p-value), else the trend's state."""
    low, high = r.get("range_change_low"), r.get("range_change_high")
    if low is not None and high is not None and -ALPHA_NEGLIGIBLE < low and high < ALPHA_NEGLIGIBLE:
        return NEGLIGIBLE
    return trend_state(r["statistic"], r["p_value_adjusted"], -1)


def change_text(r: dict) -> str:
    """'-42 % [-45 %, -38 %]': the alpha claim's fitted change over the λ range; '—' without one."""
    if r.get("range_change") is None:
        return "—"
    text = f"{100 * r['range_change']:+.2g} %"
    if r.get("range_change_low") is not None:
        text += f" [{100 * r['range_change_low']:+.2g} %, {100 * r['range_change_high']:+.2g} %]"
    return text


def alpha_verdict(r: dict) -> str:
    ci = interval(r["ci_low"], r["ci_high"], r.get("no_interval_reason"))
    lams = [p["weight_decay"] for p in r["per_lambda"]]
    change = "" if r.get("range_change") is None else f" (alpha changes by {change_text(r)} over the λ range)"
    note = (f"; the change stays within ±{100 * ALPHA_NEGLIGIBLE:g} %, no shrinking in practice"
            if r["state"] == NEGLIGIBLE else "")
    return (f"{r['state']}: ρ = {num(r['statistic'])}, {p_is(r['p_value_adjusted'], 'p_adj')}; "
            f"d log alpha / d log λ = {num(r['slope'])} {ci}{change}{note}; alpha {num(r['per_lambda'][0]['mean'], 3)} → "
            f"{num(r['per_lambda'][-1]['mean'], 3)} (seed means); {r['n_converged']} trials, "
            f"{seeds_text(r['seeds_per_lambda'])} seeds per λ, λ {lams[0]:g}–{lams[-1]:g} ({len(lams)} values)"
            f"{excluded_note(r['excluded'])}")


def alpha_vs_lambda(frame: pd.DataFrame, n_perm: int = stats.N_PERM, seed: int = 0) -> list[dict]:
    """Claim (i) per architecture group, Holm-adjusted over the groups; [] when the study
    has no final alpha or fewer than 2 λ values."""
    finals = final_values(frame, "alpha")
    if finals.empty or finals["weight_decay"].nunique() < 2:
        return []
    table = trials(frame).merge(finals[["run_id", "alpha"]], on="run_id", how="left")
    out = [{"group": group, **alpha_group(rows, n_perm, seed)} for group, rows in by_group(table)]
    return _finish(out, -1, alpha_verdict, decide=alpha_state)


def _finish(results: list[dict], predicted_sign: int, describe, direction: str = "statistic",
            decide=None) -> list[dict]:
    _adjust(results)
    for r in results:
        if r["state"] == INSUFFICIENT:
            continue
        r["state"] = (decide(r) if decide else
                      trend_state(r[direction], r["p_value_adjusted"], predicted_sign))
        r["verdict"] = describe(r)
    return results


# ------------------------------------------------------------------ (ii) nc_score against the loss

def loss_correlations(frame: pd.DataFrame, metric: str = "nc_score", loss: str = "train_loss") -> pd.DataFrame:
    """Per trial: run_id, n_evaluations and rho (Spearman of `metric` against `loss` over the
    trial's evaluations at the last hidden block; NaN with < MIN_EVALUATIONS or a constant side)."""
    if metric not in frame.columns or loss not in frame.columns:
        return pd.DataFrame(columns=["run_id", "n_evaluations", "rho"])
    rows = frame[(frame["layer"] == 0) & np.isfinite(frame[metric].to_numpy(float))
                 & np.isfinite(frame[loss].to_numpy(float))]
    out = []
    for run_id, sub in rows.groupby("run_id", sort=False):
        n = len(sub)
        rho = stats.spearman(sub[loss], sub[metric]) if n >= MIN_EVALUATIONS else math.nan
        out.append({"run_id": run_id, "n_evaluations": n, "rho": rho})
    return pd.DataFrame(out, columns=["run_id", "n_evaluations", "rho"])


def loss_group(rows: pd.DataFrame) -> dict:
    """Claim (ii) on one group's trials (columns status, rho)."""
    ok = rows["status"] == CONVERGED
    excluded = exclusion_counts(rows)
    few = ok & ~np.isfinite(rows["rho"].to_numpy(float))
    if few.any():
        excluded[f"no ρ (< {MIN_EVALUATIONS} evaluations or a constant series)"] = int(few.sum())
    rho = rows.loc[ok & ~few, "rho"].to_numpy(float)
    neg, pos, p = sign_test(rho)
    mean, low, high = mean_interval(rho)
    out = {"test": LOSS_TEST, "metric": "nc_score", "predicted": "rho_i < 0 (nc_score rises as train_loss falls)",
           "n_converged": int(len(rho)), "n_excluded": int(sum(excluded.values())), "excluded": excluded,
           "n_negative": neg, "n_positive": pos, "n_zero": int(len(rho) - neg - pos),
           "sign_balance": (pos - neg) / (pos + neg) if pos + neg else None,
           "statistic": mean, "statistic_name": "mean over trials of the per-trial Spearman rho(nc_score, train_loss)",
           "median": float(np.median(rho)) if len(rho) else None,
           "p_value": None, "p_value_name": "exact two-sided sign test of the per-trial rho",
           "ci_low": low, "ci_high": high, "ci_level": LEVEL,
           "ci_of": "mean of the per-trial rho, t-interval over trials (the independent units)",
           "no_interval_reason": None if low is not None else "fewer than 2 trials, or no spread"}
    if neg + pos < MIN_SIGN_TRIALS:
        out["state"] = INSUFFICIENT
        out["verdict"] = (f"too few trials with a nonzero ρ: {neg + pos}{excluded_note(excluded)}; the sign test "
                          f"needs >= {MIN_SIGN_TRIALS} to reach p < 0.05; no verdict")
        return out
    out["p_value"] = p
    out["state"] = "pending"
    return out


def loss_verdict(r: dict) -> str:
    ci = interval(r["ci_low"], r["ci_high"], r.get("no_interval_reason"))
    return (f"{r['state']}: ρ(nc_score, train_loss) < 0 in {r['n_negative']} of {r['n_converged']} trials, "
            f"> 0 in {r['n_positive']} (sign test {p_is(r['p_value_adjusted'], 'p_adj')}); mean ρ = "
            f"{num(r['statistic'])} {ci}, median {num(r['median'])}{excluded_note(r['excluded'])}")


def nc_vs_loss(frame: pd.DataFrame) -> tuple[list[dict], pd.DataFrame]:
    """Claim (ii) per architecture group, Holm-adjusted over the groups, and the per-trial
    table (group, weight_decay, seed, status, n_evaluations, rho); [] when no trial has a
    correlation."""
    corr = loss_correlations(frame)
    table = trials(frame).merge(corr, on="run_id", how="left")
    if corr.empty or not np.isfinite(corr["rho"].to_numpy(float)).any():
        return [], table
    out = [{"group": group, **loss_group(rows)} for group, rows in by_group(table)]
    return _finish(out, -1, loss_verdict, "sign_balance"), table


# ------------------------------------------------------------------ (iii) data complexity

def complexity_set(group: str) -> str:
    """The comparison set of a group: its label without `dataset=` and `teacher_depth=`."""
    return join_label([(k, v) for k, v in label_parts(group) if k not in COMPLEXITY_PARAMS])


def complexity_table(frame: pd.DataFrame, metric: str = "nc_score") -> pd.DataFrame:
    """Per trial: trial columns, dataset, level (teacher_depth for teacher data, NaN else),
    set (`complexity_set`) and the final `metric`."""
    table = trials(frame).merge(final_values(frame, metric)[["run_id", metric]], on="run_id", how="left")
    dataset = table["dataset"].astype(str) if "dataset" in table.columns else pd.Series("teacher", index=table.index)
    depth = (pd.to_numeric(table["teacher_depth"], errors="coerce") if "teacher_depth" in table.columns
             else pd.Series(math.nan, index=table.index))
    return table.assign(dataset=dataset, level=depth.where(dataset == "teacher"),
                        set=table["group"].map(complexity_set))


def applies(table: pd.DataFrame) -> bool:
    """The study varies the teacher's depth (>= 2 levels of teacher data)."""
    return table["level"].nunique() >= 2


def complexity_stratum(rows: pd.DataFrame, metric: str, n_perm: int, seed: int) -> dict:
    """JT across teacher depths at one λ (rows: one set's trials at that λ)."""
    ok = rows["status"] == CONVERGED
    excluded = exclusion_counts(rows)
    finite = np.isfinite(rows[metric].to_numpy(float))
    if (ok & ~finite).any():
        excluded[f"no final {metric}"] = int((ok & ~finite).sum())
    used = rows[ok & finite]
    teacher = used[used["level"].notna()].sort_values(["level", "seed"])
    conic = used.loc[used["dataset"] == "conic", metric].to_numpy(float)
    v, lv = teacher[metric].to_numpy(float), teacher["level"].to_numpy(float)
    per_level = [{"teacher_depth": int(level), "n": int((lv == level).sum()), "mean": float(v[lv == level].mean()),
                  "sd": float(v[lv == level].std(ddof=1)) if (lv == level).sum() > 1 else None}
                 for level in np.unique(lv)]
    out = {"weight_decay": float(rows["weight_decay"].iloc[0]), "n_converged": int(len(teacher)),
           "n_excluded": int(sum(excluded.values())), "excluded": excluded, "per_level": per_level,
           "jonckheere_J": None, "statistic": None, "statistic_name": "Jonckheere–Terpstra z across teacher_depth",
           "p_value": None, "conic": None}
    if len(conic):
        out["conic"] = {"n": int(len(conic)), "mean": float(conic.mean()),
                        "sd": float(conic.std(ddof=1)) if len(conic) > 1 else None,
                        "diff_vs_lowest": None, "ci_low": None, "ci_high": None, "ci_level": LEVEL,
                        "ci_of": "conic − lowest teacher depth, difference of seed means, Welch t-interval"}
        if per_level:
            low = v[lv == per_level[0]["teacher_depth"]]
            out["conic"]["diff_vs_lowest"] = float(conic.mean() - low.mean())
            out["conic"]["vs_teacher_depth"] = per_level[0]["teacher_depth"]
            if len(conic) > 1 and len(low) > 1 and (np.ptp(conic) > 0 or np.ptp(low) > 0):
                _, lo, hi, _ = welch_interval(conic, low, LEVEL)
                out["conic"] |= {"ci_low": float(lo), "ci_high": float(hi)}
    if len(per_level) < 2 or len(teacher) < MIN_TRIALS:
        out["state"] = INSUFFICIENT
        return out
    jt, z = stats.jonckheere_test(v, lv, n_perm, seed)
    out |= {"jonckheere_J": jt.statistic, "statistic": z, "p_value": jt.p_value}
    out["state"] = "pending" if not math.isnan(jt.p_value) else INCONCLUSIVE
    return out


def complexity_set_result(label: str, rows: pd.DataFrame, metric: str, n_perm: int, seed: int) -> dict:
    strata = [complexity_stratum(sub, metric, n_perm, seed) for _, sub in rows.groupby("weight_decay", sort=True)]
    ok = (rows["status"] == CONVERGED) & np.isfinite(rows[metric].to_numpy(float)) & rows["level"].notna()
    used = rows[ok]
    J, z, p = stratified_jonckheere([(sub[metric].to_numpy(float), sub["level"].to_numpy(float))
                                     for _, sub in used.groupby("weight_decay", sort=True)], n_perm, seed)
    tested = [s for s in strata if s["state"] != INSUFFICIENT]
    out = {"set": label, "group": label, "test": COMPLEXITY_TEST, "metric": metric,
           "predicted": "z < 0 (nc_score falls as teacher_depth grows)",
           "levels": sorted(int(x) for x in used["level"].unique()),
           "n_converged": int(len(used)), "n_strata": len(strata), "n_strata_tested": len(tested),
           "jonckheere_J": J, "statistic": z, "p_value": None if math.isnan(p) else p,
           "statistic_name": "stratified Jonckheere–Terpstra z (J summed over λ strata, permuted within strata)",
           "strata": strata}
    if not tested or math.isnan(p):
        out["state"] = INSUFFICIENT
        out["verdict"] = ("too few converged teacher trials: no λ stratum has >= 2 teacher depths and "
                          f">= {MIN_TRIALS} trials; no verdict")
    else:
        out["state"] = "pending"
    return out


def complexity_verdict(r: dict) -> str:
    per = "; ".join(f"λ {s['weight_decay']:g}: z = {num(s['statistic'])}, {p_is(s.get('p_value_adjusted'), 'p_adj')} "
                    f"({s['state']})" for s in r["strata"] if s["state"] != INSUFFICIENT)
    lv = ", ".join(str(x) for x in r["levels"])
    return (f"{r['state']}: stratified JT z = {num(r['statistic'])}, {p_is(r['p_value_adjusted'], 'p_adj')} "
            f"over {r['n_strata_tested']} λ strata, {r['n_converged']} teacher trials at teacher_depth {lv}; "
            f"per λ: {per}")


def data_complexity(frame: pd.DataFrame, metric: str = "nc_score", n_perm: int = stats.N_PERM,
                    seed: int = 0) -> list[dict]:
    """Claim (iii) per comparison set: per-λ JT (Holm over every set × λ stratum) and the
    stratified JT (Holm over the sets); [] when the study does not vary teacher_depth."""
    if frame.empty or metric not in frame.columns:
        return []
    table = complexity_table(frame, metric)
    if not applies(table):
        return []
    out = [complexity_set_result(label, rows, metric, n_perm, seed)
           for label, rows in table.groupby("set", sort=True) if rows["level"].nunique() >= 1]
    strata = [s for r in out for s in r["strata"]]
    _adjust(strata)
    for s in strata:
        if s["state"] != INSUFFICIENT:
            s["state"] = trend_state(s["statistic"], s["p_value_adjusted"], -1)
    return _finish(out, -1, complexity_verdict)


# ------------------------------------------------------------------ all of them

def paper_claims(frame: pd.DataFrame, n_perm: int = stats.N_PERM, seed: int = 0) -> tuple[dict, pd.DataFrame]:
    """{test: [per-group results]} for the three claims (a claim the study has no data for
    maps to []), and the per-trial loss-correlation table."""
    loss, corr = nc_vs_loss(frame)
    return ({ALPHA_TEST: alpha_vs_lambda(frame, n_perm, seed), LOSS_TEST: loss,
             COMPLEXITY_TEST: data_complexity(frame, "nc_score", n_perm, seed)}, corr)


def summary_line(results: list[dict], unit: str = "group") -> str:
    return summary([r["state"] for r in results], unit=unit)


def claims_json(results: dict) -> dict:
    """The `claims` entry of conjectures.json: per claim, what it says, how it is tested,
    whether the study has the data, a summary and the per-group results."""
    methods = {ALPHA_TEST: "Spearman rho of final alpha vs log λ over trials, permutation p, Holm over groups; "
                           "slope of per-λ mean log alpha on log λ with a t-interval (K − 2 df); 'negligible' when that "
                           "interval, carried over the group's λ range, keeps alpha's change within ±5 %",
               LOSS_TEST: "per-trial Spearman rho(nc_score, train_loss) over evaluations; across trials an exact "
                          "sign test (Holm over groups) and a t-interval of the mean rho",
               COMPLEXITY_TEST: "Jonckheere–Terpstra of final nc_score (per trial) across teacher_depth, per λ "
                                "(Holm over set × λ) and stratified over λ (Holm over sets); conic descriptive"}
    unit = {COMPLEXITY_TEST: "comparison set"}
    return clean({key: {"claim": CLAIMS[key], "method": methods[key], "applies": bool(results.get(key)),
                        "summary": summary_line(results.get(key, []), unit.get(key, "group")),
                        "groups": results.get(key, [])}
                  for key in (ALPHA_TEST, LOSS_TEST, COMPLEXITY_TEST)})
