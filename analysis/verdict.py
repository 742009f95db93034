"""Shared wording of verdicts: numbers first, claims never stronger than the test.

A conjecture's verdict in a group is reached against its tolerance τ (`analysis.bounds`):
`consistent` (the ε interval lies below τ), `violated` (above τ), `inconclusive` (it
straddles τ, or there is no interval), `insufficient` (too few converged trials: no verdict
at all), or `control` (a group outside the conjecture's scope, e.g. no BN for 3.1.1: numbers
only). The decisions use Holm-adjusted p-values within the conjecture's family of groups.

The trend (a rank correlation with λ or with the block index) is a separate finding, also
Holm-adjusted: `supported` (significant in the predicted direction), `contradicted`
(significant against it) or `inconclusive`.
"""
from __future__ import annotations

import math

from . import stats
from .bounds import CONSISTENT, INCONCLUSIVE, VIOLATED

ALPHA = 0.05
SUPPORTED, CONTRADICTED, INSUFFICIENT, CONTROL = "supported", "contradicted", "insufficient", "control"
NEGLIGIBLE = "negligible"              # a claimed change shown to be smaller than its practical tolerance
STATES = (CONSISTENT, VIOLATED, SUPPORTED, CONTRADICTED, NEGLIGIBLE, INCONCLUSIVE, INSUFFICIENT, CONTROL)
P_FLOOR = 1 / (1 + stats.N_PERM)       # a permutation p-value never falls below this

# Tolerances fixed before any data are seen, in each conjecture's own units (docs/science.md §6).
TAUS = {"conjecture_3_1_1": 0.1, "conjecture_3_2_1": 0.05, "conjecture_3_2_2": 0.5}
TAU_REASONS = {
    "conjecture_3_1_1": "τ = 0.1 of nc_score per unit of log λ: the closest λ pair of the thesis' grid "
                        "(7e-3 → 1e-2, ×1.43) may lose 0.036, about two seed SDs of affine BN, and the "
                        "whole 100-fold grid 0.46, a third of nc_score's range (4/3 for C = 4); a smaller "
                        "τ cannot be told from seed noise with 10 seeds on that grid (python -m analysis.power)",
    "conjecture_3_2_1": "τ = 0.05 of nc_score per block step: about half the mean gain per block of a "
                        "depth-15 network that goes from no collapse to full collapse (4/3 over 14 steps)",
    "conjecture_3_2_2": "τ = 0.5 block: a rise of the seed-mean effective depth by less than half a block "
                        "means most seeds keep their depth; the conjecture itself says no rise (ε = 0)",
}


def num(x: float | None, digits: int = 2) -> str:
    """Compact number: 2 significant digits by default, 'n/a' for None/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x == 0:
        return "0"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = f"{x:.{digits}g}"
    return text.replace("e-0", "e-").replace("e+0", "e")


def pval(p: float | None, floor: float = P_FLOOR) -> str:
    """'0.03', '2.1e-4', or '≤ 1e-4' for a Monte-Carlo p-value at its floor."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    if p <= floor * (1 + 1e-9):
        return f"≤ {floor:.0e}".replace("e-0", "e-")
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}".replace("e-0", "e-")


def p_is(p: float | None, name: str = "p") -> str:
    """'p = 0.03' or 'p ≤ 1e-4'."""
    text = pval(p)
    return f"{name} {text}" if text.startswith("≤") else f"{name} = {text}"


def interval(low: float | None, high: float | None, reason: str | None = None) -> str:
    """'[low, high]', or '(no CI: <reason>)' when there is no interval."""
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return f"(no CI: {reason or 'one seed per λ'})"
    return f"[{num(low)}, {num(high)}]"


def adjust(results: list[dict], keys: tuple[str, ...] = ("p_value", "p_consistent", "p_violated")) -> None:
    """Holm-adjust each p-value key within the family `results` (one conjecture's groups),
    in place, as `<key>_adjusted`. The ε verdicts' p-values count only groups that test
    the conjecture (role != control); the trend's p-value counts every group."""
    for key in keys:
        family = [r for r in results if key == "p_value" or r.get("role", "test") != CONTROL]
        for r, adjusted in zip(family, stats.holm([r.get(key) for r in family])):
            r[key + "_adjusted"] = adjusted
        for r in results:
            r.setdefault(key + "_adjusted", None)


def bound_state(r: dict) -> str:
    """The verdict against τ from the Holm-adjusted p-values (see module docstring)."""
    if r.get("role") == CONTROL:
        return CONTROL
    for key, state in (("p_consistent_adjusted", CONSISTENT), ("p_violated_adjusted", VIOLATED)):
        if r.get(key) is not None and r[key] < ALPHA:
            return state
    return INCONCLUSIVE


def finalize(results: list[dict], predicted_sign: int, describe) -> list[dict]:
    """Adjust the family's p-values, then set each group's `trend` (from the adjusted trend
    p-value), `state` (the verdict against τ) and `verdict` text (`describe(r)`)."""
    for r in results:
        if r.get("role") == CONTROL:           # numbers only: no test of the conjecture to report
            r.update(bound_state=None, p_consistent=None, p_violated=None)
    adjust(results)
    for r in results:
        if r["state"] == INSUFFICIENT:
            continue
        r["trend"] = trend_state(r["statistic"], r["p_value_adjusted"], predicted_sign)
        r["state"] = bound_state(r)
        r["verdict"] = describe(r)
    return results


def bound_text(r: dict, unit: str = "") -> str:
    """'ε̂ = 0.02 [0, 0.08] (noise floor 0.05) vs τ = 0.1, p_adj = 0.01'."""
    ci = interval(r["ci_low"], r["ci_high"], r.get("no_interval_reason"))
    floor = f"; noise floor {num(r['noise_floor'])}" if r.get("noise_floor") is not None else ""
    p = ""
    if r["state"] == CONSISTENT:
        p = f", {p_is(r['p_consistent_adjusted'], 'p_adj')}"
    elif r["state"] == VIOLATED:
        p = f", {p_is(r['p_violated_adjusted'], 'p_adj')}"
    elif r["state"] == INCONCLUSIVE and r.get("bound_state") in (CONSISTENT, VIOLATED):
        side, key = ("below", "p_consistent") if r["bound_state"] == CONSISTENT else ("above", "p_violated")
        p = (f"; the interval alone lies {side} τ ({p_is(r.get(key), 'p')}), but not after Holm's "
             f"adjustment over the conjecture's groups ({p_is(r.get(key + '_adjusted'), 'p_adj')})")
    zero = r.get("zero_sd_settings")
    caveat = (f" ({zero} {'setting' if zero == 1 else 'settings'} whose seeds agree exactly: scaled by the "
              "pooled SD)") if zero else ""
    return f"ε̂ = {num(r['epsilon_hat'])}{unit} {ci}{caveat}{floor}; τ = {r['tau']:g}{p}"


def excluded_note(excluded: dict[str, int]) -> str:
    """' (3 excluded: 2 not_converged, 1 diverged)' or ''."""
    n = sum(excluded.values())
    return f" ({n} excluded: {', '.join(f'{v} {k}' for k, v in excluded.items())})" if n else ""


def trend_state(rho: float, p: float, predicted_sign: int) -> str:
    """supported / contradicted / inconclusive from a rank correlation and its p-value."""
    if rho is None or p is None or math.isnan(rho) or math.isnan(p) or p >= ALPHA or rho == 0:
        return INCONCLUSIVE
    return SUPPORTED if math.copysign(1, rho) == predicted_sign else CONTRADICTED


def summary(states: list[str], unit: str = "group", labels: dict[str, str] | None = None) -> str:
    """'consistent in 2 of 5 groups, inconclusive in 1, …' over per-group states; `labels`
    renames states (the theorem 'holds' or is 'VIOLATED')."""
    n = len(states)
    if n == 0:
        return f"no {unit}s"
    labels = {INSUFFICIENT: "too few converged trials", CONTROL: "control (no verdict)"} | (labels or {})
    parts = []
    for state in STATES:
        k = states.count(state)
        if k:
            label = labels.get(state, state)
            parts.append(f"{label} in {k}" + (f" of {n} {unit}{'s' if n > 1 else ''}" if not parts else ""))
    return ", ".join(parts)


def clean(value):
    """JSON-ready: NaN/inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
