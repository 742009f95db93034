"""study.metrics against float64 brute-force loops, closed forms, invariances, degenerate inputs.

Every reference below is rebuilt from the definitions of docs/science.md §4 with explicit loops
over samples, pairs and classes (numpy float64), so it shares no code with study.metrics.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from study import metrics
from study.metrics import CLASSIFIER_KEYS, COSINE_KEYS, LAYER_KEYS, layer_key, measure

SIZES = (5, 11, 20, 24)          # unbalanced, N = 60
SINGLETON = (1, 9, 20, 30)       # a class of one sample


# ------------------------------------------------------------------ data

def labels(sizes, g: np.random.Generator) -> np.ndarray:
    y = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return g.permutation(y)


def random_problem(sizes=SIZES, D=7, n_layers=3, seed=0, offset=0.0, C_all=None):
    """Clustered features for `n_layers` blocks (D_l varies), classifier W (C_all, D), bias b."""
    g = np.random.default_rng(seed)
    y = labels(sizes, g)
    C_all = C_all or len(sizes)
    layers = []
    for l in range(n_layers):
        D_l = D if l == n_layers - 1 else D - 2 + l
        centres = g.normal(size=(C_all, D_l)) * (1 + l)
        layers.append(centres[y] + g.normal(size=(len(y), D_l)) + offset)
    W = g.normal(size=(C_all, D))
    b = g.normal(size=C_all) * 0.3
    return layers, y, W, b


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# ------------------------------------------------------------------ brute-force references

def ref_cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
    return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def ref_cosines(H, y, center: bool) -> dict[str, float]:
    """Mean of cos(h_i, h_j) over ALL pairs (i, j), i = j included, per class pair."""
    X = H - H.mean(axis=0) if center else H
    classes = sorted(set(y.tolist()))
    idx = {c: np.flatnonzero(y == c) for c in classes}
    n = {c: len(idx[c]) for c in classes}
    G = {}
    for a in classes:
        for b in classes:
            total = 0.0
            for i in idx[a]:
                for j in idx[b]:
                    total += ref_cos(X[i], X[j])
            G[a, b] = total / (n[a] * n[b])
    intra = {c: G[c, c] for c in classes}
    inter = {(a, b): G[a, b] for a in classes for b in classes if a != b}
    out = {
        "intra_min": min(intra.values()),
        "intra_mean": sum(n[c] * intra[c] for c in classes) / sum(n.values()),
        "inter_max": max(inter.values()),
        "inter_mean": (sum(n[a] * n[b] * v for (a, b), v in inter.items())
                       / sum(n[a] * n[b] for (a, b) in inter)),
    }
    out["nc_score"] = out["intra_min"] - out["inter_max"]
    return out


def ref_class_means(H, y):
    classes = sorted(set(y.tolist()))
    mu = {c: H[y == c].mean(axis=0) for c in classes}
    return classes, mu, H.mean(axis=0)


def ref_nc1(H, y) -> float:
    classes, mu, mu_G = ref_class_means(H, y)
    N, D = H.shape
    C = len(classes)
    Sigma_W = np.zeros((D, D))
    for i in range(N):
        r = H[i] - mu[y[i]]
        Sigma_W += np.outer(r, r)
    Sigma_W /= N
    Sigma_B = sum(np.outer(mu[c] - mu_G, mu[c] - mu_G) for c in classes) / C
    lam, V = np.linalg.eigh(Sigma_B)                     # ascending
    top = np.argsort(lam)[::-1][:min(C - 1, D)]
    pinv = sum(np.outer(V[:, k], V[:, k]) / lam[k] for k in top)
    return float(np.trace(Sigma_W @ pinv)) / C


def ref_nc2(H, y) -> dict[str, float]:
    classes, mu, mu_G = ref_class_means(H, y)
    C = len(classes)
    m = {c: mu[c] - mu_G for c in classes}
    norms = [math.sqrt(float(m[c] @ m[c])) for c in classes]
    cos = [ref_cos(m[a], m[b]) for a in classes for b in classes if a < b]
    return {
        "nc2_equinorm": float(np.std(norms) / np.mean(norms)),
        "nc2_equiangular": float(np.std(cos)),
        "nc2_maxangle": float(np.mean([abs(c + 1 / (C - 1)) for c in cos])),
    }


def ref_ncc_labels(H, y) -> np.ndarray:
    classes, mu, _ = ref_class_means(H, y)
    out = np.empty(len(H), dtype=int)
    for i in range(len(H)):
        dist = [float((H[i] - mu[c]) @ (H[i] - mu[c])) for c in classes]
        out[i] = classes[int(np.argmin(dist))]
    return out


def ref_cdnv(H, y) -> float:
    classes, mu, _ = ref_class_means(H, y)
    var = {c: np.mean([float((h - mu[c]) @ (h - mu[c])) for h in H[y == c]]) for c in classes}
    ratios = [(var[a] + var[b]) / (2 * float((mu[a] - mu[b]) @ (mu[a] - mu[b])))
              for a in classes for b in classes if a < b]
    return float(np.mean(ratios))


def ref_layer(H, y) -> dict[str, float]:
    out = ref_cosines(H, y, center=True)
    out |= {"raw_" + k: v for k, v in ref_cosines(H, y, center=False).items()}
    out["nc1"] = ref_nc1(H, y)
    out |= ref_nc2(H, y)
    out["ncc_acc"] = float(np.mean(ref_ncc_labels(H, y) == y))
    out["cdnv"] = ref_cdnv(H, y)
    return out


def ref_classifier(H, y, W, b) -> dict[str, float]:
    classes, mu, mu_G = ref_class_means(H, y)
    N, C_all = len(H), len(W)
    losses, preds = [], []
    for i in range(N):
        z = W @ H[i] + (b if b is not None else 0.0)
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        losses.append(lse - z[y[i]])
        preds.append(int(np.argmax(z)))
    train_loss = sum(losses) / N
    preds = np.array(preds)
    Wp = W[classes]                                          # present classes only
    M = np.stack([mu[c] - mu_G for c in classes], axis=1)   # (D, C)
    nc3 = float(np.sum((Wp / np.linalg.norm(Wp) - M.T / np.linalg.norm(M)) ** 2))
    alpha = math.sqrt(sum(float(h @ h) for h in H) / N)
    beta = math.sqrt(float(np.sum(W * W))) / math.sqrt(C_all)
    pi_max = max(int(np.sum(y == c)) for c in classes) / N
    floor = math.log(1 + (C_all - 1) * math.exp(-C_all / (C_all - 1) * alpha * beta
                                                  * math.sqrt(C_all * pi_max)))
    return {
        "nc3": nc3,
        "nc4": float(np.mean(ref_ncc_labels(H, y) != preds)),
        "train_loss": train_loss,
        "train_acc": float(np.mean(preds == y)),
        "alpha": alpha,
        "beta": beta,
        "loss_floor": floor,
        "loss_gap": train_loss - floor,
    }


def ref_measure(layers, y, W=None, b=None, epsilon=0.01) -> dict[str, float]:
    out, accs = {}, []
    for l, H in enumerate(layers, start=1):
        layer = ref_layer(H, y)
        out |= {layer_key(l, k): v for k, v in layer.items()}
        accs.append(layer["ncc_acc"])
    out |= layer
    if W is not None:
        out |= ref_classifier(layers[-1], y, W, b)
    L = len(layers) + 1
    out["effective_depth"] = float(next((l for l, a in enumerate(accs, 1) if 1 - a <= epsilon), L))
    return out


def assert_close(got: dict, want: dict, rel: float, abs_: float, keys=None) -> None:
    keys = sorted(want) if keys is None else keys
    bad = [f"{k}: got {got[k]!r}, want {want[k]!r}" for k in keys
           if not got[k] == pytest.approx(want[k], rel=rel, abs=abs_)]
    assert not bad, "\n".join(bad)


def run_measure(layers, y, W=None, b=None, dtype=torch.float64, **kw) -> dict[str, float]:
    return measure([t(H).to(dtype) for H in layers], t(y),
                   None if W is None else t(W).to(dtype),
                   None if b is None else t(b).to(dtype), **kw)


# ------------------------------------------------------------------ 1. brute force, float64

def test_metric_names_follow_the_contract():
    layers, y, W, b = random_problem()
    out = run_measure(layers, y, W, None, num_classes=4)
    per_layer = {layer_key(l, k) for l in (1, 2, 3) for k in LAYER_KEYS}
    assert set(out) == per_layer | set(LAYER_KEYS) | set(CLASSIFIER_KEYS) | {"effective_depth"}
    assert set(COSINE_KEYS) == {"intra_min", "intra_mean", "inter_max", "inter_mean", "nc_score"}


@pytest.mark.parametrize("sizes, seed", [(SIZES, 0), (SINGLETON, 1), ((7, 3, 12), 2), ((9, 21), 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_measure_matches_brute_force_float64(sizes, seed, with_bias):
    layers, y, W, b = random_problem(sizes, seed=seed)
    b = b if with_bias else None
    got = run_measure(layers, y, W, b, num_classes=len(sizes))
    want = ref_measure(layers, y, W, b)
    assert set(got) == set(want)
    assert_close(got, want, rel=1e-9, abs_=1e-12)


def test_each_function_matches_brute_force():
    """The building blocks one by one (so a failure names the function)."""
    (H,), y, W, b = random_problem(n_layers=1, seed=5)
    stats = metrics.class_stats(t(H), t(y))
    for center, prefix in ((True, ""), (False, "raw_")):
        got = metrics.cosine_summary(metrics.cosine_matrix(stats, center=center), stats.n, prefix)
        want = ref_cosines(H, y, center)
        assert_close(got, {prefix + k: v for k, v in want.items()}, rel=1e-10, abs_=1e-13)
    assert metrics.nc1(stats) == pytest.approx(ref_nc1(H, y), rel=1e-10)
    assert_close(metrics.nc2(stats), ref_nc2(H, y), rel=1e-10, abs_=1e-13)
    assert metrics.cdnv(stats) == pytest.approx(ref_cdnv(H, y), rel=1e-10)
    ncc = metrics.ncc_predict(stats)
    assert (stats.classes[ncc].numpy() == ref_ncc_labels(H, y)).all()
    assert metrics.ncc_accuracy(stats) == np.mean(ref_ncc_labels(H, y) == y)
    want = ref_classifier(H, y, W, b)
    assert metrics.nc3(t(W), stats) == pytest.approx(want["nc3"], rel=1e-10)
    got = metrics.classifier_metrics(stats, t(W), t(b), t(y))
    assert_close(got, want, rel=1e-10, abs_=1e-13)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_chunked_sweeps_match_brute_force(monkeypatch, dtype, tol):
    """class_stats sweeps H in row chunks: chunks of 5 rows (a ragged last one) change nothing."""
    layers, y, W, b = random_problem(SINGLETON, seed=6)
    whole = run_measure(layers, y, W, b, dtype=dtype, num_classes=4)
    monkeypatch.setattr(metrics, "CHUNK_BYTES", 5 * 7 * torch.finfo(dtype).bits // 8)
    chunked = run_measure(layers, y, W, b, dtype=dtype, num_classes=4)
    assert_close(chunked, whole, rel=tol, abs_=tol)
    want = ref_measure([H.astype(np.float32).astype(np.float64) if dtype == torch.float32 else H
                        for H in layers], y, W.astype(np.float32).astype(np.float64) if dtype == torch.float32
                       else W, b.astype(np.float32).astype(np.float64) if dtype == torch.float32 else b)
    assert_close(chunked, want, rel=tol, abs_=tol)


def test_cosine_matrix_is_the_mean_over_all_pairs():
    """Entry (c, c') of the (C, C) matrix, pair by pair (i = j included on the diagonal)."""
    (H,), y, _, _ = random_problem(SINGLETON, n_layers=1, seed=7)
    stats = metrics.class_stats(t(H), t(y))
    G = metrics.cosine_matrix(stats, center=True).numpy()
    X = H - H.mean(axis=0)
    for a in range(4):
        for c in range(4):
            pairs = [ref_cos(X[i], X[j]) for i in np.flatnonzero(y == a) for j in np.flatnonzero(y == c)]
            assert G[a, c] == pytest.approx(np.mean(pairs), rel=1e-10, abs=1e-13)
    assert G[0, 0] == pytest.approx(1.0)   # the singleton class: cos(h, h) = 1


def test_effective_depth_rule():
    assert metrics.effective_depth([0.5, 0.98, 0.995, 1.0], depth=5) == 3
    assert metrics.effective_depth([0.5, 0.98, 0.995, 1.0], depth=5, epsilon=0.05) == 2
    assert metrics.effective_depth([0.5, 0.9], depth=3) == 3        # none reaches: L
    assert metrics.effective_depth([1.0, 0.5], depth=3) == 1
    assert metrics.effective_depth([0.9, 0.99], depth=3) == 2        # 1 - 0.99 = 0.01 is <= 0.01


def test_effective_depth_in_measure_uses_layer_ncc():
    """Block 1 is noise, blocks 2-3 collapsed: effective depth 2; all noise: depth L."""
    g = np.random.default_rng(3)
    y = labels(SIZES, g)
    noise = g.normal(size=(60, 5))
    collapsed = g.normal(size=(4, 5))[y]
    out = run_measure([noise, collapsed, collapsed], y, num_classes=4, depth=4)
    assert out["layer01/ncc_acc"] < 0.99 and out["effective_depth"] == 2.0
    out = run_measure([noise, noise], y, num_classes=4, depth=7)
    assert out["effective_depth"] == 7.0


def test_loss_floor_formula():
    """docs/science.md §4, written out: balanced C = 4 and the unbalanced sqrt(C pi_max) factor."""
    a, b_ = 1.3, 0.7
    for C, pi_max in ((4, 0.25), (4, 0.55), (2, 0.9), (10, 0.1)):
        want = math.log(1 + (C - 1) * math.exp(-C / (C - 1) * a * b_ * math.sqrt(C * pi_max)))
        assert metrics.loss_floor(a, b_, C, pi_max) == pytest.approx(want, rel=1e-14)
    assert metrics.loss_floor(0.0, 1.0, 4, 0.25) == pytest.approx(math.log(4))


# ------------------------------------------------------------------ 1b. float32 input

@pytest.mark.parametrize("sizes, seed, offset", [(SIZES, 11, 0.0), (SINGLETON, 12, 0.0), (SIZES, 13, 4.0)])
def test_float32_agrees_with_float64_reference(sizes, seed, offset):
    layers, y, W, b = random_problem(sizes, seed=seed, offset=offset)
    layers32 = [H.astype(np.float32) for H in layers]
    W32 = W.astype(np.float32)
    got = run_measure(layers32, y, W32, None, dtype=torch.float32, num_classes=4)
    want = ref_measure([H.astype(np.float64) for H in layers32], y, W32.astype(np.float64))
    assert_close(got, want, rel=1e-4, abs_=1e-5)


def test_float32_at_production_size_agrees_with_float64():
    """N = 6000, D = 64, post-ReLU-like offset features, tight classes: float32 within 1e-4."""
    g = torch.Generator().manual_seed(0)
    N, D, C = 6000, 64, 4
    y = torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.1]), N, replacement=True, generator=g)
    centres = torch.randn(C, D, generator=g, dtype=torch.float64)
    H = (torch.relu(centres[y] + 0.1 * torch.randn(N, D, generator=g, dtype=torch.float64)) + 2.0)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    H32 = H.float()
    got = measure([H32, H32], y, W.float(), num_classes=C)
    want = measure([H32.double(), H32.double()], y, W.float().double(), num_classes=C)
    assert_close(got, want, rel=1e-4, abs_=1e-6)


# ------------------------------------------------------------------ 2. closed forms

def simplex_etf(C: int, D: int, seed: int) -> np.ndarray:
    """(C, D) unit vertices of a centred simplex ETF embedded in R^D by a random isometry."""
    E = math.sqrt(C / (C - 1)) * (np.eye(C) - np.ones((C, C)) / C)    # rows: centred, unit
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(D, C)))
    return E @ Q.T


def etf_expectations(C: int) -> dict[str, float]:
    return {"intra_min": 1.0, "intra_mean": 1.0, "inter_max": -1 / (C - 1),
            "inter_mean": -1 / (C - 1), "nc_score": 1 + 1 / (C - 1)}


@pytest.mark.parametrize("C, D", [(4, 6), (3, 5), (5, 5)])
def test_simplex_etf_closed_form(C, D):
    """Balanced classes collapsed onto a scaled ETF, shifted by a common vector."""
    V = simplex_etf(C, D, seed=C)                                      # (C, D)
    g = np.random.default_rng(C)
    y = g.permutation(np.repeat(np.arange(C), 6))
    shift = g.normal(size=D) * 3
    H = 2.5 * V[y] + shift
    W = 0.7 * V                                                         # normalised centred means
    out = run_measure([H, H], y, W, num_classes=C)
    for prefix in ("", "layer01/", "layer02/"):
        assert_close({k: out[prefix + k] for k in COSINE_KEYS}, etf_expectations(C), rel=0, abs_=1e-12)
        for key in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "cdnv"):
            assert out[prefix + key] == pytest.approx(0.0, abs=1e-12), key
        assert out[prefix + "ncc_acc"] == 1.0
    assert out["nc3"] == pytest.approx(0.0, abs=1e-12)
    assert out["effective_depth"] == 1.0


@pytest.mark.parametrize("C", [2, 4, 6])
def test_simplex_etf_through_origin_unbalanced(C):
    """No shift, unbalanced classes: the raw cosines are the ETF's; NC4 = 0 with W on the ETF;
    with balanced classes the Theorem 2.3.1 floor is attained (loss_gap = 0)."""
    D = C + 2
    V = simplex_etf(C, D, seed=10 + C)
    g = np.random.default_rng(C)
    sizes = [3 + 4 * c for c in range(C)]
    y = g.permutation(np.repeat(np.arange(C), sizes))
    H = 1.7 * V[y]
    out = run_measure([H], y, 1.3 * V, num_classes=C)
    assert_close({k: out["raw_" + k] for k in COSINE_KEYS}, etf_expectations(C), rel=0, abs_=1e-12)
    assert out["nc1"] == pytest.approx(0.0, abs=1e-12)
    assert out["cdnv"] == pytest.approx(0.0, abs=1e-12)
    assert out["ncc_acc"] == 1.0 and out["nc4"] == 0.0 and out["train_acc"] == 1.0
    assert out["loss_gap"] > 1e-3                  # unbalanced: the floor is not attained
    y_bal = g.permutation(np.repeat(np.arange(C), 5))
    out = run_measure([1.7 * V[y_bal]], y_bal, 1.3 * V, num_classes=C)
    assert out["alpha"] == pytest.approx(1.7) and out["beta"] == pytest.approx(1.3)
    assert out["loss_gap"] == pytest.approx(0.0, abs=1e-12)


def test_fully_collapsed_classes_not_etf():
    g = np.random.default_rng(4)
    y = labels(SIZES, g)
    mu = g.normal(size=(4, 7)) + 1.0
    H = mu[y]
    out = run_measure([H], y, num_classes=4)
    for key in ("intra_min", "intra_mean", "raw_intra_min", "raw_intra_mean"):
        assert out[key] == pytest.approx(1.0, abs=1e-12), key
    assert out["nc1"] == pytest.approx(0.0, abs=1e-12)
    assert out["cdnv"] == pytest.approx(0.0, abs=1e-12)
    assert out["ncc_acc"] == 1.0
    assert out["inter_max"] > -1 / 3 + 1e-3        # not an ETF: inter is not -1/(C-1)
    assert out["nc2_equiangular"] > 1e-3


# ------------------------------------------------------------------ 3. invariances

SCALE_INVARIANT = tuple(k for k in LAYER_KEYS) + ("nc3", "nc4", "train_acc", "effective_depth")


def test_relabelling_classes_changes_nothing():
    layers, y, W, b = random_problem(SIZES, seed=21)
    perm = np.array([2, 0, 3, 1])
    W2, b2 = np.empty_like(W), np.empty_like(b)
    W2[perm], b2[perm] = W, b
    before = run_measure(layers, y, W, b, num_classes=4)
    after = run_measure(layers, perm[y], W2, b2, num_classes=4)
    assert_close(after, before, rel=1e-10, abs_=1e-13)


@pytest.mark.parametrize("scale", [1e-3, 0.37, 58.0])
def test_positive_scaling(scale):
    layers, y, W, _ = random_problem(SIZES, seed=22)
    before = run_measure(layers, y, W, num_classes=4)
    after = run_measure([scale * H for H in layers], y, W, num_classes=4)
    keys = [layer_key(l, k) for l in (1, 2, 3) for k in LAYER_KEYS] + list(SCALE_INVARIANT)
    assert_close(after, before, rel=1e-9, abs_=1e-12, keys=keys)
    assert after["alpha"] == pytest.approx(scale * before["alpha"], rel=1e-12)
    after_w = run_measure(layers, y, scale * W, num_classes=4)    # scaling W too
    assert_close(after_w, before, rel=1e-9, abs_=1e-12, keys=["nc3", "nc4", "train_acc"])


def test_translation_leaves_centred_measures():
    layers, y, W, _ = random_problem(SIZES, seed=23)
    g = np.random.default_rng(0)
    shifted = [H + 3 * g.normal(size=H.shape[1]) for H in layers]
    before = run_measure(layers, y, W, num_classes=4)
    after = run_measure(shifted, y, W, num_classes=4)
    invariant = COSINE_KEYS + ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "ncc_acc", "cdnv")
    keys = [layer_key(l, k) for l in (1, 2, 3) for k in invariant] + ["nc3"]
    assert_close(after, before, rel=1e-9, abs_=1e-12, keys=keys)
    assert after["raw_intra_min"] != pytest.approx(before["raw_intra_min"], rel=1e-3)


# ------------------------------------------------------------------ 4. degenerate inputs

def assert_no_nan(out: dict) -> None:
    nan = [k for k, v in out.items() if math.isnan(v)]
    assert not nan, f"NaN in {nan}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_rows_count_as_cosine_zero(dtype):
    """Integer features whose sum is 0: a zero row is zero both raw and centred (mu_G = 0)."""
    g = np.random.default_rng(8)
    y = labels(SIZES, g)
    H = g.integers(-4, 5, size=(60, 7)).astype(np.float64)
    H[3] = 0.0
    last = 59 if 59 != 3 else 58
    H[last] = 0.0
    H[last] = -H.sum(axis=0)
    assert (H.sum(axis=0) == 0).all()
    W = g.normal(size=(4, 7))
    got = run_measure([H], y, W, dtype=dtype, num_classes=4)
    assert_no_nan(got)
    want = ref_measure([H], y, W)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert_close(got, want, rel=tol, abs_=tol)


@pytest.mark.parametrize("D", [1, 2])
def test_fewer_dimensions_than_classes(D):
    """D < C - 1: Sigma_B has rank D, NC1 inverts the top min(C-1, D) eigenpairs."""
    layers, y, W, b = random_problem(SIZES, D=D + 2, n_layers=1, seed=30 + D)
    H = layers[0][:, :D]
    got = run_measure([H], y, W[:, :D], b, num_classes=4)
    assert_no_nan(got)
    assert_close(got, ref_measure([H], y, W[:, :D], b), rel=1e-9, abs_=1e-12)


def test_absent_class_is_left_out():
    """Labels {0, 1, 3} of C = 4: measures over the 3 present classes; the classifier keeps
    all 4 logits (train_loss, beta, loss_floor use C = 4, nc3 the present rows)."""
    layers, y, W, b = random_problem((5, 11, 0, 24), seed=40)
    assert set(y.tolist()) == {0, 1, 3}
    got = run_measure(layers, y, W, b, num_classes=4)
    assert_no_nan(got)
    assert_close(got, ref_measure(layers, y, W, b), rel=1e-9, abs_=1e-12)
    assert got["nc2_maxangle"] == pytest.approx(ref_nc2(layers[-1], y)["nc2_maxangle"])   # 1/(C-1) = 1/2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_features_identical(dtype):
    g = np.random.default_rng(9)
    y = labels(SIZES, g)
    H = np.tile(g.normal(size=7) + 0.3, (60, 1))
    out = run_measure([H, H], y, g.normal(size=(4, 7)), dtype=dtype, num_classes=4)
    assert_no_nan(out)
    for prefix in ("", "raw_"):
        for key in COSINE_KEYS[:4]:
            assert -1 - 1e-6 <= out[prefix + key] <= 1 + 1e-6
    assert out["nc_score"] == pytest.approx(0.0, abs=1e-6)


def test_single_sample_classes_and_constant_classes():
    """Every class a singleton, and a layer of all-zero features: no NaN."""
    g = np.random.default_rng(10)
    y = np.arange(4)
    H = g.normal(size=(4, 3))
    out = run_measure([H, np.zeros((4, 3))], y, g.normal(size=(4, 3)), num_classes=4)
    assert_no_nan(out)
    assert out["layer01/intra_min"] == pytest.approx(1.0)
    assert out["layer01/nc1"] == pytest.approx(0.0, abs=1e-20)
    assert out["layer01/cdnv"] == pytest.approx(0.0, abs=1e-20)
    assert out["layer01/ncc_acc"] == 1.0


def test_one_present_class_is_refused():
    H = torch.randn(10, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 2 classes"):
        measure([H], torch.full((10,), 2), num_classes=4)
    with pytest.raises(ValueError):
        measure([], torch.arange(10) % 2)


# ------------------------------------------------------------------ 5. the loss floor

def test_train_loss_never_below_loss_floor_random_search():
    """Random features and weights of many scales, unbalanced labels, partly aligned W."""
    g = torch.Generator().manual_seed(123)
    worst = math.inf
    for trial in range(200):
        C = int(torch.randint(2, 8, (1,), generator=g))
        D = int(torch.randint(1, 10, (1,), generator=g))
        N = int(torch.randint(C, 50, (1,), generator=g))
        probs = torch.rand(C, generator=g) ** 3 + 1e-3
        y = torch.multinomial(probs, N, replacement=True, generator=g)
        if len(y.unique()) < 2:
            continue
        mu = torch.randn(C, D, generator=g, dtype=torch.float64)
        spread = 10 ** (4 * float(torch.rand(1, generator=g)) - 3)
        H = mu[y] + spread * torch.randn(N, D, generator=g, dtype=torch.float64)
        H = H * 10 ** (3 * float(torch.rand(1, generator=g)) - 1.5)
        mix = float(torch.rand(1, generator=g))       # W from aligned (class means) to random
        W = (1 - mix) * (mu - mu.mean(dim=0)) + mix * torch.randn(C, D, generator=g, dtype=torch.float64)
        W = W * 10 ** (3 * float(torch.rand(1, generator=g)) - 1.5)
        stats = metrics.class_stats(H, y, C)
        out = metrics.classifier_metrics(stats, W, None, y)
        assert out["train_loss"] >= out["loss_floor"] - 1e-12, (trial, out)
        worst = min(worst, out["loss_gap"])
    assert worst < 0.05        # the search came close to the floor somewhere


def test_loss_floor_holds_for_optimised_unbalanced_features():
    """Minimise CE over H, W with fixed alpha, beta for pi = (.55, .15, .15, .15): the loss
    stays above the corrected floor but goes below the thesis' uncorrected m (docs/science.md §4),
    so the sqrt(C pi_max) factor matters."""
    torch.manual_seed(0)
    C, D, alpha, beta = 4, 4, 1.0, 1.0
    y = torch.tensor([0] * 11 + [1] * 3 + [2] * 3 + [3] * 3)
    N = len(y)
    H_free = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    W_free = torch.randn(C, D, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([H_free, W_free], lr=0.05)

    def scaled():
        H = alpha * H_free / H_free.pow(2).sum(dim=1).mean().sqrt()
        W = beta * math.sqrt(C) * W_free / W_free.norm()
        return H, W

    for _ in range(300):
        H, W = scaled()
        loss = torch.nn.functional.cross_entropy(H @ W.T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    H, W = (a.detach() for a in scaled())
    out = metrics.classifier_metrics(metrics.class_stats(H, y, C), W, None, y)
    assert out["alpha"] == pytest.approx(alpha) and out["beta"] == pytest.approx(beta)
    thesis_m = math.log(1 + (C - 1) * math.exp(-C / (C - 1) * alpha * beta))
    assert out["loss_floor"] <= out["train_loss"] < thesis_m


# ------------------------------------------------------------------ 6. streamed measurement

def streaming_model(kind: str, placement: str, shape: tuple[int, ...], C: int = 4) -> torch.nn.Module:
    """A float64 model of `kind` with running buffers moved away from 0 and 1 (so running and
    exact statistics differ) and a classifier bias."""
    from types import SimpleNamespace
    from study.models import build_model
    torch.manual_seed(3)
    model = build_model(SimpleNamespace(model=kind, depth=3, width=6, bn="affine", bn_placement=placement,
                                        bias=True), shape, C).double()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(20, *shape, dtype=torch.float64) + 0.5)
    return model.eval()


@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("bn_stats", ["exact", "running"])
@pytest.mark.parametrize("kind, placement, shape", [("mlp", "every", (16,)), ("mlp", "last", (16,)),
                                                    ("cnn", "every", (2, 6, 6)), ("cnn", "last", (30,)),
                                                    ("resnet", "every", (30,))])
def test_measure_stream_equals_in_memory(kind, placement, shape, bn_stats, chunk_rows, monkeypatch):
    """Same features (float64 model), batches of 23 rows (ragged last), labels {0, 1, 3} of
    C = 4: every measure within 1e-6 of measure(model.hidden(X, bn_stats), ...)."""
    model = streaming_model(kind, placement, shape)
    g = np.random.default_rng(0)
    y = t(g.choice([0, 1, 3], size=130, p=[0.5, 0.2, 0.3]))
    X = torch.randn(130, *shape, dtype=torch.float64) + 0.3
    W, b = model.classifier.weight, model.classifier.bias
    if chunk_rows:                             # class sweeps split inside each batch too
        monkeypatch.setattr(metrics, "CHUNK_BYTES", chunk_rows * 6 * 8)
    with torch.no_grad():
        want = measure(model.hidden(X, bn_stats), y, W, b, num_classes=4)
    got = metrics.measure_stream(model, X, y, W, b, num_classes=4, bn_stats=bn_stats, batch_size=23)
    n_layers = 2 if kind == "mlp" else 3                      # depth 3: L-1 blocks, or 3 conv blocks
    assert got.keys() == want.keys()
    assert len(want) == (n_layers + 1) * len(LAYER_KEYS) + len(CLASSIFIER_KEYS) + 1
    bad = [f"{k}: {got[k]!r} vs {want[k]!r}" for k in want if abs(got[k] - want[k]) > 1e-6 * max(1.0, abs(want[k]))]
    assert not bad, "\n".join(bad)
    assert want["train_acc"] < 1.0 and 0 < want["nc4"] < 1       # the counted parts are exercised


def test_measure_stream_without_classifier_and_with_a_wrong_one():
    model = streaming_model("mlp", "every", (16,))
    X, y = torch.randn(40, 16, dtype=torch.float64), torch.arange(40) % 4
    got = metrics.measure_stream(model, X, y, num_classes=4, batch_size=9)
    assert "nc3" not in got and "layer02/nc1" in got and "layer03/nc1" not in got
    with pytest.raises(ValueError, match="classifier W"):
        metrics.measure_stream(model, X, y, torch.zeros(4, 5, dtype=torch.float64), batch_size=9)


def test_accumulator_state_does_not_grow_with_N():
    """Fed N = 100 or N = 5000 rows in batches of 50, the accumulator holds the same O(C D)
    numbers, none of them per sample, and gives class_stats' result on the whole matrix."""
    C, D = 4, 16
    held = {}
    for N in (100, 5000):
        g = torch.Generator().manual_seed(N)
        y = torch.randint(0, C, (N,), generator=g)
        H = torch.randn(C, D, generator=g, dtype=torch.float64)[y] + torch.randn(N, D, generator=g, dtype=torch.float64)
        acc = metrics.ClassStatsAccumulator(torch.bincount(y, minlength=C))
        for start in range(0, N, 50):
            acc.sweep1(H[start:start + 50], y[start:start + 50])
        acc.finish_sweep1()
        for start in range(0, N, 50):
            acc.sweep2(H[start:start + 50], y[start:start + 50])
        held[N] = acc.state_numel()
        assert all(N not in v.shape for v in vars(acc).values() if isinstance(v, torch.Tensor))
        streamed, whole = acc.result(), metrics.class_stats(H, y, C)
        assert streamed.H is None and streamed.ncc is None
        assert torch.allclose(streamed.u_bar, whole.u_bar, rtol=1e-10, atol=1e-13)
        assert torch.allclose(streamed.mu_c, whole.mu_c, rtol=1e-10, atol=1e-13)
        assert metrics.layer_metrics(streamed) == pytest.approx(metrics.layer_metrics(whole, whole.ncc), rel=1e-10)
    assert held[100] == held[5000] <= 10 * C * D + 4 * D + 4 * C * C
