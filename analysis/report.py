"""`analyze()`: load a study, run every test, write report.md (and the same as a
self-contained report.html), conjectures.json and the figures, and log them on the study's
parent run (artifact path `analysis/`).

`run_tests(frame)` is the pure part (tidy frame -> results and tables); `write_report`
and `write_json` only format. Every number in a verdict comes from `conjectures.json`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from study.config import SYNTHETIC_NUM_CLASSES
from study.schema import KIND_STUDY, TAG_KIND

from . import claims, depth, effdepth, effects, stats, theorem, wd
from .frame import CONVERGED, by_group, final_layers, final_values, ordered, regroup, relax_convergence, trials
from .load import CACHE_DIR, Listing, Study, cache_root, open_study, read_study, unfinished_notes, usage_error
from .report_html import markdown_html
from .verdict import ALPHA, TAU_REASONS, TAUS, clean, interval, num, pval, summary

TESTS = (("conjecture_3_1_1", "Conjecture 3.1.1", "NC improves with weight decay"),
         ("conjecture_3_2_1", "Conjecture 3.2.1", "NC sharpens with depth"),
         ("conjecture_3_2_2", "Conjecture 3.2.2", "effective depth falls as weight decay grows"),
         ("theorem_2_3_1", "Theorem 2.3.1", "loss_gap >= 0 (a check of the measurement) and the theorem's rates on the raw cosines"))
SUMMARY_WORDS = {"conjecture_3_2_2": {"unit": "group × ε test"},
                 "theorem_2_3_1": {"labels": {"supported": "holds", "contradicted": "VIOLATED"}}}


def summary_line(key: str, results: list[dict]) -> str:
    return summary([r["state"] for r in results], **SUMMARY_WORDS.get(key, {}))


@dataclass
class Analysis:
    """Results per test (lists of per-group dicts) and the tables behind the figures."""
    results: dict[str, list[dict]]
    scores: pd.DataFrame          # per trial: final nc_score, intra_min, inter_max
    models: pd.DataFrame          # per trial: 3.2.1 per-model ε̂ and curve
    depths: pd.DataFrame          # per trial: effective depth per ε
    evals: pd.DataFrame           # every checked evaluation (Theorem 2.3.1)
    epsilons: tuple[float, ...]
    settings: dict = field(default_factory=dict)
    effects: list = field(default_factory=list)   # BN-kind effect cells (analysis.effects)
    claims: dict = field(default_factory=dict)    # the paper's claims and §1.4 (analysis.claims)


def run_tests(frame: pd.DataFrame, epsilons: Sequence[float] = effdepth.EPSILONS, taus: dict | None = None,
              n_perm: int = stats.N_PERM, seed: int = 0) -> Analysis:
    """Every test of docs/science.md §6 and §7 on a tidy frame (its groups first relabelled
    by `frame.regroup`); `taus` overrides the tolerances of `verdict.TAUS` (keys
    conjecture_3_1_1, conjecture_3_2_1, conjecture_3_2_2)."""
    epsilons = tuple(float(e) for e in epsilons)
    taus = TAUS | (taus or {})
    frame = regroup(frame)               # a no-op on labels that already ignore unread data params
    scores = wd.final_scores(frame, "nc_score")
    for metric in ("intra_min", "inter_max"):
        scores = scores.merge(final_values(frame, metric)[["run_id", metric]], on="run_id", how="left")
    r311 = wd.conjecture_3_1_1(frame, "nc_score", taus["conjecture_3_1_1"], n_perm, seed)
    r321, models = depth.conjecture_3_2_1(frame, "nc_score", taus["conjecture_3_2_1"], n_perm, seed)
    r322, depths = effdepth.conjecture_3_2_2(frame, epsilons, taus["conjecture_3_2_2"], n_perm, seed)
    r231, evals = theorem.theorem_2_3_1(frame)
    paper, _ = claims.paper_claims(frame, n_perm, seed)
    return Analysis({"conjecture_3_1_1": r311, "conjecture_3_2_1": r321, "conjecture_3_2_2": r322,
                     "theorem_2_3_1": r231}, scores, models, depths, evals, epsilons,
                    {"alpha": ALPHA, "ci_level": 0.95, "n_perm": n_perm, "seed": seed, "taus": taus,
                     "multiplicity": "Holm within each conjecture's family of groups"},
                    effects.bn_effects(scores), paper)


# ------------------------------------------------------------------ outputs

def write_figures(frame: pd.DataFrame, analysis: Analysis, out_dir: Path) -> list[Path]:
    from . import figures
    paths = [figures.save(figures.fig3_1(analysis.scores), out_dir / "fig3_1.png"),
             figures.save(figures.training_curves(frame), out_dir / "nc_score_curves.png"),
             figures.save(figures.conjecture_3_1_1(analysis.scores, analysis.results["conjecture_3_1_1"]),
                          out_dir / "conjecture_3_1_1.png"),
             figures.save(figures.conjecture_3_2_1(analysis.models), out_dir / "conjecture_3_2_1.png"),
             figures.save(figures.conjecture_3_2_2(analysis.depths, analysis.epsilons), out_dir / "conjecture_3_2_2.png"),
             figures.save(figures.theorem_scatter(analysis.evals), out_dir / "theorem_2_3_1.png")]
    if analysis.effects:
        paths.append(figures.save(figures.bn_effects(analysis.effects), out_dir / "bn_effects.png"))
    if analysis.claims.get(claims.ALPHA_TEST):
        alphas = trials(frame).merge(final_values(frame, "alpha")[["run_id", "alpha"]], on="run_id", how="left")
        paths.append(figures.save(figures.alpha_vs_lambda(alphas, analysis.claims[claims.ALPHA_TEST]),
                                  out_dir / "alpha_vs_lambda.png"))
    curves = {m: final_layers(frame, m) for m in ("ncc_acc", "intra_min", "inter_max")}
    for group, models in by_group(analysis.models):
        converged = models.loc[models["status"] == CONVERGED, "run_id"]
        if any(r in curves["ncc_acc"] for r in converged):   # all of the group's λ, to name the failed ones
            fig = figures.fig3_3(curves, models, group)
            paths.append(figures.save(fig, out_dir / f"fig3_3_{figures.slug(group)}.png"))
    return paths


def conjectures_json(study: Study, analysis: Analysis) -> dict:
    table = trials(study.frame)
    return clean({
        "experiments": list(study.experiment_ids), "tracking_uri": study.tracking_uri,
        "generated": _now(),
        "n_trials": int(len(table)), "n_converged": int((table["status"] == CONVERGED).sum()),
        "skipped_runs": study.skipped.to_dict("records"), "settings": analysis.settings,
        "tests": {key: {"title": title, "claim": claim,
                        "summary": summary_line(key, analysis.results[key]),
                        "groups": analysis.results[key]}
                  for key, title, claim in TESTS},
        "bn_effects": {"claim": effects.CLAIM, "ci_of": effects.ci_of(), "cells": analysis.effects},
        "claims": claims.claims_json(analysis.claims)})


def _md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ci(r: dict) -> str:
    return "—" if r["epsilon_hat"] is None else interval(r["ci_low"], r["ci_high"], r.get("no_interval_reason"))


def _decision(r: dict) -> str:
    """The verdict cell of a table: state, and the adjusted p-value that decided it."""
    state = r["state"]
    if state == "consistent":
        return f"**consistent** (p_adj {pval(r['p_consistent_adjusted'])})"
    if state == "violated":
        return f"**violated** (p_adj {pval(r['p_violated_adjusted'])})"
    return state


def _p_pair(r: dict) -> str:
    """'0.01 (adj 0.04)' for a test's p-value and its Holm adjustment."""
    return "n/a" if r.get("p_value") is None else f"{pval(r['p_value'])} (adj {pval(r.get('p_value_adjusted'))})"


def _excl(r: dict) -> str:
    parts = [f"{v} {k}" for k, v in r["excluded"].items()]
    return ", ".join(parts) if parts else "0"


def _bn_stats(frame: pd.DataFrame) -> str:
    """How the trials' BN layers were normalised when measured (the `bn_stats` param)."""
    if "bn_stats" not in frame.columns:
        return ("running averages (trials recorded before the `bn_stats` setting existed): train_acc and "
                "\"converged\" depend on them")
    kinds = sorted(set(frame.drop_duplicates("run_id")["bn_stats"].astype(str)))
    words = {"exact": "exact statistics of the training set (`bn_stats: exact`)",
             "running": "running averages (`bn_stats: running`): train_acc and \"converged\" depend on them"}
    return "; ".join(words.get(k, k) for k in kinds)


def _full_collapse(frame: pd.DataFrame) -> str:
    """nc_score at full collapse, 1 + 1/(C−1), for the study's class counts (the `num_classes`
    param; 4, the synthetic sets' C, for trials recorded before it was logged)."""
    counts = (sorted({int(c) for c in frame["num_classes"].dropna()}) if "num_classes" in frame.columns
              else []) or [SYNTHETIC_NUM_CLASSES]
    values = ", ".join(f"{1 + 1 / (c - 1):.3g} for C = {c}" for c in counts)
    return f"1 + 1/(C−1) ({values})"


def _rule(settings: dict) -> str:
    acc = settings.get("min_train_acc", 1.0)
    if acc >= 1.0:
        return "Converged: final training accuracy 100 % (the thesis' rule)."
    return (f"**Converged here means final training accuracy ≥ {acc * 100:g} %**, not the thesis' 100 % "
            f"(a sensitivity check, `--min-train-acc {acc:g}`).")


def _accuracy_table(frame: pd.DataFrame, groups: list[str]) -> list[str]:
    """Lines of the table of final training accuracy per group × λ: the lowest over seeds
    and converged/trials, which is where 'training fails for large λ' shows."""
    acc = final_values(frame, "train_acc")
    if acc.empty:
        return []
    lams = sorted(set(acc["weight_decay"]))
    rows = []
    for g in groups:
        row = [f"`{g}`"]
        for lam in lams:
            cell = acc[(acc["group"] == g) & (acc["weight_decay"] == lam)]
            if cell.empty:
                row.append("—")
                continue
            low = math.floor(1e4 * cell["train_acc"].min()) / 100  # 99.996 % is not 100.00 %
            row.append(f"{low:.2f} % ({int((cell['status'] == CONVERGED).sum())}/{len(cell)})")
        rows.append(row)
    return ["Final training accuracy, lowest over seeds (converged / trials):", "",
            _md_table(["group"] + [f"λ={l:g}" for l in lams], rows), ""]


def _bn_effects_section(cells: list[dict]) -> list[str]:
    """Lines of the BN-kind effect tables: per comparison set, rows = pairs, columns = λ."""
    if not cells:
        return []
    L = ["## BN kind: effect sizes at each λ", "",
         "Difference of seed means of the final nc_score between BN kinds (first minus second), with a "
         "Welch 95 % t-interval per cell; converged trials only. **‡**: the difference is shown after "
         "multiplicity control, its Bonferroni interval over the row's cells with an interval (level "
         "1 − 0.05/m, in conjectures.json as `ci_low_adjusted`, `ci_high_adjusted`, `family_size` m) "
         "excluding 0. Read a row's claim (\"a beats b\") from the ‡ cells, not from the unadjusted "
         "intervals.", ""]
    for label in sorted({c["set"] for c in cells}):
        mine = [c for c in cells if c["set"] == label]
        lams = sorted({c["weight_decay"] for c in mine})
        pairs = list(dict.fromkeys((c["a"], c["b"]) for c in mine))
        by = {(c["a"], c["b"], c["weight_decay"]): c for c in mine}
        rows = [[f"{a} − {b}"] + [effects.cell_text(by[a, b, l]) if (a, b, l) in by else "—" for l in lams]
                for a, b in pairs]
        L += [f"`{label}`:", "", _md_table(["pair"] + [f"λ={l:g}" for l in lams], rows), ""]
    return L + ["![BN kind effect sizes](bn_effects.png)", ""]


CLAIM_TITLES = ((claims.ALPHA_TEST, "Paper claim: alpha"), (claims.LOSS_TEST, "Paper claim: NC and the loss"),
                (claims.COMPLEXITY_TEST, "Data complexity (thesis §1.4)"))


def _ci_text(r: dict, reason: str | None = None) -> str:
    return interval(r["ci_low"], r["ci_high"], reason or r.get("no_interval_reason"))


def _claims_section(results: dict, figures: list[Path]) -> list[str]:
    """Lines of "Paper claims": alpha against λ and NC against the loss (each only when the
    study has the data); [] when neither has."""
    alpha, loss = results.get(claims.ALPHA_TEST, []), results.get(claims.LOSS_TEST, [])
    if not alpha and not loss:
        return []
    L = ["## Paper claims", "",
         "The claims of the paper's v3 (arXiv 2309.04644) checked one by one. BN and weight decay strengthen "
         "NC: the Conjecture 3.1.1 trend (ρ and JT of the final nc_score against λ, per group) and the BN-kind "
         "effect sizes above. The two below are trend tests with the trials as independent units, Holm-adjusted "
         "over the groups (docs/science.md §7): **supported** = significant in the predicted direction, "
         "**contradicted** = significant against it, else inconclusive.", ""]
    if alpha:
        L += ["**The last-layer feature norm alpha shrinks as λ grows.** ρ: Spearman of the final alpha (root "
              "mean square feature norm of the last hidden block) against log λ over trials, permutation p; "
              "slope: least squares of the per-λ seed mean of log alpha on log λ, with a 95 % t-interval from "
              f"the fit's residuals (K − 2 df). Carried over the group's λ range, that slope gives alpha's change "
              f"there; **negligible** = its interval lies within ±{100 * claims.ALPHA_NEGLIGIBLE:g} % (a tolerance "
              "fixed in advance), whatever ρ's p-value: an MLP whose last block ends in a non-affine BN has "
              "alpha = sqrt(width) by construction, and BN's eps makes it trend significantly by a "
              "hundredth of a percent, which is no shrinking.", ""]
        rows = []
        for r in alpha:
            ci = "—" if r["slope"] is None else f"{num(r['slope'])} {_ci_text(r)}"
            seeds = claims.seeds_text(r["seeds_per_lambda"]) if r["seeds_per_lambda"] else "—"
            rows.append([f"`{r['group']}`", r["state"], r["n_converged"], seeds, _excl(r), num(r["statistic"]),
                         _p_pair(r), ci, claims.change_text(r)])
        L += [_md_table(["group", "verdict", "n", "seeds per λ", "excluded", "ρ (alpha, log λ)", "p (Holm)",
                         "d log alpha / d log λ [95% CI]", "change of alpha over the λ range [95% CI]"], rows), ""]
        lams = sorted({p["weight_decay"] for r in alpha for p in r["per_lambda"]})
        rows = []
        for r in alpha:
            by = {p["weight_decay"]: p for p in r["per_lambda"]}
            rows.append([f"`{r['group']}`"]
                        + [f"{by[l]['mean']:.3g} ({by[l]['n']})" if l in by else "—" for l in lams])
        L += ["Seed-mean final alpha (number of converged seeds):", "",
              _md_table(["group"] + [f"λ={l:g}" for l in lams], rows), ""]
        if any(p.name == "alpha_vs_lambda.png" for p in figures):
            L += ["![alpha against λ](alpha_vs_lambda.png)", ""]
    if loss:
        L += ["**NC is stronger where the training loss is lower.** Per trial, ρ_i = Spearman of nc_score "
              "against train_loss over its evaluations (predicted < 0); across the trials of a group, an exact "
              "two-sided sign test of the ρ_i and the mean ρ_i with a 95 % t-interval over trials.", ""]
        rows = [[f"`{r['group']}`", r["state"], r["n_converged"], _excl(r), r["n_negative"], r["n_positive"],
                 _p_pair(r), f"{num(r['statistic'])} {_ci_text(r)}",
                 num(r["median"])] for r in loss]
        L += [_md_table(["group", "verdict", "trials", "excluded", "ρ_i < 0", "ρ_i > 0", "sign test p (Holm)",
                         "mean ρ_i [95% CI]", "median ρ_i"], rows), ""]
    return L


def _complexity_section(results: list[dict]) -> list[str]:
    """Lines of "Data complexity (thesis §1.4)", [] when the study does not vary teacher_depth."""
    if not results:
        return []
    L = ["## Data complexity (thesis §1.4)", "",
         "Data of lower distribution complexity should reach more NC. Complexity is ordered by the depth of the "
         "random teacher that labels the data (teacher_depth 3 < 6 < 9); prediction: the final nc_score falls as "
         "teacher_depth grows. Per λ: Jonckheere–Terpstra across teacher_depth on the converged trials (one "
         "value per seed), z < 0 predicted, p Holm-adjusted over every comparison set × λ; the set's verdict: "
         "the stratified JT (J summed over λ, values permuted within each λ), Holm over the sets. Conic-hull "
         "data are reported beside the trend, not placed on it (docs/science.md §7): their seed mean and the "
         "difference conic − lowest teacher depth with a Welch 95 % interval.", ""]
    for r in results:
        levels = r["levels"]
        has_conic = any(s["conic"] for s in r["strata"])
        L += [f"`{r['set']}`: **{r['state']}**: stratified JT z = {num(r['statistic'])}, "
              f"p = {pval(r['p_value'])} (adj {pval(r.get('p_value_adjusted'))}).", ""]
        rows = []
        for s in r["strata"]:
            by = {p["teacher_depth"]: p for p in s["per_level"]}
            row = [f"{s['weight_decay']:g}"] + [f"{by[l]['mean']:.3f} ({by[l]['n']})" if l in by else "—"
                                                 for l in levels]
            if has_conic:
                c = s["conic"]
                if c is None:
                    row += ["—", "—"]
                else:
                    diff = "—" if c["diff_vs_lowest"] is None else (
                        f"{num(c['diff_vs_lowest'])} {_ci_text(c, 'too few seeds or no spread')}")
                    row += [f"{c['mean']:.3f} ({c['n']})", diff]
            row += [num(s["statistic"]), _p_pair(s), s["state"]]
            rows.append(row)
        head = ["λ"] + [f"teacher_depth={l}" for l in levels]
        if has_conic:
            head += ["conic", f"conic − teacher_depth={levels[0]} [95% CI]"]
        L += ["Seed-mean final nc_score (converged seeds), per λ:", "",
              _md_table(head + ["JT z", "p (Holm)", "trend"], rows), ""]
    return L


def write_report(study: Study, analysis: Analysis, figures: list[Path], path: Path,
                 partial: Sequence[str] = ()) -> Path:
    """report.md; `partial` holds a line per study that has not ended every trial, shown first."""
    res = analysis.results
    table = trials(study.frame)
    groups = ordered(table["group"])
    L: list[str] = [f"# nc-study analysis: {', '.join(study.experiment_ids)}", ""]
    L += [f"> **Partial results:** {line}." for line in partial] + ([""] if partial else [])
    L += ["nc_score = intra_min − inter_max of the centred cosines of the last hidden block: "
          f"{_full_collapse(study.frame)} at full collapse, about 0 or below when the features have "
          "no class structure.", ""]
    L.append(f"{len(table)} trials ({int((table['status'] == CONVERGED).sum())} converged) in "
             f"{len(groups)} architecture group(s), read from `{study.tracking_uri}`. Only converged trials "
             f"enter a test; the others are counted beside it. {_rule(analysis.settings)} Significance level {ALPHA}, two-sided "
             f"permutation p-values for the trends ({analysis.settings['n_perm']} permutations, so p ≥ "
             f"{1 / (1 + analysis.settings['n_perm']):.1g}), parametric (Welch t, Bonferroni over a "
             "group's contrasts) for the verdicts against τ, "
             f"Holm-adjusted within each conjecture's family of groups (columns 'p (Holm)'; columns named "
             f"'JT p' and 'ε̂ vs λ p' are unadjusted); seed {analysis.settings['seed']}. "
             f"BN statistics: {_bn_stats(study.frame)}.")
    L += ["", "## How to read the verdicts", "",
          "Each conjecture says a quantity never falls by more than a small ε. ε̂ is that smallest ε on "
          "the seed means; its 95 % interval is simultaneous over every λ pair (or block step) the "
          "conjecture quantifies over, each contrast scaled by its own λ's seed SDs (Welch t, Bonferroni over "
          "the contrasts: no λ borrows another's spread), and holds its level for 2–10 seeds per λ, equal "
          "SDs or not, within 0.91–0.95 where a 2-seed λ is the noisy one (tests/test_analysis_bounds.py). "
          "A λ with a single converged seed has no spread of its own and is left out, by name. The **noise floor** is the 95th percentile of ε̂ when "
          "nothing changes at all, given the seed SD: an ε̂ below it is what noise alone gives. The verdict "
          "compares the interval with a tolerance τ fixed before the data: **consistent** (the whole "
          "interval lies below τ), **violated** (above τ), else **inconclusive**; each decision is a test "
          "whose p-value is Holm-adjusted within the conjecture's family. The trend (rank correlation) is "
          "a separate finding. Tolerances:", ""]
    for key, title, _ in TESTS[:3]:
        tau = analysis.settings["taus"][key]
        L.append(f"- {title}: {TAU_REASONS[key]}." if tau == TAUS[key] else
                 f"- {title}: τ = {tau:g}, set with --tau (default {TAUS[key]:g}: {TAU_REASONS[key]}).")
    L += ["", "## Verdicts", ""]
    for key, title, claim in TESTS:
        L.append(f"**{title}** ({claim}): {summary_line(key, res[key])}.")
        L.append("")
        for r in res[key]:
            at = f", ε = {r['epsilon']:g}" if "epsilon" in r and key == "conjecture_3_2_2" else ""
            L.append(f"- `{r['group']}`{at}: {r['verdict']}")
        L.append("")
    for key, title in CLAIM_TITLES:
        if analysis.claims.get(key):
            unit = {"unit": "comparison set"} if key == claims.COMPLEXITY_TEST else {}
            L += [f"**{title}** ({claims.CLAIMS[key]}): {summary([r['state'] for r in analysis.claims[key]], **unit)}.",
                  ""]
            L += [f"- `{r['group']}`: {r['verdict']}" for r in analysis.claims[key]]
            L.append("")
    bad = theorem.violations(analysis.evals)
    if len(bad):
        L += [f"> **WARNING: loss_gap < 0 at {len(bad)} evaluation(s).** The loss floor of Theorem 2.3.1 "
              f"holds for any bias-free model, so a measurement is wrong. See the Theorem 2.3.1 section.", ""]

    L += ["## Data", ""]
    statuses = sorted(set(table["status"]))
    rows = [[f"`{g}`"] + [int(((table["group"] == g) & (table["status"] == s)).sum()) for s in statuses]
            for g in groups]
    L += [_md_table(["group"] + statuses, rows), ""]
    L += _accuracy_table(study.frame, groups)
    if len(study.skipped):
        L += [f"{len(study.skipped)} run(s) skipped (not usable as trials):", ""]
        L += [f"- {r.trial} (`{r.run_id}`, {r.experiment}): {r.reason}" for r in study.skipped.itertuples()]
        L.append("")

    L += ["## Conjecture 3.1.1: NC improves with weight decay", "",
          "S(λ) = final nc_score; for λ1 < λ2, S(λ2) − S(λ1) ≥ −ε log(λ2/λ1). ε̂ on per-λ seed means, in "
          "nc_score per unit of log λ. Tested on groups with BN before the classifier (role test); groups "
          "without BN are controls (numbers, no verdict). Trend: Spearman ρ of S against log λ over trials "
          "(p and its Holm adjustment), and Jonckheere–Terpstra (z > 0: rises with λ).", ""]
    rows = []
    for r in res["conjecture_3_1_1"]:
        pair = "; ".join(f"{p['lambda_1']:g} → {p['lambda_2']:g}" for p in r["set_by"]) or "—"
        lr = r["lambda_range"]
        covered = f"{lr['low']:g}–{lr['high']:g} ({lr['n_values']})" if lr["values"] else "—"
        rows.append([f"`{r['group']}`", r["role"], _decision(r), r["n_converged"], _excl(r), covered,
                     num(r["epsilon_hat"]), _ci(r), num(r.get("noise_floor")), pair, num(r["statistic"]),
                     _p_pair(r), num(r["jonckheere_z"]), pval(r["jonckheere_p"])])
    L += [_md_table(["group", "role", "verdict", "n", "excluded", "λ covered (values)", "ε̂", "95% CI",
                     "noise floor", "set by λ pair", "ρ", "p (Holm)", "JT z", "JT p"], rows), ""]
    missing = [f"`{r['group']}`: {', '.join(f'{v:g}' for v in r['lambda_range']['no_converged'])}"
               for r in res["conjecture_3_1_1"] if r["lambda_range"]["no_converged"]]
    if missing:
        L += ["λ values with no converged trial (outside every verdict): " + "; ".join(missing) + ".", ""]
    lams = sorted({p["weight_decay"] for r in res["conjecture_3_1_1"] for p in r["per_lambda"]})
    if lams:
        rows = []
        for r in res["conjecture_3_1_1"]:
            by = {p["weight_decay"]: p for p in r["per_lambda"]}
            rows.append([f"`{r['group']}`"] + [f"{by[l]['mean']:.3f} ({by[l]['n']})" if l in by else "—" for l in lams])
        L += ["Seed-mean final nc_score (number of converged seeds):", "",
              _md_table(["group"] + [f"λ={l:g}" for l in lams], rows), ""]
    L += ["![Conjecture 3.1.1](conjecture_3_1_1.png)", "", "![Fig 3.1](fig3_1.png)", ""]

    L += ["## Conjecture 3.2.1: NC sharpens with depth", "",
          "S_l = final nc_score of hidden block l; for consecutive blocks S_{l+1} − S_l ≥ −ε. ε̂ = the largest "
          "seed-mean drop over every λ and block step (interval: Bonferroni t over all of them). Per model, "
          "ε̂ = max(0, max_l S_l − S_{l+1}): its maximum over models and median. Layer ρ: mean per-model "
          "Spearman ρ of S_l against l, p from shuffling the block order within models (and its Holm "
          "adjustment). ε̂ vs λ: Spearman ρ of per-model ε̂ against λ.", ""]
    rows = []
    for r in res["conjecture_3_2_1"]:
        d = r["distribution"] or {}
        s = r["set_by"][0] if r["set_by"] else None
        where = f"{s['trial']} block {s['block_from']} → {s['block_to']}" if s else "—"
        share = f"{100 * r['share_nondecreasing']:.0f}%" if r["share_nondecreasing"] is not None else "n/a"
        rows.append([f"`{r['group']}`", _decision(r), r["n_converged"], _excl(r), num(r["epsilon_hat"]), _ci(r),
                     num(r.get("noise_floor")), num(r.get("max_model_epsilon_hat")), where, num(d.get("median")),
                     share, num(r["statistic"]), _p_pair(r), num(r["lambda_rho"]), pval(r["lambda_p"])])
    L += [_md_table(["group", "verdict", "models", "excluded", "ε̂", "95% CI", "noise floor", "max per-model ε̂",
                     "set by", "median per-model ε̂", "non-decreasing steps", "layer ρ", "p (Holm)", "ε̂ vs λ ρ",
                     "ε̂ vs λ p"], rows), ""]
    lams = sorted({p["weight_decay"] for r in res["conjecture_3_2_1"] for p in r["per_lambda"]})
    if lams:
        rows = []
        for r in res["conjecture_3_2_1"]:
            by = {p["weight_decay"]: p for p in r["per_lambda"]}
            rows.append([f"`{r['group']}`"] + [f"{num(by[l]['median_epsilon_hat'])} / {num(by[l]['max_epsilon_hat'])}"
                                               if l in by else "—" for l in lams])
        L += ["Per-model ε̂ against λ (median / max over seeds):", "",
              _md_table(["group"] + [f"λ={l:g}" for l in lams], rows), ""]
    L += ["![Conjecture 3.2.1](conjecture_3_2_1.png)", ""]

    L += ["## Conjecture 3.2.2: depth minimisation improves with weight decay", "",
          "d_ε = smallest hidden block with 1 − ncc_acc ≤ ε at the final evaluation (else L = the number "
          "of measured blocks + 1: the depth of an MLP, depth + 1 for a cnn or resnet), "
          "recomputed from the per-layer ncc_acc. Prediction: ρ(d_ε, λ) < 0 and no λ1 < λ2 with "
          "d̄(λ1) < d̄(λ2). Worst rise: the largest such increase of the seed-mean depth, in blocks (ε̂), with "
          "its max-t interval; p-values Holm-adjusted over every group × ε test.", ""]
    rows = []
    for r in res["conjecture_3_2_2"]:
        pairs = ", ".join(f"{p['lambda_1']:g}→{p['lambda_2']:g} ({p['depth_1']:.1f}→{p['depth_2']:.1f})"
                          for p in r["violating_pairs"][:4]) or "none"
        if len(r["violating_pairs"]) > 4:
            pairs += f", … ({len(r['violating_pairs'])} in all)"
        trial_pairs = (f"{r['n_violating_trial_pairs']}/{r['n_trial_pairs']}"
                       if r["n_trial_pairs"] is not None else "n/a")
        rows.append([f"`{r['group']}`", f"{r['epsilon']:g}", _decision(r), r["n_converged"], _excl(r),
                     num(r["statistic"]), _p_pair(r), pairs, f"{num(r['epsilon_hat'])} {_ci(r)}",
                     num(r.get("noise_floor")), trial_pairs,
                     "—" if r["logged_disagree"] is None else r["logged_disagree"]])
    L += [_md_table(["group", "ε", "verdict", "n", "excluded", "ρ", "p (Holm)", "violating λ pairs (mean depth)",
                     "worst rise [95% CI]", "noise floor", "violating trial pairs", "logged effective_depth disagrees"],
                    rows), ""]
    L += ["![Conjecture 3.2.2](conjecture_3_2_2.png)", ""]

    L += ["## Theorem 2.3.1: the loss floor and the theorem's rates", "",
          "loss_gap ≥ 0 at every evaluation of every bias-free trial, converged or not, is a check of the "
          "measurement, not of the theorem: the floor holds for any features and weights with these norms "
          f"(violation: loss_gap < −{theorem.TOLERANCE:g}). The theorem's rates are tested on the raw "
          "(uncentred) cosines it bounds: per group, the least-squares slope of log(1 − raw_intra_min) on "
          "log(√loss_gap/(αβ)) and of log(raw_inter_max + 1/(C−1)) on log(loss_gap^(1/6)), predicted 1, "
          "with a 95 % CI clustered over trials; evaluations with loss_gap ≤ 0 or y ≤ 0 are off the log axes. "
          "The theorem gives upper bounds, y ≤ K·x with K up to e^{O(αβ)}: a fitted slope away from 1 says "
          "how tight the bound is along training, not that it fails; it would fail if y/x grew without limit "
          "as the gap shrinks (in the figure: points climbing ever higher above the dashed line at the left).", ""]
    rows = [[f"`{r['group']}`", r["n_trials_checked"], r["n_evaluations"], num(r["statistic"], 3), r["n_violations"],
             theorem.slope_text(r, "intra"), theorem.slope_text(r, "inter"),
             "; ".join(f"{n} {why}" for why, n in r.get("n_off_axes", {}).items()) or "0"]
            for r in res["theorem_2_3_1"]]
    L += [_md_table(["group", "trials", "evaluations", "min loss_gap", "violations",
                     "intra slope [95% CI] (predicted: 1)", "inter slope [95% CI] (predicted: 1)",
                     "points off the log axes"], rows), ""]
    if len(bad):
        L += ["**Violations (loss_gap < 0):**", ""]
        L += [f"- {r.trial} (`{r.run_id}`) epoch {int(r.epoch)}: loss_gap = {r.loss_gap:.4g}"
              for r in bad.head(50).itertuples()]
        if len(bad) > 50:
            L.append(f"- … {len(bad) - 50} more in conjectures.json")
        L.append("")
    L += ["![Theorem 2.3.1](theorem_2_3_1.png)", ""]

    L += _bn_effects_section(analysis.effects)
    L += _claims_section(analysis.claims, figures)
    L += _complexity_section(analysis.claims.get(claims.COMPLEXITY_TEST, []))
    L += ["## Figures", "", "![nc_score during training](nc_score_curves.png)", ""]
    L += [f"![{p.stem}]({p.name})" for p in figures if p.name.startswith("fig3_3_")]
    L.append("")
    path.write_text("\n".join(L))
    return path


# ------------------------------------------------------------------ the whole path

def check_min_train_acc(value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
        raise usage_error(f"--min-train-acc {value!r} must lie in (0, 1]; 1 is the thesis' rule (100 % "
                          f"training accuracy), e.g. --min-train-acc 0.999 for a sensitivity check")
    return float(value)


def check_taus(taus: dict | None) -> dict:
    """The tolerances in force: the defaults of `verdict.TAUS` with `taus` over them."""
    out = dict(TAUS)
    for key, value in (taus or {}).items():
        if key not in TAUS:
            raise usage_error(f"--tau: unknown conjecture {key!r}; use 3.1.1, 3.2.1 or 3.2.2, e.g. --tau 3.2.2=0.5")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise usage_error(f"--tau {key.removeprefix('conjecture_').replace('_', '.')}={value!r} must be a "
                              f"positive number, e.g. --tau {TAUS[key]:g}")
        out[key] = float(value)
    return out


def check_epsilons(epsilons: Sequence[float]) -> tuple[float, ...]:
    out = []
    for eps in epsilons:
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 <= eps < 1):
            raise usage_error(f"effective-depth epsilon {eps!r} must lie in [0, 1); e.g. --epsilons 0.001,0.01,0.05")
        out.append(float(eps))
    if not out:
        raise usage_error("give at least one effective-depth epsilon, e.g. --epsilons 0.01")
    return tuple(out)


LAYER_METRICS = ("ncc_acc", "nc_score", "intra_min", "inter_max")   # the per-layer measures the tests read


def log_artifacts(parents: dict, tracking_uri: str, files: list[Path], say: Callable[[str], None],
                  warn: Callable[[str], None]) -> int:
    """Log `files` (this analysis' outputs, nothing else in their folder) under `analysis/`
    on each experiment's parent run; returns on how many runs. A local artifact location is
    written through MLflow's artifact repository directly, which is what
    `MlflowClient.log_artifact` does after looking the run up (and spares opening the
    tracking store); any other location goes through the client."""
    from urllib.parse import urlparse
    logged = 0
    for name, parent in parents.items():
        if parent is None:
            warn(f"experiment {name!r} has no parent run (tag {TAG_KIND}={KIND_STUDY}): outputs not logged to MLflow")
            continue
        try:
            if parent.artifact_uri and urlparse(parent.artifact_uri).scheme in ("", "file"):
                from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
                repo = get_artifact_repository(parent.artifact_uri)
                for path in files:
                    repo.log_artifact(str(path), "analysis")
            else:
                from mlflow import MlflowClient
                client = MlflowClient(tracking_uri=tracking_uri)
                for path in files:
                    client.log_artifact(parent.run_id, str(path), "analysis")
        except Exception as exc:  # the report is written; say why MLflow did not take it
            warn(f"could not log the analysis on parent run {parent.run_id} of {name!r}: {exc}")
            continue
        say(f"logged {len(files)} files as artifacts analysis/ on parent run {parent.run_id} ({name})")
        logged += 1
    return logged


def _fingerprint(listing: Listing, tracking_uri: str, settings: dict) -> str:
    """Identity of an analysis' inputs: the runs (as the per-run cache keys them), the
    settings and this package's source, so any change re-computes."""
    h = hashlib.sha1()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(source.read_bytes())
    h.update(json.dumps([tracking_uri, settings], sort_keys=True, default=str).encode())
    for r in listing.trials:
        h.update(json.dumps([r.run_id, r.name, r.experiment, r.cache_key(listing.source.name),
                             sorted(r.params.items())], default=str).encode())
    return h.hexdigest()


def _read_outputs(path: Path) -> dict[str, bytes] | None:
    try:
        with open(path, "rb") as fh:
            files = pickle.load(fh)
        return files if "conjectures.json" in files and "report.md" in files else None
    except Exception:  # absent or unreadable: compute
        return None


def analyze(experiments: list[str], tracking_uri: str, out_dir: Path,
            epsilons: Sequence[float] = effdepth.EPSILONS, cache_dir: Path | None = CACHE_DIR,
            backend: str = "auto", taus: dict | None = None, n_perm: int = stats.N_PERM, seed: int = 0,
            log_to_mlflow: bool = True, progress: Callable[[str], None] | None = None,
            warn: Callable[[str], None] | None = None, min_train_acc: float = 1.0) -> Path:
    """Analyze `experiments` in the store at `tracking_uri`; write report.md (and the same as
    report.html), conjectures.json and PNGs into `out_dir` and log them on the parent run(s). Returns the report path.
    Bad input raises study.errors.UsageError before anything is written.

    With a `cache_dir`, run histories are cached per run, and the outputs per set of inputs:
    a re-run over unchanged runs with the same settings rewrites the stored outputs (with a
    fresh `generated` time) instead of recomputing them."""
    say = progress or (lambda message: None)
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    epsilons = check_epsilons(epsilons)
    min_train_acc = check_min_train_acc(min_train_acc)
    if out_dir.exists() and not out_dir.is_dir():
        raise usage_error(f"--out {out_dir} is a file; name a directory for the report")
    listing = open_study(list(experiments), tracking_uri, backend)
    settings = {"epsilons": epsilons, "taus": check_taus(taus), "n_perm": n_perm, "seed": seed, "backend": backend,
                "min_train_acc": min_train_acc}
    stored = files = None
    if cache_dir is not None:
        stored = cache_root(cache_dir, listing.source) / "outputs" / f"{_fingerprint(listing, tracking_uri, settings)}.pkl"
        files = _read_outputs(stored)
    if files is not None:
        listing.source.close()
        say(f"{len(listing.trials)} trial runs unchanged since the last analysis: outputs from the cache")
        written = _replay(files, out_dir, warn)
    else:
        written = _compute(listing, tracking_uri, out_dir, settings, cache_dir, say, warn)
        if stored is not None:
            _store_outputs(stored, written)
    if log_to_mlflow:
        log_artifacts(listing.parents, tracking_uri, written, say, warn)
    return out_dir / "report.md"


def _compute(listing: Listing, tracking_uri: str, out_dir: Path, settings: dict, cache_dir: Path | None,
             say: Callable[[str], None], warn: Callable[[str], None]) -> list[Path]:
    """Read the runs, run the tests, write every output; returns the files written."""
    study = read_study(listing, tracking_uri, cache_dir, LAYER_METRICS, progress=say)
    study.frame = regroup(relax_convergence(study.frame, settings["min_train_acc"]))
    say("running the tests")
    analysis = run_tests(study.frame, settings["epsilons"], settings["taus"], settings["n_perm"], settings["seed"])
    analysis.settings = dict(analysis.settings, min_train_acc=settings["min_train_acc"])
    partial = unfinished_notes(listing)
    warnings = list(partial)
    bad = theorem.violations(analysis.evals)
    if len(bad):
        worst = bad.iloc[0]
        warnings.append(f"LOSS FLOOR VIOLATED: loss_gap < 0 at {len(bad)} evaluation(s), worst "
                        f"{worst['loss_gap']:.4g} ({worst['trial']}, epoch {int(worst['epoch'])}); "
                        f"a measurement is wrong (docs/science.md §4)")
    for line in warnings:
        warn(line)
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"drawing figures into {out_dir}")
    figures = write_figures(study.frame, analysis, out_dir)
    result = conjectures_json(study, analysis) | {"warnings": warnings}
    (out_dir / "conjectures.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    report = write_report(study, analysis, figures, out_dir / "report.md", partial)
    page = out_dir / "report.html"     # the same report, readable in MLflow's artifact viewer
    page.write_text(markdown_html(report.read_text(), out_dir), encoding="utf-8")
    return [report, page, out_dir / "conjectures.json"] + figures


def _replay(files: dict[str, bytes], out_dir: Path, warn: Callable[[str], None]) -> list[Path]:
    """Write stored outputs again, with a fresh `generated` time; repeat their warnings."""
    result = json.loads(files["conjectures.json"])
    result["generated"] = _now()
    files["conjectures.json"] = (json.dumps(result, indent=1, ensure_ascii=False) + "\n").encode()
    for line in result.get("warnings", []):
        warn(line)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    return [out_dir / name for name in files]


def _store_outputs(stored: Path, written: list[Path], keep: int = 8) -> None:
    stored.parent.mkdir(parents=True, exist_ok=True)
    tmp = stored.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump({p.name: p.read_bytes() for p in written}, fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, stored)
    for old in sorted(stored.parent.glob("*.pkl"), key=lambda f: f.stat().st_mtime)[:-keep]:
        old.unlink(missing_ok=True)      # keep the newest output sets only


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
