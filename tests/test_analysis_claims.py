"""The paper's claims and the data-complexity test (analysis.claims, docs/science.md §7) on
planted frames whose answers are known; group labels that ignore the params a data set does
not read (frame.regroup); the effective depth of conv models (effdepth)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import claims, effdepth, stats
from analysis.frame import ignored_params, regroup

GRID = (1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 5e-3, 7e-3, 1e-2)


def tidy(trials: list[dict]) -> pd.DataFrame:
    """A frame shaped like analysis.load's from trials given as dicts: weight_decay, seed,
    optional status, group, params (dataset, teacher_depth, model, depth, …) and `evals`, a
    list of {metric: value} per evaluation at layer 0 (the last one is the final), and
    `layers`, {metric: per-block values} at the last evaluation."""
    rows = []
    for i, t in enumerate(trials):
        base = {"run_id": f"run{i:03d}", "experiment": "planted", "trial": f"planted_{i}",
                "status": t.get("status", "converged"), "group": t.get("group", "all"),
                "weight_decay": float(t["weight_decay"]), "seed": int(t.get("seed", 0)),
                "depth": int(t.get("depth", 6)), "bn": t.get("bn", "affine")}
        base |= t.get("params", {})
        for k, values in enumerate(t["evals"]):
            rows.append(base | {"epoch": 10 * (k + 1), "layer": 0} | values)
        for metric, curve in t.get("layers", {}).items():
            for l, value in enumerate(curve, start=1):
                rows.append(base | {"epoch": 10 * len(t["evals"]), "layer": l, metric: value})
    frame = pd.DataFrame(rows)
    return frame.groupby(["run_id", "epoch", "layer"], as_index=False, sort=False).first()


# ------------------------------------------------------------------ (i) alpha against λ

def alpha_trials(slope: float, rng, seeds: int = 3, noise: float = 0.05, lambdas=GRID, group: str = "all"):
    """log alpha = 1 + slope · log(λ / 1e-4) + noise, per trial."""
    return [{"weight_decay": lam, "seed": s, "group": group,
             "evals": [{"alpha": math.exp(1 + slope * math.log(lam / 1e-4) + noise * rng.standard_normal())}]}
            for lam in lambdas for s in range(seeds)]


def test_alpha_planted_decrease_is_supported_with_its_slope():
    rng = np.random.default_rng(0)
    trials = alpha_trials(-0.15, rng) + [{"weight_decay": 1e-2, "seed": 9, "status": "not_converged",
                                          "evals": [{"alpha": 100.0}]}]
    [r] = claims.alpha_vs_lambda(tidy(trials), n_perm=999)
    assert r["state"] == "supported" and r["statistic"] < -0.8 and r["p_value_adjusted"] < 0.01
    assert r["ci_low"] <= -0.15 <= r["ci_high"] and r["ci_high"] < 0 and r["df"] == 6
    assert abs(r["slope"] + 0.15) < 0.03
    assert r["n_converged"] == 24 and r["excluded"] == {"not_converged": 1} and r["seeds_per_lambda"] == [3] * 8
    assert r["verdict"].startswith("supported: ρ = -0.") and "3 seeds per λ" in r["verdict"]
    rising = claims.alpha_vs_lambda(tidy(alpha_trials(+0.15, rng)), n_perm=999)[0]
    assert rising["state"] == "contradicted"


def test_alpha_flat_is_rarely_supported_and_its_interval_covers_zero():
    """Calibration: 40 studies where alpha does not depend on λ (8 λ × 3 seeds): at α = 0.05
    'supported' (significant and decreasing) in at most 10 %, the slope interval covering 0
    in at least 85 % (nominal 95 %)."""
    rng = np.random.default_rng(1)
    supported = covered = 0
    for _ in range(40):
        [r] = claims.alpha_vs_lambda(tidy(alpha_trials(0.0, rng, noise=0.2)), n_perm=199)
        supported += r["state"] == "supported"
        covered += r["ci_low"] <= 0 <= r["ci_high"]
    assert supported <= 4 and covered >= 34


def test_alpha_pinned_by_construction_is_negligible_not_supported():
    """A norm that barely moves (0.1 % over the 100-fold grid, tiny noise) trends significantly
    yet is 'negligible'; a real 50 % fall with the same noise stays 'supported'."""
    rng = np.random.default_rng(2)
    [pinned] = claims.alpha_vs_lambda(tidy(alpha_trials(-2e-4, rng, noise=1e-5)), n_perm=999)
    assert pinned["p_value_adjusted"] < 0.01 and pinned["statistic"] < -0.8
    assert pinned["state"] == "negligible" and "no shrinking in practice" in pinned["verdict"]
    span = math.log(1e-2 / 1e-4)
    assert math.isclose(pinned["range_change"], math.expm1(pinned["slope"] * span))
    assert -0.05 < pinned["range_change_low"] <= pinned["range_change"] <= pinned["range_change_high"] < 0.05
    [falling] = claims.alpha_vs_lambda(tidy(alpha_trials(-0.15, rng, noise=1e-5)), n_perm=999)
    assert falling["state"] == "supported" and falling["range_change_high"] < -0.05
    assert abs(falling["range_change"] - math.expm1(-0.15 * span)) < 1e-3


def test_groups_come_in_the_natural_order_of_their_numbers():
    """depth=3 before depth=12 (not as strings), in the results and every figure and table."""
    from analysis.frame import ordered
    assert ordered(["depth=12", "depth=3", "bn=none, depth=6", "bn=affine, depth=15", "bn=affine, depth=6",
                    "lr=1e-3", "lr=5e-4", "depth=3"]) == ["bn=affine, depth=6", "bn=affine, depth=15",
                                                         "bn=none, depth=6", "depth=3", "depth=12", "lr=5e-4",
                                                         "lr=1e-3"]
    rng = np.random.default_rng(5)
    trials = [t for g in ("depth=15", "depth=3", "depth=12", "depth=6") for t in alpha_trials(-0.2, rng, group=g)]
    res = claims.alpha_vs_lambda(tidy(trials), n_perm=99)
    assert [r["group"] for r in res] == ["depth=3", "depth=6", "depth=12", "depth=15"]


def test_alpha_holm_across_groups_and_absent_without_two_lambdas():
    rng = np.random.default_rng(2)
    trials = alpha_trials(-0.2, rng, group="bn=affine") + alpha_trials(0.0, rng, group="bn=none", noise=0.2)
    res = claims.alpha_vs_lambda(tidy(trials), n_perm=999)
    assert [r["group"] for r in res] == ["bn=affine", "bn=none"]
    assert [r["p_value_adjusted"] for r in res] == pytest.approx(stats.holm([r["p_value"] for r in res]))
    assert res[0]["state"] == "supported"
    one_lambda = [{"weight_decay": 1e-3, "seed": s, "evals": [{"alpha": 2.0 + s}]} for s in range(3)]
    assert claims.alpha_vs_lambda(tidy(one_lambda)) == []
    few = [{"weight_decay": lam, "seed": 0, "evals": [{"alpha": 2.0}]} for lam in (1e-4, 1e-3)]
    [r] = claims.alpha_vs_lambda(tidy(few))
    assert r["state"] == "insufficient" and "no verdict" in r["verdict"]


def test_ols_slope_matches_numpy_and_two_points_have_no_interval():
    x, y = np.array([0.0, 1.0, 2.0, 4.0]), np.array([1.0, 0.7, 0.65, 0.1])
    fit = claims.ols_slope(x, y)
    assert fit["slope"] == pytest.approx(np.polyfit(x, y, 1)[0]) and fit["df"] == 2
    resid = y - np.polyval(np.polyfit(x, y, 1), x)
    se = math.sqrt(resid @ resid / 2 / ((x - x.mean()) ** 2).sum())
    assert fit["ci_high"] - fit["slope"] == pytest.approx(4.302653 * se, rel=1e-5)   # t_{0.975, 2}
    two = claims.ols_slope([0.0, 1.0], [1.0, 2.0])
    assert two["slope"] == pytest.approx(1.0) and two["ci_low"] is None and "no residual" in two["no_interval_reason"]


# ------------------------------------------------------------------ (ii) NC against the loss

def loss_trials(n: int, rng, coupling: float, evals: int = 8) -> list[dict]:
    """The loss falls over training; nc_score = coupling · (1 − loss) + noise."""
    out = []
    for i in range(n):
        loss = np.linspace(2.0, 0.1, evals) + 0.05 * rng.standard_normal(evals)
        nc = coupling * (1 - loss) + 0.3 * rng.standard_normal(evals)
        out.append({"weight_decay": GRID[i % 8], "seed": i // 8,
                    "evals": [{"train_loss": a, "nc_score": b} for a, b in zip(loss, nc)]})
    return out


def test_nc_rising_as_the_loss_falls_is_supported():
    rng = np.random.default_rng(3)
    trials = loss_trials(24, rng, coupling=1.0)
    trials.append({"weight_decay": 1e-3, "seed": 7, "evals": [{"train_loss": 1.0, "nc_score": 0.1},
                                                              {"train_loss": 0.5, "nc_score": 0.2}]})
    [r], table = claims.nc_vs_loss(tidy(trials))
    assert r["state"] == "supported" and r["n_negative"] >= 22 and r["n_converged"] == 24
    assert r["p_value"] == pytest.approx(claims.sign_test([-1] * r["n_negative"] + [1] * r["n_positive"])[2])
    assert r["ci_high"] < 0 and r["statistic"] < -0.5
    assert list(r["excluded"]) == ["no ρ (< 3 evaluations or a constant series)"]
    assert len(table) == 25 and table["rho"].isna().sum() == 1
    assert r["verdict"].startswith(f"supported: ρ(nc_score, train_loss) < 0 in {r['n_negative']} of 24 trials")


def test_nc_unrelated_to_the_loss_is_rarely_supported():
    rng = np.random.default_rng(4)
    states = [claims.nc_vs_loss(tidy(loss_trials(12, rng, coupling=0.0)))[0][0]["state"] for _ in range(40)]
    assert states.count("supported") <= 4


def test_sign_test_is_exact():
    assert claims.sign_test([-1] * 6) == (6, 0, pytest.approx(2 / 64))
    neg, pos, p = claims.sign_test([-0.5, -0.2, 0.3, 0.0, math.nan])
    assert (neg, pos) == (2, 1) and p == pytest.approx(1.0)


# ------------------------------------------------------------------ (iii) data complexity

def complexity_trials(effect: float, rng, seeds: int = 5, lambdas=(1e-4, 1e-3, 5e-3), conic: float | None = 1.1,
                      noise: float = 0.05) -> list[dict]:
    """nc_score = 1 − effect · (teacher_depth − 3) / 3 + 0.05 log10(λ / 1e-4) + noise; conic trials
    at `conic`, logged with the default teacher_depth 3; labels as the loader writes them."""
    out = []
    for lam in lambdas:
        for td in (3, 6, 9):
            for s in range(seeds):
                S = 1 - effect * (td - 3) / 3 + 0.05 * math.log10(lam / 1e-4) + noise * rng.standard_normal()
                out.append({"weight_decay": lam, "seed": s, "group": f"dataset=teacher, teacher_depth={td}",
                            "params": {"dataset": "teacher", "teacher_depth": td}, "evals": [{"nc_score": S}]})
        if conic is not None:
            for s in range(seeds):
                out.append({"weight_decay": lam, "seed": s, "group": "dataset=conic, teacher_depth=3",
                            "params": {"dataset": "conic", "teacher_depth": 3},
                            "evals": [{"nc_score": conic + noise * rng.standard_normal()}]})
    return out


def test_planted_complexity_trend_is_detected_and_conic_described():
    rng = np.random.default_rng(5)
    [r] = claims.data_complexity(tidy(complexity_trials(0.15, rng)), n_perm=999)
    assert r["set"] == "all" and r["levels"] == [3, 6, 9] and r["n_converged"] == 45
    assert r["state"] == "supported" and r["statistic"] < 0 and r["p_value_adjusted"] < 0.01
    assert [s["state"] for s in r["strata"]] == ["supported"] * 3
    adjusted = [s["p_value_adjusted"] for s in r["strata"]]
    assert stats.holm([s["p_value"] for s in r["strata"]]) == pytest.approx(adjusted)
    first = r["strata"][0]
    assert [p["teacher_depth"] for p in first["per_level"]] == [3, 6, 9] and first["per_level"][0]["n"] == 5
    c = first["conic"]
    assert c["n"] == 5 and c["vs_teacher_depth"] == 3 and c["ci_low"] < c["diff_vs_lowest"] < c["ci_high"]
    assert c["ci_low"] <= 0.1 <= c["ci_high"]                         # planted: 1.1 − 1.0
    assert r["verdict"].startswith("supported: stratified JT z = -")
    reverse = claims.data_complexity(tidy(complexity_trials(-0.15, rng)), n_perm=999)[0]
    assert reverse["state"] == "contradicted"


def test_null_complexity_is_rarely_supported():
    rng = np.random.default_rng(6)
    states = [claims.data_complexity(tidy(complexity_trials(0.0, rng, seeds=3, conic=None)), n_perm=199)[0]["state"]
              for _ in range(30)]
    assert states.count("supported") <= 3


def test_complexity_needs_varying_teacher_depth_and_splits_other_params():
    rng = np.random.default_rng(7)
    flat = [t for t in complexity_trials(0.15, rng) if t["params"]["teacher_depth"] == 3]
    assert claims.data_complexity(tidy(flat)) == []
    trials = complexity_trials(0.15, rng, seeds=3)
    for t in complexity_trials(0.0, rng, seeds=3):
        t["group"] = "bn=none, " + t["group"]
        t["bn"] = "none"
        trials.append(t)
    for t in trials[: len(trials) // 2]:
        t["group"] = "bn=affine, " + t["group"]
    res = claims.data_complexity(tidy(trials), n_perm=499)
    assert [r["set"] for r in res] == ["bn=affine", "bn=none"]
    assert res[0]["state"] == "supported"
    assert [r["p_value_adjusted"] for r in res] == pytest.approx(stats.holm([r["p_value"] for r in res]))


def test_stratified_jonckheere_agrees_with_one_stratum():
    rng = np.random.default_rng(8)
    v, l = rng.standard_normal(12) - 0.3 * np.repeat([0, 1, 2], 4), np.repeat([3.0, 6.0, 9.0], 4)
    J, z, p = claims.stratified_jonckheere([(v, l)], n_perm=4999, seed=0)
    jt, z1 = stats.jonckheere_test(v, l, n_perm=4999, seed=0)
    assert J == jt.statistic and z == pytest.approx(z1, abs=0.05) and p == pytest.approx(jt.p_value, abs=0.02)


# ------------------------------------------------------------------ groups ignore params the data set ignores

def test_ignored_params_follow_study_data():
    assert {"teacher_depth", "teacher_width", "data_path", "data_root"} <= ignored_params({"dataset": "conic"})
    assert "teacher_depth" not in ignored_params({"dataset": "teacher"})
    assert "conic_kind" in ignored_params({"dataset": "teacher"})
    assert {"n_samples", "input_dim", "data_seed"} <= ignored_params({"dataset": "npz", "subset": 0})
    assert "data_seed" not in ignored_params({"dataset": "npz", "subset": 500})
    assert "n_samples" not in ignored_params({"dataset": "mnist1d"})
    assert ignored_params({"dataset": "something_new"}) == set()


def _loaded(specs: list[dict]):
    """The frame analysis.load builds for planted trials (analysis.synthetic) of `specs`."""
    from analysis.load import RunRecord, tidy_frame, wide_history
    from analysis.synthetic import planted_trials
    from study.schema import metric_key
    records, histories = [], []
    for spec in specs:
        for t in planted_trials(bns=("affine",), lambdas=(1e-4, 1e-3), seeds=range(2), depth=3, epochs=10,
                                eval_every=5, seed=len(records), **spec):
            i = len(records)
            keys = [metric_key(k) for k, v in t.metrics.items() for _ in v]
            steps = [s for v in t.metrics.values() for s in t.steps]
            values = [x for v in t.metrics.values() for x in v]
            records.append(RunRecord(f"r{i}", "planted", f"planted_{i}", 1, {"status": "converged"},
                                     t.cfg.to_params(), 1, 1))
            histories.append(wide_history(keys, steps, values))
    return tidy_frame(records, histories)


def test_conic_trials_with_different_teacher_depths_form_one_group():
    from analysis.report import run_tests
    frame = _loaded([{"dataset": "teacher", "teacher_depth": 3}, {"dataset": "teacher", "teacher_depth": 9},
                     {"dataset": "conic", "teacher_depth": 3}, {"dataset": "conic", "teacher_depth": 6}])
    fixed = regroup(frame)
    groups = fixed.drop_duplicates("run_id").groupby("group")["run_id"].count().to_dict()
    assert groups == {"dataset=teacher, teacher_depth=3": 4, "dataset=teacher, teacher_depth=9": 4,
                      "dataset=conic": 8}
    assert regroup(fixed) is fixed                                   # nothing left to fix
    analysis = run_tests(frame, (0.01,), n_perm=99)
    r311 = {r["group"]: r for r in analysis.results["conjecture_3_1_1"]}
    assert set(r311) == set(groups) and r311["dataset=conic"]["n_converged"] == 8
    [complexity] = analysis.claims["data_complexity"]
    assert complexity["levels"] == [3, 9] and complexity["strata"][0]["conic"]["n"] == 4
    only_conic = regroup(_loaded([{"dataset": "conic", "teacher_depth": 3}, {"dataset": "conic", "teacher_depth": 6}]))
    assert set(only_conic["group"]) == {"all"}
    teacher = _loaded([{"dataset": "teacher", "teacher_depth": 3}, {"dataset": "teacher", "teacher_depth": 6}])
    assert regroup(teacher) is teacher and teacher["group"].nunique() == 2


# ------------------------------------------------------------------ effective depth of conv models

def test_cnn_effective_depth_counts_every_measured_block():
    """A cnn of depth 4 measures 4 blocks (layer01 … layer04; an MLP of depth 4 measures 3),
    so with no block under ε its effective depth is 5 = blocks + 1, as the trainer logs it."""
    ncc = [0.90, 0.94, 0.97, 0.98]                                   # NCC error 0.1, 0.06, 0.03, 0.02
    trials = [{"weight_decay": lam, "seed": s, "depth": 4, "params": {"model": "cnn", "ncc_epsilon": 0.01},
               "evals": [{"nc_score": 0.5, "effective_depth": 5.0}], "layers": {"ncc_acc": ncc}}
              for lam in (1e-4, 1e-3) for s in range(2)]
    trials.append({"weight_decay": 1e-3, "seed": 5, "depth": 4, "params": {"model": "mlp", "ncc_epsilon": 0.01},
                   "evals": [{"nc_score": 0.5, "effective_depth": 4.0}], "layers": {"ncc_acc": ncc[:3]}})
    table = effdepth.per_trial(tidy(trials), (0.001, 0.01, 0.05)).set_index("run_id")
    assert table.loc["run000", ["n_blocks", "d_0.001", "d_0.01", "d_0.05"]].tolist() == [4, 5, 5, 3]
    assert table.loc["run004", ["n_blocks", "d_0.001", "d_0.01", "d_0.05"]].tolist() == [3, 4, 4, 3]
    results, _ = effdepth.conjecture_3_2_2(tidy(trials), (0.01,), n_perm=99)
    assert results[0]["logged_disagree"] == 0
    # a block missing at the final evaluation (measured before): incomplete, not a shorter model
    late = tidy(trials[:1])
    late = late[~((late["layer"] == 4) & (late["epoch"] == 10))]
    earlier = tidy([{"weight_decay": 1e-4, "seed": 0, "depth": 4, "evals": [{"nc_score": 0.1}],
                     "layers": {"ncc_acc": ncc}}]).assign(epoch=5)
    d = effdepth.per_trial(pd.concat([earlier, late], ignore_index=True), (0.01,))
    assert math.isnan(d["d_0.01"].iloc[0]) and d["n_blocks"].iloc[0] == 4


# ------------------------------------------------------------------ the report

def test_report_has_the_claim_sections_only_with_their_data(tmp_path):
    from analysis.load import Study
    from analysis.report import conjectures_json, run_tests, write_report
    rng = np.random.default_rng(9)
    trials = complexity_trials(0.15, rng, seeds=3)
    for t in trials:
        t["evals"] = [{"nc_score": t["evals"][0]["nc_score"] / 2, "train_loss": 1.0, "alpha": 3.0},
                      {"nc_score": t["evals"][0]["nc_score"] * 0.8, "train_loss": 0.5, "alpha": 2.5},
                      {"nc_score": t["evals"][0]["nc_score"], "train_loss": 0.1,
                       "alpha": 2.0 * t["weight_decay"] ** -0.1 * math.exp(0.02 * rng.standard_normal())}]
    frame = regroup(tidy(trials))
    study = Study(frame, pd.DataFrame(columns=["run_id", "experiment", "trial", "reason"]), {}, {"planted": "1"},
                  "sqlite:///planted.db", "sqlite")
    analysis = run_tests(frame, (0.01,), n_perm=199)
    text = write_report(study, analysis, [], tmp_path / "report.md").read_text()
    assert "## Paper claims" in text and "## Data complexity (thesis §1.4)" in text
    assert "**Data complexity (thesis §1.4)**" in text and "**Paper claim: alpha**" in text
    assert ("| λ | teacher_depth=3 | teacher_depth=6 | teacher_depth=9 | conic | conic − teacher_depth=3 [95% CI] |"
            in text)
    result = conjectures_json(study, analysis)
    assert set(result["claims"]) == {"alpha_vs_lambda", "nc_vs_loss", "data_complexity"}
    assert result["claims"]["data_complexity"]["applies"] and result["claims"]["alpha_vs_lambda"]["applies"]
    assert result["claims"]["data_complexity"]["groups"][0]["state"] == "supported"
    # one λ, no teacher_depth: both sections left out, the JSON says the claims do not apply
    single = tidy([{"weight_decay": 1e-3, "seed": s, "evals": [{"nc_score": 0.5, "alpha": 2.0}]} for s in range(3)])
    plain = run_tests(single, (0.01,), n_perm=99)
    other = Study(single, study.skipped, {}, {"p": "1"}, "x", "sqlite")
    text = write_report(other, plain, [], tmp_path / "r2.md").read_text()
    assert "## Paper claims" not in text and "Data complexity" not in text
    assert "(1.33 for C = 4) at full collapse" in text          # no num_classes param: the synthetic C
    ten = Study(single.assign(num_classes=10), study.skipped, {}, {"p": "1"}, "x", "sqlite")
    text = write_report(ten, plain, [], tmp_path / "r3.md").read_text()
    assert "(1.11 for C = 10) at full collapse" in text and "C = 4" not in text.split("## How to read")[0]
    c = conjectures_json(other, plain)["claims"]
    assert not c["data_complexity"]["applies"] and c["data_complexity"]["groups"] == []
    assert not c["alpha_vs_lambda"]["applies"] and not c["nc_vs_loss"]["applies"]


def test_alpha_figure_has_a_panel_per_group():
    from analysis import figures
    rng = np.random.default_rng(10)
    trials = alpha_trials(-0.2, rng, group="bn=affine") + alpha_trials(0.0, rng, group="bn=none")
    trials.append({"weight_decay": 1e-2, "seed": 7, "group": "bn=none", "status": "diverged",
                   "evals": [{"alpha": 1.0}]})
    frame = tidy(trials)
    res = claims.alpha_vs_lambda(frame, n_perm=99)
    from analysis.frame import final_values, trials as trial_table
    alphas = trial_table(frame).merge(final_values(frame, "alpha")[["run_id", "alpha"]], on="run_id")
    fig = figures.alpha_vs_lambda(alphas, res)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2 and all(ax.get_ylabel() for ax in panels) and len(fig.legends) == 1
    assert panels[0].get_title().startswith("bn=affine: supported")
    assert panels[1].get_yscale() == "log"
