"""Structured pruning on architectures we did not write (the fast part of the coverage suite;
``bench/prune_coverage.py`` runs all of it): 30 % of every dependency group's units removed,
the physically smaller model equal to the masked float model, on the same output shape."""
from __future__ import annotations

import pytest
import torch

from slimtorch.prune.check import compare, prune_each_group
from slimtorch.zoo.coverage import ARCHS
from slimtorch.zoo.coverage_base import calib_and_eval

# each < 3 s here (not edgenext: its layer scales start at 1e-6, so the output barely depends
# on the pruned branch channels and the comparison proves nothing); CNN/mobile/hybrid/ViT/MLP/text/audio, concat, chunk, SE, heads, GQA MLPs
FAST = ["tv/squeezenet1_1", "tv/shufflenet_v2_x0_5", "tv/mnasnet0_5", "tv/regnet_y_400mf",
        "timm/lcnet_050", "timm/mobilevit_xs", "timm/mobilevitv2_050", "tv/mobilenet_v3_small",
        "timm/regnetx_002", "timm/xcit_nano_12_p16_224", "timm/ghostnet_100",
        "hf/bert", "hf/llama", "hf/whisper_encoder", "hf/wav2vec2"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("name", FAST)
def test_pruned_model_equals_masked_float(name):
    arch = ARCHS[name]
    calib, ev = calib_and_eval(arch)
    check = prune_each_group(arch.build(), calib[0], 0.3)
    got = compare(check, ev)
    assert check.stats["removed_units"] > 0.25 * check.stats["units"] > 0
    assert got["shape_ok"] and got["rel_err"] < 1e-4, got
    assert got["rel_change"] > 1e-3, got  # the removed units did change the output
    assert got["macs_ratio"] < 0.95 and check.stats["params_ratio"] < 0.95
