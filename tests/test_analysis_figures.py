"""The figures: Fig 3.1 draws converged trials as lines and marks the λ values where trials
failed; every figure labels its axes, explains its colours and bands, keeps what did not
converge visible and puts its legend outside the data. And report.html from report.md."""
import base64

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection

from analysis import figures


def _finals() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for bn in ("affine", "none"):
        for lam in (1e-4, 1e-3, 1e-2):
            for seed in range(3):
                status = "converged"
                if bn == "none" and lam == 1e-2:
                    status = "not_converged"
                elif bn == "none" and lam == 1e-3 and seed == 0:
                    status = "diverged"
                rows.append(dict(bn=bn, group=f"bn={bn}", status=status, weight_decay=lam,
                                 intra_min=rng.random(), inter_max=-rng.random()))
    return pd.DataFrame(rows)


def _failure_marks(ax):
    lines = [l for l in ax.get_lines() if l.get_label() == figures.FAILED_LABEL]
    texts = sorted((t.get_position()[0], t.get_text()) for t in ax.texts)
    return lines, texts


def test_fig3_1_marks_failed_lambdas_with_their_counts():
    finals = _finals()
    fig = figures.fig3_1(finals)
    affine, none = fig.axes[:2]
    assert affine.get_title() == "bn = affine" and none.get_title() == "bn = none"
    assert _failure_marks(affine) == ([], [])
    lines, texts = _failure_marks(none)
    assert len(lines) == 1 and list(lines[0].get_xdata()) == [1e-3, 1e-2]
    assert texts == [(1e-3, "1"), (1e-2, "3")]
    # the converged lines of bn=none stop where every seed failed
    drawn = [l for l in none.get_lines() if l.get_label() == "intra_min"]
    assert list(drawn[0].get_xdata()) == [1e-4, 1e-3]
    means = finals[(finals.bn == "none") & (finals.status == "converged")].groupby("weight_decay")["intra_min"].mean()
    assert np.allclose(drawn[0].get_ydata(), means.to_numpy())


def test_fig3_1_has_one_legend_below_the_panels_and_one_colour_per_data_set():
    rows = []
    for data in ("a.npz", "b.npz"):
        for bn in ("affine", "none"):
            if data == "a.npz" and bn == "none":
                continue  # data set a only in the affine panel: b must keep its colour
            for lam in (1e-4, 1e-3):
                rows.append(dict(bn=bn, group=f"data_path={data}, bn={bn}", status="converged",
                                 weight_decay=lam, intra_min=0.5, inter_max=-0.1))
    fig = figures.fig3_1(pd.DataFrame(rows))
    affine, none = fig.axes[:2]
    assert affine.get_legend() is None and none.get_legend() is None and len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["intra_min (data_path=a.npz)", "inter_max (data_path=a.npz)",
                      "intra_min (data_path=b.npz)", "inter_max (data_path=b.npz)"]
    colour = {ax: {l.get_label(): l.get_color() for l in ax.get_lines()} for ax in (affine, none)}
    assert colour[none]["intra_min (data_path=b.npz)"] == colour[affine]["intra_min (data_path=b.npz)"]
    assert colour[affine]["intra_min (data_path=a.npz)"] != colour[affine]["intra_min (data_path=b.npz)"]
    renderer = FigureCanvasAgg(fig).get_renderer()
    legend_top = fig.legends[0].get_window_extent(renderer).y1
    assert legend_top < min(ax.get_window_extent().y0 for ax in (affine, none))


# ------------------------------------------------------------------ every figure: labels, legends, gaps

def _planted(bns=("affine", "none"), lambdas=(1e-4, 1e-3, 5e-3), seeds=2, none_fails_from=5e-3):
    """Tidy frame of a small planted study (analysis.synthetic) and its test results; bn=none
    fails to converge from λ = `none_fails_from` on (every λ if 0)."""
    from analysis.load import RunRecord, tidy_frame, wide_history
    from analysis.report import run_tests
    from analysis.synthetic import planted_trials
    trials = planted_trials(bns=bns, lambdas=lambdas, seeds=range(seeds), depth=4, epochs=20, eval_every=5,
                            noise=0.05, seed=3)
    records, histories = [], []
    for i, t in enumerate(trials):
        status = "converged"
        if t.cfg.bn == "none" and t.cfg.weight_decay >= none_fails_from:
            status = "not_converged"
        keys = [k for k, v in t.metrics.items() for _ in v]
        steps = [s for v in t.metrics.values() for s in t.steps]
        values = [x for v in t.metrics.values() for x in v]
        records.append(RunRecord(f"r{i}", "planted", f"planted_{i}", 1, {"status": status}, t.cfg.to_params(), 1, 1))
        histories.append(wide_history(keys, steps, values))
    frame = tidy_frame(records, histories)
    return frame, run_tests(frame, (0.01, 0.05), n_perm=99)


def _all_figures(frame, analysis) -> dict:
    from analysis.frame import final_layers
    curves = {m: final_layers(frame, m) for m in ("ncc_acc", "intra_min", "inter_max")}
    out = {"fig3_1": figures.fig3_1(analysis.scores),
           "training_curves": figures.training_curves(frame),
           "conjecture_3_1_1": figures.conjecture_3_1_1(analysis.scores, analysis.results["conjecture_3_1_1"]),
           "conjecture_3_2_1": figures.conjecture_3_2_1(analysis.models),
           "conjecture_3_2_2": figures.conjecture_3_2_2(analysis.depths, analysis.epsilons)}
    for group, models in analysis.models.groupby("group"):
        out[f"fig3_3 {group}"] = figures.fig3_3(curves, models, group)
    return out


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


def _has_data(ax) -> bool:
    return bool(ax.get_lines() or ax.collections)


def test_every_panel_has_a_y_label_and_every_colour_code_a_legend():
    frame, analysis = _planted()
    for name, fig in _all_figures(frame, analysis).items():
        panels = [ax for ax in fig.axes if ax.get_visible() and _has_data(ax)]
        assert panels, name
        for ax in panels:
            assert ax.get_ylabel().strip(), f"{name}: panel {ax.get_title()!r} has no y label"
        # colour encodes λ, ε, the metric or the architecture group: one legend says which
        assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes), name
    curves = _all_figures(frame, analysis)["training_curves"]
    labels = [t.get_text() for t in curves.legends[0].get_texts()]
    assert labels[:3] == ["λ = 0.0001", "λ = 0.001", "λ = 0.005"] and "not_converged" in labels
    assert "weight decay λ" in curves.legends[0].get_title().get_text()
    eps = _all_figures(frame, analysis)["conjecture_3_2_2"].legends[0]
    assert {"ε = 0.01", "ε = 0.05"} <= {t.get_text() for t in eps.get_texts()}


def test_seed_bands_are_explained_in_the_legend():
    frame, analysis = _planted(seeds=3)
    for name, fig in _all_figures(frame, analysis).items():
        banded = any(isinstance(c, PolyCollection) for ax in fig.axes for c in ax.collections)
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert banded == (figures.BAND_LABEL in labels), name
        if name.startswith("fig3"):
            assert banded, name
    assert "seed min–max" in figures.BAND_LABEL and "seed mean" in figures.BAND_LABEL


def test_fig3_1_keeps_a_bn_kind_whose_trials_all_failed():
    finals = _finals()
    finals.loc[finals.bn == "none", "status"] = "not_converged"
    fig = figures.fig3_1(finals)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["bn = affine", "bn = none"]
    none = panels[1]
    assert any(t.get_text().startswith("no converged trial") and "9 not converged" in t.get_text()
               for t in none.texts)
    lines, texts = _failure_marks(none)
    assert list(lines[0].get_xdata()) == [1e-4, 1e-3, 1e-2] and [t for _, t in texts if t.isdigit()] == ["3"] * 3
    assert none.get_ylabel()
    # the same panel in the whole pipeline
    frame, analysis = _planted(none_fails_from=0)
    fig = _all_figures(frame, analysis)["fig3_1"]
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["bn = affine", "bn = none"]
    assert any("no converged trial" in t for t in _texts(fig))


def test_fig3_3_names_the_lambdas_where_no_trial_converged():
    frame, analysis = _planted()
    figs = _all_figures(frame, analysis)
    none = figs["fig3_3 bn=none"]
    assert [ax.get_title() for ax in none.axes if ax.get_visible()] == ["λ = 0.0001", "λ = 0.001", "λ = 0.005"]
    assert "no converged trial at λ = 0.005 (empty panels)" in [t.get_text() for t in none.texts]
    empty = [ax for ax in none.axes if ax.get_title() == "λ = 0.005"][0]
    assert not [l for l in empty.get_lines() if not l.get_label().startswith("_")]   # only the zero line
    assert any("no converged trial" in t.get_text() for t in empty.texts)
    assert not any("no converged trial" in t for t in _texts(figs["fig3_3 bn=affine"]))
    for name in ("conjecture_3_1_1", "conjecture_3_2_1", "conjecture_3_2_2"):
        titles = [ax.get_title() for ax in figs[name].axes]
        assert sum("no converged trial at λ = 0.005" in t for t in titles) == 1, name


def test_training_curves_legend_lies_outside_every_panel():
    frame, analysis = _planted(bns=("affine", "nonaffine", "none"), lambdas=(1e-4, 3e-4, 1e-3, 3e-3, 5e-3, 1e-2))
    fig = figures.training_curves(frame)
    renderer = FigureCanvasAgg(fig).get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))
        assert legend.y1 < ax.get_tightbbox(renderer).y0        # below the x labels too
    assert legend.y0 >= 0 and legend.x0 >= 0 and legend.x1 <= fig.bbox.width


# ------------------------------------------------------------------ report.html

def test_markdown_html_tables_lists_inline_and_embedded_images(tmp_path):
    from analysis.report_html import markdown_html
    png = tmp_path / "fig.png"
    figures.save(figures.fig3_1(_finals()), png)
    markdown = "\n".join([
        "# Report <a>", "", "First **bold** and `code <b>` with 1 < 2 & 3 > 2.", "",
        "- item one", "- item `two`", "",
        "| group | verdict | p |", "|---|---|---|", "| `bn=affine` | **consistent** (p_adj 0.01) | 0.5 |",
        "| `bn=none` | control | — |", "",
        "> **WARNING: loss_gap < 0.**", "", "![Fig 3.1](fig.png)", "", "![gone](missing.png)"])
    page = markdown_html(markdown, tmp_path)
    assert page.startswith("<!DOCTYPE html>") and "<title>Report &lt;a&gt;</title>" in page
    assert "<table>" in page and "<th>group</th><th>verdict</th><th>p</th>" in page
    assert "<td><code>bn=affine</code></td><td><strong>consistent</strong> (p_adj 0.01)</td><td>0.5</td>" in page
    assert page.count("<tr>") == 3 and "---" not in page
    assert "<li>item one</li>" in page and "<li>item <code>two</code></li>" in page
    assert "First <strong>bold</strong> and <code>code &lt;b&gt;</code> with 1 &lt; 2 &amp; 3 &gt; 2." in page
    assert "<blockquote><p><strong>WARNING: loss_gap &lt; 0.</strong></p></blockquote>" in page
    data = base64.b64encode(png.read_bytes()).decode()
    assert f'<img alt="Fig 3.1" src="data:image/png;base64,{data}">' in page
    assert '<a href="missing.png">gone</a>' in page
    assert "th { white-space: nowrap" in page and "overflow-x: auto" in page
    assert "<a>" not in page and "<b>" not in page


def _xtick_labels(fig, panel: int = 0) -> list[tuple[float, str]]:
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[panel]
    low, high = ax.get_xlim()
    return [(round(t.get_position()[0], 12), t.get_text()) for t in ax.get_xticklabels()
            if t.get_text() and low <= t.get_position()[0] <= high]


def test_a_lambda_axis_narrower_than_a_decade_still_names_its_lambdas():
    """Minor ticks are off, so a λ grid within one decade (3e-4, 5e-4: no power of 10 in view)
    had an x axis without a single label; it gets ticks at its 1-2-3-5 values. A grid over
    decades keeps the powers of 10 alone."""
    def scores(lams):
        return pd.DataFrame([dict(group="bn=none", status="converged", weight_decay=lam, nc_score=0.5 + 0.01 * s)
                             for lam in lams for s in range(3)])
    result = [dict(group="bn=none", state="control", epsilon_hat=0.0, tau=0.1, statistic=0.0)]
    narrow = _xtick_labels(figures.conjecture_3_1_1(scores([3e-4, 5e-4]), result))
    assert [x for x, _ in narrow] == [3e-4, 5e-4]
    wide = _xtick_labels(figures.conjecture_3_1_1(scores([1e-4, 1e-3, 1e-2]), result))
    assert [x for x, _ in wide] == [1e-4, 1e-3, 1e-2]
    # every tick of a narrow view is labelled (the stock formatter skips 5 x 10^-4 here)
    three = _xtick_labels(figures.conjecture_3_1_1(scores([3e-4, 5e-4, 1e-3]), result))
    assert [x for x, _ in three] == [3e-4, 5e-4, 1e-3]


def test_a_panel_with_nothing_converged_spans_its_trials_lambdas():
    """An empty panel's λ axis covers its group's λ, instead of matplotlib's empty default of
    1 to 10: from its failure marks where trials failed, else (all still running) set so."""
    status = {"bn=affine": "converged", "bn=nonaffine": "not_converged", "bn=none": "running"}
    rows = pd.DataFrame([dict(group=g, status=st, weight_decay=lam, nc_score=0.5)
                         for g, st in status.items() for lam in (1e-3, 1e-2)])
    results = [dict(group=g, state="inconclusive", epsilon_hat=0.0, tau=0.1, statistic=0.0) for g in status]
    fig = figures.conjecture_3_1_1(rows, results)
    FigureCanvasAgg(fig).draw()
    for ax in fig.axes[1:3]:
        low, high = ax.get_xlim()
        assert low < 1e-3 and 1e-2 < high < 0.1
    lines, texts = _failure_marks(fig.axes[1])
    assert list(lines[0].get_xdata()) == [1e-3, 1e-2]
    assert [t for _, t in texts if t.isdigit()] == ["1", "1"]
    assert _failure_marks(fig.axes[2])[0] == []


def test_bn_effects_draws_each_cell_with_both_intervals():
    """One panel per comparison set; per pair of BN kinds a dot at each λ's difference, a thin
    line for its 95 % interval and a thick one for its Bonferroni interval, a hollow dot where a
    side had too few seeds (no interval)."""
    from analysis.effects import bn_effects
    rng = np.random.default_rng(3)
    rows = [dict(group=f"bn={bn}, depth={d}", bn=bn, weight_decay=lam, status="converged",
                 nc_score=(0.8 if bn == "affine" else 0.3) + 0.02 * rng.standard_normal())
            for d in (3, 6) for bn in ("affine", "none") for lam in (1e-4, 1e-3)
            for _ in range(3 if not (d == 6 and lam == 1e-3 and bn == "none") else 1)]
    cells = bn_effects(pd.DataFrame(rows))
    fig = figures.bn_effects(cells)
    FigureCanvasAgg(fig).draw()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["depth=3", "depth=6"]
    for ax, (n_ci, n_bare) in zip(panels, ((2, 0), (1, 1))):
        thin = [l for l in ax.get_lines() if l.get_linewidth() == 0.8 and len(l.get_xdata()) == 2
                and l.get_xdata()[0] == l.get_xdata()[1]]
        thick = [l for l in ax.get_lines() if l.get_linewidth() == 3]
        dots = [l for l in ax.get_lines() if l.get_marker() == "o"]
        assert len(thin) == len(thick) == n_ci
        filled = sum(len(l.get_xdata()) for l in dots if l.get_markerfacecolor() != "none")
        hollow = sum(len(l.get_xdata()) for l in dots if l.get_markerfacecolor() == "none")
        assert (filled, hollow) == (n_ci, n_bare)
        ys = sorted(float(y) for l in dots for y in l.get_ydata())
        assert all(0.4 < y < 0.6 for y in ys)                       # affine − none ≈ 0.5 at every λ
