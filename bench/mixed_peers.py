"""AIMET automatic mixed precision (AMP) at slimtorch's weight-size budgets, on zoo ResNet-20
and MobileNetV2 (Fashion-MNIST), to compare with ``bench/mixed_precision.py``'s allocations.

Per model:

1. QuantSim as in ``peers_recon.aimet_ptq`` (AIMET's PTQ flow): ``prepare_model``, BN fold,
   ``QuantizationSimModel`` with ``post_training_tf_enhanced`` and the per-channel config
   ``default_config_per_channel.json``, W8A8; encodings from the 1024 calibration images
   (``task.calibration(1024, seed, 32)``).
2. ``aimet_torch.mixed_precision.choose_mixed_precision`` with candidates W8A8, W4A8, W2A8 (int),
   ``allowed_accuracy_drop=None``. Phase 1 (per-group sensitivity) scores top-1 on 256 held-out
   TRAIN images, phase 2 (the Pareto curve) top-1 on 1000 other held-out train images; both are
   disjoint from the calibration images and from the test set. ``amp_search_algo`` is
   ``AMPSearchAlgo.BruteForce``: with ``allowed_accuracy_drop=None`` the target is -inf, and
   the default ``Binary`` search then evaluates a single Pareto point (the last one), so only
   brute force returns the whole curve.
3. AMP trades accuracy against BitOps, not size. Its Pareto list is cumulative: entry i is
   (relative BitOps, phase-2 score, quantizer group, candidate) after applying the candidates
   of entries 0..i, in order, to the all-W8 baseline. For each budget (average weight bits
   3, 4, 5 over ALL Conv2d/Linear weights, weighted by parameter count, unquantized weights
   counting 32) the chosen point is the first i at which that average drops to <= the budget.
   It is applied the way AIMET applies candidates (``GreedyMixedPrecisionAlgo.
   set_quantizer_groups_candidates``: ``QuantizerGroup.set_quantizers_to_candidate`` for every
   group, then ``sim.compute_encodings``), inside ``_mock_v1_quantizers`` as AIMET's v2
   ``choose_mixed_precision`` does; every group is first reset to the baseline candidate.
   Reported: measured average weight bits (from the sim's weight quantizers), top-1 on the
   10 000 test images, AMP wall seconds (one AMP run per model, shared by its budgets).

Writes bench/results/mixed_peers.md and .json. An AIMET failure is recorded verbatim for its
model and the next model runs.

    python bench/mixed_peers.py [--models resnet20 mobilenetv2] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peers_recon import _aimet_config, _aimet_prepare  # noqa: E402
from report import provenance  # noqa: E402

from slimtorch.eval.machine import machine_markdown  # noqa: E402
from slimtorch.export.artifact import write_json_atomic, write_text_atomic  # noqa: E402

RES = Path(__file__).parent / "results"
BUDGETS = (3, 4, 5)  # average weight bits over all Conv2d/Linear weights
WEIGHT_BITS = (8, 4, 2)  # AMP candidates, activations 8-bit int; W8 first (the baseline)
CALIB_SIZE, PHASE1_SIZE, PHASE2_SIZE = 1024, 256, 1000
EVAL_BATCH = 500


def error_text(e: BaseException) -> str:
    """Type, message and the last traceback line of ``e``, verbatim."""
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f' [File "{last.filename}", line {last.lineno}, in {last.name}: {last.line}]' \
        if last else ""
    return f"{type(e).__name__}: {e}{where}"


def held_out(seed: int, calib: list[torch.Tensor], sizes: tuple[int, int]
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two labelled train-split subsets after the calibration images in the same seeded
    permutation (``fashion_mnist.calibration_set``), so disjoint from them and from the test
    set. Checks the calibration images are the permutation's head."""
    from slimtorch.data.fashion_mnist import load_fashion_mnist, to_input
    images, labels = load_fashion_mnist("train")
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    n = sum(len(x) for x in calib)
    if not torch.equal(torch.cat(calib), to_input(images[perm[:n]])):
        raise RuntimeError("calibration images are not the seeded permutation's head")
    out, start = [], n
    for size in sizes:
        idx = perm[start:start + size]
        out.append((to_input(images[idx]), labels[idx]))
        start += size
    return out


def top1(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = data
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in x.split(EVAL_BATCH)])
    return 100.0 * (pred == y).float().mean().item()


def forward_all(model: torch.nn.Module, calib: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in calib:
            model(x)


def layer_bits(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Conv2d/Linear name -> (weight parameter count, weight bits; 32 if unquantized)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            pq = getattr(m, "param_quantizers", None)
            q = pq["weight"] if pq is not None and "weight" in pq else None
            out[name] = (m.weight.numel(), int(q.bitwidth) if q is not None else 32)
    return out


def avg_bits(layers: dict[str, tuple[int, int]]) -> float:
    return sum(n * b for n, b in layers.values()) / sum(n for n, _ in layers.values())


def cand_str(c) -> str:
    """``((8, int), (4, int))`` -> ``W4A8``; an activation-only candidate -> ``A8``."""
    (ab, _), *rest = c
    return (f"W{rest[0][0]}" if rest else "") + f"A{ab}"


def build_sim(model, calib):
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel
    model = _aimet_prepare(model)
    dummy = calib[0][:1]
    fold_all_batch_norms(model, None, dummy_input=dummy)
    sim = QuantizationSimModel(model, dummy, QuantScheme.post_training_tf_enhanced,
                               default_output_bw=8, default_param_bw=8,
                               config_file=_aimet_config())
    sim.compute_encodings(forward_all, calib)
    return sim, dummy


class Capture(logging.Handler):
    """AIMET's MixedPrecision log records (the summary lines are kept verbatim)."""

    KEEP = ("Baseline FP32 accuracy", "QuantSim accuracy with candidate", "Time taken by phase",
            "AMP phase-2 final accuracy")

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines, self.warnings = [], {}

    def emit(self, record):
        msg = record.getMessage().strip()
        if any(msg.startswith(k) for k in self.KEEP):
            self.lines.append(msg)
        if record.levelno >= logging.WARNING:
            self.warnings[msg] = self.warnings.get(msg, 0) + 1


def run_model(name: str, seed: int, sizes: dict, doc: dict) -> None:
    """Fills ``doc`` (the model's record) as it goes, so a failure keeps what finished."""
    from aimet_torch._base.amp.mixed_precision_algo import GreedyMixedPrecisionAlgo
    from aimet_torch.amp.utils import _mock_v1_quantizers
    from aimet_torch.common.amp.utils import AMPSearchAlgo
    from aimet_torch.common.defs import CallbackFunc, QuantizationDataType
    from aimet_torch.common.utils import AimetLogger
    from aimet_torch.mixed_precision import choose_mixed_precision
    from slimtorch.eval.tasks import task_for
    from slimtorch.zoo.sources import load_model

    task = task_for(f"zoo:{name}", None)
    calib = task.calibration(sizes["calib"], seed, 32)
    phase1, phase2 = held_out(seed, calib, (sizes["phase1"], sizes["phase2"]))
    model = load_model(f"zoo:{name}").eval()
    torch.manual_seed(seed)
    fp_out = task.outputs(model)
    doc["fp_top1"] = task.score(fp_out)["top1"]
    doc["fp_weight_bits"] = round(avg_bits(layer_bits(model)), 3)

    t0 = time.perf_counter()
    sim, dummy = build_sim(model, calib)
    doc["sim_seconds"] = round(time.perf_counter() - t0, 1)
    base_layers = layer_bits(sim.model)
    doc["w8_weight_bits"] = round(avg_bits(base_layers), 3)
    doc["w8_top1"] = task.score(task.outputs(sim.model), fp_out)["top1"]
    print(f"[{name}] float {doc['fp_top1']}, W8A8 sim {doc['w8_top1']} "
          f"(avg weight bits {doc['w8_weight_bits']})", flush=True)

    candidates = [((8, QuantizationDataType.int), (wb, QuantizationDataType.int))
                  for wb in WEIGHT_BITS]
    fwd = CallbackFunc(forward_all, calib)
    eval1, eval2 = (lambda m: top1(m, phase1)), (lambda m: top1(m, phase2))
    cap = Capture()
    amp_log = AimetLogger.get_area_logger(AimetLogger.LogAreas.MixedPrecision)
    amp_log.addHandler(cap)
    try:
        with tempfile.TemporaryDirectory() as results_dir:
            t0 = time.perf_counter()
            pareto = choose_mixed_precision(
                sim, dummy, candidates, eval1, eval2, allowed_accuracy_drop=None,
                results_dir=results_dir, clean_start=True, forward_pass_callback=fwd,
                amp_search_algo=AMPSearchAlgo.BruteForce)
            doc["amp_seconds"] = round(time.perf_counter() - t0, 1)
            acc_file = Path(results_dir, ".cache", "accuracy_list.pkl")
            info_file = Path(results_dir, "amp_info_list.json")
            # AIMET's own phase-1 cache, written a moment ago into our temp dir: trusted
            accuracy_list = pickle.loads(acc_file.read_bytes()) if acc_file.is_file() else None
            doc["amp_info"] = json.loads(info_file.read_text()) if info_file.is_file() else None
    finally:
        amp_log.removeHandler(cap)
        doc["aimet_log"], doc["aimet_warnings"] = cap.lines, cap.warnings
    if pareto is None:
        raise RuntimeError("choose_mixed_precision returned None (early exit)")
    doc["pareto_len"] = len(pareto)
    doc["accuracy_list_len"] = None if accuracy_list is None else len(accuracy_list)
    print(f"[{name}] AMP {doc['amp_seconds']} s, Pareto list {len(pareto)} points", flush=True)

    # Walk the cumulative Pareto path from the baseline, tracking every layer's weight bits.
    bits = {k: b for k, (_, b) in base_layers.items()}
    path = []
    for i, (rel_bitops, score, group, cand) in enumerate(pareto):
        if len(cand) == 2:
            for module in group.parameter_quantizers:
                bits[module] = cand[1][0]
        avg = avg_bits({k: (base_layers[k][0], bits[k]) for k in bits})
        path.append({"step": i, "group": group.to_list(), "candidate": cand_str(cand),
                     "rel_bitops": rel_bitops, "phase2_top1": score, "avg_weight_bits": avg})
    doc["pareto"] = path
    baseline = candidates[0]
    if any(p["candidate"] == cand_str(baseline) for p in path):
        doc["note"] = "AMP's baseline candidate is not W8A8 (a Pareto step moves a group to W8A8)"

    rows = doc["budgets"] = []
    for budget in BUDGETS:
        k = next((p["step"] for p in path if p["avg_weight_bits"] <= budget), None)
        row = {"budget": budget}
        rows.append(row)
        if k is None:
            row["error"] = (f"not reached: the full Pareto path ends at "
                            f"{path[-1]['avg_weight_bits']:.3f} average weight bits" if path
                            else "empty Pareto list")
            continue
        row.update(steps=k + 1, rel_bitops=path[k]["rel_bitops"],
                   phase2_top1=path[k]["phase2_top1"],
                   path_weight_bits=round(path[k]["avg_weight_bits"], 3))
        t0 = time.perf_counter()
        with _mock_v1_quantizers(sim):
            algo = GreedyMixedPrecisionAlgo(sim, dummy, candidates, eval1, eval2,
                                            tempfile.gettempdir(), False, fwd)
            reset = [(g, baseline) for g in algo.quantizer_groups]
            algo.set_quantizer_groups_candidates(
                reset + [(g, c) for _, _, g, c in pareto[:k + 1]])
        row["apply_seconds"] = round(time.perf_counter() - t0, 1)
        # the re-applied configuration scored as AMP's phase 2 scored it (a faithfulness check)
        row["phase2_top1_reapplied"] = eval2(sim.model)
        layers = layer_bits(sim.model)
        row["weight_bits"] = round(avg_bits(layers), 3)
        row["layer_bits"] = {n: b for n, (_, b) in layers.items()}
        row.update({f"q_{m}": v for m, v in task.score(task.outputs(sim.model),
                                                       fp_out).items()})
        print(f"[{name}] budget {budget}: {k + 1} steps, {row['weight_bits']} weight bits, "
              f"top-1 {row['q_top1']}", flush=True)


def fmt(v, spec=".2f") -> str:
    return "" if v is None else format(v, spec)


def markdown(doc: dict) -> str:
    lines = ["| model | configuration | AMP steps applied | avg weight bits (measured) | "
             f"rel. BitOps (AMP) | AMP phase-2 top-1 ({doc['sizes']['phase2']} held train) | "
             "test top-1 % | "
             "AMP wall s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in doc["models"]:
        name = m["model"]
        if "fp_top1" in m:
            lines.append(f"| {name} | float | | {m['fp_weight_bits']} | | | {fmt(m['fp_top1'])} | |")
        if "w8_top1" in m:
            lines.append(f"| {name} | AIMET W8A8 (all 8-bit) | | {m['w8_weight_bits']} | | | "
                         f"{fmt(m['w8_top1'])} | |")
        for r in m.get("budgets", []):
            label = f"AMP at budget {r['budget']}"
            if "error" in r:
                lines.append(f"| {name} | {label} | | | | | {r['error']} | "
                             f"{fmt(m.get('amp_seconds'), '.0f')} |")
                continue
            lines.append(f"| {name} | {label} | {r['steps']} / {m['pareto_len']} | "
                         f"{r['weight_bits']} | {fmt(r['rel_bitops'], '.3f')} | "
                         f"{fmt(r['phase2_top1'])} | {fmt(r['q_top1'])} | "
                         f"{fmt(m['amp_seconds'], '.0f')} |")
        if "error" in m:
            lines.append(f"| {name} | **AIMET failed** | | | | | `{m['error']}` | |")
    return "\n".join(lines)


def notes(doc: dict) -> list[str]:
    out = []
    for m in doc["models"]:
        if "pareto_len" in m:
            info = dict(m.get("amp_info") or [])
            out.append(f"- {m['model']}: Pareto list {m['pareto_len']} points (accuracy list "
                       f"{m['accuracy_list_len']}); AMP phase 1 "
                       f"{fmt(info.get('Phase1 Time'))} min, phase 2 "
                       f"{fmt(info.get('Phase2 Time'))} min; "
                       + "; ".join(f"`{line}`" for line in m["aimet_log"]
                                   if not line.startswith("Time taken")))
        rows = [r for r in m.get("budgets", []) if "phase2_top1_reapplied" in r]
        if rows:
            same = sum(r["phase2_top1_reapplied"] == r["phase2_top1"] for r in rows)
            out.append(f"- {m['model']}: re-applied configurations score on the phase-2 images "
                       f"as AMP's Pareto list says for {same} of {len(rows)} budgets ("
                       + ", ".join(f"{r['budget']}: {fmt(r['phase2_top1_reapplied'])} vs "
                                   f"{fmt(r['phase2_top1'])}" for r in rows) + ")")
        if m.get("note"):
            out.append(f"- {m['model']}: {m['note']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-size", type=int, default=CALIB_SIZE, help="(development only)")
    p.add_argument("--phase1-size", type=int, default=PHASE1_SIZE, help="(development only)")
    p.add_argument("--phase2-size", type=int, default=PHASE2_SIZE, help="(development only)")
    p.add_argument("--out", default=str(RES / "mixed_peers"), help="output prefix")
    a = p.parse_args()
    torch.set_num_threads(1)
    sizes = {"calib": a.calib_size, "phase1": a.phase1_size, "phase2": a.phase2_size}
    doc = {"command": f"python {' '.join(sys.argv)}", "machine": machine_markdown(),
           "aimet_version": metadata.version("aimet-torch"), "torch_threads": 1,
           "seed": a.seed, "sizes": sizes, "budgets": list(BUDGETS),
           "candidates": [f"W{b}A8" for b in WEIGHT_BITS], "models": []}
    t_all = time.perf_counter()
    for name in a.models:
        m = {"model": f"zoo:{name}"}
        doc["models"].append(m)
        t0 = time.perf_counter()
        try:
            run_model(name, a.seed, sizes, m)
        except Exception as e:  # noqa: BLE001 - recorded verbatim, next model runs
            m["error"] = error_text(e)
            traceback.print_exc()
            print(f"[{name}] FAILED: {m['error']}", flush=True)
        m["seconds"] = round(time.perf_counter() - t0, 1)
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    md = "\n".join([
        "# AIMET automatic mixed precision at weight-size budgets (bench/mixed_peers.py)", "",
        provenance(), doc["machine"], "",
        f"aimet-torch {doc['aimet_version']}; torch threads 1; seed {a.seed}. QuantSim: "
        "prepare_model, BN fold, post_training_tf_enhanced, default_config_per_channel.json, "
        f"W8A8, encodings from {sizes['calib']} calibration train images. AMP "
        "(choose_mixed_precision, BruteForce search, allowed_accuracy_drop=None) over "
        f"{', '.join(doc['candidates'])}; phase 1 scores top-1 on {sizes['phase1']} held-out "
        f"train images, phase 2 on {sizes['phase2']} other held-out train images. A budget's "
        "configuration: AMP's Pareto steps applied in order from all-W8 until the average "
        "weight bits (all Conv2d/Linear weights, parameter-weighted, float = 32) first drop to "
        "<= the budget; then encodings recomputed. Test top-1 on the 10 000 Fashion-MNIST test "
        "images. AMP wall s: the one AMP run per model.", "",
        markdown(doc), "", *notes(doc), "", f"Total run time {doc['seconds']:.0f} s."])
    print("\n" + md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".md"), md + "\n")
    write_json_atomic(out.with_suffix(".json"), doc)


if __name__ == "__main__":
    main()
