"""Each test of docs/science.md §6 on frames built here, whose answers are known."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import bounds, depth, effdepth, theorem, wd
from analysis.report import run_tests
from study.metrics import effective_depth as study_effective_depth

GRID = (1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 5e-3, 7e-3, 1e-2)


def planted_frame(trials: list[dict], depth_: int = 6) -> pd.DataFrame:
    """Tidy frame (analysis.frame) of trials given as dicts: weight_decay, seed, status,
    S (final nc_score), optional `layers` {metric: (L-1,) final curve}, `gaps` (loss_gap per
    evaluation), group, bias."""
    rows = []
    for i, t in enumerate(trials):
        base = {"run_id": f"run{i:03d}", "experiment": "planted", "trial": f"planted_{i}",
                "status": t.get("status", "converged"), "group": t.get("group", "all"),
                "weight_decay": float(t["weight_decay"]), "seed": int(t.get("seed", 0)), "depth": depth_,
                "bn": t.get("bn", "affine"), "bias": t.get("bias", False), "num_classes": 4, "ncc_epsilon": 0.01}
        gaps = t.get("gaps", [0.5, 0.1])
        for k, gap in enumerate(gaps):
            epoch = 10 * (k + 1)
            final = k == len(gaps) - 1
            rows.append(base | {"epoch": epoch, "layer": 0, "nc_score": t["S"] if final else t["S"] / 2,
                                "intra_min": 0.9, "inter_max": -0.2, "raw_intra_min": 0.95, "raw_inter_max": 0.1,
                                "loss_gap": gap, "alpha": 2.0, "beta": 1.5,
                                "effective_depth": t.get("logged_depth", math.nan) if final else math.nan})
        for metric, curve in t.get("layers", {}).items():
            for l, value in enumerate(curve, start=1):
                rows.append(base | {"epoch": 10 * len(gaps), "layer": l, metric: value})
    frame = pd.DataFrame(rows)
    return frame.groupby(["run_id", "epoch", "layer"], as_index=False, sort=False).first()


def others(S: float = 9.0) -> list[dict]:
    """Trials that must be excluded: two not converged and one diverged, with absurd scores."""
    return [{"weight_decay": 1e-4, "seed": 9, "status": "not_converged", "S": S},
            {"weight_decay": 1e-2, "seed": 9, "status": "not_converged", "S": -S},
            {"weight_decay": 5e-3, "seed": 8, "status": "diverged", "S": math.nan}]


# ------------------------------------------------------------------ Conjecture 3.1.1

def test_311_holds_exactly():
    offsets = (-0.004, 0.0, 0.004)
    trials = [{"weight_decay": lam, "seed": s, "S": 0.5 + 0.1 * math.log(lam / 1e-4) + d}
              for lam in GRID for s, d in enumerate(offsets)] + others()
    [r] = wd.conjecture_3_1_1(planted_frame(trials), n_perm=1999)
    assert r["epsilon_hat"] == 0.0 and r["set_by"] == []
    assert r["ci_low"] == 0.0 and r["ci_high"] >= 0.0                     # covers the truth, 0
    assert r["statistic"] > 0.9 and r["p_value"] < 0.01 and r["jonckheere_z"] > 0
    assert r["n_converged"] == 24 and r["n_excluded"] == 3
    assert r["excluded"] == {"diverged": 1, "not_converged": 2}
    assert r["ci_high"] == 0.0 and r["state"] == "consistent" and r["trend"] == "supported"
    assert r["verdict"].startswith("consistent: ε < τ: ε̂ = 0 [0, 0]")
    assert r["role"] == "test" and r["lambda_range"] == {"low": 1e-4, "high": 1e-2, "n_values": 8,
                                                         "values": list(GRID), "no_converged": [],
                                                         "one_seed": []}


def dip_trials(eps: float, noise: float = 0.0, seeds: int = 3, rng=None) -> list[dict]:
    """S rises 0.03 per unit of log λ, except from λ = 3e-3 to 5e-3 where it falls at rate eps."""
    log = np.log(np.array(GRID) / 1e-4)
    S = 0.5 + 0.03 * log
    S[5:] -= (0.03 + eps) * (log[5] - log[4])
    out = []
    for lam, s_mean in zip(GRID, S):
        offsets = np.linspace(-0.01, 0.01, seeds) if rng is None else noise * rng.standard_normal(seeds)
        out += [{"weight_decay": lam, "seed": k, "S": s_mean + d} for k, d in enumerate(offsets)]
    return out


def test_311_violated_by_known_epsilon():
    """10 seeds per λ (SD 0.006): each λ's own SD at 9 df tells a fall at rate 0.08 from
    τ = 0.02; with 3 seeds (2 df each) the same dip gives [0, 0.2], inconclusive."""
    [r] = wd.conjecture_3_1_1(planted_frame(dip_trials(0.08, seeds=10) + others()), n_perm=999, tau=0.02)
    assert r["epsilon_hat"] == pytest.approx(0.08, abs=1e-9)
    assert r["ci_low"] > 0.02 and r["state"] == "violated" and r["p_violated_adjusted"] < 0.05
    assert r["verdict"].startswith("violated: ε > τ: ε̂ = 0.08 [")
    assert [(p["lambda_1"], p["lambda_2"]) for p in r["set_by"]] == [(3e-3, 5e-3)]
    assert r["ci_low"] <= 0.08 <= r["ci_high"]
    assert r["statistic"] > 0                                              # still rises overall
    assert r["excluded"] == {"diverged": 1, "not_converged": 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_311_noisy_seeds_ci_covers_the_truth(seed):
    rng = np.random.default_rng(seed)
    [r] = wd.conjecture_3_1_1(planted_frame(dip_trials(0.08, noise=0.01, seeds=5, rng=rng)), n_perm=499)
    assert r["ci_low"] <= 0.08 <= r["ci_high"]
    assert abs(r["epsilon_hat"] - 0.08) < 0.04
    assert r["set_by"][0]["lambda_1"] == 3e-3 and r["set_by"][0]["lambda_2"] == 5e-3


def test_311_slow_fall_is_within_a_loose_bound_and_beyond_a_tight_one():
    """A steady fall of 0.05 per unit of log λ: consistent with τ = 0.1, violated at τ = 0.03,
    and the falling trend is reported on its own either way."""
    trials = [{"weight_decay": lam, "seed": s, "S": 1.0 - 0.05 * math.log(lam) + d}
              for lam in GRID[:4] for s, d in enumerate((-0.001, 0.001))]
    [r] = wd.conjecture_3_1_1(planted_frame(trials), n_perm=999)
    assert r["epsilon_hat"] == pytest.approx(0.05)
    assert len(r["set_by"]) == 6                                           # all 4·3/2 λ pairs tie
    assert r["ci_low"] <= 0.05 <= r["ci_high"] < 0.1
    assert r["statistic"] < 0 and r["trend"] == "contradicted" and r["state"] == "consistent"
    assert "trend contradicted" in r["verdict"]
    [tight] = wd.conjecture_3_1_1(planted_frame(trials), n_perm=999, tau=0.03)
    assert tight["state"] == "violated"


def test_311_too_few_converged_trials_gives_no_verdict():
    trials = [{"weight_decay": 1e-4, "seed": 0, "S": 0.5}, {"weight_decay": 1e-3, "seed": 0, "S": 0.6}] + others()
    [r] = wd.conjecture_3_1_1(planted_frame(trials))
    assert r["state"] == "insufficient" and r["epsilon_hat"] is None and r["p_value"] is None
    assert r["verdict"].startswith("too few converged trials: 2") and "no verdict" in r["verdict"]
    assert r["n_excluded"] == 3


def test_311_zero_weight_decay_is_excluded_with_reason():
    trials = [{"weight_decay": lam, "seed": 0, "S": lam * 10} for lam in (0.0, 1e-4, 1e-3, 1e-2)]
    [r] = wd.conjecture_3_1_1(planted_frame(trials), n_perm=99)
    assert r["n_converged"] == 3 and r["excluded"] == {"weight_decay <= 0 (log λ undefined)": 1}


def test_311_groups_are_tested_separately():
    up = [{"weight_decay": lam, "seed": s, "S": math.log(lam) + 0.01 * s, "group": "bn=affine"}
          for lam in GRID for s in range(2)]
    down = [{"weight_decay": lam, "seed": s, "S": -math.log(lam) + 0.01 * s, "group": "bn=none"}
            for lam in GRID for s in range(2)]
    for t in down:
        t["bn"] = "none"
    res = {r["group"]: r for r in wd.conjecture_3_1_1(planted_frame(up + down), n_perm=499)}
    assert res["bn=affine"]["state"] == "consistent" and res["bn=affine"]["trend"] == "supported"
    none = res["bn=none"]
    assert none["role"] == "control" and none["state"] == "control" and none["trend"] == "contradicted"
    assert none["verdict"].startswith("control (no BN before the classifier; no verdict)")
    assert none["epsilon_hat"] == pytest.approx(1.0) and none["ci_low"] > 0.1     # numbers still reported


def test_311_holm_within_the_family_and_the_lambda_range():
    """Trend p-values are Holm-adjusted over every group, the verdicts' over the tested groups
    only; a λ whose trials all failed is named as outside the verdict."""
    rng = np.random.default_rng(0)
    trials = []
    for g, slope in (("bn=affine, w=1", 0.02), ("bn=affine, w=2", 0.0), ("bn=affine, w=3", 0.05)):
        trials += [{"weight_decay": lam, "seed": s, "S": 0.5 + slope * math.log(lam) + 0.02 * rng.standard_normal(),
                    "group": g} for lam in GRID[:5] for s in range(3)]
    trials += [{"weight_decay": 1e-2, "seed": s, "S": 0.1, "group": "bn=affine, w=1", "status": "not_converged"}
               for s in range(3)]
    res = wd.conjecture_3_1_1(planted_frame(trials), n_perm=999)
    from analysis import stats
    assert [r["p_value_adjusted"] for r in res] == pytest.approx(stats.holm([r["p_value"] for r in res]))
    assert [r["p_consistent_adjusted"] for r in res] == pytest.approx(stats.holm([r["p_consistent"] for r in res]))
    assert all(r["p_value_adjusted"] >= r["p_value"] for r in res)
    first = res[0]
    assert first["lambda_range"]["no_converged"] == [1e-2] and first["lambda_range"]["high"] == 3e-3
    assert "no converged trial at λ 0.01" in first["verdict"] and "λ 0.0001–0.003 (5 values)" in first["verdict"]


def test_311_interval_stops_at_the_largest_drop_nc_score_allows():
    """With λ = 1e-4, 2e-4, 1e-2 the steepest possible fall is nc_score's whole range, 3, over
    log 2 (the closest pair); two seeds 1.6 apart at one λ (the largest SD, 1 df) give an
    upper end far above that, and it is cut there."""
    trials = [{"weight_decay": lam, "seed": s, "S": S} for lam, pair in
              {1e-4: (0.5, 0.5001), 2e-4: (0.5, 0.5002), 1e-2: (-0.6, 1.0)}.items() for s, S in enumerate(pair)]
    [r] = wd.conjecture_3_1_1(planted_frame(trials), n_perm=99)
    strata = [np.array(p) for p in ((0.5, 0.5001), (0.5, 0.5002), (-0.6, 1.0))]
    unclipped = bounds.pair_bound(strata, bounds.log_lambda_weights(np.array([1e-4, 2e-4, 1e-2])), r["tau"])
    assert unclipped["ci_high"] > 3 / math.log(2)
    assert r["ci_high"] == pytest.approx(3 / math.log(2)) and r["state"] == "inconclusive"


# ------------------------------------------------------------------ Conjecture 3.2.1

def test_321_model_epsilon_on_a_known_dip():
    S = np.array([0.1, 0.2, 0.3, 0.23, 0.4])
    eps, block, share = depth.model_epsilon(S)
    assert eps == pytest.approx(0.07) and block == 3 and share == pytest.approx(0.75)
    assert depth.model_epsilon(np.array([0.1, 0.2, 0.3])) == (0.0, None, 1.0)


def test_321_group_on_curves_with_a_known_dip():
    rng = np.random.default_rng(0)
    rising = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    dipped = rising.copy()
    dipped[3] = 0.23                                                       # block 3 -> 4 falls by 0.07
    trials = [{"weight_decay": lam, "seed": s, "S": 0.5, "layers": {"nc_score": rising + 0.005 * rng.standard_normal(5)}}
              for lam in (1e-4, 1e-3, 1e-2) for s in range(3)]
    trials.append({"weight_decay": 1e-2, "seed": 3, "S": 0.5, "layers": {"nc_score": dipped}})
    trials.append({"weight_decay": 1e-2, "seed": 4, "S": 0.5, "status": "not_converged",
                   "layers": {"nc_score": rising[::-1]}})                  # excluded: would dip by 0.1
    trials.append({"weight_decay": 1e-3, "seed": 5, "S": 0.5})             # converged, no per-layer data
    [r], models = depth.conjecture_3_2_1(planted_frame(trials), n_perm=999)
    assert r["max_model_epsilon_hat"] == pytest.approx(0.07)
    [s] = r["set_by"]
    assert (s["trial"], s["block_from"], s["block_to"]) == ("planted_9", 3, 4)
    assert s["S_from"] - s["S_to"] == pytest.approx(0.07)
    assert r["n_converged"] == 10
    assert r["excluded"] == {"not_converged": 1, "no complete per-layer nc_score": 1}
    assert r["share_nondecreasing"] == pytest.approx(39 / 40)
    # every seed-mean step rises, the dip included ((3 · -0.1 + 0.07) / 4 < 0): ε̂ = 0, and the
    # interval's width comes from the dipped model's spread at λ = 1e-2, whose steps are scaled
    # by their own models' SD (3 df), not by one pooled over the quiet λ (which gave < 0.2)
    assert r["epsilon_hat"] == 0.0 and r["ci_low"] == 0.0 and r["sd_model"] == "welch"
    assert 0.2 < r["ci_high"] < 1.0
    assert r["distribution"]["median"] == 0.0
    assert r["statistic"] > 0.9 and r["p_value"] < 0.01 and r["trend"] == "supported"
    assert r["state"] in ("consistent", "inconclusive") and r["tau"] == 0.05
    assert r["lambda_rho"] > 0                                              # the dip sits at the largest λ
    assert len(models) == 12


def test_nc_score_never_leaves_its_range_so_no_drop_exceeds_three():
    """nc_score = intra_min - inter_max lies in [-1, 1 + 1/(C-1)] (docstring of
    depth.NC_SCORE_SPAN), measured by study.metrics on random, collapsed (simplex),
    antipodal-within-class and all-in-one-direction features, C = 2 .. 10."""
    from study.metrics import class_stats, cosine_matrix, cosine_summary
    import torch
    rng = np.random.default_rng(0)
    seen = []
    for C in (2, 3, 4, 10):
        y = np.repeat(np.arange(C), 6)
        simplex = np.eye(C) - 1 / C
        cases = [rng.standard_normal((len(y), 12)),                              # no structure
                 simplex[y] @ rng.standard_normal((C, 12)),                      # full collapse
                 np.where((np.arange(len(y)) % 2)[:, None] == 0, 1, -1) * rng.standard_normal((1, 12)),
                 np.abs(rng.standard_normal((len(y), 12))) + 5]                  # one direction
        for H in cases:
            stats = class_stats(torch.tensor(H), torch.tensor(y))
            score = cosine_summary(cosine_matrix(stats), stats.n)["nc_score"]
            assert -1 - 1e-12 <= score <= 1 + 1 / (C - 1) + 1e-12
            seen.append(score)
    assert max(seen) == pytest.approx(1 + 1 / (2 - 1))                         # the simplex at C = 2 reaches it
    assert 2 + 1 / (2 - 1) <= depth.NC_SCORE_SPAN


def test_321_interval_stops_at_the_largest_drop_nc_score_allows():
    """Two models per λ that disagree wildly at one step (df = 1 with the largest SD) give an
    upper end far above the 3 that nc_score's range allows; it is cut at 3."""
    rng = np.random.default_rng(1)
    trials = [{"weight_decay": lam, "seed": s, "S": 0.5,
               "layers": {"nc_score": np.array([0.1, 0.2, 0.3, 0.4]) + (0.9 * s if lam == 1e-2 else 0)
                          * np.array([0, 0, 1, -1]) + 0.001 * rng.standard_normal(4)}}
              for lam in (1e-4, 1e-3, 1e-2) for s in range(2)]
    [r], models = depth.conjecture_3_2_1(planted_frame(trials, depth_=5), n_perm=99)
    drops = [np.stack(models.loc[models["weight_decay"] == lam, "curve"].to_list()) for lam in (1e-4, 1e-3, 1e-2)]
    unclipped = bounds.step_bound([c[:, :-1] - c[:, 1:] for c in drops], r["tau"])["ci_high"]
    assert unclipped > depth.NC_SCORE_SPAN and r["ci_high"] == depth.NC_SCORE_SPAN
    assert r["state"] == "inconclusive" and "at 3, the largest drop" in r["ci_of"]


# ------------------------------------------------------------------ Conjecture 3.2.2

def ncc_curve(d05: int, d01: int, n_blocks: int = 5) -> np.ndarray:
    """NCC accuracy per block: error 0.1 before block d05, 0.04 from d05, 0.005 from d01."""
    l = np.arange(1, n_blocks + 1)
    return np.where(l >= d01, 0.995, np.where(l >= d05, 0.96, 0.9))


def test_322_effective_depth_matches_study_metrics():
    rng = np.random.default_rng(0)
    for _ in range(50):
        acc = rng.choice([0.9, 0.95, 0.99, 0.999, 1.0], size=5)
        for eps in (0.001, 0.01, 0.05):
            assert effdepth.effective_depth(acc, 6, eps) == study_effective_depth(acc, 6, eps)


def test_322_known_violating_pairs():
    # d_0.01 by λ: 1e-4 -> 4, 1e-3 -> 2, 1e-2 -> 3 (a rise of one block: a violation);
    # d_0.05: 3, 2, 2 (none); d_0.001: 6 everywhere (never reached: depth L)
    plan = {1e-4: (3, 4), 1e-3: (2, 2), 1e-2: (2, 3)}
    trials = [{"weight_decay": lam, "seed": s, "S": 0.5, "layers": {"ncc_acc": ncc_curve(*d)}, "logged_depth": d[1]}
              for lam, d in plan.items() for s in range(2)]
    trials.append({"weight_decay": 1e-2, "seed": 7, "S": 0.5, "status": "diverged",
                   "layers": {"ncc_acc": ncc_curve(5, 5)}})
    results, table = effdepth.conjecture_3_2_2(planted_frame(trials), (0.001, 0.01, 0.05), n_perm=999)
    by_eps = {r["epsilon"]: r for r in results}
    assert table.set_index("run_id").loc["run000", ["d_0.001", "d_0.01", "d_0.05"]].tolist() == [6, 4, 3]
    r = by_eps[0.01]
    assert [(p["lambda_1"], p["lambda_2"]) for p in r["violating_pairs"]] == [(1e-3, 1e-2)]
    assert r["epsilon_hat"] == 1.0 and r["set_by"] == r["violating_pairs"]
    assert r["ci_low"] is None and "agree exactly" in r["no_interval_reason"]   # seeds identical
    assert r["state"] == "inconclusive"
    assert (r["n_violating_trial_pairs"], r["n_trial_pairs"]) == (4, 12)
    assert r["logged_disagree"] == 0
    assert r["excluded"] == {"diverged": 1}
    assert by_eps[0.05]["violating_pairs"] == [] and by_eps[0.05]["epsilon_hat"] == 0.0
    assert by_eps[0.05]["statistic"] < 0
    flat = by_eps[0.001]
    assert math.isnan(flat["statistic"]) and flat["state"] == "inconclusive" and flat["trend"] == "inconclusive"
    assert "no violating λ pair" in flat["verdict"] and flat["violating_pairs"] == []


def test_322_strictly_falling_depth_is_supported():
    plan = {1e-4: (5, 5), 3e-4: (4, 5), 1e-3: (3, 4), 3e-3: (2, 3), 1e-2: (1, 2)}
    trials = [{"weight_decay": lam, "seed": s, "S": 0.5, "layers": {"ncc_acc": ncc_curve(*d)}}
              for lam, d in plan.items() for s in range(2)]
    results, _ = effdepth.conjecture_3_2_2(planted_frame(trials), (0.01,), n_perm=999)
    [r] = results
    assert r["statistic"] == pytest.approx(-1.0, abs=0.05) and r["p_value"] < 0.01
    assert r["trend"] == "supported" and r["violating_pairs"] == [] and r["n_violating_trial_pairs"] == 0


def test_322_interval_stops_at_the_largest_rise_the_depth_allows():
    """d_0.01 lies in 1 .. 6 for 5 blocks, so the mean depth can rise by 5 blocks at most.
    Two seeds that disagree by 4 blocks at one λ (its own SD, 1 df; the λ whose seeds agree
    take the pooled SD) give an upper end far above that; it is cut at 5, and the verdict
    (against τ = 0.5) stays inconclusive."""
    plan = {1e-4: [(1, 1), (1, 1)], 1e-3: [(1, 1), (5, 5)], 1e-2: [(2, 2), (2, 2)]}
    trials = [{"weight_decay": lam, "seed": s, "S": 0.5, "layers": {"ncc_acc": ncc_curve(*d)}}
              for lam, ds in plan.items() for s, d in enumerate(ds)]
    frame = planted_frame(trials)
    [r], table = effdepth.conjecture_3_2_2(frame, (0.01,), n_perm=99)
    assert r["zero_sd_settings"] == 2 and "2 settings whose seeds agree exactly" in r["verdict"]
    strata = [table.loc[table["weight_decay"] == lam, "d_0.01"].to_numpy(float) for lam in sorted(plan)]
    unclipped = bounds.pair_bound(strata, np.full((3, 3), -1.0), r["tau"])["ci_high"]
    assert unclipped > 5 and r["ci_high"] == 5.0 and r["ci_low"] == 0.0
    assert r["state"] == "inconclusive" and "[0, 5]" in r["verdict"]


# ------------------------------------------------------------------ Theorem 2.3.1

def test_theorem_lists_every_violation_and_ignores_biased_models():
    trials = [{"weight_decay": 1e-3, "seed": 0, "S": 0.5, "gaps": [0.4, 0.1, 0.02]},
              {"weight_decay": 1e-3, "seed": 1, "S": 0.5, "gaps": [0.3, -0.01, -1e-9]},    # one real violation
              {"weight_decay": 1e-2, "seed": 0, "S": 0.5, "gaps": [0.3, 0.2, -0.5], "bias": True},
              {"weight_decay": 1e-2, "seed": 1, "S": 0.5, "gaps": [0.2, -0.03], "status": "not_converged"}]
    [r], evals = theorem.theorem_2_3_1(planted_frame(trials))
    assert r["n_evaluations"] == 8 and r["n_trials_checked"] == 3
    assert r["excluded"] == {"bias=True (no floor)": 1}
    assert r["n_violations"] == 2
    assert [(v["trial"], v["epoch"]) for v in r["violations"]] == [("planted_3", 20), ("planted_1", 20)]
    assert r["statistic"] == pytest.approx(-0.03) and r["epsilon_hat"] == pytest.approx(0.03)
    assert r["state"] == "contradicted" and r["verdict"].startswith("VIOLATED at 2 of 8 evaluations")
    row = evals.iloc[0]
    assert row["x_intra"] == pytest.approx(math.sqrt(0.4) / 3.0)
    assert row["y_inter"] == pytest.approx(0.1 + 1 / 3)          # the raw (uncentred) cosine
    assert row["y_intra"] == pytest.approx(1 - 0.95)
    clean = planted_frame([{"weight_decay": 1e-3, "seed": 0, "S": 0.5, "gaps": [0.3, 0.0]}])
    [ok], _ = theorem.theorem_2_3_1(clean)
    assert ok["state"] == "supported" and ok["verdict"].startswith("holds") and ok["n_violations"] == 0


def test_run_tests_on_planted_study_has_every_test_per_group():
    from analysis.load import tidy_frame, wide_history, RunRecord
    from analysis.synthetic import planted_trials
    from study.schema import metric_key
    trials = planted_trials(bns=("affine", "nonaffine"), lambdas=GRID[::2], seeds=range(2), depth=5,
                            epochs=30, eval_every=10)
    records, histories = [], []
    for i, t in enumerate(trials):
        keys = [metric_key(k) for k, v in t.metrics.items() for _ in v]     # the names MLflow holds
        steps = [s for k, v in t.metrics.items() for s in t.steps]
        values = [x for v in t.metrics.values() for x in v]
        records.append(RunRecord(f"r{i}", "planted", f"planted_{i}", 1, {"status": t.status},
                                 t.cfg.to_params(), 1, 1))
        histories.append(wide_history(keys, steps, values))
    analysis = run_tests(tidy_frame(records, histories), (0.01,), n_perm=199)
    assert [len(analysis.results[k]) for k in sorted(analysis.results)] == [2, 2, 2, 2]
    r = {x["group"]: x for x in analysis.results["conjecture_3_1_1"]}
    assert r["bn=affine"]["statistic"] > 0 and r["bn=nonaffine"]["statistic"] > 0
    from analysis import claims                   # the planted alpha shrinks with λ, as the paper finds
    alpha = claims.alpha_vs_lambda(tidy_frame(records, histories), n_perm=199)
    assert [a["group"] for a in alpha] == ["bn=affine", "bn=nonaffine"]
    assert all(a["statistic"] < 0 for a in alpha)


# ------------------------------------------------------------------ scope and λ coverage (audit)

def test_a_final_score_logged_as_nan_is_not_replaced_by_an_earlier_one():
    """A converged trial whose last evaluation has nc_score NaN is left out (no final
    nc_score), not read at an earlier epoch where its score was half the final one."""
    trials = [{"weight_decay": lam, "seed": s, "S": 0.5 + 0.01 * s} for lam in GRID[:4] for s in range(3)]
    frame = planted_frame(trials)
    victim = frame["trial"].iloc[0]
    last = frame["epoch"].max()
    at_last = (frame["trial"] == victim) & (frame["epoch"] == last) & (frame["layer"] == 0)
    assert at_last.sum() == 1 and (frame["trial"] == victim).sum() > 1     # earlier epochs exist
    frame.loc[at_last, "nc_score"] = math.nan
    [r] = wd.conjecture_3_1_1(frame, n_perm=99)
    assert r["n_converged"] == 11 and r["excluded"].get("no final nc_score") == 1


def test_the_depth_verdicts_name_the_lambdas_they_leave_out():
    """3.2.1 and 3.2.2 say, as 3.1.1 does, which λ have no converged trial and which are left
    out with a single converged seed."""
    rising = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    trials = [{"weight_decay": lam, "seed": s, "S": 0.5, "layers": {"nc_score": rising + 0.01 * s,
                                                                    "ncc_acc": ncc_curve(2 + s % 2, 4)}}
              for lam in (1e-4, 1e-3) for s in range(3)]
    trials.append({"weight_decay": 3e-3, "seed": 0, "S": 0.5,
                   "layers": {"nc_score": rising, "ncc_acc": ncc_curve(2, 4)}})
    trials += [{"weight_decay": 1e-2, "seed": s, "S": 0.5, "status": "not_converged",
                "layers": {"nc_score": rising, "ncc_acc": ncc_curve(2, 4)}} for s in range(3)]
    frame = planted_frame(trials)
    [r321], _ = depth.conjecture_3_2_1(frame, n_perm=99)
    [r322], _ = effdepth.conjecture_3_2_2(frame, (0.01,), n_perm=99)
    for r in (r321, r322):
        assert r["lambda_range"]["values"] == [1e-4, 1e-3]
        assert r["lambda_range"]["one_seed"] == [3e-3] and r["lambda_range"]["no_converged"] == [1e-2]
        assert "left out with 1 converged seed (no seed variance of its own): λ 0.003" in r["verdict"]
        assert "no converged trial at λ 0.01" in r["verdict"]


def test_conv_nets_with_bn_inside_their_blocks_are_controls_for_311():
    """Conjecture 3.1.1 presumes a BN right before the classifier: an MLP block ends in its BN,
    a conv net has one there only with bn_placement: last (its head BN). A control's dict has
    no verdict fields (bound_state, p_consistent, p_violated all None)."""
    import pandas as pd
    def rows(**kw):
        return pd.DataFrame([{"bn": "affine", **kw}] * 2)
    assert wd.role(rows(model="mlp", bn_placement="last")) == "test"
    assert wd.role(rows(model="mlp", bn_placement="every")) == "test"
    assert wd.role(rows(model="cnn", bn_placement="last")) == "test"
    assert wd.role(rows(model="cnn", bn_placement="every")) == "control"
    assert wd.role(rows(model="resnet", bn_placement="every")) == "control"
    assert wd.role(pd.DataFrame([{"bn": "none", "model": "mlp"}])) == "control"
    assert "not directly before the classifier" in wd.control_reason(rows(model="cnn", bn_placement="every"))
    trials = [{"weight_decay": lam, "seed": s, "S": 0.5 - 0.3 * math.log(lam / 1e-4) + 0.001 * s,
               "bn": "none"} for lam in GRID[:4] for s in range(3)]
    [r] = wd.conjecture_3_1_1(planted_frame(trials), n_perm=99)
    assert r["state"] == "control" and r["ci_low"] > 0.1                 # its numbers are kept
    assert r["bound_state"] is None and r["p_violated"] is None and r["p_consistent"] is None
    assert r["verdict"].startswith("control (no BN before the classifier; no verdict)")
