"""Coverage of capture + W8A8 on real architectures: torchvision, timm and the pretrained MiniLM.

Each model is quantized once (module-scoped fixture) with W8A8 and checked for

* coverage: every Conv2d/Linear of the float model is a calibrated QuantConv2d/QuantLinear
  (weight and input quantizer in QUANT mode with finite, positive scales); nothing is reported
  unsupported;
* attention: every attention layer has calibrated functional sites — one
  ``scaled_dot_product_attention`` site or two explicit matmuls (QKᵀ and AV);
* blocks: the residual blocks capture finds, with their layer members;
* fidelity: cosine of the outputs to the float model and top-1 agreement above floors measured
  on this setup (with margin).

The vision models are randomly initialised (seeded) and run on small random images (64×64; ViT,
DeiT and Swin are built for 64×64 inputs). Random weights are not trained weights: two
adjustments keep the float model non-degenerate, applied by rules, not per class:
linear layers whose weights are all zero (torchvision's ViT head) get a small random init —
otherwise every logit is exactly 0 — and MobileNetV2 gets He fan-in init for its convolutions —
torchvision's fan-out init shrinks each depthwise conv's output by ~√channels, and the logits
end at ~1e-9, below any 8-bit activation grid.

Recipe: the built-in ``w8a8`` unchanged (MSE-p ranges for weights and activations). The file
runs torch with one intra-op thread (see ``_one_thread``).
"""
from __future__ import annotations

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

pytestmark = pytest.mark.slow

IMAGE = 64
CALIB_BATCHES, CALIB_BATCH, EVAL_IMAGES = 2, 4, 32


@dataclass(frozen=True)
class Case:
    build: Callable[[], tuple[nn.Module, list, Any]]  # -> (model, calib items, eval item)
    block_sizes: list[int]          # number of layers in each residual block, in order
    attention_layers: int = 0       # attention modules expected to carry functional sites
    cos_floor: float = 0.995        # cosine(float, quantized) of the flattened outputs
    agree_floor: float = 0.75       # top-1 agreement (classifiers only)
    embeds: bool = False            # outputs are sentence embeddings, not logits
    decomposed: int = 0             # nn.MultiheadAttention modules rewritten
    block_members: dict = field(default_factory=dict)  # block name -> exact layer set


# ------------------------------------------------------------------------------- builders
def _images(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def _image_data() -> tuple[list, torch.Tensor]:
    calib = [_images(100 + i, CALIB_BATCH) for i in range(CALIB_BATCHES)]
    return calib, _images(200, EVAL_IMAGES)


@torch.no_grad()
def _init_zero_linears(model: nn.Module) -> None:
    """All-zero Linear weights (zero-initialised heads) get trunc-normal(0.02) weights."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.trunc_normal_(m.weight, std=0.02)


@torch.no_grad()
def _he_fan_in(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")


def _torchvision(name: str, fan_in: bool = False, **kwargs) -> Callable:
    def build():
        tv = pytest.importorskip("torchvision")
        torch.manual_seed(0)
        model = tv.models.get_model(name, weights=None, **kwargs)
        if fan_in:
            _he_fan_in(model)
        _init_zero_linears(model)
        return (model.eval(), *_image_data())
    return build


def _timm(name: str, **kwargs) -> Callable:
    def build():
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs)
        _init_zero_linears(model)
        return (model.eval(), *_image_data())
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

# Floors sit below what this setup measures (seed 0, one thread, 32 eval images/sentences):
# cosine resnet18 0.9999, mobilenet_v2 0.989, convnext_tiny 0.9992, vit_b_16 0.9992, deit_tiny
# 0.9993, swin_tiny 0.9994, MiniLM embeddings 0.9925 (worst sentence 0.987); top-1 agreement
# 1.0, 0.91, 1.0, 0.88, 0.97, 0.94. Random-init MobileNetV2 amplifies any perturbation (1e-3
# relative weight noise alone costs ~0.003 cosine), hence its lower floor. Random-init logits
# have near-ties, so top-1 agreement is loose; the quantized top-1 must be in the float top-5.
CASES = {
    "resnet18": Case(_torchvision("resnet18"), [2, 2, 3, 2, 3, 2, 3, 2],
                     block_members=RESNET18_BLOCKS),
    # inverted residuals with a skip: expand 1x1, depthwise 3x3, project 1x1
    "mobilenet_v2": Case(_torchvision("mobilenet_v2", fan_in=True), [3] * 10, cos_floor=0.97),
    # depthwise 7x7, fc1, fc2 per block; depths 3-3-9-3
    "convnext_tiny": Case(_timm("convnext_tiny"), [3] * 18),
    # nn.MultiheadAttention rewritten into q/k/v/out Linears: attention blocks hold 4 layers
    "vit_b_16": Case(_torchvision("vit_b_16", image_size=IMAGE), [4, 2] * 12,
                     attention_layers=12, decomposed=12),
    "deit_tiny": Case(_timm("deit_tiny_patch16_224", img_size=IMAGE), [2, 2] * 12,
                      attention_layers=12),
    "swin_tiny": Case(_timm("swin_tiny_patch4_window7_224", img_size=IMAGE, window_size=2),
                      [2, 2] * 12, attention_layers=12),
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
    assert in_top5 == 1.0, f"{run.name}: a quantized top-1 is outside the float top-5"
