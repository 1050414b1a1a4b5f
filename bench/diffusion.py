"""Diffusion PTQ on zoo:ddpm: float (several noise seeds: the seed spread) vs RTN on a single
time step, PTQ4DM, Q-Diffusion and Q-Diffusion + PTQD at W8A8 / W4A8 / W4A4, sampled from the
same noise as the float model (seed 0), scored by FD / KID / precision / recall / classifier IS
on resnet20 features against the 10k test images (``slimtorch.diffusion.metrics``), with
calibration minutes, artifact size and sampling time per image; NNCF's W8A8 on the same UNet
with the same (x_t, t) calibration pairs as a peer (its failure recorded verbatim); a PNG grid
of the first 16 samples of every model (same noise) to bench/results/diffusion_grid.png.

    python bench/diffusion.py [--n 2000] [--sampler ddim] [--bits w8a8,w4a8,w4a4]
        [--methods diffusion-rtn,ptq4dm,qdiffusion,qdiffusion-ptqd] [--float-seeds 3] [--peers]
    python bench/diffusion.py --card   # also write the float model's metrics into its card

Rows are saved after each model (``--from-json`` re-renders or extends a partial run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

import slimtorch
from slimtorch.diffusion.calibration import calibration_set
from slimtorch.diffusion.metrics import score_samples
from slimtorch.diffusion.schedule import sample
from slimtorch.eval.size import fp_size_bytes, quantized_size_bytes
from slimtorch.recipe import resolve_recipe
from slimtorch.zoo.sources import load_model

from report import commit, write  # bench/ is on sys.path when a bench script runs


def sample_timed(model, args, seed: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    x = sample(model, args.n, sampler=args.sampler, steps=args.steps, seed=seed,
               shape=(1, 28, 28), progress=True)
    return x, (time.perf_counter() - t0) / args.n


def nncf_row(model, fp_x, args) -> dict:
    """NNCF's W8A8 ``quantize`` on the UNet, calibrated on Q-Diffusion's (x_t, t) pairs."""
    row = {"model": "NNCF W8A8 (nncf.quantize, defaults)", "bits": "w8a8"}
    try:
        import nncf
        cfg = resolve_recipe("w8a8-qdiffusion").calib.diffusion
        pairs = calibration_set(model, cfg, 256, 32, seed=0)
        t0 = time.perf_counter()
        q = nncf.quantize(model, nncf.Dataset(pairs), subset_size=256)
        row["calib_min"] = round((time.perf_counter() - t0) / 60, 2)
        x, per_img = sample_timed(q, args, 0)
        row.update(score_samples(x, reference=fp_x), ms_per_image=round(1000 * per_img, 2))
        row["samples"] = x[:16]
    except Exception as e:  # a peer's failure is a result: record it verbatim
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        traceback.print_exc()
    return row


def grid_png(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid
    rows = [r for r in rows if "samples" in r]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 0.75 * len(rows) + 0.3))
    for ax, r in zip(axes if len(rows) > 1 else [axes], rows):
        g = make_grid((r["samples"] + 1) / 2, nrow=16, padding=1, pad_value=1.0)  # [3, H, W]
        ax.imshow(g[0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(r["model"], fontsize=7, loc="left", pad=2)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--bits", default="w8a8,w4a8,w4a4")
    ap.add_argument("--methods", default="diffusion-rtn,ptq4dm,qdiffusion,qdiffusion-ptqd")
    ap.add_argument("--float-seeds", type=int, default=3)
    ap.add_argument("--brecq-iters", type=int, default=None, help="override BRECQ's iters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", action="store_true", help="NNCF W8A8 beside ours")
    ap.add_argument("--card", action="store_true", help="write float metrics into the card")
    ap.add_argument("--from-json", default=None, help="rows of an earlier run to keep")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or f"bench/results/diffusion_{args.sampler}"
    model = load_model("zoo:ddpm").eval()
    rows = json.loads(Path(args.from_json).read_text()) if args.from_json else []
    done = {r["model"] for r in rows}
    fp_x = None
    for s in range(args.float_seeds):
        name = f"float (noise seed {s})"
        x, per_img = sample_timed(model, args, s)
        fp_x = x if s == 0 else fp_x
        if name not in done:
            rows.append({"model": name, "bits": "fp32", "seed": s, **score_samples(x),
                         "size_kb": round(fp_size_bytes(model) / 1024, 1),
                         "ms_per_image": round(1000 * per_img, 2), "samples": x[:16]})
            save(rows, out, args)
    if args.card:
        write_card(rows, args)
    cache, cache_min = {}, {}
    for bits in args.bits.split(","):
        cache.clear()
        for method in args.methods.split(","):
            name = f"{bits}-{method}"
            if name in done:
                continue
            recipe = resolve_recipe(name).to_dict()
            if args.brecq_iters is not None:
                recipe["methods"] = [dict(m, iters=args.brecq_iters) if m["name"] == "brecq"
                                     else m for m in recipe["methods"]]
            t0 = time.perf_counter()
            base = f"{bits}-qdiffusion"
            if method == "qdiffusion-ptqd" and base in cache:  # same BRECQ run, then PTQD
                q = with_ptqd(model, cache[base], recipe)
                calib_min = cache_min[base] + (time.perf_counter() - t0) / 60
            else:
                q = slimtorch.quantize(model, recipe, seed=0, progress=True)
                calib_min = (time.perf_counter() - t0) / 60
            cache[name], cache_min[name] = q, calib_min
            x, per_img = sample_timed(q, args, 0)
            rows.append({"model": name, "bits": bits, "method": method, "seed": 0,
                         **score_samples(x, reference=fp_x),
                         "calib_min": round(calib_min, 2),
                         "size_kb": round(quantized_size_bytes(q) / 1024, 1),
                         "ms_per_image": round(1000 * per_img, 2), "samples": x[:16],
                         "commit": commit()})
            save(rows, out, args)
    if args.peers and "NNCF W8A8 (nncf.quantize, defaults)" not in done:
        rows.append(nncf_row(model, fp_x, args))
        save(rows, out, args)


def with_ptqd(model, q, recipe: dict):
    """``q`` (a Q-Diffusion model) plus the recipe's PTQD step, on the same calibration pairs
    ``quantize`` would make (seeded): equal to quantizing with the -ptqd recipe, without
    repeating the reconstruction."""
    import copy

    from slimtorch.api import run_methods
    from slimtorch.quant.prepare import META_ATTR
    r = resolve_recipe(recipe)
    c = r.calib
    pairs = calibration_set(model, c.diffusion, c.samples, c.batch_size, seed=0)
    q = copy.deepcopy(q)
    only = r.model_copy(update={"methods": [m for m in r.methods
                                            if type(m).__name__ == "PTQDConfig"]})
    getattr(q, META_ATTR)["methods"] += run_methods(q, only, pairs, seed=0, float_model=model)
    return q


def save(rows: list[dict], out: str, args) -> None:
    grid_png(rows, f"{out}_grid.png")
    plain = [{k: v for k, v in r.items() if k != "samples"} for r in rows]
    write(plain, out, lambda rs: to_markdown(rs, args))


def write_card(rows: list[dict], args) -> None:
    from slimtorch.zoo.registry import card_path
    path = card_path("ddpm")
    card = json.loads(path.read_text())
    floats = [r for r in rows if r["bits"] == "fp32"]
    card["metrics"] = {"sampler": f"{args.sampler}-{args.steps}", "n": args.n,
                       "feature_space": "zoo resnet20 penultimate (not Inception)",
                       "fd": [r["fd"] for r in floats], "kid_x1e3": [r["kid"] for r in floats],
                       "precision": [r["precision"] for r in floats],
                       "recall": [r["recall"] for r in floats],
                       "is": [r["is"] for r in floats], "noise_seeds": [r["seed"] for r in floats]}
    path.write_text(json.dumps(card, indent=2) + "\n")


def to_markdown(rows: list[dict], args) -> str:
    floats = [r["fd"] for r in rows if r["bits"] == "fp32"]
    spread = (f"float FD over {len(floats)} noise seeds: mean {statistics.mean(floats):.3f}, "
              f"range {min(floats):.3f}–{max(floats):.3f}" if floats else "")
    head = ("| model | FD ↓ | KID×10³ ↓ | precision | recall | IS | MSE to float | calib min | "
            "size KB | ms / image |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} |||||||||")
            continue
        lines.append(f"| {r['model']} | {r['fd']} | {r['kid']} ± {r['kid_std']} | "
                     f"{r['precision']} | {r['recall']} | {r['is']} | "
                     f"{r.get('mse_to_float', '')} | {r.get('calib_min', '')} | "
                     f"{r.get('size_kb', '')} | {r.get('ms_per_image', '')} |")
    return (f"zoo:ddpm, {args.sampler.upper()}-{args.steps if args.sampler == 'ddim' else 1000}"
            f", {rows[0]['n'] if rows else args.n} samples per model. FD / KID / precision / "
            "recall / IS are computed on the penultimate features (logits for IS) of the "
            "project's Fashion-MNIST resnet20 against the 10k test images -- a domain-encoder "
            "metric, not comparable with Inception FIDs. Quantized models sample from the same "
            "noise as float seed 0 (paired; 'MSE to float' is per pixel in [-1, 1]). "
            f"{spread}. Fake-quant sampling in PyTorch, {args.threads} threads. Grid: "
            f"`{Path(args.out or f'bench/results/diffusion_{args.sampler}').name}_grid.png` "
            "(rows in table order, first 16 samples).\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
