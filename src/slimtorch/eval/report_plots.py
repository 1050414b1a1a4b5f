"""The report's figures: matplotlib on the Agg canvas (no pyplot, no display, no global state),
returned as PNG bytes.

matplotlib is the ``report`` extra; without it ``ReportError`` says what to install.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

from ..errors import ReportError

DPI = 100
FRONT, OFF, FLOAT = "#1f77b4", "#9aa5b1", "#d62728"


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("the report draws its figures with matplotlib, which is not "
                          "installed: pip install 'slimtorch[report]'") from None
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _height(n: int) -> float:
    return min(1.2 + 0.24 * n, 60.0)  # one bar row per layer, capped for very deep models


def barh(labels: Sequence[str], series: dict[str, Sequence[float | None]], *, xlabel: str,
         title: str) -> bytes:
    """Horizontal grouped bars, one row per label (top to bottom in the order given); a None
    or non-finite value draws no bar and is marked "∞"/"float" by the caller's table."""
    fig = _figure(9.0, _height(len(labels)))
    ax = fig.add_subplot()
    k = len(series)
    h = 0.8 / k
    for j, (name, vals) in enumerate(series.items()):
        ys = [i + (j - (k - 1) / 2) * h for i in range(len(labels))]
        xs = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
        ax.barh(ys, xs, height=h, label=name)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if k > 1:  # beside the axes, where it hides no bar
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def pareto(points: Sequence[tuple[float, float, str, bool]], *, xlabel: str, ylabel: str,
           title: str, float_point: tuple[float, float] | None,
           higher_is_better: bool) -> bytes:
    """Scatter of (x, y, label, on_front); the front joined as a step line; the float model as
    a reference star."""
    fig = _figure(8.0, 5.0)
    ax = fig.add_subplot()
    for x, y, label, on in points:
        ax.scatter([x], [y], color=FRONT if on else OFF, s=40, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((x, y) for x, y, _, on in points if on)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=FRONT,
                alpha=0.6, label="Pareto front")
    if float_point is not None:
        ax.scatter([float_point[0]], [float_point[1]], marker="*", s=120, color=FLOAT,
                   zorder=3, label="float")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + ("" if higher_is_better else " (lower is better)"))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
