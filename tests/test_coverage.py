"""Coverage of capture + W8A8 on architectures we did not write.

Two parts, both on the shared list ``slimtorch.zoo.coverage.ARCHS`` (torchvision, timm and tiny
Hugging Face ``transformers`` configs; random init made realistic by rule — zero heads re-drawn,
BatchNorm statistics from train-mode passes on a batch of 16, see ``zoo/coverage_base``):

* detailed cases (``CASES``; plus the pretrained MiniLM), each quantized once (module-scoped
  fixture) with W8A8 and checked for coverage (every Conv2d/Linear a calibrated QuantConv2d/
  QuantLinear, nothing unsupported), attention sites (one ``scaled_dot_product_attention`` site
  or two explicit matmuls per attention layer), the residual blocks capture finds, and fidelity
  (cosine and top-1 agreement above floors measured on this setup, with margin);
* breadth (``test_w8a8_architecture``): every other architecture of the list quantizes at W8A8,
  runs, leaves no Conv/Linear in float without listing it as unsupported, and keeps output
  cosine >= ``COS_FLOOR`` — or, for the few listed in ``BELOW_FLOOR`` with the measured number
  and the reason, at least that number minus a margin.

Recipe: the built-in ``w8a8`` unchanged (min/max weight ranges, MSE-p activation ranges). The file
runs torch with one intra-op thread (see ``_one_thread``).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from conftest import load_minilm_or_skip
import torch
from torch import nn

import slimtorch
from slimtorch.eval.fidelity import cosine_fidelity, logits_agreement
from slimtorch.quant.functional import SITE_ROLES
from slimtorch.quant.modules import QuantConv2d, QuantLayerMixin, QuantLinear
from slimtorch.quant.quantizer import Mode
from slimtorch.zoo.coverage import ARCHS
from slimtorch.zoo.coverage_base import calib_and_eval, cosine, output_of

pytestmark = pytest.mark.slow
LOWERED_COS = 0.999  # slimtorch.lower (int8 Linear layers) against the fake-quant output
LOWERED_COS_AMPLIFIED = 0.995  # ... where rounding flips are amplified (see the test)



@dataclass(frozen=True)
class Case:
    build: Callable[[], tuple[nn.Module, list, Any]]  # -> (model, calib items, eval item)
    block_sizes: list[int]          # number of layers in each residual block, in order
    attention_layers: int = 0       # attention modules expected to carry functional sites
    cos_floor: float = 0.995        # cosine(float, quantized) of the flattened outputs
    agree_floor: float = 0.75       # top-1 agreement (classifiers only)
    top5_floor: float = 1.0         # share of quantized top-1s inside the float top-5
    embeds: bool = False            # outputs are sentence embeddings, not logits
    decomposed: int = 0             # nn.MultiheadAttention modules rewritten
    block_members: dict = field(default_factory=dict)  # block name -> exact layer set


# ------------------------------------------------------------------------------- builders
def _arch(name: str) -> Callable:
    """A builder of the shared coverage list (slimtorch.zoo.coverage): model, calib, eval."""
    def build():
        arch = ARCHS[name]
        pytest.importorskip({"torchvision": "torchvision", "timm": "timm",
                             "transformers": "transformers"}[arch.family])
        return (arch.build(), *calib_and_eval(arch))
    return build


def _minilm():
    from slimtorch.data.text import load_sentences, text_batches

    model, tok = load_minilm_or_skip()
    calib = text_batches(tok, load_sentences("calib", 16), batch_size=8)
    evals = text_batches(tok, load_sentences("eval", 32), batch_size=32)
    return model, calib, evals[0]


RESNET18_BLOCKS = {
    f"layer{s}.{b}": {f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"}
    | ({f"layer{s}.{b}.downsample.0"} if s > 1 and b == 0 else set())
    for s in range(1, 5) for b in range(2)
}

# Floors sit below what this setup measures (seed 0, one thread, 16 eval images, 32 sentences):
# cosine resnet18 0.9963, mobilenet_v2 0.891, convnext_tiny 0.9995, vit_b_16 0.9992, deit_tiny
# 0.9993, swin_tiny 0.9994, MiniLM embeddings 0.9925 (worst sentence 0.987); top-1 agreement
# 0.94, 0.19 (3 of 16; 0.38 with MSE weight ranges at cosine 0.888), 1.0, 0.94, 1.0,
# 0.88. Random-init MobileNetV2 with BatchNorm statistics from random
# images amplifies any perturbation (NNCF's W8A8 on the same model and data: cosine 0.827), hence
# its lower floors. Random-init logits have near-ties, so top-1 agreement is loose; the
# quantized top-1 must be in the float top-5 (MobileNetV2: 75 % of the time).
CASES = {
    "resnet18": Case(_arch("tv/resnet18"), [2, 2, 3, 2, 3, 2, 3, 2],
                     block_members=RESNET18_BLOCKS),
    # inverted residuals with a skip: expand 1x1, depthwise 3x3, project 1x1
    "mobilenet_v2": Case(_arch("tv/mobilenet_v2"), [3] * 10, cos_floor=0.86,
                         agree_floor=0.15, top5_floor=0.7),
    # depthwise 7x7, fc1, fc2 per block; depths 3-3-9-3
    "convnext_tiny": Case(_arch("timm/convnext_tiny"), [3] * 18),
    # nn.MultiheadAttention rewritten into q/k/v/out Linears: attention blocks hold 4 layers
    "vit_b_16": Case(_arch("tv/vit_b_16"), [4, 2] * 12,
                     attention_layers=12, decomposed=12),
    "deit_tiny": Case(_arch("timm/deit_tiny_patch16_224"), [2, 2] * 12,
                      attention_layers=12),
    "swin_tiny": Case(_arch("timm/swin_tiny_patch4_window7_224"), [2, 2] * 12,
                      attention_layers=12),
    # BERT: q, k, v, attention.output.dense | intermediate.dense, output.dense
    "minilm": Case(_minilm, [4, 2] * 6, attention_layers=6, cos_floor=0.98, embeds=True),
}


@dataclass
class Run:
    name: str
    case: Case
    model: nn.Module
    qmodel: nn.Module
    meta: dict
    ref: torch.Tensor    # float outputs on the eval item ([N, classes] or [N, D] embeddings)
    out: torch.Tensor    # quantized outputs


@torch.no_grad()
def _outputs(model: nn.Module, item: Any) -> torch.Tensor:
    if isinstance(item, dict):  # MiniLM: mean-pooled, normalised sentence embeddings
        from slimtorch.zoo.minilm import embed
        return embed(model, [item])
    return model(item)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these models run small tensors through many small ops, and on a
    busy 2-core machine every multi-threaded op waits for a second core (a quantize of Swin
    took 20 s with 2 threads and 3 s with 1 under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(CASES))
def run(request, _one_thread) -> Run:
    case = CASES[request.param]
    model, calib, eval_item = case.build()
    qmodel = slimtorch.quantize(model, "w8a8", calib, seed=0)
    return Run(request.param, case, model, qmodel, qmodel._slimtorch_meta,
               _outputs(model, eval_item), _outputs(qmodel, eval_item))


def _calibrated(q) -> bool:
    return (q is not None and q.mode is Mode.QUANT and bool(torch.isfinite(q.scale).all())
            and bool((q.scale > 0).all()))


# ---------------------------------------------------------------------------------- tests
def test_every_conv_and_linear_is_quantized_and_calibrated(run):
    graph = run.meta["graph"]
    assert graph["unsupported"] == []
    expected = {n for n, m in run.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    qtypes = {n: type(m) for n, m in run.qmodel.named_modules()}
    missing = {n for n in expected if qtypes.get(n) not in (QuantConv2d, QuantLinear)}
    assert not missing, f"{run.name}: left in float: {sorted(missing)[:5]}"
    compute = {n: m for n, m in run.qmodel.named_modules() if isinstance(m, (nn.Conv2d,
                                                                              nn.Linear))}
    # the MHA rewrite adds q/k/v Linears: 3 per decomposed module beyond the float model's
    assert len(compute) == len(expected) + 3 * run.case.decomposed
    assert len(run.meta["decomposed"]) == run.case.decomposed
    for name, m in compute.items():
        assert isinstance(m, QuantLayerMixin), name
        assert _calibrated(m.weight_quantizer), f"{name}: weight quantizer not calibrated"
        assert _calibrated(m.input_quantizer), f"{name}: input quantizer not calibrated"
        assert m.weight_quantizer.spec.bits == m.input_quantizer.spec.bits == 8
    planned = {k for k, v in run.meta["plan"]["layers"].items() if v["activations"]}
    assert planned == set(compute)
    for name, m in run.qmodel.named_modules():  # also weight-only layers (embeddings)
        if isinstance(m, QuantLayerMixin):
            assert _calibrated(m.weight_quantizer), f"{name}: weight quantizer not calibrated"


def _attention_sites(meta: dict) -> dict:
    return {k: v for k, v in meta["plan"]["functional"].items() if v["kind"] != "add"}


def test_attention_matmuls_have_calibrated_sites(run):
    found = {s["key"] for s in run.meta["graph"]["functional"]}
    assert set(run.meta["plan"]["functional"]) == found
    plan = _attention_sites(run.meta)
    sites = getattr(run.qmodel, "slimtorch_functional", None)
    if run.case.attention_layers == 0:
        assert plan == {}
        return
    assert sorted(sites.keys()) == sorted(run.meta["plan"]["functional"])
    kinds_by_module = defaultdict(list)
    for key, site in plan.items():
        module, kind, _ = key.rsplit(":", 2)
        assert kind == site["kind"]
        kinds_by_module[module].append(kind)
        quantizers = sites.site(key)
        assert len(quantizers) == len(SITE_ROLES[kind])
        assert all(_calibrated(q) for q in quantizers), f"{key}: not calibrated"
    assert len(kinds_by_module) == run.case.attention_layers
    for module, kinds in kinds_by_module.items():
        assert sorted(kinds) in (["sdpa"], ["matmul", "matmul"]), (module, kinds)


def test_residual_blocks_found(run):
    blocks = run.meta["graph"]["blocks"]
    assert [len(b["layers"]) for b in blocks] == run.case.block_sizes
    layers = {l["fqn"] for l in run.meta["graph"]["layers"]}
    members = [fqn for b in blocks for fqn in b["layers"]]
    assert len(members) == len(set(members)), "a layer sits in two blocks"
    assert all(set(b["layers"]) <= layers for b in blocks)
    # an attention module's projections (q/k/v, output) all sit in one block
    block_of = {fqn: i for i, b in enumerate(blocks) for fqn in b["layers"]}
    attention = {key.rsplit(":", 2)[0] for key in _attention_sites(run.meta)}
    assert len(attention) == run.case.attention_layers
    for module in attention:
        inside = {block_of.get(fqn) for fqn in layers if fqn.startswith(module + ".")}
        assert len(inside) == 1 and None not in inside, (module, inside)
    if run.case.block_members:
        assert {b["name"]: set(b["layers"]) for b in blocks} == run.case.block_members


def test_residual_adds_quantized_where_an_int8_chain_continues(run):
    """CNN residual adds feed convs: both operands quantized. Transformer residual adds feed
    LayerNorm (float), so they stay float; so does ConvNeXt's residual stream."""
    graph, plan = run.meta["graph"], run.meta["plan"]["functional"]
    adds = [s for s in graph["functional"] if s["kind"] == "add"]
    assert {s["node"] for s in adds} <= {b["add_node"] for b in graph["blocks"]}
    assert all(plan[s["key"]]["kind"] == "add" for s in adds)
    sites = getattr(run.qmodel, "slimtorch_functional", None)
    for s in adds:
        assert all(_calibrated(q) for q in sites.site(s["key"]))
    cnn = run.name in ("resnet18", "mobilenet_v2")
    assert len(adds) == (len(graph["blocks"]) if cnn else 0)


def test_outputs_stay_close_to_float(run):
    assert torch.isfinite(run.out).all()
    cos = torch.nn.functional.cosine_similarity(run.ref.flatten(), run.out.flatten(), dim=0)
    assert cos.item() >= run.case.cos_floor, f"{run.name}: cosine {cos:.5f}"
    if run.case.embeds:  # per sentence: mean and worst cosine of the embeddings
        rows = torch.nn.functional.cosine_similarity(run.ref, run.out, dim=1)
        print(f"{run.name}: cosine {cos:.5f} mean row {cosine_fidelity(run.ref, run.out):.5f}"
              f" min row {rows.min():.5f}")
        assert cosine_fidelity(run.ref, run.out) >= run.case.cos_floor
        assert rows.min().item() >= run.case.cos_floor - 0.01
        return
    agree = logits_agreement(run.ref, run.out)["top1_agreement"]
    top5 = run.ref.topk(5, dim=1).indices  # [N, 5]
    in_top5 = (top5 == run.out.argmax(1, keepdim=True)).any(1).float().mean().item()
    print(f"{run.name}: cosine {cos:.5f} top1 {agree:.3f} in float top-5 {in_top5:.3f}")
    assert agree >= run.case.agree_floor, f"{run.name}: top-1 agreement {agree:.3f}"
    assert in_top5 >= run.case.top5_floor, f"{run.name}: quantized top-1 in float top-5 " \
        f"{in_top5:.3f}"


# ---------------------------------------------------------------------------------- breadth
COS_FLOOR = 0.90
BELOW_MARGIN = 0.02
# Architectures whose W8A8 cosine is below COS_FLOOR on this setup: (slimtorch measured, NNCF
# measured in bench/coverage.py, reason). Random-init networks with BatchNorm statistics from
# random images amplify any perturbation (Yang et al. 2019: BN at init explodes gradients with
# depth); NNCF's W8A8 on the same model and data is lower still, so these are the setup's
# ceiling, not a bug. Their floor is the measured number minus BELOW_MARGIN.
# (the "alone" figures were measured with MSE-p weight ranges, before w8a8 moved to min/max)
_DEEP = "deep random-init BN net: 8-bit noise amplified"
BELOW_FLOOR: dict[str, tuple[float, float, str]] = {
    "tv/resnet50": (0.8704, 0.8609, _DEEP + " (weights alone 0.896, activations alone 0.896)"),
    "tv/googlenet": (0.8956, 0.8825, _DEEP),
    "tv/mnasnet0_5": (0.8937, 0.8474, _DEEP),
    "timm/efficientnet_b2": (0.8333, 0.4568, _DEEP + " (weights alone 0.944, activations "
                             "alone 0.851; each single activation quantizer costs <= 0.03)"),
    "timm/mobilenetv3_small_100": (0.6044, 0.3333, _DEEP + " (weights alone 0.995; each of "
                                   "the 8-bit activation quantizers of blocks.4 alone costs "
                                   "0.03-0.05)"),
    "timm/repvgg_a0": (0.4257, 0.2334, _DEEP + " (22 plain 3-branch blocks)"),
    "timm/lcnet_050": (0.8860, 0.3783, _DEEP + " (MSE-p weight ranges: 0.9029)"),
}
DETAILED = {"tv/resnet18", "tv/mobilenet_v2", "timm/convnext_tiny", "tv/vit_b_16",
            "timm/deit_tiny_patch16_224", "timm/swin_tiny_patch4_window7_224"}
BREADTH = [n for n in ARCHS if n not in DETAILED]


def test_the_list_spans_the_families():
    families = [ARCHS[n].family for n in ARCHS]
    assert len(ARCHS) >= 40
    assert families.count("torchvision") >= 12 and families.count("timm") >= 20
    assert families.count("transformers") >= 8
    assert set(BELOW_FLOOR) <= set(BREADTH) and set(DETAILED) <= set(ARCHS)


@pytest.mark.parametrize("name", BREADTH)
def test_w8a8_architecture(name, _one_thread):
    model, calib, eval_item = _arch(name)()
    qmodel = slimtorch.quantize(model, "w8a8", calib, seed=0)
    meta = qmodel._slimtorch_meta
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayerMixin)}
    assert layers, f"{name}: nothing quantized"
    for fqn, m in layers.items():
        assert _calibrated(m.weight_quantizer), f"{fqn}: weight quantizer not calibrated"
        assert m.input_quantizer is None or _calibrated(m.input_quantizer), fqn
    # a Conv/Linear left in float is listed as unsupported, never silently skipped
    listed = {u["where"] for u in meta["graph"]["unsupported"]}
    float_layers = {n for n, m in qmodel.named_modules()
                    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and n not in layers}
    # (torchvision's Swin calls F.linear on its qkv/proj weights inside the attention
    # module: listed under that module)
    silent = {n for n in float_layers if not any(n == w or n.startswith(w + ".") for w in listed)}
    assert not silent, f"{name}: silently float: {sorted(silent)[:5]}"
    ref, out = output_of(ARCHS[name], model, eval_item), output_of(ARCHS[name], qmodel, eval_item)
    assert torch.isfinite(out).all()
    cos = cosine(ref, out)
    floor = BELOW_FLOOR[name][0] - BELOW_MARGIN if name in BELOW_FLOOR else COS_FLOOR
    print(f"{name}: cosine {cos:.4f}")
    assert cos >= floor, f"{name}: cosine {cos:.4f} < {floor:.4f}"
    # the integer form computes what the fake-quant model does (summation order aside)
    lowered = slimtorch.lower(copy.deepcopy(qmodel))
    low = output_of(ARCHS[name], lowered, eval_item)
    # Where float rounding in the fake-quant path flips a later quantizer's rounding and a deep
    # random net amplifies it (timm/levit_128s on an Intel AMX CPU: 0.9983), the integer form
    # must still be as faithful to float as the fake-quant model (error at most 5 % larger)
    near, err_q, err_low = cosine(out, low), 1 - cos, 1 - cosine(ref, low)
    assert near >= LOWERED_COS or (near >= LOWERED_COS_AMPLIFIED and err_low <= 1.05 * err_q), \
        f"{name}: lowered vs fake quant {near}; error to float {err_low:.4f} vs {err_q:.4f}"
