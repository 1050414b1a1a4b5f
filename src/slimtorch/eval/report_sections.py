"""The report's sections: each a small function ``(runs) -> Section | None`` (None: nothing to
show for these runs), run in the order of ``SECTIONS``.

A new family adds its section as one more function and one more entry in ``SECTIONS``, reading
what its method records (``meta["methods"][i]["stats"]``) or its own file in the artifact
directory, without touching the others. ``sensitivity`` reads ``DIR/sensitivity.json``
(``slimtorch sensitivity --out DIR``); ``samples`` the diffusion task's ``DIR/samples.png``.
``pruning`` and ``sparsity`` read what the prune and sparsity methods record. No section
invents a number: what a run did not measure reads "not measured" and names the
command that measures it.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

from . import report_plots as plots
from .report_data import (METRICS, Run, cell, headline, kept_channels, latency, layer_bits,
                          layer_sparsity, pareto_sets, prune_stats, sizes, sqnr_layers, value)
from .report_render import Figure, Section, Table, Text

NOT_MEASURED = "not measured"
FINE = ("cosine", "kl", "mse_to_float")  # metrics shown with 4 decimals


def _mb(n: int | None) -> str:
    return NOT_MEASURED if n is None else f"{n / 1e6:.3f} MB"


# ---------------------------------------------------------------- summary
def summary(runs: Sequence[Run]) -> Section:
    """Model, recipe, task metric, size and latency of each run against its float model."""
    rows = []
    for r in runs:
        key, m = headline(r), r.metrics or {}
        metric = (f"{METRICS[key][0]}: {cell(m.get(f'fp_{key}', 'nan'))} → "
                  f"{cell(m[f'q_{key}'])}" if key else NOT_MEASURED)
        others = [f"{METRICS[k][0]} {cell(m[f'q_{k}'], 4 if k in FINE else 2)}"
                  for k in METRICS if k != key and f"q_{k}" in m]
        fp_b, q_b = sizes(r)
        size = (f"{_mb(fp_b)} → {_mb(q_b)} ({fp_b / q_b:.2f}× smaller)" if fp_b and q_b
                else f"{NOT_MEASURED} (artifact file {_mb(_file_bytes(r))})")
        lat = latency(r)
        speed = (f"{lat.fp:.2f} → {lat.q:.2f} {lat.unit} (speed-up {lat.fp / lat.q:.2f}×; "
                 f"{lat.label})"
                 if lat else NOT_MEASURED)
        check = r.self_check
        changed = (any(l.weights or l.activations for l in layer_bits(r))
                   or layer_sparsity(r) is not None)
        # the self-check compares the model as compressed with its own float/dense path: a
        # pruned-only run has no such noise, and "∞ dB" beside its accuracy drop would mislead
        sq = ("— (pruned only: nothing quantized or sparse)" if check and not changed else
              f"{cell(check['output_sqnr_db'], 1)} dB" if check else NOT_MEASURED)
        rows.append([r.label, r.model, r.recipe, metric, "; ".join(others) or "—", size,
                     speed, sq])
    blocks = [Table(["run", "model", "recipe", "task metric (float → quantized)",
                     "other metrics (quantized)", "size (float → quantized)",
                     "latency (float → quantized)", "output SQNR"], rows)]
    missing = [r.label for r in runs if r.metrics is None]
    if missing:
        blocks.append(Text(f"No metrics.json in {', '.join(missing)} (saved from Python): task "
                           "metric and sizes not measured; `slimtorch quantize --out DIR` "
                           "writes them."))
    if any(latency(r) is None for r in runs):
        blocks.append(Text("Latency is measured by `slimtorch bench speed DIR` (it writes "
                           "DIR/speed.json); runs without it read \"not measured\"."))
    return Section("summary", "Summary", blocks)


def _file_bytes(r: Run) -> int | None:
    from ..export.artifact import TENSORS
    p = r.path / TENSORS
    return p.stat().st_size if p.is_file() else None


# ---------------------------------------------------------------- recipe and methods
def recipe(runs: Sequence[Run]) -> Section:
    """Each run's recipe and the settings every method actually ran with."""
    blocks = []
    for r in runs:
        rec, m = r.meta.get("recipe", {}), r.metrics or {}
        facts = [f"recipe `{r.recipe}`: {rec.get('description', '')}".rstrip(": "),
                 f"calibration {m.get('calib_size', NOT_MEASURED)} samples, seed "
                 f"{r.meta.get('seed', '?')}"]
        if "versions" in r.config:
            facts.append("versions " + ", ".join(f"{k} {v}" for k, v in
                                                 r.config["versions"].items()))
        blocks.append(Text(f"{r.label}: " + "; ".join(facts) + "."))
        blocks.append(Table(["method", "resolved settings", "auto became"], [
            [rec_["name"], json.dumps(rec_.get("config", {}), sort_keys=True) or "{}",
             json.dumps(rec_.get("auto", {}), sort_keys=True)]
            for rec_ in r.meta.get("methods", [])]))
    return Section("recipe", "Recipe and methods", blocks)


# ---------------------------------------------------------------- latency detail
def speed(runs: Sequence[Run]) -> Section | None:
    """Every timing ``slimtorch bench speed`` recorded (only runs that have one)."""
    timed = [r for r in runs if r.speed]
    if not timed:
        return None
    blocks = []
    for r in timed:
        s = r.speed
        mach = s.get("machine", {})
        blocks.append(Text(f"{r.label}: {s.get('threads')} threads on {mach.get('cpu', '?')} "
                           f"({mach.get('isa', '?')}), load at start "
                           f"{mach.get('load avg (1 min) at start', '?')}."))
        if s.get("kind") == "decode":
            sp = s["speed"]
            blocks.append(Table(["engine", "prefill tok/s", "decode tok/s"], [
                [k, f"{sp[k]['prefill_tok_s']:.0f}", f"{sp[k]['decode_tok_s']:.1f}"]
                for k in ("fp32", "lowered")]))
        else:
            blocks.append(Table(["engine", "batch", "median ms"], [
                [row["engine"], str(row["batch"]), f"{row['ms']:.3f}"] for row in s["rows"]]))
    return Section("speed", "Latency", blocks)


# ---------------------------------------------------------------- per-layer SQNR
def sqnr(runs: Sequence[Run]) -> Section:
    """Per-layer SQNR to float: own (the layer alone) and cumulative (everything up to it)."""
    blocks = []
    for r in runs:
        rows, note = sqnr_layers(r)
        blocks.append(Text(f"{r.label}: {note}."))
        if not rows:
            continue
        names = [l["name"] for l in rows]
        own = [value(l["own_sqnr_db"]) for l in rows]
        cum = [value(l["cumulative_sqnr_db"]) for l in rows]
        png = plots.barh(names, {"own": own, "cumulative": cum}, xlabel="SQNR to float (dB)",
                         title=f"{r.label}: per-layer SQNR ({r.model}, {r.recipe})")
        table = Table(["layer", "type", "own dB", "cumulative dB"], [
            [l["name"], l.get("type", ""), cell(o, 1), cell(c, 1)]
            for l, o, c in zip(rows, own, cum)])
        blocks.append(Figure(png, f"{r.label}: per-layer SQNR to float, own and cumulative "
                             "(dB; higher is closer to float)", table))
    return Section("sqnr", "Per-layer SQNR", blocks)


# ---------------------------------------------------------------- bits per layer
def bits(runs: Sequence[Run]) -> Section:
    """Weight and input-activation bits of every layer, from the plan saved in the artifact."""
    blocks = []
    for r in runs:
        layers = layer_bits(r)
        if not layers:
            blocks.append(Text(f"{r.label}: the artifact holds no layer plan."))
            continue
        if not any(l.weights or l.activations for l in layers):
            blocks.append(Text(f"{r.label}: every layer is float (the recipe quantizes "
                               "nothing)."))
            continue
        sites = r.meta.get("plan", {}).get("functional", {})
        site_bits = sorted({str(s["spec"]["bits"]) for s in sites.values() if s.get("spec")})
        note = (f"; {len(sites)} functional sites (residual adds, matmuls) at "
                f"{'/'.join(site_bits)} bits" if sites else "")
        blocks.append(Text(f"{r.label}: {len(layers)} layers{note}; 0 bits in the figure = "
                           "left float."))
        png = plots.barh([l.name for l in layers],
                         {"weights": [l.weights or 0 for l in layers],
                          "activations": [l.activations or 0 for l in layers]},
                         xlabel="bits", title=f"{r.label}: bits per layer ({r.recipe})")
        table = Table(["layer", "weight bits", "activation bits"], [
            [l.name, str(l.weights or "float"), str(l.activations or "float")] for l in layers])
        blocks.append(Figure(png, f"{r.label}: bits of each layer's weights and input "
                             "activations", table))
    return Section("bits", "Bits per layer", blocks)


def pruning(runs: Sequence[Run]) -> Section | None:
    """Structured pruning: output channels of every prunable layer before and after."""
    blocks = []
    for r in runs:
        layers = kept_channels(r)
        if layers is None:
            continue
        if not layers:
            blocks.append(Text(f"{r.label}: kept channels {NOT_MEASURED} (pruned by a slimtorch "
                               "that did not record them; prune again to see them)."))
            continue
        stats = prune_stats(r)
        before, after = sum(b for _, b, _ in layers), sum(a for _, _, a in layers)
        ratios = "; ".join(f"{k} ×{stats[k]['ratio']:.2f} of float" for k in ("macs", "params")
                           if isinstance(stats.get(k), dict) and "ratio" in stats[k])
        blocks.append(Text(f"{r.label}: {after} of {before} output channels kept "
                           f"({after / before:.0%}) over {len(layers)} layers"
                           + (f"; {ratios}" if ratios else "") + "."))
        png = plots.barh([f for f, _, _ in layers], {"float": [b for _, b, _ in layers],
                                                     "kept": [a for _, _, a in layers]},
                         xlabel="output channels", title=f"{r.label}: channels per layer "
                         f"({r.recipe})")
        table = Table(["layer", "channels (float)", "kept", "kept %"], [
            [f, str(b), str(a), f"{100 * a / b:.0f}"] for f, b, a in layers])
        blocks.append(Figure(png, f"{r.label}: output channels of each prunable layer, float "
                             "and kept", table))
    return Section("pruning", "Kept channels per layer (pruning)", blocks) if blocks else None


def sparsity(runs: Sequence[Run]) -> Section | None:
    """Sparse weights: the fraction of zero weights of every masked layer."""
    blocks = []
    for r in runs:
        found = layer_sparsity(r)
        if found is None:
            continue
        layers, dense = found
        order = {l.name: i for i, l in enumerate(layer_bits(r))}  # the plan: model order
        names = sorted({*layers, *dense}, key=lambda f: (order.get(f, len(order)), f))
        png = plots.barh(names, {"zero weights %": [100 * layers.get(f, 0.0) for f in names]},
                         xlabel="zero weights %", title=f"{r.label}: sparsity per layer "
                         f"({r.recipe})")
        table = Table(["layer", "zero weights %", "note"], [
            [f, f"{100 * layers[f]:.1f}" if f in layers else "0 (dense)", dense.get(f, "")]
            for f in names])
        blocks.append(Figure(png, f"{r.label}: fraction of zero weights per layer (layers left "
                             "dense show 0, with the reason)", table))
    return Section("sparsity", "Sparsity per layer", blocks) if blocks else None


# ---------------------------------------------------------------- Pareto fronts
def _pareto(runs: Sequence[Run], axis: str, what: str, how: str) -> Section | None:
    sets = pareto_sets(runs, axis)
    if not sets:
        return None
    blocks = []
    for s in sets:
        label, higher = METRICS[s.metric]
        pts = [(p.x, p.y, p.run.recipe, p.on_front) for p in s.points]
        png = plots.pareto(pts, xlabel=s.x_label, ylabel=label, float_point=s.float_point,
                           higher_is_better=higher, title=f"{s.model}: {label} vs {what}")
        table = Table(["run", "recipe", s.x_label, label, "on the front"], [
            [p.run.label, p.run.recipe, f"{p.x:.3f}", f"{p.y:.4g}", "yes" if p.on_front else
             "no"] for p in s.points])
        blocks.append(Figure(png, f"{s.model}: {label} vs {what}; the front = runs no other "
                             f"run beats on both", table))
    blocks.append(Text(how))
    return Section(f"pareto-{axis}", f"Pareto front: accuracy vs {what}", blocks)


def pareto_size(runs: Sequence[Run]) -> Section | None:
    """Across runs of one model: which recipes give the best task metric for their size."""
    return _pareto(runs, "size", "size", "Sizes as recorded by `slimtorch quantize` (tensor "
                   "bytes of the artifact; float: its state dict).")


def pareto_latency(runs: Sequence[Run]) -> Section | None:
    """The same against measured latency, when ≥ 2 runs of a model have ``speed.json``."""
    return _pareto(runs, "latency", "latency", "Latency from each run's speed.json "
                   "(`slimtorch bench speed DIR`); a run without one is left out.")


# ---------------------------------------------------------------- sensitivity
SENSITIVITY_FILE = "sensitivity.json"


def sensitivity(runs: Sequence[Run]) -> Section | None:
    """Per-layer ΔKL of one layer's weights at b bits, and the proxies' rank correlations, for
    runs whose directory holds ``sensitivity.json``."""
    blocks = []
    for r in runs:
        path = r.path / SENSITIVITY_FILE
        if not path.is_file():
            continue
        sens = json.loads(path.read_text())
        shown = [b for b in sens["bits"] if int(b) <= 4] or sens["bits"][:1]
        names = [l["fqn"] for l in sens["layers"]]
        png = plots.barh(names, {f"W{b}": [l["kl"][str(b)] for l in sens["layers"]]
                                 for b in shown}, xlabel="ΔKL(float ‖ quantized)",
                         title=f"{r.label}: sensitivity of each layer ({sens['model']})"
                         if "model" in sens else f"{r.label}: sensitivity of each layer")
        bits = [str(b) for b in sens["bits"]]
        table = Table(["layer", "params", *[f"ΔKL W{b}" for b in bits]], [
            [l["fqn"], str(l["params"]), *[f"{l['kl'][b]:.2e}" for b in bits]]
            for l in sens["layers"]])
        blocks.append(Figure(png, f"{r.label}: ΔKL to float with only this layer's weights "
                             f"quantized, on {sens['held_samples']} held images", table))
        blocks.append(Table(["proxy", *[f"ρ W{b}" for b in bits], "ρ pooled"], [
            [name, *[cell(row[f"w{b}"], 3) for b in bits], cell(row["pooled"], 3)]
            for name, row in sens["spearman"].items()]))
        if sens.get("blocks"):  # older sensitivity.json files have none
            blocks.append(Text(f"{r.label}: per block (a reconstruction unit's layers quantized "
                               "together), ΔKL and, in brackets, the sum of its layers' own:"))
            blocks.append(Table(["block", "layers", "params", *[f"ΔKL W{b}" for b in bits]], [
                [blk["name"], str(len(blk["layers"])), str(blk["params"]),
                 *[f"{blk['kl'][b]:.2e} ({blk['sum_of_layers_kl'][b]:.2e})" for b in bits]]
                for blk in sens["blocks"]]))
    if not blocks:
        return None
    blocks.append(Text("Spearman ρ of each proxy with the measured ΔKL (`slimtorch "
                       "sensitivity`; docs/mixed-precision.md)."))
    return Section("sensitivity", "Per-layer sensitivity", blocks)


def samples(runs: Sequence[Run]) -> Section | None:
    """Diffusion runs: the float samples over the quantized samples from the same noise
    (``DIR/samples.png``, written by ``slimtorch quantize``) and the sample metrics."""
    from ..diffusion.task import SAMPLES_FILE
    blocks = []
    for r in runs:
        path = r.path / SAMPLES_FILE
        if not path.is_file():
            continue
        m = r.metrics or {}
        rows = [[METRICS[k][0], cell(m[f"fp_{k}"], 3) if f"fp_{k}" in m else "—",
                 cell(m[f"q_{k}"], 4 if k in FINE else 3)]
                for k in ("fd", "kid", "mse_to_float") if f"q_{k}" in m]
        n = m.get("q_n")
        blocks.append(Figure(path.read_bytes(), f"{r.label}: float samples (top) and quantized "
                             "samples from the same noise (bottom)",
                             Table(["metric" + (f" ({n} samples)" if n else ""), "float",
                                    "quantized"], rows)))
    if not blocks:
        return None
    return Section("samples", "Samples (diffusion)", blocks)


SECTIONS: list[Callable[[Sequence[Run]], Section | None]] = [
    summary, recipe, pareto_size, pareto_latency, speed, sqnr, bits, pruning, sparsity,
    sensitivity, samples,
]
