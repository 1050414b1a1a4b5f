"""The report of real runs, as a picture: ResNet-20 under several RTN recipes, each quantized and
timed by the CLI's own code, then ``slimtorch report`` over the set, opened in headless Chromium.

For each recipe: ``slimtorch quantize --model zoo:resnet20 --recipe R --out RUNS/resnet20-R``
(calibration 1024, seed 0, metrics on the full test set) and ``slimtorch bench speed`` on it
(batch 1 and 64, 2 threads; skipped when the artifact already has speed.json), then
``slimtorch report RUNS/resnet20-* --out RUNS/report.html --inspect-samples 32``. Writes
bench/results/report_resnet20.png (a screenshot of the top of the page, 1280 px wide),
report_resnet20_pareto.png (the accuracy-vs-size figure as embedded in the page) and
report_resnet20.md (command, commit, machine, then the report's Markdown twin).

    python bench/report_page.py [--recipes w8a8 w4a8 w4a4 w2a4] [--runs runs/report]
                                [--height 2600] [--out bench/results/report_resnet20]
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from report import commit, provenance

from slimtorch.cli import main as cli
from slimtorch.eval.machine import machine_markdown
from slimtorch.eval.report import report
from slimtorch.export.artifact import atomic_path, write_text_atomic


MADE_AT = "bench_commit.txt"  # the commit a run was quantized and timed at


def _made_at(d: Path) -> str:
    return (d / MADE_AT).read_text().strip() if (d / MADE_AT).is_file() else "not recorded"


def screenshot(page: Path, png: Path, width: int, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory(dir=png.parent) as tmp:  # chromium names its own file
        shot = Path(tmp) / "shot.png"
        subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox",
                        "--hide-scrollbars", f"--window-size={width},{height}",
                        f"--screenshot={shot}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        if not shot.is_file() or shot.stat().st_size == 0:
            raise SystemExit(f"chromium wrote no screenshot of {page}")
        shot.chmod(0o644)
        os.replace(shot, png)


def first_figure(page: Path, section: str) -> bytes:
    """The PNG of the first figure in the page's section ``section`` (its id)."""
    html = page.read_text()
    part = html[html.index(f'<section id="{section}">'):]
    return base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', part).group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8", "w4a4", "w2a4"])
    p.add_argument("--runs", default="runs/report")
    p.add_argument("--height", type=int, default=2600)
    p.add_argument("--out", default="bench/results/report_resnet20")
    args = p.parse_args()
    runs = Path(args.runs)
    dirs = []
    for r in args.recipes:
        d = runs / f"resnet20-{r}"
        if not (d / "metrics.json").is_file():
            assert cli(["quantize", "--model", "zoo:resnet20", "--recipe", r, "--out", str(d),
                        "--quiet"]) == 0
            (d / MADE_AT).write_text(commit())
        if not (d / "speed.json").is_file():
            assert cli(["bench", "speed", str(d)]) == 0
        dirs.append(d)
    made = "; ".join(f"{d.name} at {_made_at(d)}" for d in dirs)
    page, md = report(dirs, runs / "report.html", inspect_samples=32)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    screenshot(page, out.with_suffix(".png"), 1280, args.height)
    with atomic_path(out.with_name(out.name + "_pareto.png"), mode=0o644) as tmp:
        Path(tmp).write_bytes(first_figure(page, "pareto-size"))
    note = "\n".join([provenance(), f"Runs quantized and timed: {made}.", machine_markdown(), "",
                      f"Screenshot: `{out.with_suffix('.png').name}` (top {args.height} px of "
                      f"the page, headless Chromium); figure: `{out.name}_pareto.png`. "
                      "The report's Markdown twin follows.", "", md.read_text()])
    write_text_atomic(out.with_suffix(".md"), note)
    print(note)


if __name__ == "__main__":
    main()
