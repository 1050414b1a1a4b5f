"""Coverage: W8A8 on architectures we did not write, slimtorch vs NNCF in the same script.

Each architecture of ``slimtorch.zoo.coverage.ARCHS`` (torchvision, timm, Hugging Face
``transformers``; random-init made realistic by rule, see ``zoo/coverage_base``) is quantized
by both tools from the same 2 × 4 calibration items and compared on the same 16 evaluation
items: cosine of the flattened output tensor to the float model's.

- slimtorch: ``slimtorch.quantize(model, "w8a8", calib)`` (the built-in recipe unchanged);
- NNCF: ``nncf.quantize(model, nncf.Dataset(calib), subset_size=<calibration samples>)`` with
  its defaults, plus ``model_type=nncf.ModelType.TRANSFORMER`` on transformers (as NNCF's docs
  ask); a failure is recorded verbatim.

Prints a markdown table and writes bench/results/coverage.md (+ .json).

    python bench/coverage.py [--archs tv/resnet18 hf/bert ...] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path

import torch

import slimtorch
from slimtorch.eval.machine import machine_markdown
from slimtorch.export.artifact import write_json_atomic, write_text_atomic
from slimtorch.zoo.coverage import ARCHS
from slimtorch.zoo.coverage_base import Arch, calib_and_eval, cosine, output_of

TOLERANCE = 0.005  # ours must be >= NNCF's cosine minus this
TRANSFORMER_KINDS = {"vit", "text", "audio"}


def ours(arch: Arch, model, calib):
    return slimtorch.quantize(model, "w8a8", calib, seed=0)


def nncf_w8a8(arch: Arch, model, calib):
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # first run compiles a C++ ext
    import nncf
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if arch.kind in TRANSFORMER_KINDS else {}
    n = sum(len(next(iter(c.values())) if isinstance(c, dict) else c) for c in calib)
    return nncf.quantize(copy.deepcopy(model), nncf.Dataset(calib), subset_size=n, **kw)


TOOLS = {"slimtorch": ours, "nncf": nncf_w8a8}


def measure(arch: Arch, tool: str, model, calib, eval_item, ref) -> dict:
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = TOOLS[tool](arch, model, calib)
            cos = cosine(ref, output_of(arch, q, eval_item))
    except Exception as e:  # recorded verbatim: a peer's failure is a result
        return {"error": f"{type(e).__name__}: {e}".strip(),
                "where": traceback.format_exc(limit=-2).strip().splitlines()[-3:]}
    return {"cosine": round(cos, 5), "seconds": round(time.perf_counter() - t0, 1)}


def run(name: str, tools: list[str]) -> dict:
    arch = ARCHS[name]
    model = arch.build()
    calib, eval_item = calib_and_eval(arch)
    ref = output_of(arch, model, eval_item)
    row = {"arch": name, "family": arch.family, "kind": arch.kind}
    for tool in tools:
        row[tool] = measure(arch, tool, model, calib, eval_item, ref)
    return row


def verdict(row: dict) -> str:
    a, b = row.get("slimtorch", {}), row.get("nncf", {})
    if "cosine" not in a:
        return "slimtorch failed"
    if "cosine" not in b:
        return "NNCF failed"
    return "ok" if a["cosine"] >= b["cosine"] - TOLERANCE else "NNCF higher"


def _cell(r: dict) -> tuple[str, str]:
    return (f"{r['cosine']:.4f}", f"{r['seconds']:.1f}") if "cosine" in r else ("failed", "")


def to_markdown(rows: list[dict], header: list[str]) -> str:
    lines = [*header, "", "| architecture | kind | slimtorch cosine | NNCF cosine | Δ | verdict "
             "| slimtorch s | NNCF s |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        (a, sa), (b, sb) = _cell(r.get("slimtorch", {})), _cell(r.get("nncf", {}))
        d = (f"{r['slimtorch']['cosine'] - r['nncf']['cosine']:+.4f}"
             if "cosine" in r.get("slimtorch", {}) and "cosine" in r.get("nncf", {}) else "")
        lines.append(f"| {r['arch']} | {r['kind']} | {a} | {b} | {d} | {verdict(r)} | {sa} "
                     f"| {sb} |")
    fails = [(r["arch"], t, r[t]) for r in rows for t in TOOLS if "error" in r.get(t, {})]
    if fails:
        lines += ["", "Failures (verbatim):", ""]
        lines += [f"- {a} / {t}: `{f['error'][:600]}`" for a, t, f in fails]
    counts = {v: sum(verdict(r) == v for r in rows) for v in
              ("ok", "NNCF higher", "NNCF failed", "slimtorch failed")}
    lines += ["", "Verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
    return "\n".join(lines)


def provenance(args) -> list[str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    versions = []
    for pkg in ("nncf", "timm", "torchvision", "transformers"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} not installed")
    return [f"Command: `python {' '.join(sys.argv)}` at commit {commit}",
            machine_markdown() + ", " + ", ".join(versions),
            "W8A8, 2 × 4 calibration items, cosine of the flattened output on 16 evaluation "
            "items (seeded); random-init models made realistic by rule (zoo/coverage_base)."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS),
                   metavar="ARCH")
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "coverage"))
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="re-render the table from rows saved by earlier runs (rows of "
                   "one architecture merged: e.g. a --tools slimtorch rerun over saved NNCF rows)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_json:
        saved = [json.loads(Path(f).read_text()) for f in args.from_json]
        header = [h for s in saved for h in s["header"]]
        merged: dict[str, dict] = {}  # one row per architecture; a later file's tools win
        for r in (r for s in saved for r in s["rows"]):
            merged.setdefault(r["arch"], {}).update(r)
        rows = list(merged.values())
    else:
        header, rows = provenance(args), []
        for name in args.archs:
            rows.append(run(name, args.tools))
            print(json.dumps(rows[-1]), flush=True)
    md = to_markdown(rows, header)
    print("\n" + md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out + ".md"), md + "\n")
    write_json_atomic(Path(args.out + ".json"), {"header": header, "rows": rows})


if __name__ == "__main__":
    main()
