"""``slimtorch report DIR [DIR ...] --out report.html``: one self-contained HTML page and its
Markdown twin (same basename, ``.md``) for one artifact directory or a set of runs.

The page: model, recipe and method settings; task metric, size and latency against float (a run
without a measurement says "not measured"); per-layer SQNR and bits per layer as bar charts;
across the runs of one model, the accuracy-vs-size Pareto front (and accuracy-vs-latency when
runs have ``speed.json``). Figures are matplotlib PNGs embedded as ``data:`` URIs: no script,
no file or network access when the page is opened. What goes on it is the list of sections in
``report_sections.SECTIONS``; the data it reads is ``report_data``; the two renderings
``report_render``.

The report reads what the runs recorded and measures nothing, except with
``inspect_samples=N``: then every layer's SQNR is recomputed on N calibration samples of the
model's task (``slimtorch inspect``), since quantize's self-check keeps only the worst layers.
Both files are rendered in full before either is written, each to a temporary file renamed into
place, so neither is ever half-written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ReportError
from .report_data import Run, load_runs
from .report_render import Section, render_html, render_markdown

SectionFn = Callable[[Sequence[Run]], "Section | None"]


def report(dirs: Sequence[str | os.PathLike] | str | os.PathLike, out: str | os.PathLike, *,
           inspect_samples: int = 0, sections: Sequence[SectionFn] | None = None,
           title: str | None = None) -> tuple[Path, Path]:
    """Write ``out`` (HTML) and ``out`` with suffix ``.md`` for the artifact directories
    ``dirs``; returns both paths. ``sections``: the section functions, in order (default
    ``report_sections.SECTIONS``)."""
    html_path, md_path = _out_paths(out)
    if inspect_samples < 0:
        raise ReportError(f"inspect_samples must be ≥ 0 (0: use the self-check's worst layers),"
                          f" got {inspect_samples}")
    runs = load_runs(dirs)
    if inspect_samples:
        for r in runs:
            _inspect(r, inspect_samples)
    if sections is None:
        from .report_sections import SECTIONS
        sections = SECTIONS
    built = [s for s in (fn(runs) for fn in sections) if s is not None]
    title = title or ("slimtorch report: " + ", ".join(dict.fromkeys(r.model for r in runs)))
    subtitle = f"{len(runs)} run{'s' * (len(runs) != 1)}: " + ", ".join(
        f"{r.label} ({r.recipe})" for r in runs)
    page, twin = render_html(title, subtitle, built), render_markdown(title, subtitle, built)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    _write(html_path, page)
    _write(md_path, twin)
    return html_path, md_path


def _write(path: Path, text: str) -> None:
    """A temporary file beside ``path`` renamed onto it (readable by all: a page to share)."""
    from ..export.artifact import atomic_path
    with atomic_path(path, mode=0o644) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _out_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    html_path = Path(out)
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"--out {html_path}: the report is an HTML file; give a name ending "
                          "in .html (its Markdown twin gets the same name with .md)")
    if html_path.is_dir():
        raise ReportError(f"--out {html_path} is a directory; give a file name such as "
                          f"{html_path / 'report.html'}")
    return html_path, html_path.with_suffix(".md")


def _inspect(run: Run, samples: int) -> None:
    """Every layer's SQNR of ``run`` on ``samples`` calibration samples (``run_inspect``)."""
    from ..pipeline import run_inspect
    check = run_inspect(run.path, samples=samples)
    run.layers = [{"name": l.name, "type": l.type, "own_sqnr_db": l.own_sqnr_db,
                   "cumulative_sqnr_db": l.cumulative_sqnr_db} for l in check.layers]
    run.layers_note = (f"recomputed by `slimtorch report --inspect-samples {samples}` on "
                       f"{check.samples} calibration samples: every layer, in model order")
