"""``slimtorch sweep SWEEP.yaml``: every model × recipe × seed as one trial, on Ray
(``slimtorch.sweeps``); a line per trial as it ends, then the table."""
from __future__ import annotations

import signal

from rich.console import Console
from rich.table import Table

console = Console()


class _Stream:
    """Prints one line per event of ``sweep`` as trials end: ``[ended/all] done|failed ...``."""

    def __init__(self) -> None:
        self.ended = self.total = 0

    def __call__(self, kind: str, trial: dict, info: dict) -> None:
        from .eval.report_data import headline_cells
        if kind == "start":
            self.ended, self.total = info["finished"], info["trials"]
            console.print(f"sweep: {info['trials']} trials, {info['finished']} finished "
                          f"earlier (kept); running the rest on {info['backend']}",
                          highlight=False, soft_wrap=True)
            return
        what = f"{trial['model']} · {trial['recipe_label']} · seed {trial['seed']}"
        if kind == "retry":
            console.print(f"retry  {what}: {info['error']}", highlight=False, markup=False,
                          soft_wrap=True)
            return
        self.ended += 1
        if kind == "done":
            label, fp, q = headline_cells(info)
            score = f"{label} {fp} → {q}" if q is not None else "no task metric"
            text = (f"done   {what}: {score}, {info['q_size_bytes'] / 1e3:.1f} KB, "
                    f"{info['calib_seconds']:.0f} s")
        else:
            text = f"failed {what}: {info['error']}"
        # soft_wrap: one line per trial however narrow the terminal (or a log file: 80)
        console.print(f"[{self.ended}/{self.total}] {text}", highlight=False, markup=False,
                      soft_wrap=True)


def cmd_sweep(args) -> None:
    from .sweeps import SweepError, spec_from, sweep
    spec = spec_from(args.spec, name=args.name, models=args.models, recipes=args.recipes,
                     seeds=args.seeds, calib_size=args.calib_size)
    # `kill PID` ends the sweep like Ctrl-C: the Ray runtime it started is stopped, and the
    # same command run again resumes
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        res = sweep(spec, args.out, address=args.address, serial=args.serial,
                    workers=args.workers, on_event=_Stream())
    except KeyboardInterrupt:
        raise SweepError("interrupted: the trials that finished are kept; run the same "
                         "command again to resume") from None
    t = Table(title=f"sweep {res['name']}: {len(res['rows'])} of {res['trials']} trials "
              f"finished ({len(res['skipped'])} from an earlier run), {len(res['failures'])} "
              f"failed · {res['backend']}")
    for col in ("model", "recipe", "seed", "metric", "float", "compressed", "size KB"):
        t.add_column(col, justify="left" if col in ("model", "recipe", "metric") else "right")
    from .eval.report_data import cell, headline_cells
    for m in res["rows"]:
        label, fp, q = headline_cells(m)
        t.add_row(m["model"], m["recipe_label"], str(m["seed"]), label, cell(fp), cell(q),
                  f"{m['q_size_bytes'] / 1e3:.1f}")
    console.print(t)
    console.print(f"results in [bold]{res['out']}/results.md[/bold] (and .json); artifacts in "
                  f"{res['out']}/trials/ (`slimtorch report {res['out']}/trials/*`)")
    if res["failures"]:
        raise SweepError(f"{len(res['failures'])} trial(s) failed (listed above and in "
                         f"{res['out']}/failures.json); fix them and run the sweep again: "
                         "finished trials are kept")


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run models × recipes × seeds from a YAML spec on Ray "
                       "(serially without it); resumable")
    p.add_argument("spec", metavar="SWEEP.yaml", nargs="?", help="the grid (see "
                   "docs/sweeps.md); the options below set or override its keys")
    p.add_argument("--models", nargs="+", help="zoo:NAME or minilm, one or more")
    p.add_argument("--recipes", nargs="+", help="built-in names or YAML files")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--calib-size", type=int)
    p.add_argument("--name", help="the sweep's name (default output: runs/NAME)")
    p.add_argument("--out", help="output directory (default runs/NAME)")
    p.add_argument("--address", help="join a running Ray cluster ('auto', 'ray://HOST:10001'); "
                   "default: start a local Ray runtime on this machine's cores")
    p.add_argument("--workers", type=int, help="CPUs of the local Ray runtime (default: all), "
                   "or torch threads when serial")
    p.add_argument("--serial", action="store_true", help="run trials in this process, one "
                   "after another (the default when Ray is not installed)")
    p.set_defaults(fn=cmd_sweep)
