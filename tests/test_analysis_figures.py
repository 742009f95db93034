"""Fig 3.1 draws converged trials as lines and marks the λ values where trials failed."""
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg

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
    lines = [l for l in ax.get_lines() if l.get_label() == "not converged (count)"]
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
