"""One diagnosis run of ``run_quantize`` with a patched built-in recipe, as used for the
MobileNetV2 W4A4 investigation in ``bench/results/ptq_recon_actlr.md``.

    python bench/recon_diag.py NAME BASE_RECIPE 'JSON_PATCH' [MODEL]   (SEED env var, default 0)

JSON_PATCH is merged into the recipe dict (one level deep for dicts), e.g.
'{"activations": null}' (weights only), '{"overrides": {"re:.*": {"weights": null}}}'
(activations only), '{"method_args": {"act_lr": 4e-3}}' (merged into every ``methods``
entry). Prints one JSON line: top-1 of the
float and quantized model, the quantized model's top-1 agreement with float, agreement and
KL(float ‖ quantized) on the calibration images and on the test split, and the per-unit
reconstruction loss before/after.
"""
import json
import os
import sys
import time

import torch

from slimtorch.algorithms.pd import pd_loss
from slimtorch.eval.tasks import run_batches, task_for
from slimtorch.pipeline import run_quantize
from slimtorch.recipe import load_builtin
from slimtorch.zoo.sources import load_model


def fidelity(source: str, qmodel, seed: int, fp_test: torch.Tensor) -> dict:
    """Top-1 agreement and KL(float ‖ quantized) of the logits, on the calibration images
    themselves and on the test split (``fp_test``: the float logits ``run_quantize`` computed): a
    method that over-fits its calibration set is closer to float on the first than on the
    second."""
    task = task_for(source)
    calib = task.calibration(1024, seed, 500)
    out = {}
    for where, zf, zq in (
            ("calib", run_batches(load_model(source).eval(), calib), run_batches(qmodel, calib)),
            ("test", fp_test, task.outputs(qmodel))):
        out[f"{where}_agree"] = round(100 * (zf.argmax(1) == zq.argmax(1)).float().mean().item(), 2)
        out[f"{where}_kl"] = round(pd_loss(zq, zf, 1.0).item(), 4)
    return out


def main() -> None:
    torch.set_num_threads(1)
    name, base, patch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = sys.argv[4] if len(sys.argv) > 4 else "mobilenetv2"
    r = load_builtin(base).to_dict()
    for k, v in patch.items():
        if k == "method_args":
            r["methods"] = [{**e, **v} for e in r["methods"]]
            continue
        r[k] = {**r[k], **v} if isinstance(v, dict) and isinstance(r.get(k), dict) else v
    r["name"] = name
    t = time.time()
    seed = int(os.environ.get("SEED", 0))
    fp_cache: dict = {}
    m, qmodel = run_quantize(f"zoo:{model}", r, calib_size=1024, seed=seed, fp_cache=fp_cache)
    wall = round(time.time() - t, 1)
    pu = [u for s in m.get("methods", []) for u in s["stats"].get("per_unit", [])]
    print(json.dumps({"name": name, "base": base, "patch": patch, "fp": m["fp_top1"],
                      "q": m["q_top1"], "agree": m.get("q_top1_agreement"),
                      **fidelity(f"zoo:{model}", qmodel, seed, fp_cache[f"zoo:{model}"]),
                      "calib_s": m["calib_seconds"],
                      "wall": wall,
                      "units": [(u["unit"], round(u["loss_before"], 4), round(u["loss_after"], 4))
                                for u in pu]}))


if __name__ == "__main__":
    main()
