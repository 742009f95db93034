"""analysis.stats against brute force and scipy, on small data."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from analysis import stats
from analysis.load import group_labels


def test_rankdata_matches_scipy():
    from scipy.stats import rankdata
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, (5, 9)).astype(float)
    np.testing.assert_array_equal(stats.rankdata(x, axis=1), rankdata(x, axis=1))
    np.testing.assert_array_equal(stats.rankdata(x[0]), rankdata(x[0]))


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 30).astype(float)          # many ties, like λ with seeds
    y = x + rng.normal(0, 2, 30)
    assert stats.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(stats.spearman(np.ones(5), y[:5]))
    assert math.isnan(stats.spearman([1.0, 2.0], [1.0, 2.0]))


def test_spearman_exact_p_for_small_samples():
    r = stats.spearman_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert r.exact and r.statistic == pytest.approx(1.0)
    assert r.p_value == pytest.approx(2 / 120)         # identity and reversal out of 5!
    r = stats.spearman_test([1, 2, 3, 4, 5], [10, 8, 6, 4, 2])
    assert r.statistic == pytest.approx(-1.0) and r.p_value == pytest.approx(2 / 120)


def test_spearman_permutation_p_monte_carlo_is_reproducible():
    rng = np.random.default_rng(1)
    x = np.repeat(np.arange(8.0), 4)
    strong = stats.spearman_test(x, x + rng.normal(0, 0.5, 32), n_perm=999, seed=3)
    assert not strong.exact and strong.p_value == pytest.approx(1 / 1000)
    noise = rng.normal(size=32)
    a, b = stats.spearman_test(x, noise, 999, seed=5), stats.spearman_test(x, noise, 999, seed=5)
    assert a == b and 0.01 < a.p_value <= 1


def brute_jt(values, levels):
    J = 0.0
    for i, j in itertools.product(range(len(values)), repeat=2):
        if levels[i] < levels[j]:
            J += 1.0 if values[i] < values[j] else 0.5 if values[i] == values[j] else 0.0
    return J


def test_jonckheere_statistic_matches_brute_force():
    rng = np.random.default_rng(2)
    levels = np.repeat([1e-4, 1e-3, 1e-2], 4)
    values = rng.integers(0, 4, 12).astype(float)
    assert stats.jonckheere_statistic(values, levels)[0] == brute_jt(values, levels)
    many = rng.normal(size=(3, 12))
    np.testing.assert_allclose(stats.jonckheere_statistic(many, levels), [brute_jt(v, levels) for v in many])


def test_jonckheere_test_sign_and_p():
    levels = np.repeat([1.0, 2.0, 3.0, 4.0], 3)
    rising = levels + np.tile([0.0, 0.1, 0.2], 4)
    r, z = stats.jonckheere_test(rising, levels, n_perm=1999)
    assert r.statistic == 54 and z > 3 and r.p_value < 0.01    # every cross-level pair ordered
    r, z = stats.jonckheere_test(-rising, levels, n_perm=1999)
    assert r.statistic == 0 and z < -3 and r.p_value < 0.01
    r, z = stats.jonckheere_test(rising, np.ones(12))
    assert math.isnan(r.p_value) and math.isnan(z)


def test_group_labels_name_only_the_params_that_differ():
    params = [{"bn": "affine", "depth": 6, "weight_decay": 1e-4, "seed": 0, "width": 300},
              {"bn": "none", "depth": 6, "weight_decay": 1e-3, "seed": 1, "width": 300},
              {"bn": "none", "depth": 15, "weight_decay": 1e-3, "seed": 1, "width": 300}]
    assert group_labels(params) == ["depth=6, bn=affine", "depth=6, bn=none", "depth=15, bn=none"]  # TrialConfig order
    assert group_labels(params[:1]) == ["all"]
    assert group_labels([{"bn": "a", "seed": 0}, {"bn": "a", "seed": 1}]) == ["all", "all"]


def test_group_labels_show_data_paths_by_their_shortest_distinct_tail():
    params = [{"data_path": "/work/shared/datasets/conic.npz", "bn": "affine"},
              {"data_path": "/work/shared/datasets/mlp_3.npz", "bn": "affine"},
              {"data_path": "/work/shared/datasets/mlp_3.npz", "bn": "none"}]
    assert group_labels(params) == ["data_path=conic.npz, bn=affine", "data_path=mlp_3.npz, bn=affine",
                                    "data_path=mlp_3.npz, bn=none"]
    same_name = [{"data_path": "/a/run1/x.npz"}, {"data_path": "/a/run2/x.npz"}, {"data_path": None}]
    assert group_labels(same_name) == ["data_path=run1/x.npz", "data_path=run2/x.npz", "data_path=-"]
