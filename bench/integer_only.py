"""Integer-only ViT (I-ViT): top-1 of float, our W8A8 fake-quant, I-ViT's fake-quant twin and the
integer-only forward (both integer exponentials), agreement between them, bit-exactness (two
runs, and after save/load), and speed of the integer path vs fp32 in PyTorch (batch 64, median).

    python bench/integer_only.py [--threads 2] [--calib-size 1024] [--repeats 5]

The integer forward runs on int64 elementwise kernels and ``torch._int_mm``; it is a correctness
path for integer-only hardware, not a fast path here (the table says how slow).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import slimtorch
from slimtorch.data.fashion_mnist import calibration_set, test_set
from slimtorch.intops.integer_artifact import load_integer_only, save_integer_only
from slimtorch.zoo.sources import load_model

from report import write  # bench/ is on sys.path when a bench script runs


def run_all(model, x) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b) for b in x.split(500)])


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/integer_only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, calib = load_model("zoo:vit").eval(), calibration_set(args.calib_size, 0)
    x, y = test_set()
    top1 = lambda o: round(100 * (o.argmax(1) == y).float().mean().item(), 2)
    agree = lambda a, b: round(100 * (a.argmax(1) == b.argmax(1)).float().mean().item(), 2)
    fp = run_all(model, x)
    w8a8 = run_all(slimtorch.quantize(model, "w8a8", calib, seed=0), x)
    b64 = x[:64]
    fp_s = median_s(lambda: model(b64), args.repeats)
    rows = [{"model": "float", "top1": top1(fp)},
            {"model": "W8A8 fake-quant (recipe w8a8)", "top1": top1(w8a8),
             "agree_float": agree(w8a8, fp)}]
    for exp in ("shift", "poly"):
        io = slimtorch.integer_only(model, list(calib.split(128)), exp=exp)
        fake, out = run_all(io.fake, x), run_all(io, x)
        with tempfile.TemporaryDirectory() as d:
            save_integer_only(io, d)
            reloaded = torch.equal(load_integer_only(d, model)(x[:500]), out[:500])
        rows.append({"model": f"I-ViT fake-quant ({exp})", "top1": top1(fake),
                     "agree_float": agree(fake, fp)})
        rows.append({"model": f"integer-only ({exp})", "top1": top1(out),
                     "agree_float": agree(out, fp), "agree_w8a8": agree(out, w8a8),
                     "agree_fake": agree(out, fake),
                     "bit_exact": torch.equal(run_all(io, x[:500]), out[:500]) and reloaded,
                     "ms_b64": round(1000 * median_s(lambda: io(b64), args.repeats), 1),
                     "fp32_ms_b64": round(1000 * fp_s, 1)})
    write(rows, args.out, to_markdown)


def to_markdown(rows: list[dict]) -> str:
    head = ("| model | top-1 % | agree float % | agree W8A8 % | agree I-ViT fake % | "
            "bit-exact (2 runs, save/load) | ms batch 64 (fp32) |\n|---|---:|---:|---:|---:|---|---:|")
    lines = [head]
    for r in rows:
        ms = f"{r['ms_b64']} ({r['fp32_ms_b64']})" if "ms_b64" in r else ""
        lines.append(f"| {r['model']} | {r['top1']} | {r.get('agree_float', '')} | "
                     f"{r.get('agree_w8a8', '')} | {r.get('agree_fake', '')} | "
                     f"{r.get('bit_exact', '')} | {ms} |")
    return ("Zoo ViT on the full Fashion-MNIST test set (10k), calibration 1024 train images, "
            "seed 0. Integer-only: no float op between the input quantizer and the output "
            "dequantizer (checked by tests/test_integer_only.py).\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
