"""Other PTQ tools for ``ptq_recon.py`` and ``efficientnet_lite2.py``, on the same zoo model,
calibration images and test set.

- ``aimet``: AIMET (aimet-torch) AdaRound on BN-folded weights, then QuantSim activation
  encodings (``post_training_tf_enhanced``); first and last layer weights at 8 bits.
- ``aimet-ptq`` / ``aimet-cle`` / ``aimet-cle-bc`` / ``aimet-adaround``: AIMET's PTQ flow for
  real CNNs (its user guide: ``prepare_model`` → BN fold or CLE → AdaRound → QuantSim with
  ``post_training_tf_enhanced`` and the per-channel config ``default_config_per_channel.json``).
- ``nncf``: NNCF ``nncf.quantize`` (min-max PTQ, bias correction) with the row's bit widths
  forced through ``AdvancedQuantizationParameters``.
- ``brevitas``: Brevitas' ImageNet PTQ example recipe: ``preprocess_for_quantize`` (BN merge),
  ``layerwise`` backend (first/last layer 8-bit), per-channel weights, activation calibration,
  GPTQ.
Each returns a metrics row like ``run_quantize``; a failure propagates and is recorded verbatim
by the caller.
"""
from __future__ import annotations

import copy
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

AIMET_ITERS = 400  # AdaRound steps per layer (twice slimtorch's CPU default of 200 per unit)


def _bits(bits: str) -> tuple[int, int]:
    w, a = bits.removeprefix("w").split("a")
    return int(w), int(a)


def run_peer(tool: str, model_name: str, bits: str, seed: int, calib_size: int) -> dict:
    from slimtorch.eval.tasks import task_for
    from slimtorch.zoo.sources import load_model
    task = task_for(f"zoo:{model_name}", None)
    calib = task.calibration(calib_size, seed, 32)
    model = load_model(f"zoo:{model_name}").eval()
    torch.manual_seed(seed)
    fp_out = task.outputs(model)
    t0 = time.perf_counter()
    qmodel, setting, pkg = TOOLS[tool](copy.deepcopy(model), calib, *_bits(bits))
    calib_seconds = time.perf_counter() - t0
    with torch.no_grad():
        q_out = task.outputs(qmodel)
    fp, q = task.score(fp_out), task.score(q_out, fp_out)
    return {"tool": tool, "bits": bits, "tool_version": metadata.version(pkg), "setting": setting,
            "calib_size": calib_size, "threads": torch.get_num_threads(),
            "calib_seconds": round(calib_seconds, 3),
            **{f"fp_{k}": v for k, v in fp.items()}, **{f"q_{k}": v for k, v in q.items()}}


def aimet(model, calib, wb: int, ab: int):
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel
    dummy = calib[0][:1]
    fold_all_batch_norms(model, input_shapes=tuple(dummy.shape))
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    loader = [(x, torch.zeros(len(x))) for x in calib]
    params = AdaroundParameters(data_loader=loader, num_batches=len(loader),
                                default_num_iterations=AIMET_ITERS)
    scheme = QuantScheme.post_training_tf_enhanced
    with tempfile.TemporaryDirectory() as tmp:
        ada = Adaround.apply_adaround(model, dummy, params, path=tmp, filename_prefix="ada",
                                      default_param_bw=wb, default_quant_scheme=scheme,
                                      param_bw_override_list=[(convs[0], 8), (convs[-1], 8)])
        sim = QuantizationSimModel(ada, dummy, quant_scheme=scheme, default_param_bw=wb,
                                   default_output_bw=ab)
        sim.set_and_freeze_param_encodings(encoding_path=f"{tmp}/ada.encodings")
    sim.compute_encodings(lambda m, _: [m(x) for x in calib], None)
    return sim.model, (f"AdaRound {AIMET_ITERS} it/layer, tf_enhanced, W{wb}A{ab}, "
                       "first/last weights 8-bit"), "aimet-torch"


# AdaRound on the ImageNet CNN, cut to fit CPU time: AIMET re-runs the float and the quantized
# model up to each of the 65 layers for every AdaRound batch (sampling), then takes the steps
AIMET_CPU_ITERS = 50  # steps per layer (AIMET's default: 10000; 15000 below 8 bits)
AIMET_CPU_CROPS = 16  # calibration crops AdaRound samples, one batch (AIMET: up to 2000)
AIMET_CONFIG = "default_config_per_channel.json"  # per-channel weights (aimet_torch/common/...)


def _aimet_prepare(model: torch.nn.Module) -> torch.nn.Module:
    """``prepare_model`` (functional adds / pooling become modules, so QuantSim quantizes them).
    Parameter-free modules of the model's own code stay leaves (torch.fx cannot trace
    shape-dependent padding) and are left unquantized (``QuantizationMixin.ignore``)."""
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.nn import QuantizationMixin
    leaves = {type(m) for m in model.modules() if not type(m).__module__.startswith("torch")
              and not any(True for _ in m.parameters()) and not any(True for _ in m.children())}
    for cls in leaves:
        QuantizationMixin.ignore(cls)
    return prepare_model(copy.deepcopy(model), module_classes_to_exclude=list(leaves))


def _aimet_config() -> str:
    import aimet_torch
    return str(Path(aimet_torch.__file__).parent / "common" / "quantsim_config" / AIMET_CONFIG)


def _aimet_sim(model, calib, wb: int, ab: int, encodings: str | None = None):
    """QuantSim W``wb``A``ab`` (tf_enhanced, per-channel config), encodings from ``calib``;
    ``encodings``: AdaRound's weight encodings, frozen. Returns the model and its layer policy."""
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel
    sim = QuantizationSimModel(model, calib[0][:1], QuantScheme.post_training_tf_enhanced,
                               default_output_bw=ab, default_param_bw=wb,
                               config_file=_aimet_config())
    layers = "every layer"
    if wb < 8:  # first and last layer weights at 8 bits, as slimtorch's recipes do
        for m in _aimet_first_last(sim.model):
            m.param_quantizers["weight"].bitwidth = 8
        layers = "first/last weights 8-bit"
    if encodings is not None:
        sim.set_and_freeze_param_encodings(encoding_path=encodings)
    with torch.no_grad():
        sim.compute_encodings(lambda m: [m(x) for x in calib])
    return sim.model, f"{AIMET_CONFIG}, W{wb}A{ab} ({layers})"


def _aimet_first_last(model) -> list:
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return [layers[0], layers[-1]]


def aimet_ptq(model, calib, wb: int, ab: int):
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    model = _aimet_prepare(model)
    fold_all_batch_norms(model, None, dummy_input=calib[0][:1])
    q, policy = _aimet_sim(model, calib, wb, ab)
    return q, f"prepare_model, BN fold, QuantSim tf_enhanced, {policy}", "aimet-torch"


def aimet_cle(model, calib, wb: int, ab: int):
    from aimet_torch.cross_layer_equalization import equalize_model
    model = _aimet_prepare(model)
    equalize_model(model, dummy_input=calib[0][:1])  # BN fold + cross-layer scaling + HBF
    q, policy = _aimet_sim(model, calib, wb, ab)
    return q, f"prepare_model, CLE (equalize_model), QuantSim tf_enhanced, {policy}", "aimet-torch"


def aimet_cle_bc(model, calib, wb: int, ab: int):
    """CLE + bias correction, AIMET's DFQ flow. aimet-torch 2.42.0 ships no torch bias
    correction module, so the import raises and the row records the error verbatim."""
    from aimet_torch.bias_correction import BiasCorrection  # noqa: F401
    raise NotImplementedError("aimet_torch.bias_correction imported: wire its correct_bias "
                              "call here (untested against this aimet-torch version)")


def aimet_adaround(model, calib, wb: int, ab: int):
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.common.defs import QuantScheme
    model = _aimet_prepare(model)
    dummy = calib[0][:1]
    fold_all_batch_norms(model, None, dummy_input=dummy)
    loader = [(calib[0][:AIMET_CPU_CROPS], torch.zeros(AIMET_CPU_CROPS))]
    params = AdaroundParameters(data_loader=loader, num_batches=1,
                                default_num_iterations=AIMET_CPU_ITERS)
    first_last = [] if wb >= 8 else [(m, 8) for m in _aimet_first_last(model)]
    with tempfile.TemporaryDirectory() as tmp:
        ada = Adaround.apply_adaround(model, dummy, params, path=tmp, filename_prefix="ada",
                                      default_param_bw=wb, param_bw_override_list=first_last,
                                      default_quant_scheme=QuantScheme.post_training_tf_enhanced,
                                      default_config_file=_aimet_config())
        q, policy = _aimet_sim(ada, calib, wb, ab, encodings=f"{tmp}/ada.encodings")
    return q, (f"prepare_model, BN fold, AdaRound {AIMET_CPU_ITERS} it/layer on "
               f"{len(loader[0][0])} crops, "
               f"QuantSim tf_enhanced, {policy}"), "aimet-torch"


def nncf(model, calib, wb: int, ab: int):
    import nncf as nn_cf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       QuantizationParameters)
    adv = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(num_bits=wb),
        activations_quantization_params=QuantizationParameters(num_bits=ab))
    n = sum(len(x) for x in calib)
    q = nn_cf.quantize(model, nn_cf.Dataset(calib), subset_size=n, advanced_parameters=adv)
    return q, f"nncf.quantize defaults, num_bits W{wb}/A{ab} on every layer", "nncf"


def brevitas(model, calib, wb: int, ab: int):
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq.ptq_common import (apply_gptq,
                                                                         calibrate,
                                                                         quantize_model)
    model = preprocess_for_quantize(model, equalize_iters=0, merge_bn=True)
    q = quantize_model(model, backend="layerwise", weight_bit_width=wb, act_bit_width=ab,
                       bias_bit_width=32, weight_quant_granularity="per_channel",
                       act_quant_percentile=99.999, act_quant_type="asym",
                       scale_factor_type="float_scale", quant_format="int",
                       weight_quant_type="asym", layerwise_first_last_bit_width=8)
    loader = [(x, torch.zeros(len(x))) for x in calib]
    with torch.no_grad():
        q(calib[0])
    calibrate(loader, q)
    apply_gptq(loader, q, act_order=True)
    return q, (f"layerwise W{wb}A{ab} (first/last 8-bit), per-channel asym weights, "
               "percentile 99.999 acts, calibrate + GPTQ"), "brevitas"


TOOLS = {"aimet": aimet, "nncf": nncf, "brevitas": brevitas, "aimet-ptq": aimet_ptq,
         "aimet-cle": aimet_cle, "aimet-cle-bc": aimet_cle_bc, "aimet-adaround": aimet_adaround}
