"""Structured pruning on the coverage suite: every architecture of
``slimtorch.zoo.coverage.ARCHS`` (torchvision, timm, Hugging Face ``transformers``; random init
made realistic by rule) has 30 % of every dependency group's units removed (lowest group-L2
magnitude first, ``slimtorch.prune.check``) and the physically smaller model is run against
the masked float model on 16 evaluation items.

An architecture *prunes* when at least one unit was removed, the pruned model runs with the
masked model's output shape, and max |pruned − masked| / max |masked| < 1e-4. The table lists
the units found, removed, params and MACs kept, the error, and the most common reasons channels
were left alone (the groups' ``excluded`` list).

    python bench/prune_coverage.py [--archs tv/resnet18 hf/llama ...] [--fraction 0.3]

Writes bench/results/prune_coverage.md (+ .json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

from slimtorch.eval.machine import machine_markdown
from slimtorch.prune.check import compare, prune_each_group
from slimtorch.zoo.coverage import ARCHS
from slimtorch.zoo.coverage_base import calib_and_eval

OUT = Path(__file__).parent / "results" / "prune_coverage"
REL_ERR = 1e-4
CHANGED = 1e-3  # below: the output barely depends on the pruned channels (unverified)


def run_one(name: str, fraction: float) -> dict:
    arch = ARCHS[name]
    row = {"arch": name, "family": arch.family, "kind": arch.kind}
    t0 = time.perf_counter()
    try:
        model = arch.build()
        calib, ev = calib_and_eval(arch)
        check = prune_each_group(model, calib[0], fraction)
        got = compare(check, ev)
        st = check.stats
        reasons = Counter(_reason(e["why"]) for e in st["excluded"])
        row.update(units=st["units"], removed=st["removed_units"], layers=st["pruned_layers"],
                   params_ratio=round(st["params_ratio"], 4),
                   macs_ratio=round(got["macs_ratio"], 4), shape_ok=got["shape_ok"],
                   rel_err=got.get("rel_err"), rel_change=got["rel_change"],
                   reasons=reasons.most_common(3))
        row["prunes"] = bool(st["removed_units"] and got["shape_ok"]
                             and got["rel_err"] < REL_ERR)
        row["verified"] = got["rel_change"] > CHANGED
    except Exception as e:  # recorded, the run goes on
        row.update(prunes=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                   traceback=traceback.format_exc()[-1500:])
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _reason(why: str) -> str:
    """A reason without the module path, so one cause counts once across blocks."""
    words = why.split()
    return " ".join(w for w in words if not any(c.isdigit() for c in w) or "×" in w)[:90]


def _status(r: dict) -> str:
    if not r["prunes"]:
        return "**no**"
    return "yes" if r["verified"] else "yes (unverified)"


def to_markdown(data: dict) -> str:
    rows = data["rows"]
    ok = sum(r["prunes"] for r in rows)
    lines = [f"# Structured pruning on the coverage suite: {ok} of {len(rows)} architectures "
             f"prune", "", f"Command: `{data['command']}` at commit {data['commit']}.", "",
             data["machine"], "",
             f"{data['fraction']:.0%} of every dependency group's units removed (lowest "
             "group-L2 magnitude first); the physically pruned model against the masked float "
             f"model on 16 items (prunes: a unit removed, same output shape, relative max error "
             f"< {REL_ERR:g}; *unverified* where the masked output differs from float by less than "
             f"{CHANGED:g}, e.g. layer scales of 1e-6 at init, so the equality proves little). Units: coupled channels (one channel in every layer of its "
             "group). Params / MACs: kept fraction. Reasons: the most common causes of "
             "channels left alone.", "",
             "| architecture | kind | prunes | units | removed | params kept | MACs kept | "
             "max rel. error | change vs float | seconds | channels left alone because |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['kind']} | **no** | | | | | | | {r['seconds']} | "
                         f"failed: `{r['error'][:200]}` |")
            continue
        why = "; ".join(f"{w} ({n})" for w, n in r["reasons"])
        err = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "shape mismatch"
        lines.append(f"| {r['arch']} | {r['kind']} | {_status(r)} | "
                     f"{r['units']} | {r['removed']} | {r['params_ratio']:.3f} | "
                     f"{r['macs_ratio']:.3f} | {err} | {r['rel_change']:.2f} | {r['seconds']} | "
                     f"{why} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="*", default=list(ARCHS))
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    data = {"command": "python " + " ".join(sys.argv), "commit": commit,
            "machine": machine_markdown(), "fraction": args.fraction, "rows": []}
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        sys.exit(f"unknown architectures {unknown}; choose from {', '.join(ARCHS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.archs:
        row = run_one(name, args.fraction)
        data["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("traceback", "reasons")}),
              flush=True)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(to_markdown(data))
    print(to_markdown(data))


if __name__ == "__main__":
    main()
