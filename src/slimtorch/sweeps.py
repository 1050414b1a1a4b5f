"""Sweeps: every model × recipe × seed of a sweep spec is one trial — one ``slimtorch quantize``
run (``pipeline.run_quantize``) — run in parallel on Ray, or one after another without it.

A spec (``SWEEP.yaml``, a dict or a ``SweepSpec``)::

    name: baseline
    models: [zoo:resnet20, zoo:mobilenetv2]
    recipes: [w8a8, w4a8, my-recipe.yaml]   # built-in names or files (relative to the spec)
    # ... or a recipe written out inline (a mapping, labelled by its name):
    #   - {name: w4a4-qdrop-long, methods: [{name: qdrop, iters: 20000}], ...}
    seeds: [0, 1, 2]
    calib_size: 256                         # optional, as `slimtorch quantize --calib-size`
    cpus_per_trial: 1                       # Ray CPUs of a trial = its torch threads

What ``sweep`` leaves in ``OUT``:

- ``OUT/trials/ID/``: the trial's artifact and ``metrics.json`` — ``slimtorch report
  OUT/trials/*`` reads them like any run;
- ``OUT/results.md`` / ``results.json``: one table of every trial and a summary over seeds,
  rewritten (atomically) each time a trial finishes — results stream in as trials end;
- ``OUT/failures.json``: trials that failed after their retries, with the error verbatim;
- ``OUT/float-outputs/``: the float model's task outputs, computed once per model
  (``FloatOutputs``) and read by every other trial of it;
- ``OUT/sweep.json``: the settings of every trial, so a rerun can tell a finished trial it may
  keep from one that was run with other settings.

A trial is finished when its ``metrics.json`` exists: ``run_quantize`` writes it last, after the
artifact, by rename. A killed sweep run again skips finished trials, and a trial killed during
block reconstruction continues from its ``recon-state`` (``run_quantize(resume=True)``).
A trial that raises (a crashed worker, an out-of-memory kill, a bug) is run again ``retries``
times (default once) and then reported; bad input (a ``SlimtorchError``) is reported at once,
since running it again would fail the same way.

Ray: ``address=None`` starts a local Ray runtime on this machine's cores (``workers`` CPUs,
default all) and stops it at the end; ``address="auto"`` or ``"ray://HOST:10001"`` joins a
running cluster, whose nodes must see ``OUT`` at the same path (a shared file system) and have
slimtorch installed. Without Ray installed, or with ``serial=True``, trials run in this
process one after another, with the same retries, resume and files.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import statistics
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import SlimtorchError


class SweepError(SlimtorchError):
    """A sweep spec or output directory that cannot be run (an unknown model or recipe, a
    directory that holds another sweep's trials, a sweep already running there)."""


class SweepSpec(BaseModel):
    """The grid of a sweep; every field is a setting of ``slimtorch quantize``."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "sweep"
    models: list[str] = Field(min_length=1)
    recipes: list[str | dict[str, Any]] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    calib_size: int | None = Field(default=None, ge=1)
    eval_size: int | None = Field(default=None, ge=1)
    calib: Literal["data", "data-free"] | None = None
    data_dir: str | None = None
    cpus_per_trial: int = Field(default=1, ge=1)
    retries: int = Field(default=1, ge=0, le=5)

    @field_validator("models", "recipes", "seeds")
    @classmethod
    def _unique(cls, v: list) -> list:
        dup = sorted({str(x) for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"listed twice: {', '.join(dup)}")
        return v


def load_spec(spec: "SweepSpec | dict | str | os.PathLike") -> tuple[SweepSpec, Path]:
    """(spec, the directory its recipe files are relative to) from a spec, a dict or a YAML
    file; errors name the key and line."""
    if isinstance(spec, SweepSpec):
        return spec, Path.cwd()
    from .recipe import load_yaml_model, validate_model
    if isinstance(spec, dict):
        return (validate_model(spec, SweepSpec, source="sweep", what="sweep", error=SweepError),
                Path.cwd())
    path = Path(spec)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    return (load_yaml_model(path.read_text(), SweepSpec, source=path.name, what="sweep",
                            error=SweepError), path.resolve().parent)


def spec_from(path: "str | os.PathLike | None", **fields: Any) -> SweepSpec:
    """The spec of the file ``path`` (None: none) with ``fields`` that are not None set over
    it — ``slimtorch sweep [SWEEP.yaml] --models ... --seeds ...``. Recipe files named in
    the file stay relative to it."""
    from .recipe import is_recipe_file
    data: dict[str, Any] = {}
    if path is not None:
        spec, base = load_spec(path)
        data = spec.model_dump(exclude_unset=True)
        data["recipes"] = [str(base / r) if isinstance(r, str) and is_recipe_file(r) else r
                           for r in spec.recipes]
    data.update({k: v for k, v in fields.items() if v is not None})
    if "models" not in data or "recipes" not in data:
        raise SweepError("a sweep needs models and recipes: give SWEEP.yaml, or --models and "
                         "--recipes (e.g. --models zoo:vit --recipes w8a8 w4a4 --seeds 0 1)")
    return load_spec(data)[0]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def expand(spec: SweepSpec, base: Path) -> list[dict[str, Any]]:
    """The trials of ``spec`` in grid order (model, then recipe, then seed): plain dicts of
    ``run_quantize`` settings with an ``id`` (the directory name under ``OUT/trials``) and the
    recipe's fingerprint (an edited recipe file makes a finished trial stale). Every model and
    recipe is checked here, before any trial starts."""
    from .recipe import is_recipe_file, recipe_fingerprint, resolve_recipe
    from .zoo.registry import get_entry
    for source in spec.models:
        scheme, _, name = source.partition(":")
        if source not in ("minilm", "zoo:minilm") and scheme != "zoo":
            raise SweepError(f"sweep model {source!r}: a sweep runs `slimtorch quantize`, which "
                             "evaluates zoo:NAME models and minilm (`slimtorch zoo list`)")
        if scheme == "zoo" and name != "minilm":
            get_entry(name)  # UnknownModelError naming the known models
    from .recipe import Recipe
    recipes: dict[str, tuple[str | dict, str]] = {}
    for r in spec.recipes:
        if isinstance(r, dict):  # inline: run as written, labelled by its name
            recipe = Recipe.from_dict(r, source=f"sweep recipe {r.get('name', '(no name)')!r}")
            label, ref = recipe.name, recipe.to_dict()
        else:
            path = (base / r) if is_recipe_file(r) else None
            recipe = resolve_recipe(str(path) if path is not None else r)
            label, ref = (path.stem, str(path)) if path is not None else (r, r)
        if _slug(label) in {_slug(k) for k in recipes}:
            raise SweepError(f"two sweep recipes are both named {label!r}: rename one (a "
                             "file's label is its stem, an inline recipe's its name)")
        recipes[label] = (ref, recipe_fingerprint(recipe))
    trials = []
    for model in spec.models:
        for label, (recipe, fingerprint) in recipes.items():
            for seed in spec.seeds:
                trials.append({"id": f"{_slug(model)}__{_slug(label)}__seed{seed}",
                               "model": model, "recipe": recipe, "recipe_label": label,
                               "recipe_fingerprint": fingerprint, "seed": seed,
                               "calib_size": spec.calib_size, "eval_size": spec.eval_size,
                               "calib": spec.calib})
    return trials


# the trial settings that decide its result: a finished trial run with others is stale
_SETTINGS = ("model", "recipe_fingerprint", "seed", "calib_size", "eval_size", "calib")


def run_trial(trial: dict[str, Any], out: str, data_dir: str | None, threads: int,
              fresh: bool = False) -> dict[str, Any]:
    """Run one trial into ``OUT/trials/ID`` (in a Ray worker or in this process). Returns
    ``{"status": "done", "metrics": ...}``, or ``{"status": "error", "error": ...}`` for bad
    input; any other exception propagates, and the driver runs the trial again. ``fresh``: this
    process runs this trial only (a Ray worker of ``max_calls=1``), so its peak resident
    memory is the trial's: recorded as ``peak_rss_mb`` in the metrics (and metrics.json)."""
    import resource
    import torch
    from .export.artifact import write_json_atomic
    from .pipeline import run_quantize
    torch.set_num_threads(threads)
    directory = Path(out) / "trials" / trial["id"]
    try:
        metrics, _ = run_quantize(
            trial["model"], trial["recipe"], calib_size=trial["calib_size"], seed=trial["seed"],
            out=directory, data_dir=data_dir, eval_size=trial["eval_size"],
            calib_source=trial["calib"], resume=(directory / "recon-state").exists(),
            fp_cache=FloatOutputs(Path(out) / "float-outputs", trial["eval_size"]))
    except SlimtorchError as e:
        return {"status": "error", "error": f"{type(e).__name__}: {e}"}
    if fresh:
        metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        write_json_atomic(directory / "metrics.json", metrics)
    return {"status": "done", "metrics": metrics}


class FloatOutputs(dict):
    """``run_quantize``'s float-output cache on disk, shared by every trial of a sweep: the
    float model's task outputs depend on the model and the evaluation size only, so they are
    computed by the first trial of each model and read (``weights_only``) by the others —
    trials run in worker processes of their own, which share no memory."""

    def __init__(self, root: Path, eval_size: int | None):
        super().__init__()
        self.root, self.tag = root, "all" if eval_size is None else str(eval_size)

    def _file(self, source: str) -> Path:
        # a retrained zoo model (new weights file) must not read its old model's outputs
        stamp = ""
        if source.startswith("zoo:") and source != "zoo:minilm":
            from .zoo.registry import weights_path
            w = weights_path(source[4:])
            if w.is_file():
                st = w.stat()
                stamp = f"__{st.st_size}-{st.st_mtime_ns}"
        return self.root / f"{_slug(source)}__{self.tag}{stamp}.pt"

    def __bool__(self) -> bool:  # ``fp_cache or {}`` must keep us even when nothing is loaded
        return True

    def get(self, source: str, default: Any = None) -> Any:
        import torch
        f = self._file(source)
        if not f.is_file():
            return default
        try:
            return torch.load(f, weights_only=True)
        except Exception:  # noqa: BLE001 — unreadable: computed again and rewritten
            return default

    def __setitem__(self, source: str, outputs: Any) -> None:
        import torch
        from .export.artifact import atomic_path
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._file(source)) as tmp:
            torch.save(outputs, tmp)


class _Backend:
    """Runs trials and hands back (trial, result or exception) as each one ends."""

    def submit(self, trial: dict) -> None: ...
    def results(self) -> Iterator[tuple[dict, dict | None, BaseException | None]]: ...
    def close(self) -> None: ...


class _Serial(_Backend):
    def __init__(self, out: str, data_dir: str | None, threads: int):
        self.args, self.queue = (out, data_dir, threads), []

    def submit(self, trial: dict) -> None:
        self.queue.append(trial)

    def results(self):
        while self.queue:
            trial = self.queue.pop(0)
            try:
                yield trial, run_trial(trial, *self.args), None
            except Exception as e:  # noqa: BLE001 — reported, retried by the driver
                yield trial, None, e

    def close(self) -> None:
        pass


class _Ray(_Backend):
    def __init__(self, out: str, data_dir: str | None, cpus: int, address: str | None,
                 workers: int | None):
        import logging
        import ray
        self.ray, self.args, self.pending = ray, (out, data_dir, cpus), {}
        self.owned = not ray.is_initialized()
        if self.owned:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local runtime: no token file
            # "local": a runtime of our own, never one another process started on this
            # machine (ray.init() alone would join the latest one it finds)
            ray.init(address=address or "local", num_cpus=None if address else workers,
                     include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     object_store_memory=None if address else 256 << 20)
        # max_calls=1: every trial in a process of its own — the memory of one is back before
        # the next starts, and its peak RSS is its own
        self.remote = ray.remote(num_cpus=cpus, max_retries=0, max_calls=1)(run_trial)

    def submit(self, trial: dict) -> None:
        self.pending[self.remote.remote(trial, *self.args, fresh=True)] = trial

    def results(self):
        while self.pending:
            done, _ = self.ray.wait(list(self.pending), num_returns=1)
            trial = self.pending.pop(done[0])
            try:
                yield trial, self.ray.get(done[0]), None
            except Exception as e:  # noqa: BLE001 — a crashed worker or a raising trial
                yield trial, None, e

    def close(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        if self.owned:
            self.ray.shutdown()


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.sweep.lock`` for the run: two sweeps writing one directory would overwrite
    each other's trials."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".sweep.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep is running in {out}; wait for it to end or use "
                             "another --out") from None
        yield


def _known(out: Path) -> dict[str, dict]:
    """The settings of every trial ever started in ``out`` (``OUT/sweep.json``), by id."""
    path = out / "sweep.json"
    return json.loads(path.read_text())["trials"] if path.is_file() else {}


def _finished(out: Path, trials: list[dict]) -> set[str]:
    """Ids of the finished trials; a finished trial whose settings differ from the spec's is
    an error (its numbers would be mixed into the table as if they were the spec's)."""
    known = _known(out)
    finished = set()
    for t in trials:
        if not (out / "trials" / t["id"] / "metrics.json").is_file():
            continue
        old = known.get(t["id"])
        diff = [k for k in _SETTINGS if old is None or old.get(k) != t[k]]
        if diff:
            raise SweepError(f"{out / 'trials' / t['id']} was run with other settings "
                             f"({', '.join(diff)}); use another --out, or delete that trial "
                             "directory to run it again")
        finished.add(t["id"])
    return finished


def _record(out: Path, trials: list[dict]) -> None:
    """Add the settings of ``trials`` to ``OUT/sweep.json`` before any of them runs."""
    from .export.artifact import write_json_atomic
    write_json_atomic(out / "sweep.json", {"trials": {**_known(out),
                                                     **{t["id"]: t for t in trials}}})


def rows_markdown(rows: list[dict], failures: dict[str, str], name: str) -> str:
    """The sweep's table: one row per trial (grid order), then mean ± standard deviation of
    each model × recipe over its seeds, then the failures."""
    from .eval.report_data import cell, headline_cells
    out = [f"# sweep {name}", "", "| model | recipe | seed | metric | float | compressed | "
           "size KB | calibration s | peak RSS MB |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[float]] = {}
    for m in rows:
        label, fp, q = headline_cells(m)
        out.append(f"| {m['model']} | {m['recipe_label']} | {m['seed']} | {label} | "
                   f"{cell(fp)} | {cell(q)} | {m['q_size_bytes'] / 1e3:.1f} | "
                   f"{m['calib_seconds']:.1f} | {cell(m.get('peak_rss_mb'), 0)} |")
        if q is not None:
            groups.setdefault((m["model"], m["recipe_label"], label), []).append(float(q))
    if any(len(v) > 1 for v in groups.values()):
        out += ["", "Over seeds (mean ± sample standard deviation):", "",
                "| model | recipe | metric | seeds | compressed |", "|---|---|---|---:|---:|"]
        for (model, recipe, label), v in groups.items():
            sd = f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else ""
            out.append(f"| {model} | {recipe} | {label} | {len(v)} | "
                       f"{statistics.mean(v):.3f}{sd} |")
    if failures:
        out += ["", "Failed trials (error verbatim):", ""]
        out += [f"- `{tid}`: {err.splitlines()[0] if err else ''}" for tid, err in
                failures.items()]
    return "\n".join(out) + "\n"


def sweep(spec: "SweepSpec | dict | str | os.PathLike", out: str | os.PathLike | None = None,
          *, address: str | None = None, serial: bool = False, workers: int | None = None,
          on_event: Callable[[str, dict, dict], None] | None = None) -> dict[str, Any]:
    """Run every trial of ``spec`` not finished in ``out`` (None: ``runs/NAME``) yet; see the
    module docstring.

    Returns {"name", "rows": the metrics of every finished trial in grid order, each with its
    ``trial`` id and ``recipe_label``; "failures": {id: error}; "skipped": ids found finished;
    "backend": "ray" or "serial"}. ``on_event(kind, trial, info)`` is called with
    ``"done"`` (info: the metrics), ``"retry"`` and ``"failed"`` (info: {"error": ...}) as
    trials end, and once with ``"start"`` (info: {"trials", "finished", "backend"}) — the CLI
    prints its stream from it."""
    from .export.artifact import write_json_atomic, write_text_atomic
    spec, base = load_spec(spec)
    trials = expand(spec, base)
    if workers is not None and workers < 1:
        raise SweepError(f"--workers must be at least 1, got {workers}")
    use_ray = not serial and ray_available()
    if address is not None and not use_ray:
        raise SweepError("--address joins a Ray cluster, but " + (
            "--serial was given" if serial else "Ray is not installed: pip install "
            "'slimtorch[sweep]'") + "; drop --address to run serially here")
    out = Path("runs") / _slug(spec.name) if out is None else Path(out)
    with _lock(out):
        finished = _finished(out, trials)
        _record(out, trials)
        data_dir = spec.data_dir
        threads = spec.cpus_per_trial if use_ray else (workers or os.cpu_count() or 1)
        todo = [t for t in trials if t["id"] not in finished]
        backend = (_Ray(str(out), data_dir, spec.cpus_per_trial, address, workers)
                   if use_ray and todo else _Serial(str(out), data_dir, threads))
        metrics = {tid: json.loads((out / "trials" / tid / "metrics.json").read_text())
                   for tid in finished}
        failures: dict[str, str] = {}
        attempts = {t["id"]: 0 for t in trials}

        def publish() -> list[dict]:
            rows = [{**metrics[t["id"]], "trial": t["id"], "recipe_label": t["recipe_label"]}
                    for t in trials if t["id"] in metrics]
            write_json_atomic(out / "results.json", {"name": spec.name, "rows": rows,
                                                     "failures": failures})
            write_text_atomic(out / "results.md", rows_markdown(rows, failures, spec.name))
            write_json_atomic(out / "failures.json", failures)
            return rows

        if on_event:
            on_event("start", {}, {"trials": len(trials), "finished": len(finished),
                                   "backend": "ray" if use_ray else "serial"})
        try:
            for t in todo:
                attempts[t["id"]] += 1
                backend.submit(t)
            for trial, result, exc in backend.results():
                tid = trial["id"]
                if result is not None and result["status"] == "done":
                    metrics[tid] = result["metrics"]
                    failures.pop(tid, None)
                    if on_event:
                        on_event("done", trial, result["metrics"])
                elif result is None and attempts[tid] <= spec.retries:
                    attempts[tid] += 1
                    if on_event:
                        on_event("retry", trial, {"error": _error_text(exc)})
                    backend.submit(trial)
                else:
                    failures[tid] = result["error"] if result is not None else _error_text(exc)
                    if on_event:
                        on_event("failed", trial, {"error": failures[tid]})
                publish()
        finally:
            backend.close()
        rows = publish()
    return {"name": spec.name, "rows": rows, "failures": failures, "skipped": sorted(finished),
            "backend": "ray" if use_ray else "serial", "out": str(out), "trials": len(trials)}


def _error_text(exc: BaseException | None) -> str:
    """The error as the trial raised it: its type and message (Ray wraps it; its text keeps
    the worker's traceback, whose last line is the original error)."""
    if exc is None:
        return ""
    if type(exc).__module__.startswith("ray"):
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return lines[-1].strip() if lines else type(exc).__name__
    return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[0]
