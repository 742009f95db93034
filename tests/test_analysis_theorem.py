"""Theorem 2.3.1 on its own terms: the loss_gap >= 0 check of the measurement, and the
theorem's rates fitted on the raw cosines per group, on frames whose slopes are planted."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import figures, theorem

C = 4
SLOPES = {"bn=affine": (1.0, 0.7), "bn=none": (2.0, 1.3)}     # group -> planted (intra, inter) slope


def rate_frame(slopes: dict = SLOPES, trials: int = 6, evals: int = 10, noise: float = 0.05,
               seed: int = 0) -> pd.DataFrame:
    """Tidy frame (analysis.frame), layer 0 only, whose raw cosines follow
    log y = a_trial + k log x + noise for the planted k of each group and relation."""
    rng = np.random.default_rng(seed)
    rows = []
    for group, (k_intra, k_inter) in slopes.items():
        for t in range(trials):
            run = f"{group}_{t}"
            a, b = rng.normal(-1.0, 0.2, 2)                               # per-trial intercepts
            gap = 10 ** rng.uniform(-4, 0, evals)                          # (E,)
            alpha, beta = rng.uniform(1, 3, evals), rng.uniform(0.5, 2, evals)
            y_intra = np.exp(a + k_intra * np.log(np.sqrt(gap) / (alpha * beta)) + noise * rng.standard_normal(evals))
            y_inter = np.exp(b + k_inter * np.log(gap ** (1 / 6)) + noise * rng.standard_normal(evals))
            for e in range(evals):
                rows.append({"run_id": run, "experiment": "planted", "trial": run, "status": "converged",
                             "group": group, "weight_decay": (1e-4, 1e-3, 1e-2)[t % 3], "seed": t // 3,
                             "depth": 4, "bn": group[3:], "epoch": 5 * (e + 1), "layer": 0, "bias": False,
                             "num_classes": C, "loss_gap": gap[e], "alpha": alpha[e], "beta": beta[e],
                             "raw_intra_min": 1 - y_intra[e], "raw_inter_max": y_inter[e] - 1 / (C - 1),
                             "intra_min": 0.9, "inter_max": -0.3})
    return pd.DataFrame(rows)


def test_slope_fit_recovers_the_planted_slopes_per_group():
    results, evals = theorem.theorem_2_3_1(rate_frame())
    assert [r["group"] for r in results] == sorted(SLOPES)
    for r in results:
        for relation, k in zip(("intra", "inter"), SLOPES[r["group"]]):
            assert r[f"{relation}_slope"] == pytest.approx(k, abs=0.05)
            low, high = r[f"{relation}_slope_ci"]
            assert low < k < high
            assert r[f"n_points_{relation}"] == 60
        assert r["n_off_axes"] == {} and r["cosines"] == theorem.COSINES
        assert r["predicted_slope"] == 1.0 and r["p_value"] is None
        assert r["rho_intra"] > 0.9 and r["rho_inter"] > 0.9
        assert "intra " + theorem.slope_text(r, "intra") in r["verdict"]


def test_slope_interval_is_clustered_over_trials():
    """A trial-level shift that moves with x (here: whole trials off the line) must widen
    the interval far beyond the naive one; one trial gives no interval."""
    x = np.exp(np.tile(np.linspace(0, 2, 5), 4))
    shift = np.repeat([0.0, 0.6, -0.6, 0.2], 5) * np.log(x)          # per-trial slopes 1, 1.6, 0.4, 1.2
    k, (low, high) = theorem.slope_fit(x, x * np.exp(shift), np.repeat(list("abcd"), 5))
    assert k == pytest.approx(1.05) and low < 0.6 and high > 1.5
    assert theorem.slope_fit(x[:5], x[:5], np.zeros(5)) == (pytest.approx(1.0), None)
    assert theorem.slope_fit(x[:2], x[:2], np.arange(2)) == (None, None)


def test_points_off_the_log_axes_are_counted_by_reason():
    frame = rate_frame({"all": (1.0, 1.0)}, trials=3, evals=4)
    frame.loc[0, "loss_gap"] = 0.0                                    # off both relations
    frame.loc[1, "loss_gap"] = -0.01                                  # off both, and a violation
    frame.loc[2, "raw_intra_min"] = 1.0                               # y_intra = 0
    frame.loc[3, "raw_intra_min"] = 1.2                               # y_intra < 0
    frame.loc[4, "raw_inter_max"] = -0.5                              # y_inter < 0
    frame.loc[5, "raw_inter_max"] = np.nan                            # not logged
    [r], evals = theorem.theorem_2_3_1(frame)
    assert r["n_off_axes"] == {"loss_gap <= 0": 2, "intra: 1 − raw_intra_min <= 0": 2,
                               "inter: raw_inter_max + 1/(C−1) <= 0": 1, "inter: no raw cosine logged": 1}
    assert r["n_points_intra"] == 12 - 4 and r["n_points_inter"] == 12 - 4
    assert r["n_evaluations"] == 12 and r["n_violations"] == 1


def test_figure_has_a_pair_of_log_log_panels_per_group_and_a_lambda_legend():
    _, evals = theorem.theorem_2_3_1(rate_frame())
    fig = figures.theorem_scatter(evals)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 4
    assert [ax.get_title() for ax in axes] == ["bn=affine", "bn=affine", "bn=none", "bn=none"]
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in axes)
    assert [ax.get_xlabel() for ax in axes[:2]] == ["√loss_gap / (αβ)", "loss_gap^(1/6)"]
    assert [ax.get_ylabel() for ax in axes[:2]] == ["1 − raw_intra_min", "raw_inter_max + 1/(C−1)"]
    for ax in axes:
        lines = {l.get_label(): l for l in ax.get_lines()}
        assert lines["predicted slope 1"].get_linestyle() == "--"
        assert any(label.startswith("fitted slope ") for label in lines)
        assert len(ax.collections) == 1 and len(ax.collections[0].get_offsets()) == 60
    assert len(fig.legends) == 1 and fig.legends[0].get_title().get_text() == "λ"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["0.0001", "0.001", "0.01"]
    empty = figures.theorem_scatter(evals.iloc[:0])
    assert any(t.get_text() == "no evaluations" for ax in empty.axes for t in ax.texts)


def test_loss_gap_check_flags_a_negative_gap_and_says_it_checks_the_measurement():
    frame = rate_frame({"all": (1.0, 1.0)}, trials=3, evals=4)
    [ok], _ = theorem.theorem_2_3_1(frame)
    assert ok["state"] == "supported" and ok["verdict"].startswith("holds") and ok["n_violations"] == 0
    assert "a check of the measurement, not of the theorem" in ok["verdict"]
    assert ok["measurement_check"] is True and ok["loss_gap_check"] == theorem.LOSS_GAP_CHECK
    frame.loc[5, "loss_gap"] = -0.02
    [bad], evals = theorem.theorem_2_3_1(frame)
    assert bad["state"] == "contradicted" and bad["n_violations"] == 1
    assert bad["verdict"].startswith("VIOLATED at 1 of 12 evaluations") and "measurement is wrong" in bad["verdict"]
    assert bad["statistic"] == pytest.approx(-0.02) and bad["violations"][0]["run_id"] == frame.loc[5, "run_id"]
    assert len(theorem.violations(evals)) == 1
