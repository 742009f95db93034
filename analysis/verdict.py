"""Shared wording of verdicts: numbers first, claims never stronger than the test.

A trend test ends in one of four states: `supported` (significant in the predicted
direction), `contradicted` (significant against it), `inconclusive` (not significant, or
nothing varies), `insufficient` (too few converged trials to test: no verdict at all).
"""
from __future__ import annotations

import math

ALPHA = 0.05
SUPPORTED, CONTRADICTED, INCONCLUSIVE, INSUFFICIENT = "supported", "contradicted", "inconclusive", "insufficient"


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


def pval(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}".replace("e-0", "e-")


def interval(low: float | None, high: float | None) -> str:
    """'[low, high]', or '(no CI: one seed per λ)' when there was nothing to resample."""
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return "(no CI: one seed per λ)"
    return f"[{num(low)}, {num(high)}]"


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
    """'supported in 2 of 5 groups, contradicted in 1, …' over per-group states; `labels`
    renames states (the theorem 'holds' or is 'VIOLATED')."""
    n = len(states)
    if n == 0:
        return f"no {unit}s"
    labels = {INSUFFICIENT: "too few converged trials"} | (labels or {})
    parts = []
    for state in (SUPPORTED, CONTRADICTED, INCONCLUSIVE, INSUFFICIENT):
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
