"""Quantization methods. Each is one module with a config and an ``apply`` entry point:

    apply(model, recipe, batches, *, seed, progress, float_model=None, work_dir=None) -> dict

It runs after quantizers are attached and calibrated, before weights are frozen.
``float_model`` is the untouched float model (BN not folded) for methods that need it;
``work_dir`` holds resumable per-unit state. ``ALGORITHMS`` maps a recipe's ``method`` to
``apply``; ``CONFIGS`` to the config class that validates ``method_args``.
"""
from . import adaround, brecq, pdquant, qdrop, rtn

ALGORITHMS = {"rtn": rtn.apply, "adaround": adaround.apply, "brecq": brecq.apply,
              "qdrop": qdrop.apply, "pdquant": pdquant.apply}
CONFIGS = {"adaround": adaround.AdaRoundConfig, "brecq": brecq.BRECQConfig,
           "qdrop": qdrop.QDropConfig, "pdquant": pdquant.PDQuantConfig}

# vision-transformer PTQ (issue 5)
from . import ptq4vit, repq_vit  # noqa: E402

ALGORITHMS.update({"ptq4vit": ptq4vit.apply, "repq": repq_vit.apply})
CONFIGS.update({"ptq4vit": ptq4vit.PTQ4ViTConfig, "repq": repq_vit.RepQConfig})
