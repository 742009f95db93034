"""analysis.effects: the Welch interval of BN-kind differences against a float64 hand
computation and scipy, its coverage by simulation, and the cells without an interval."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import effects


def table(cells: dict[tuple[str, float, str], list[float]]) -> pd.DataFrame:
    """Per-trial scores from {(group, λ, status): [final nc_score per seed]}; bn read from the group."""
    rows = []
    for (group, lam, st), values in cells.items():
        bn = next(p[3:] for p in group.split(", ") if p.startswith("bn="))
        rows += [{"group": group, "bn": bn, "weight_decay": lam, "seed": s, "status": st, "nc_score": v}
                 for s, v in enumerate(values)]
    return pd.DataFrame(rows)


A = [0.81, 0.86, 0.78, 0.84]
N = [0.42, 0.55, 0.47]
Z = [0.30, 0.10, 0.26, 0.35, 0.21]


def hand_welch(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """The formula written out in float64 loops."""
    def mean(x):
        return math.fsum(x) / len(x)

    def var(x):
        m = mean(x)
        return math.fsum((v - m) ** 2 for v in x) / (len(x) - 1)
    va, vb = var(a) / len(a), var(b) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    d = mean(a) - mean(b)
    half = sps.t.ppf((1 + level) / 2, df) * math.sqrt(va + vb)
    return d, d - half, d + half, df


def test_set_label_drops_only_bn():
    assert effects.set_label("bn=affine, depth=6") == "depth=6"
    assert effects.set_label("depth=6, bn=none, data_path=a, b.npz") == "depth=6, data_path=a, b.npz"
    assert effects.set_label("bn=nonaffine") == "all"
    assert effects.set_label("all") == "all"


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_welch_matches_hand_computation_and_scipy(level):
    scores = table({("bn=affine, depth=6", 1e-3, "converged"): A, ("bn=nonaffine, depth=6", 1e-3, "converged"): N,
                    ("bn=none, depth=6", 1e-3, "converged"): Z, ("bn=affine, depth=4", 1e-3, "converged"): Z})
    out = effects.bn_effects(scores, level=level)
    assert [(e["set"], e["a"], e["b"]) for e in out] == [("depth=6", "affine", "nonaffine"),
                                                          ("depth=6", "affine", "none"),
                                                          ("depth=6", "nonaffine", "none")]
    by_kind = {"affine": A, "nonaffine": N, "none": Z}
    for e in out:
        a, b = by_kind[e["a"]], by_kind[e["b"]]
        d, low, high, df = hand_welch(a, b, level)
        assert (e["diff"], e["ci_low"], e["ci_high"], e["df"]) == pytest.approx((d, low, high, df), rel=1e-12)
        assert (e["n_a"], e["n_b"], e["ci_level"], e["no_interval_reason"]) == (len(a), len(b), level, None)
        assert e["sd_a"] == pytest.approx(np.std(a, ddof=1), rel=1e-12)
        assert e["mean_b"] == pytest.approx(np.mean(b), rel=1e-12)
        ci = sps.ttest_ind(a, b, equal_var=False).confidence_interval(level)
        assert (e["ci_low"], e["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_welch_interval_covers_at_nominal_level():
    """3 vs 5 seeds, SDs 0.02 vs 0.1: 2000 cells, the true difference 0.3 inside ~95 % of them."""
    rng = np.random.default_rng(0)
    x_a = rng.normal(0.4, 0.02, (2000, 3))
    x_b = rng.normal(0.1, 0.1, (2000, 5))
    _, low, high, _ = effects.welch_interval(x_a, x_b)
    coverage = np.mean((low <= 0.3) & (0.3 <= high))
    assert 0.93 <= coverage <= 0.97


def test_bonferroni_interval_over_a_rows_cells_by_hand():
    """m counts the cells of one set × pair that have an interval; each adjusted interval is
    the hand-computed Welch interval at level 1 − 0.05/m and contains the unadjusted one."""
    scores = table({("bn=affine", lam, "converged"): [v + k for v in A] for k, lam in enumerate((1e-4, 1e-3, 1e-2))}
                   | {("bn=none", lam, "converged"): Z for lam in (1e-4, 1e-3)}
                   | {("bn=none", 1e-2, "converged"): [0.3]})          # one seed: no interval, not counted
    out = {e["weight_decay"]: e for e in effects.bn_effects(scores)}
    assert out[1e-2]["ci_low_adjusted"] is None and out[1e-2]["family_size"] is None
    for k, lam in enumerate((1e-4, 1e-3)):
        e = out[lam]
        d, low, high, _ = hand_welch([v + k for v in A], Z, 1 - 0.05 / 2)
        assert e["family_size"] == 2
        assert (e["ci_low_adjusted"], e["ci_high_adjusted"]) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
        assert e["ci_low_adjusted"] < e["ci_low"] and e["ci_high"] < e["ci_high_adjusted"]


def test_bonferroni_row_holds_its_family_level_where_cells_alone_do_not():
    """No true difference in any of m = 5 cells (3 vs 3 seeds): the chance that some cell's
    95 % interval excludes 0 is well above 0.05 (at most 1 − 0.95^5 ≈ 0.23; about 0.15, as Welch
    is conservative at 3 seeds a side), and ≤ 0.05 with the adjusted intervals."""
    rng = np.random.default_rng(1)
    x_a, x_b = rng.normal(0.5, 0.05, (2, 4000, 5, 3))
    _, low, high, _ = effects.welch_interval(x_a, x_b)
    _, low_adj, high_adj, _ = effects.welch_interval(x_a, x_b, 1 - 0.05 / 5)
    unadjusted = np.mean(((low > 0) | (high < 0)).any(axis=1))
    adjusted = np.mean(((low_adj > 0) | (high_adj < 0)).any(axis=1))
    assert unadjusted > 0.12 and adjusted <= 0.055


def test_one_seed_and_no_converged_side_give_no_interval():
    scores = table({("bn=affine", 1e-3, "converged"): A, ("bn=nonaffine", 1e-3, "converged"): [0.5],
                    ("bn=none", 1e-3, "not_converged"): Z,
                    ("bn=affine", 1e-2, "converged"): [0.9], ("bn=nonaffine", 1e-2, "converged"): [0.4]})
    out = {(e["weight_decay"], e["a"], e["b"]): e for e in effects.bn_effects(scores)}
    one = out[(1e-3, "affine", "nonaffine")]
    assert one["diff"] == pytest.approx(np.mean(A) - 0.5)
    assert one["ci_low"] is None and one["ci_high"] is None and one["df"] is None
    assert one["no_interval_reason"] == "nonaffine: 1 converged seed"
    assert one["sd_b"] is None and one["n_b"] == 1
    both = out[(1e-2, "affine", "nonaffine")]
    assert both["no_interval_reason"] == "affine: 1 converged seed; nonaffine: 1 converged seed"
    none = out[(1e-3, "affine", "none")]
    assert none["diff"] is None and none["ci_low"] is None and none["mean_b"] is None and none["n_b"] == 0
    assert none["no_interval_reason"] == "no converged none trial at this λ"
    assert out[(1e-2, "affine", "none")]["no_interval_reason"] == "no converged none trial at this λ"
    assert out[(1e-3, "nonaffine", "none")]["set"] == "all"
    assert effects.cell_text(one) == f"{effects.num(one['diff'])} (no CI: nonaffine: 1 converged seed)"
    assert effects.cell_text(none) == "—"


def test_non_converged_trials_are_excluded():
    base = {("bn=affine", 0.0, "converged"): A, ("bn=none", 0.0, "converged"): Z}
    noisy = base | {("bn=affine", 0.0, "not_converged"): [-5.0], ("bn=none", 0.0, "diverged"): [9.0, math.nan],
                    ("bn=affine", 0.0, "failed"): [7.0]}
    clean_out, noisy_out = effects.bn_effects(table(base)), effects.bn_effects(table(noisy))
    assert len(clean_out) == len(noisy_out) == 1
    assert noisy_out == clean_out
    assert (noisy_out[0]["n_a"], noisy_out[0]["n_b"]) == (len(A), len(Z))
    assert effects.cell_text(noisy_out[0]).endswith("] ‡")     # one cell: Bonferroni over m = 1 changes nothing
    assert (noisy_out[0]["ci_low_adjusted"], noisy_out[0]["family_size"]) == (noisy_out[0]["ci_low"], 1)


def test_nan_final_value_and_zero_variance():
    scores = table({("bn=affine", 1e-3, "converged"): [0.8, 0.8, math.nan], ("bn=none", 1e-3, "converged"): [0.2, 0.2]})
    (e,) = effects.bn_effects(scores)
    assert (e["n_a"], e["diff"]) == (2, pytest.approx(0.6))
    assert e["ci_low"] is None and e["no_interval_reason"] == "no seed variance on either side"


def test_report_section_one_table_per_set():
    from analysis.report import _bn_effects_section
    scores = table({("bn=affine, depth=6", 1e-3, "converged"): A, ("bn=none, depth=6", 1e-3, "converged"): Z,
                    ("bn=none, depth=6", 1e-2, "converged"): Z, ("bn=affine, depth=4", 1e-3, "converged"): A,
                    ("bn=nonaffine, depth=4", 1e-3, "converged"): [0.5]})
    text = "\n".join(_bn_effects_section(effects.bn_effects(scores)))
    assert text.startswith("## BN kind: effect sizes at each λ")
    assert "`depth=4`:" in text and "`depth=6`:" in text
    assert "| affine − none | " in text and "| affine − nonaffine | " in text
    assert "(no CI: nonaffine: 1 converged seed)" in text and "| — |" in text
    assert text.rstrip().endswith("![BN kind effect sizes](bn_effects.png)")   # the picture of the tables
    assert _bn_effects_section([]) == []
