"""The figures of an analysis: the thesis' Fig 3.1 and Fig 3.3, training curves, and one
plot per conjecture. Each function takes tidy tables and returns a matplotlib `Figure`
(built without pyplot, so no global state and no display is needed; PNGs via Agg).

Only converged trials are drawn (the thesis discards the others), except in the training
curves, where the status sets the line style. A panel (bn kind, group, λ) without any
converged trial is kept and says so; a red × marks each λ with failed trials, with their
count. Seed spread is the min–max band around the seed mean. Legends sit under the panels,
so that none hides data.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.lines
import matplotlib.ticker

import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib import patches as mpatches
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .frame import CONVERGED, ordered
from .verdict import num

PANEL = (4.0, 3.1)
DPI = 90
LEGEND_ROW = 0.2  # inches per row of a figure legend
STATUS_STYLE = {"converged": "-", "not_converged": "--", "diverged": ":"}


def grid(n: int, max_cols: int = 4, sharey: bool = False, legend_rows: int = 0) -> tuple[Figure, list]:
    """n panels in rows of at most `max_cols`, with room below them for `legend_rows` rows
    of a figure legend. Fixed margins instead of a layout engine: constrained/tight layout
    draws every figure twice and tripled the drawing time."""
    cols = max(1, min(n, max_cols))
    rows = max(1, math.ceil(n / cols))
    below = 0.7 + LEGEND_ROW * legend_rows  # x labels, then the legend
    width, height = max(PANEL[0] * cols, 7.0), PANEL[1] * rows + 0.35 + LEGEND_ROW * legend_rows  # + the title
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=below / height, top=1 - 0.75 / height,
                        wspace=0.22 if sharey else 0.42, hspace=0.62)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


class NarrowLogLocator(matplotlib.ticker.LogLocator):
    """Ticks at the powers of 10, and where the view spans too little for two of them (a
    λ grid like 3e-4, 5e-4), at 1, 2, 3, 5 (else 1 to 9) times them: minor ticks, which
    would otherwise label such an axis, are off (`_log_x`)."""

    def tick_values(self, vmin, vmax):
        low, high = sorted((vmin, vmax))
        if low > 0 and np.isfinite(high) and high / low < 100:
            decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for mantissas in ((1,), (1, 2, 3, 5), range(1, 10)):
                ticks = [m * 10.0 ** k for k in decades for m in mantissas if low <= m * 10.0 ** k <= high]
                if len(ticks) >= 2:
                    return np.array(ticks)
        return super().tick_values(vmin, vmax)


def _narrow_log(axis) -> None:
    """`NarrowLogLocator`'s ticks on a log axis, every one labelled (the stock formatter
    labels only some of 1 to 9 on a view under a decade), and no minor ticks: on log axes
    they cost most of the drawing time and add nothing here."""
    axis.set_major_locator(NarrowLogLocator())
    axis.set_major_formatter(matplotlib.ticker.LogFormatterSciNotation(minor_thresholds=(math.inf, math.inf)))
    axis.set_minor_locator(matplotlib.ticker.NullLocator())


def _log_x(ax) -> None:
    ax.set_xscale("log")
    _narrow_log(ax.xaxis)


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "all"


def _band(ax, x, values_by_x: list[np.ndarray], label: str, color=None, style: str = "-") -> bool:
    """Seed mean as a line, seed min–max as a shaded band; returns whether a band was drawn
    (only where some x has more than one value)."""
    mean = np.array([np.mean(v) for v in values_by_x])
    low = np.array([np.min(v) for v in values_by_x])
    high = np.array([np.max(v) for v in values_by_x])
    line, = ax.plot(x, mean, style, marker="o", ms=3, label=label, color=color)
    if any(len(v) > 1 for v in values_by_x):
        ax.fill_between(x, low, high, alpha=0.2, color=line.get_color(), lw=0)
        return True
    return False


BAND_LABEL = "line: seed mean, band: seed min–max"
FAILED_LABEL = "× failed trials at λ (count)"


def _band_handle() -> mpatches.Patch:
    return mpatches.Patch(color="0.5", alpha=0.3, lw=0, label=BAND_LABEL)


def _lambda_colors(lambdas) -> dict[float, tuple]:
    lambdas = sorted(set(lambdas))
    positive = [l for l in lambdas if l > 0]
    norm = mcolors.LogNorm(min(positive), max(positive)) if len(positive) > 1 else None
    cmap = matplotlib.colormaps["viridis"]
    return {l: cmap(norm(l) if norm and l > 0 else 0.5) for l in lambdas}


def _mark_failures(ax, finals: pd.DataFrame) -> bool:
    """A red × at the top of the panel for each λ with trials that did not converge or
    diverged, with their count: the thesis' 'training fails' shows as a gap in the lines.
    Returns whether it marked any."""
    failed = finals[finals["status"].isin(["not_converged", "diverged"]) & (finals["weight_decay"] > 0)]
    if failed.empty:
        return False
    counts = failed.groupby("weight_decay").size()
    top = ax.get_xaxis_transform()  # x in data, y in axes fraction
    ax.plot(counts.index, [0.96] * len(counts), "x", color="C3", ms=6, transform=top, label=FAILED_LABEL)
    for lam, n in counts.items():
        ax.text(lam, 0.915, str(n), color="C3", fontsize=7, ha="center", va="top", transform=top)
    return True


def _headroom(ax, share: float = 0.2) -> None:
    """Room above the data for the failure marks."""
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + share * (high - low))


def _unconverged(rows: pd.DataFrame) -> list[float]:
    """The λ values of `rows` (one row per trial) where no trial converged."""
    ok = rows.groupby("weight_decay")["status"].agg(lambda s: bool((s == CONVERGED).any()))
    return [float(l) for l, any_ok in ok.items() if not any_ok]


def _lambdas(values) -> str:
    return ", ".join(f"{l:g}" for l in values)


def _empty_note(ax, rows: pd.DataFrame) -> None:
    """The text of a panel with nothing converged to draw, with what happened instead."""
    counts = rows["status"].value_counts()
    what = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if s != CONVERGED)
    ax.text(0.5, 0.5, "no converged trial" + (f"\n({what})" if what else ""), ha="center", va="center",
            fontsize=8, color="0.3", transform=ax.transAxes)


def _lambda_span(ax, rows: pd.DataFrame) -> None:
    """An empty λ panel spans its trials' λ (else its axis would show a meaningless 1 to 10)."""
    lams = rows.loc[rows["weight_decay"] > 0, "weight_decay"].to_numpy(float)
    if len(lams):
        ax.set_xlim(lams.min() / 1.5, lams.max() * 1.5)


def _handles(axes) -> dict:
    """label -> handle over every panel, first one wins (for one figure legend)."""
    out = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            out.setdefault(label, handle)
    return out


def _below(fig: Figure, handles: list, ncol: int, caption: str = "", title: str | None = None) -> None:
    """One figure legend under the panels (so none hides a line) and, under it, a caption
    line; `grid(legend_rows=...)` must have left room for both."""
    bottom = 0.0
    if caption:
        fig.text(0.5, 0.06 / fig.get_figheight(), caption, ha="center", va="bottom", fontsize=7, color="0.25")
        bottom = LEGEND_ROW / fig.get_figheight()
    if handles:
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, bottom), ncol=max(1, ncol),
                   fontsize=7, frameon=False, title=title, title_fontsize=7)


def _legend_layout(n_panels: int, labels: list[str], extra_rows: int = 0) -> tuple[int, int]:
    """(columns, rows) of a figure legend of `labels` under `grid(n_panels)`'s panels: as
    many columns as fit the figure's width (about 0.055 inch per character at font size 7,
    plus the handle), plus `extra_rows` (a legend title, a caption line)."""
    if not labels:
        return 1, extra_rows
    width = max(PANEL[0] * max(1, min(n_panels, 4)), 7.0) - 0.4
    entry = 0.6 + 0.055 * max(len(label) for label in labels)
    ncol = max(1, min(len(labels), int(width // entry)))
    return ncol, math.ceil(len(labels) / ncol) + extra_rows


def fig3_1(finals: pd.DataFrame) -> Figure:
    """Thesis Fig 3.1: final intra_min (solid) and inter_max (dashed) against λ (log
    x-axis), one panel per bn kind, one colour per architecture group, seed min–max band.
    A bn kind none of whose trials converged keeps its panel, marked as such.
    `finals`: one row per trial with bn, group, status, weight_decay, intra_min, inter_max."""
    finals = finals[finals["weight_decay"] > 0]
    rows = finals[finals["status"] == CONVERGED]
    present = set(finals["bn"])
    kinds = [k for k in ("affine", "nonaffine", "none") if k in present] + \
            sorted(present - {"affine", "nonaffine", "none"})
    # the group without its bn part: the same colour for the same rest in every panel
    rest = {(kind, group): ", ".join(part for part in group.split(", ") if part != f"bn={kind}")
            for kind, group in zip(finals["bn"], finals["group"])}
    rests = sorted(set(rest.values()))
    colour = {r: f"C{i}" for i, r in enumerate(rests)}
    entries = 2 * len(rests) + 2  # intra_min and inter_max per rest, the failure mark, the band
    # one row if a single group; else a column per group (intra_min over inter_max) while they fit
    ncol = entries if len(rests) == 1 else math.ceil(entries / 2) if len(rests) <= 4 else 4
    fig, axes = grid(max(len(kinds), 1), sharey=True, legend_rows=math.ceil(entries / ncol))
    marked = banded = False
    for ax, kind in zip(axes, kinds):
        sub = rows[rows["bn"] == kind]
        for group in ordered(sub["group"]):
            g = sub[sub["group"] == group]
            lams = sorted(set(g["weight_decay"]))
            name = f" ({rest[kind, group]})" if len(rests) > 1 and rest[kind, group] else ""
            for metric, style in (("intra_min", "-"), ("inter_max", "--")):
                banded |= _band(ax, lams, [g.loc[g["weight_decay"] == l, metric].to_numpy(float) for l in lams],
                                f"{metric}{name}", colour[rest[kind, group]], style)
        if sub.empty:
            _empty_note(ax, finals[finals["bn"] == kind])
            _lambda_span(ax, finals[finals["bn"] == kind])
        marked |= _mark_failures(ax, finals[finals["bn"] == kind])
        _log_x(ax)
        ax.set_title(f"bn = {kind}")
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel("cosine (final, converged)")
        ax.axhline(0, color="0.8", lw=0.6)
    handles = list(_handles(axes).values()) + ([_band_handle()] if banded else [])
    n = len(handles)
    _below(fig, handles, n if len(rests) == 1 else math.ceil(n / 2) if len(rests) <= 4 else 4)
    if not kinds:
        axes[0].text(0.5, 0.5, "no converged trials", ha="center", transform=axes[0].transAxes)
        axes[0].set_ylabel("cosine (final, converged)")
    elif marked:
        _headroom(axes[0])  # shared y: one call for every panel
    fig.suptitle("Fig 3.1: min within-class and max between-class cosine against weight decay")
    return fig


def fig3_3(curves: dict[str, dict[str, np.ndarray]], models: pd.DataFrame, group: str) -> Figure:
    """Thesis Fig 3.3 for one group: per-layer ncc_acc, intra_min and inter_max at the final
    evaluation against the block index, one panel per λ, seed min–max band. Only converged
    trials are drawn; a λ where none converged keeps an empty panel and is named below.
    `curves[metric][run_id]` is the (L-1,) final curve; `models` has run_id, weight_decay and
    status (without status every row counts as converged)."""
    if "status" not in models.columns:
        models = models.assign(status=CONVERGED)
    lams = sorted(set(models["weight_decay"]))
    missing = _unconverged(models)
    ncol, legend_rows = _legend_layout(len(lams), ["ncc_acc", "intra_min", "inter_max", BAND_LABEL],
                                       extra_rows=bool(missing))
    fig, axes = grid(max(len(lams), 1), sharey=True, legend_rows=legend_rows)
    banded = False
    for ax, lam in zip(axes, lams):
        here = models[models["weight_decay"] == lam]
        ids = here.loc[here["status"] == CONVERGED, "run_id"]
        drawn = False
        for metric, color in (("ncc_acc", "C2"), ("intra_min", "C0"), ("inter_max", "C3")):
            stack = [curves[metric][r] for r in ids if r in curves.get(metric, {})]
            if not stack:
                continue
            n = min(len(c) for c in stack)
            values = np.stack([c[:n] for c in stack])            # (seeds, L-1)
            banded |= _band(ax, np.arange(1, n + 1), list(values.T), metric, color)
            drawn = True
        if not ids.size:
            _empty_note(ax, here)
            ax.set_xticks([])                                    # no blocks to count
        elif not drawn:
            ax.text(0.5, 0.5, "no per-layer values", ha="center", va="center", fontsize=8, color="0.3",
                    transform=ax.transAxes)
        ax.set_title(f"λ = {lam:g}")
        ax.set_xlabel("hidden block l")
        ax.set_ylabel("final value (converged)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(0, color="0.8", lw=0.6)
    handles = list(_handles(axes).values()) + ([_band_handle()] if banded else [])
    caption = f"no converged trial at λ = {_lambdas(missing)} (empty panels)" if missing else ""
    _below(fig, handles, ncol, caption)
    fig.suptitle(f"Fig 3.3 ({group}): per-layer collapse at the end of training")
    return fig


def training_curves(frame: pd.DataFrame, metric: str = "nc_score") -> Figure:
    """`metric` (last hidden block) against epoch, one panel per group, colour = λ,
    line style = status; the legend under the panels."""
    rows = frame[(frame["layer"] == 0) & np.isfinite(frame[metric].to_numpy(float))]
    groups = ordered(frame["group"])
    colors = _lambda_colors(frame["weight_decay"].unique())
    statuses = [s for s in STATUS_STYLE if s in set(frame["status"])]
    statuses += sorted(set(frame["status"]) - set(STATUS_STYLE))
    handles = [matplotlib.lines.Line2D([], [], color=c, label=f"λ = {l:g}") for l, c in colors.items()]
    handles += [matplotlib.lines.Line2D([], [], color="k", lw=0.8, ls=STATUS_STYLE.get(s, "-."), label=s)
                for s in statuses]
    ncol, legend_rows = _legend_layout(len(groups), [h.get_label() for h in handles], extra_rows=1)
    fig, axes = grid(max(len(groups), 1), sharey=True, legend_rows=legend_rows)
    for ax, group in zip(axes, groups):
        sub = rows[rows["group"] == group]
        for (run_id, lam, status), run in sub.groupby(["run_id", "weight_decay", "status"], sort=False):
            ax.plot(run["epoch"], run[metric], STATUS_STYLE.get(status, "-."), color=colors[lam], lw=0.8, alpha=0.8)
        if sub.empty:
            ax.text(0.5, 0.5, f"no finite {metric}", ha="center", va="center", fontsize=8, color="0.3",
                    transform=ax.transAxes)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} (last hidden block)")
    _below(fig, handles, ncol, title="colour: weight decay λ; line style: trial status")
    fig.suptitle(f"{metric} during training")
    return fig


def conjecture_3_1_1(scores: pd.DataFrame, results: list[dict], metric: str = "nc_score") -> Figure:
    """Final `metric` against λ per group: seeds as dots, seed means as a line, the λ pair
    setting ε̂ in red, λ values with failed trials marked."""
    by_group = {r["group"]: r for r in results}
    groups = ordered(by_group)
    ncol, legend_rows = _legend_layout(len(groups), ["trial (converged)", "seed mean", "λ pair that sets ε̂",
                                                      FAILED_LABEL])
    fig, axes = grid(max(len(groups), 1), legend_rows=legend_rows)
    for ax, group in zip(axes, groups):
        every = scores[(scores["group"] == group) & (scores["weight_decay"] > 0)]
        g = every[every["status"] == CONVERGED]
        ax.plot(g["weight_decay"], g[metric], "o", ms=3, alpha=0.5, color="C0", label="trial (converged)")
        means = g.groupby("weight_decay")[metric].mean()
        ax.plot(means.index, means.values, "-", color="C0", label="seed mean")
        for pair in by_group[group].get("set_by", []):
            ax.plot([pair["lambda_1"], pair["lambda_2"]], [pair["S_1"], pair["S_2"]], "-", color="C3", lw=2,
                    label="λ pair that sets ε̂")
        if g.empty:
            _empty_note(ax, every)
            _lambda_span(ax, every)
            _mark_failures(ax, every)
        elif _mark_failures(ax, every):
            _headroom(ax)
        r = by_group[group]
        ci = (f" [{num(r['ci_low'])}, {num(r['ci_high'])}]" if r.get("ci_low") is not None else "")
        missing = _unconverged(every) if len(g) else []
        ax.set_title(f"{group}: {r.get('state')}\nε̂ = {num(r.get('epsilon_hat'))}{ci}, τ = {num(r.get('tau'))}, "
                     f"ρ = {num(r.get('statistic'))}"
                     + (f"\nno converged trial at λ = {_lambdas(missing)}" if missing else ""), fontsize=8)
        _log_x(ax)
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel(f"final {metric}")
    _below(fig, list(_handles(axes).values()), ncol)
    fig.suptitle("Conjecture 3.1.1: NC against weight decay")
    return fig


def alpha_vs_lambda(alphas: pd.DataFrame, results: list[dict]) -> Figure:
    """The paper's claim that the last-layer feature norm shrinks with λ: final alpha against
    λ on log–log axes, one panel per group, converged trials as dots, the seed mean as a line
    and the fitted slope of log alpha on log λ (`claims.alpha_vs_lambda`) in the title.
    `alphas`: one row per trial with group, status, weight_decay and alpha."""
    by_group = {r["group"]: r for r in results}
    groups = ordered(by_group)
    ncol, legend_rows = _legend_layout(len(groups), ["trial (converged)", "seed mean", FAILED_LABEL])
    fig, axes = grid(max(len(groups), 1), legend_rows=legend_rows)
    for ax, group in zip(axes, groups):
        every = alphas[(alphas["group"] == group) & (alphas["weight_decay"] > 0)]
        g = every[(every["status"] == CONVERGED) & (every["alpha"] > 0)]
        ax.plot(g["weight_decay"], g["alpha"], "o", ms=3, alpha=0.5, color="C0", label="trial (converged)")
        means = g.groupby("weight_decay")["alpha"].mean()
        ax.plot(means.index, means.values, "-", color="C0", label="seed mean")
        if g.empty:
            _empty_note(ax, every)
            _lambda_span(ax, every)
            _mark_failures(ax, every)
        else:
            ax.set_yscale("log")
            ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.yaxis.set_major_locator(MaxNLocator(5))          # alpha spans less than a decade
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            if _mark_failures(ax, every):
                low, high = ax.get_ylim()
                ax.set_ylim(low, high * (high / low) ** 0.2)      # headroom for the marks, log axis
        r = by_group[group]
        ci = f" [{num(r['ci_low'])}, {num(r['ci_high'])}]" if r.get("ci_low") is not None else ""
        ax.set_title(f"{group}: {r.get('state')}\nρ = {num(r.get('statistic'))}, slope {num(r.get('slope'))}{ci}",
                     fontsize=8)
        _log_x(ax)
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel("final alpha (last block, RMS norm)")
    _below(fig, list(_handles(axes).values()), ncol)
    fig.suptitle("Paper claim: the last-layer feature norm alpha against weight decay")
    return fig


def bn_effects(cells: list[dict]) -> Figure:
    """The BN-kind effect sizes (`analysis.effects`) against λ, one panel per comparison set,
    one colour per pair of BN kinds: the difference of seed means (a dot; hollow where a side
    has too few seeds for an interval), its per-cell 95 % interval (thin) and its Bonferroni
    interval over the pair's λ cells (thick), which is what a claim over the row rests on."""
    sets = sorted({c["set"] for c in cells})
    pairs = list(dict.fromkeys((c["a"], c["b"]) for c in cells))
    labels = [f"{a} − {b}" for a, b in pairs] + ["per-cell 95 % interval", "Bonferroni interval over the λ"]
    ncol, legend_rows = _legend_layout(len(sets), labels)
    fig, axes = grid(max(len(sets), 1), sharey=True, legend_rows=legend_rows)
    for ax, label in zip(axes, sets):
        for i, (a, b) in enumerate(pairs):
            mine = [c for c in cells if c["set"] == label and (c["a"], c["b"]) == (a, b) and c["diff"] is not None]
            shift = 1 + 0.06 * (i - (len(pairs) - 1) / 2)          # side by side at each λ
            for c in mine:
                x = c["weight_decay"] * shift
                if c["ci_low"] is not None:
                    ax.plot([x, x], [c["ci_low"], c["ci_high"]], "-", lw=0.8, color=f"C{i}")
                if c["ci_low_adjusted"] is not None:
                    ax.plot([x, x], [c["ci_low_adjusted"], c["ci_high_adjusted"]], "-", lw=3, alpha=0.45,
                            color=f"C{i}", solid_capstyle="butt")
            ok = [c for c in mine if c["ci_low"] is not None]
            bare = [c for c in mine if c["ci_low"] is None]
            ax.plot([c["weight_decay"] * shift for c in ok], [c["diff"] for c in ok], "o", ms=4, color=f"C{i}",
                    label=f"{a} − {b}")
            ax.plot([c["weight_decay"] * shift for c in bare], [c["diff"] for c in bare], "o", ms=4,
                    mfc="none", color=f"C{i}")
        ax.axhline(0, color="0.5", lw=0.8)
        _lambda_span(ax, pd.DataFrame({"weight_decay": [c["weight_decay"] for c in cells if c["set"] == label]}))
        _log_x(ax)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel("difference of final nc_score")
    handles = list(_handles(axes).values()) + [
        matplotlib.lines.Line2D([], [], color="0.4", lw=0.8, label="per-cell 95 % interval"),
        matplotlib.lines.Line2D([], [], color="0.4", lw=3, alpha=0.45, label="Bonferroni interval over the λ")]
    _below(fig, handles, ncol)
    fig.suptitle("BN kind: differences of seed means at each λ (hollow: too few seeds for an interval)")
    return fig


def conjecture_3_2_1(models: pd.DataFrame) -> Figure:
    """Per-model ε̂ over consecutive blocks against λ, one panel per group."""
    rows = models[(models["status"] == CONVERGED) & np.isfinite(models["epsilon_hat"].to_numpy(float))]
    groups = ordered(models["group"])
    ncol, legend_rows = _legend_layout(len(groups), ["model (converged)", "median over seeds", FAILED_LABEL])
    fig, axes = grid(max(len(groups), 1), sharey=True, legend_rows=legend_rows)
    marked = False
    for ax, group in zip(axes, groups):
        every = models[models["group"] == group]
        g = rows[rows["group"] == group]
        x = g["weight_decay"].to_numpy(float)
        ax.plot(x, g["epsilon_hat"], "o", ms=3, alpha=0.6, color="C0", label="model (converged)")
        med = g.groupby("weight_decay")["epsilon_hat"].median()
        ax.plot(med.index, med.values, "-", color="C1", label="median over seeds")
        if g.empty:
            _empty_note(ax, every)
            _lambda_span(ax, every)
        marked |= _mark_failures(ax, every)
        if (every["weight_decay"] > 0).all() and len(every):
            _log_x(ax)
        missing = _unconverged(every) if len(g) else []
        ax.set_title(group + (f"\nno converged trial at λ = {_lambdas(missing)}" if missing else ""), fontsize=9)
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel("ε̂ = max(0, max_l S_l − S_{l+1})")
    if marked:
        _headroom(axes[0])
    _below(fig, list(_handles(axes).values()), ncol)
    fig.suptitle("Conjecture 3.2.1: largest drop of nc_score between consecutive blocks, per model")
    return fig


def conjecture_3_2_2(depths: pd.DataFrame, epsilons) -> Figure:
    """Effective depth d_ε against λ, one colour per ε: seed means (line) and trials (dots,
    spread a little in λ so the ε do not hide each other)."""
    rows = depths[depths["status"] == CONVERGED]
    groups = ordered(depths["group"])
    spread = "trial (converged, λ spread per ε)"
    ncol, legend_rows = _legend_layout(len(groups), [f"ε = {e:g}" for e in epsilons] + [FAILED_LABEL, spread,
                                                                                        "seed mean"], extra_rows=1)
    fig, axes = grid(max(len(groups), 1), sharey=True, legend_rows=legend_rows)
    marked = False
    for ax, group in zip(axes, groups):
        every = depths[depths["group"] == group]
        g = rows[rows["group"] == group]
        for i, eps in enumerate(epsilons):
            col = f"d_{eps:g}"
            ok = g[np.isfinite(g[col].to_numpy(float))]
            jitter = 1 + 0.04 * (i - (len(epsilons) - 1) / 2)
            ax.plot(ok["weight_decay"] * jitter, ok[col], "o", ms=3, alpha=0.4, color=f"C{i}")
            means = ok.groupby("weight_decay")[col].mean()
            ax.plot(means.index, means.values, "-", color=f"C{i}", label=f"ε = {eps:g}")
        if g.empty:
            _empty_note(ax, every)
            _lambda_span(ax, every)
        marked |= _mark_failures(ax, every)
        if len(every) and (every["weight_decay"] > 0).all():
            _log_x(ax)
        missing = _unconverged(every) if len(g) else []
        ax.set_title(group + (f"\nno converged trial at λ = {_lambdas(missing)}" if missing else ""), fontsize=9)
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel("ε-effective depth (block)")
    if marked:
        _headroom(axes[0])
    handles = list(_handles(axes).values())
    handles += [matplotlib.lines.Line2D([], [], ls="", marker="o", ms=3, color="0.5", alpha=0.6,
                                        label=spread),
                matplotlib.lines.Line2D([], [], color="0.5", label="seed mean")]
    _below(fig, handles, ncol, title="colour: ε of the effective depth")
    fig.suptitle("Conjecture 3.2.2: effective depth against weight decay")
    return fig


def theorem_scatter(evals: pd.DataFrame) -> Figure:
    """Theorem 2.3.1 on its own terms, a row of two log–log panels per group:
    1 − raw_intra_min against √loss_gap/(αβ) and raw_inter_max + 1/(C−1) against
    loss_gap^(1/6), every checked evaluation on the axes (colour = λ), the predicted slope 1
    (dashed, through the points' median) and the fitted slope with its trial-clustered CI."""
    from . import theorem
    groups = ordered(evals["group"]) if len(evals) else []
    colors = _lambda_colors(evals["weight_decay"].unique()) if len(evals) else {}
    ncol = min(len(colors), 10)
    fig, axes = grid(max(2 * len(groups), 2), max_cols=2, legend_rows=1 + math.ceil(len(colors) / 10))
    for i, group in enumerate(groups):
        rows = evals[evals["group"] == group]
        for ax, relation in zip(axes[2 * i:2 * i + 2], theorem.RELATIONS):
            _rate_panel(ax, rows, relation, colors)
            off = int((theorem.off_axes(rows, relation) != "").sum())
            ax.set_title(group + (f"\n{off} of {len(rows)} off the log axes" if off else ""), fontsize=8)
    if not groups:
        axes[0].text(0.5, 0.5, "no evaluations", ha="center", transform=axes[0].transAxes)
    else:
        handles = [matplotlib.lines.Line2D([], [], ls="", marker="o", ms=4, color=c, label=f"{l:g}")
                   for l, c in colors.items()]
        fig.legend(handles=handles, title="λ", loc="lower center", ncol=ncol, fontsize=7, title_fontsize=8,
                   frameon=False)
    fig.suptitle("Theorem 2.3.1: the theorem's rates on the raw cosines (every bias-free evaluation)")
    return fig


def _rate_panel(ax, rows: pd.DataFrame, relation: str, colors: dict) -> None:
    """One relation of Theorem 2.3.1 on log–log axes: the points, the predicted slope 1
    through their median and the fitted slope."""
    from . import theorem
    x_col, y_col, y_name, x_name = theorem.RELATIONS[relation]
    on = theorem.off_axes(rows, relation) == ""
    x, y = rows[x_col].to_numpy(float)[on], rows[y_col].to_numpy(float)[on]
    _log_x(ax)
    ax.set_yscale("log")
    _narrow_log(ax.yaxis)
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    if not len(x):
        ax.text(0.5, 0.5, "no points on the log axes", ha="center", transform=ax.transAxes)
        return
    ax.scatter(x, y, s=4, c=[colors[l] for l in rows["weight_decay"].to_numpy()[on]], alpha=0.6, lw=0)
    lx, ly = np.log(x), np.log(y)
    ends = np.array([lx.min(), lx.max()])
    ax.plot(np.exp(ends), np.exp(np.median(ly) + ends - np.median(lx)), "--", color="0.3", lw=1,
            label=f"predicted slope {theorem.PREDICTED_SLOPE:g}")
    k, ci = theorem.slope_fit(x, y, rows["run_id"].to_numpy()[on])
    if k is not None:
        fit = theorem.slope_text({f"{relation}_slope": k, f"{relation}_slope_ci": ci}, relation)
        ax.plot(np.exp(ends), np.exp(ly.mean() + k * (ends - lx.mean())), "-", color="C3", lw=1,
                label=f"fitted slope {fit}")
    ax.legend(fontsize=6, loc="upper left")

