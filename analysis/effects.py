"""Effect sizes of the BN kind: affine vs non-affine vs no BN at each weight decay λ.

The thesis (Fig 3.1, docs/science.md §6) finds NC strongest with affine BN, much weaker with
non-affine BN, and hurt by λ without BN. Here that is measured, not tested: groups that
differ only in `bn` form a comparison set, and per set, λ and pair of BN kinds (a, b), on
converged trials with a finite final metric x (one value per seed):

    d  = x̄_a − x̄_b                                   x̄: mean over seeds
    se = sqrt(s_a²/n_a + s_b²/n_b)                    s: SD over seeds (ddof = 1)
    ν  = se⁴ / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1))     Welch–Satterthwaite
    d ± t_{ν, (1 + level)/2} · se

One interval per cell; none where a side has < 2 seeds. A claim such as "a beats b" is read
over the λ of a set, so each cell also carries its interval at the Bonferroni level
1 − (1 − level)/m, m = the cells of the same set and pair that have an interval: all m of
them cover their true differences together with probability ≥ level.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from scipy.special import stdtrit

from .frame import CONVERGED
from .verdict import interval, num

PAIRS = (("affine", "nonaffine"), ("affine", "none"), ("nonaffine", "none"))
CLAIM = "affine vs non-affine vs no BN at each λ: differences of seed means of the final nc_score"


def ci_of(metric: str = "nc_score") -> str:
    return (f"difference of seed means of final {metric} (a − b), Welch t-interval, per cell, "
            "not adjusted for multiplicity (ci_*_adjusted: Bonferroni over the pair's λ cells in its set)")


def set_label(group: str) -> str:
    """The comparison set of an architecture group: its label without the `bn=…` part.

    A group label lists every param (but λ, seed, device) that varies between groups
    (`load.group_labels`), so two groups share this label iff they differ only in `bn`.
    Split only at ', ' followed by 'key=', so a value holding ', ' stays whole."""
    parts = re.split(r", (?=[A-Za-z_]\w*=)", group)
    return ", ".join(p for p in parts if not p.startswith("bn=")) or "all"


def welch_interval(x_a: np.ndarray, x_b: np.ndarray, level: float = 0.95):
    """(d, low, high, ν) of the Welch t-interval for mean(x_a) − mean(x_b) along the last
    axis (the formula in the module docstring); x_a (…, n_a), x_b (…, n_b), n >= 2."""
    x_a, x_b = np.asarray(x_a, np.float64), np.asarray(x_b, np.float64)
    n_a, n_b = x_a.shape[-1], x_b.shape[-1]
    v_a, v_b = x_a.var(axis=-1, ddof=1) / n_a, x_b.var(axis=-1, ddof=1) / n_b   # s²/n
    se = np.sqrt(v_a + v_b)
    df = (v_a + v_b) ** 2 / (v_a ** 2 / (n_a - 1) + v_b ** 2 / (n_b - 1))
    d = x_a.mean(axis=-1) - x_b.mean(axis=-1)
    half = stdtrit(df, 0.5 + level / 2) * se
    return d, d - half, d + half, df


def seed_values(cell: pd.DataFrame, kind: str, metric: str) -> np.ndarray:
    """The final `metric` of the converged trials of BN kind `kind` in `cell` (finite only)."""
    x = cell.loc[(cell["status"] == CONVERGED) & (cell["bn"] == kind), metric].to_numpy(np.float64)
    return x[np.isfinite(x)]


def no_interval_reason(x: dict[str, np.ndarray]) -> str | None:
    """Why a cell gets no interval (kind -> its seed values), or None when it gets one."""
    empty = [k for k, v in x.items() if len(v) == 0]
    if empty:
        return f"no converged {' or '.join(empty)} trial at this λ"
    few = [f"{k}: {len(v)} converged seed" for k, v in x.items() if len(v) < 2]
    if few:
        return "; ".join(few)
    if all(np.ptp(v) == 0 for v in x.values()):
        return "no seed variance on either side"
    return None


def compare(label: str, lam: float, a: str, b: str, x_a: np.ndarray, x_b: np.ndarray,
            metric: str = "nc_score", level: float = 0.95) -> dict:
    """One cell: kind `a` against kind `b` at λ `lam` in comparison set `label`."""
    stat = {k: {"n": len(x), "mean": float(x.mean()) if len(x) else None,
                "sd": float(x.std(ddof=1)) if len(x) > 1 else None} for k, x in (("a", x_a), ("b", x_b))}
    reason = no_interval_reason({a: x_a, b: x_b})
    out = {"set": label, "weight_decay": float(lam), "a": a, "b": b, "n_a": stat["a"]["n"], "n_b": stat["b"]["n"],
           "mean_a": stat["a"]["mean"], "mean_b": stat["b"]["mean"], "sd_a": stat["a"]["sd"], "sd_b": stat["b"]["sd"],
           "diff": None, "ci_low": None, "ci_high": None, "ci_level": level, "ci_of": ci_of(metric),
           "df": None, "no_interval_reason": reason, "ci_low_adjusted": None, "ci_high_adjusted": None,
           "family_size": None}
    if len(x_a) and len(x_b):
        out["diff"] = stat["a"]["mean"] - stat["b"]["mean"]
    if reason is None:
        d, low, high, df = welch_interval(x_a, x_b, level)
        out |= {"diff": float(d), "ci_low": float(low), "ci_high": float(high), "df": float(df)}
    return out


def bn_effects(scores: pd.DataFrame, metric: str = "nc_score", level: float = 0.95) -> list[dict]:
    """Every cell (comparison set × λ × pair of BN kinds present in the set) of `scores`:
    one row per trial with columns group, bn, weight_decay, status and `metric`
    (`wd.final_scores`). Sets, λ and pairs in sorted / PAIRS order."""
    if scores.empty or metric not in scores.columns:
        return []
    rows = scores.assign(comparison_set=scores["group"].map(set_label))
    out = []
    for label, sub in rows.groupby("comparison_set", sort=True):
        kinds = set(sub["bn"])
        pairs = [(a, b) for a, b in PAIRS if a in kinds and b in kinds]
        cells = []                            # (effect, x_a, x_b) per λ × pair
        for lam, cell in sub.groupby("weight_decay", sort=True):
            for a, b in pairs:
                x_a, x_b = seed_values(cell, a, metric), seed_values(cell, b, metric)
                cells.append((compare(label, lam, a, b, x_a, x_b, metric, level), x_a, x_b))
        for a, b in pairs:
            _adjust([c for c in cells if (c[0]["a"], c[0]["b"]) == (a, b)], level)
        out += [c[0] for c in cells]
    return out


def _adjust(family: list[tuple[dict, np.ndarray, np.ndarray]], level: float) -> None:
    """Give each cell of one set × pair with an interval its Bonferroni interval over those cells."""
    with_ci = [(e, x_a, x_b) for e, x_a, x_b in family if e["ci_low"] is not None]
    m = len(with_ci)
    for e, x_a, x_b in with_ci:
        _, low, high, _ = welch_interval(x_a, x_b, 1 - (1 - level) / m)
        e |= {"ci_low_adjusted": float(low), "ci_high_adjusted": float(high), "family_size": m}


def beyond_zero_adjusted(effect: dict) -> bool:
    """Whether the cell's Bonferroni interval excludes 0."""
    low, high = effect.get("ci_low_adjusted"), effect.get("ci_high_adjusted")
    return low is not None and (low > 0 or high < 0)


def cell_text(effect: dict) -> str:
    """'0.41 [0.33, 0.49]', '0.41 (no CI: nonaffine: 1 converged seed)' or '—'."""
    if effect["diff"] is None:
        return "—"
    if effect["ci_low"] is None or (isinstance(effect["ci_low"], float) and math.isnan(effect["ci_low"])):
        return f"{num(effect['diff'])} (no CI: {effect['no_interval_reason']})"
    mark = " ‡" if beyond_zero_adjusted(effect) else ""
    return f"{num(effect['diff'])} {interval(effect['ci_low'], effect['ci_high'])}{mark}"
