"""What every bench script writes: the command and commit, the machine, the table; the rows as
JSON beside it (``PREFIX.md`` + ``PREFIX.json``, written atomically)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

from slimtorch.eval.machine import machine_markdown
from slimtorch.export.artifact import write_json_atomic, write_text_atomic


def commit() -> str:
    """The short commit of the checkout the bench runs from."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"


def provenance() -> str:
    return f"Command: `python {' '.join(sys.argv)}` at commit {commit()}."


def row_commits(rows: list[dict], key: str = "recipe") -> str:
    """A line naming the commit each row was measured at, when rows come from several runs
    (``--from-json``; rows record ``commit`` when they are measured)."""
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r.get("commit", "not recorded"), []).append(str(r.get(key)))
    if len(by) < 2:
        return ""
    return "Rows measured at: " + "; ".join(f"{c}: {', '.join(dict.fromkeys(names))}"
                                            for c, names in by.items()) + "."


def write(rows: list[dict], out: str, to_markdown: Callable[[list[dict]], str]) -> None:
    """Print and write ``out``.md (provenance, machine, table) and ``out``.json (the rows)."""
    md = "\n".join([provenance(), machine_markdown(), "", to_markdown(rows)])
    print("\n" + md)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out + ".md"), md + "\n")
    write_json_atomic(Path(out + ".json"), rows)


def add_saved_rows(parser) -> None:
    """``--from-metrics DIR ...`` and ``--from-json FILE ...`` on a bench script's parser."""
    parser.add_argument("--from-metrics", nargs="*", default=[], metavar="DIR",
                        help="artifact directories of CLI runs whose metrics.json become rows")
    parser.add_argument("--from-json", nargs="*", default=[], metavar="FILE",
                        help="rows saved by earlier runs of this script (re-rendered, not re-run)")


def saved_rows(args) -> list[dict]:
    """The rows ``add_saved_rows``' options name: metrics.json files, then saved row lists."""
    rows = [json.loads((Path(d) / "metrics.json").read_text()) for d in args.from_metrics]
    return rows + [r for f in args.from_json for r in json.loads(Path(f).read_text())]
