"""What the report reads from an artifact directory, and the pure functions on it.

A run is read, never re-measured: ``slimtorch.json`` (recipe, plan, method records, self-check;
``export.artifact``), ``metrics.json`` (``slimtorch quantize``: the task metric of float and
quantized, sizes) and ``speed.json`` (``slimtorch bench speed``: latency or decode speed). A
file that is absent leaves its numbers "not measured"; nothing is filled in.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ArtifactError, ReportError

METRICS_FILE, SPEED_FILE = "metrics.json", "speed.json"

# Task metrics as ``metrics.json`` names them (``fp_KEY`` / ``q_KEY``): label, higher is better.
# The first one a run has is its headline (the y axis of the Pareto fronts).
METRICS: dict[str, tuple[str, bool]] = {
    "top1": ("top-1 %", True),
    "ppl": ("perplexity", False),
    "top1_agreement": ("top-1 agreement with float %", True),
    "cosine": ("cosine to float", True),
    "retrieval_agreement": ("retrieval agreement %", True),
    "token_agreement": ("next-token agreement with float %", True),
    "ppl_delta_pct": ("Δ perplexity vs float %", False),
    "kl": ("KL(float ‖ quantized)", False),
    "fd": ("FD on resnet20 features (not Inception)", False),
    "kid": ("KID ×10³", False),
    "mse_to_float": ("MSE to float samples (same noise)", False),
}


@dataclass
class Run:
    """One artifact directory and what it holds."""
    path: Path
    config: dict[str, Any]                      # slimtorch.json
    metrics: dict[str, Any] | None = None       # metrics.json, when `slimtorch quantize` wrote it
    speed: dict[str, Any] | None = None         # speed.json, when `slimtorch bench speed` ran
    layers: list[dict] | None = None            # every layer's SQNR, when recomputed (inspect)
    layers_note: str = ""                       # where ``layers`` came from
    label: str = ""                             # unique short name in a set of runs

    @property
    def meta(self) -> dict[str, Any]:
        return self.config.get("meta", {})

    @property
    def model(self) -> str:
        return (self.config.get("source") or (self.metrics or {}).get("model")
                or "custom model (saved from Python)")

    @property
    def recipe(self) -> str:
        return self.meta.get("recipe", {}).get("name", "?")

    @property
    def self_check(self) -> dict[str, Any] | None:
        return self.meta.get("self_check") or (self.metrics or {}).get("self_check")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt (not valid JSON: {e}); delete it or re-run the "
                            "command that writes it") from None


def load_run(directory: str | Path) -> Run:
    """The run in ``directory``; ``ArtifactError`` when it is not a slimtorch artifact."""
    from ..export.artifact import read_config
    directory = Path(directory)
    return Run(directory, read_config(directory), _read_json(directory / METRICS_FILE),
               _read_json(directory / SPEED_FILE))


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """The runs of ``dirs`` (each directory once, in the order given), labelled uniquely."""
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    unique = list(dict.fromkeys(Path(d).resolve() for d in dirs))
    if not unique:
        raise ReportError("no artifact directory given: pass one or more directories written "
                          "by `slimtorch quantize --out DIR` (or slimtorch.save)")
    runs = [load_run(d) for d in unique]
    names = [r.path.name for r in runs]
    for r in runs:  # the directory name, or parent/name where two runs share a name
        r.label = r.path.name if names.count(r.path.name) == 1 else \
            f"{r.path.parent.name}/{r.path.name}"
    return runs


# ---------------------------------------------------------------- numbers of a run
def headline(run: Run) -> str | None:
    """The key of the run's headline task metric (``METRICS``), None when none was measured."""
    return headline_key(run.metrics or {})


def headline_key(metrics: dict[str, Any]) -> str | None:
    """The headline task metric (``METRICS``) of a ``metrics.json``, None when it has none."""
    return next((k for k in METRICS if f"q_{k}" in metrics), None)


def headline_cells(metrics: dict[str, Any]) -> tuple[str, Any, Any]:
    """(metric label, float value, compressed value) of the headline task metric of a
    ``metrics.json``; ("-", None, None) when it has none — one row of a sweep table."""
    key = headline_key(metrics)
    if key is None:
        return "-", None, None
    return METRICS[key][0], metrics.get(f"fp_{key}"), metrics.get(f"q_{key}")


def value(x: Any) -> float:
    """A number from JSON, where the self-check writes ±inf/nan as strings."""
    return float(x)


def cell(x: Any, digits: int = 2) -> str:
    """A number from ``metrics.json`` as a table cell: '-' when absent, '∞' for inf."""
    if x is None:
        return "-"
    v = value(x)
    return "∞" if v == math.inf else f"{v:.{digits}f}"


def sizes(run: Run) -> tuple[int | None, int | None]:
    """(float bytes, quantized bytes) recorded by ``slimtorch quantize``; None when not."""
    m = run.metrics or {}
    return m.get("fp_size_bytes"), m.get("q_size_bytes")


@dataclass
class Latency:
    label: str          # what was timed, e.g. "batch 1, onnxruntime"
    unit: str           # "ms" or "ms/token"
    fp: float
    q: float


# engine pairs of ``measure_speed`` rows, in order of preference for the one headline number
_ENGINES = (("fp32 onnxruntime", "int8 onnxruntime"), ("fp32 openvino", "int8 openvino"),
            ("fp32 PyTorch", "int8 PyTorch"))


def latency(run: Run) -> Latency | None:
    """The headline latency of ``speed.json``: the smallest batch in the first runtime measured
    (onnxruntime, OpenVINO, PyTorch), or an LLM's decode time per token; None when the run has
    no speed result."""
    s = run.speed
    if not s:
        return None
    if s.get("kind") == "decode":
        sp = s["speed"]
        return Latency(f"batch 1 decode, {s.get('threads')} threads, lowered vs fp32",
                       "ms/token", 1e3 / sp["fp32"]["decode_tok_s"],
                       1e3 / sp["lowered"]["decode_tok_s"])
    rows = s.get("rows", [])
    if not rows:
        return None
    b = min(r["batch"] for r in rows)
    ms = {r["engine"]: r["ms"] for r in rows if r["batch"] == b}
    for fp, q in _ENGINES:
        if fp in ms and q in ms:
            engine = q.partition(" ")[2]
            return Latency(f"batch {b}, {engine}, {s.get('threads')} threads", "ms",
                           ms[fp], ms[q])
    return None


@dataclass
class LayerBits:
    name: str
    weights: int | None        # None: float
    activations: int | None    # None: float (or not quantized at the input)


def layer_bits(run: Run) -> list[LayerBits]:
    """Bits of every planned layer's weights and input activations, in model order (the plan
    saved in ``slimtorch.json``)."""
    out = []
    for fqn, entry in run.meta.get("plan", {}).get("layers", {}).items():
        w, a = entry.get("weights"), entry.get("activations")
        out.append(LayerBits(fqn, w and w.get("bits"), a and a.get("bits")))
    return out


def prune_stats(run: Run) -> dict[str, Any] | None:
    """The stats of the recipe's last channel-pruning method (``prune``, ``hesso``: the ones
    that record kept channels); None when the run pruned no channels."""
    stats = [m["stats"] for m in run.meta.get("methods", []) if "channels" in m.get("stats", {})]
    return stats[-1] if stats else None


def kept_channels(run: Run) -> list[tuple[str, int, int]] | None:
    """(layer, output channels before, after) of every prunable layer, in model order, from
    ``prune_stats``; None when the run pruned nothing, [] when it pruned with a slimtorch that
    did not record the counts yet."""
    stats = prune_stats(run)
    if stats is None:
        return None
    return [(f, b, a) for f, (b, a) in stats.get("channels", {}).items()]


def layer_sparsity(run: Run) -> tuple[dict[str, float], dict[str, str]] | None:
    """({layer: fraction of zero weights}, {layer left dense: why}) after the recipe's last
    sparsity method (the model's sparsity summary it records); None when none ran."""
    stats = [m.get("stats", {}) for m in run.meta.get("methods", [])
             if isinstance(m.get("stats", {}).get("summary"), dict)
             and "layers" in m["stats"]["summary"]]
    if not stats:
        return None
    return dict(stats[-1]["summary"]["layers"]), dict(stats[-1].get("skipped", {}))


def sqnr_layers(run: Run) -> tuple[list[dict], str]:
    """Per-layer SQNR rows (name, type, cumulative_sqnr_db, own_sqnr_db) and where they come
    from: every layer when ``run.layers`` was recomputed, else what quantize's self-check kept
    (its worst layers by own SQNR)."""
    if run.layers is not None:
        return run.layers, run.layers_note
    check = run.self_check
    if not check:
        return [], "no self-check recorded (quantize ran with self_check=False or inplace=True)"
    rows = check.get("layers") or check.get("worst_layers") or []
    return rows, (f"recorded by quantize's self-check on {check.get('samples', '?')} calibration "
                  f"samples: the {len(rows)} layers with the lowest own SQNR (every layer: "
                  "`slimtorch report --inspect-samples N`)")


# ---------------------------------------------------------------- Pareto front
def pareto_front(points: Sequence[tuple[float, float]], *,
                 minimize: tuple[bool, bool] = (True, False)) -> list[int]:
    """Indices of the points no other point dominates, sorted by the first coordinate.

    ``minimize``: per coordinate, whether smaller is better (default: size, smaller is better;
    accuracy, larger is better). Point j dominates i when j is at least as good in both
    coordinates and strictly better in one; equal points do not dominate each other, so both
    stay. NaN coordinates are never on the front."""
    sign = [1.0 if m else -1.0 for m in minimize]
    keys = [(sign[0] * x, sign[1] * y) for x, y in points]  # both coordinates: smaller is better
    ok = [not (math.isnan(k[0]) or math.isnan(k[1])) for k in keys]
    front = [i for i, ki in enumerate(keys) if ok[i] and not any(
        ok[j] and kj[0] <= ki[0] and kj[1] <= ki[1] and kj != ki for j, kj in enumerate(keys))]
    return sorted(front, key=lambda i: (points[i][0], i))


@dataclass
class ParetoPoint:
    run: Run
    x: float
    y: float
    on_front: bool = False


@dataclass
class ParetoSet:
    model: str
    metric: str                 # METRICS key
    x_label: str
    points: list[ParetoPoint] = field(default_factory=list)
    float_point: tuple[float, float] | None = None  # the float model, for reference


def pareto_sets(runs: Sequence[Run], axis: str) -> list[ParetoSet]:
    """Per model (and headline metric) with ≥ 2 runs measured on both axes: the points and
    which are on the front. ``axis``: "size" (MB) or "latency" (``latency``'s unit)."""
    groups: dict[tuple[str, str], ParetoSet] = {}
    for r in runs:
        key, x = headline(r), _x(r, axis)
        if key is None or x is None:
            continue
        fx = _x(r, axis, float_model=True)
        fy = r.metrics.get(f"fp_{key}")
        s = groups.setdefault((r.model, key), ParetoSet(r.model, key, _x_label(r, axis)))
        s.points.append(ParetoPoint(r, x, value(r.metrics[f"q_{key}"])))
        if fx is not None and fy is not None and s.float_point is None:
            s.float_point = (fx, value(fy))  # as the first run measured it
    out = [s for s in groups.values() if len(s.points) >= 2]
    for s in out:
        front = set(pareto_front([(p.x, p.y) for p in s.points],
                                 minimize=(True, not METRICS[s.metric][1])))
        for i, p in enumerate(s.points):
            p.on_front = i in front
    return out


def _x(run: Run, axis: str, float_model: bool = False) -> float | None:
    if axis == "size":
        b = sizes(run)[0 if float_model else 1]
        return None if b is None else b / 1e6
    lat = latency(run)
    return None if lat is None else (lat.fp if float_model else lat.q)


def _x_label(run: Run, axis: str) -> str:
    if axis == "size":
        return "size (MB)"
    lat = latency(run)
    return f"latency ({lat.unit}; {lat.label})"
