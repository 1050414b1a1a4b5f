"""Layers we did not write: subclasses of nn.BatchNorm2d / nn.Conv2d with a forward of their own
(as timm's BatchNormAct2d and Conv2dSame have) keep that forward through BN folding, quantizer
attachment, deepcopy, save/load and ONNX export."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch
from slimtorch.graph.capture import capture
from slimtorch.graph.rewrite import fold_batchnorm
from slimtorch.quant.modules import QuantConv2d, QuantLayerMixin
from slimtorch.quant.prepare import prepare, quantizers_off
from slimtorch.recipe import resolve_recipe


class BNAct(nn.BatchNorm2d):
    """batch_norm then SiLU in one module (BatchNormAct2d's pattern)."""

    def forward(self, x):
        return F.silu(super().forward(x))


class PadConv(nn.Conv2d):
    """'same' padding computed from the input in forward (Conv2dSame's pattern): reflect-pad
    by k-1 at the bottom/right, then a padding-0 conv."""

    def forward(self, x):
        k = self.kernel_size[0] - 1
        return F.conv2d(F.pad(x, (0, k, 0, k), mode="reflect"), self.weight, self.bias,
                        self.stride, 0, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = PadConv(1, 8, 3)
        self.bn1 = BNAct(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def imgs():
    return torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def test_fold_keeps_a_bn_subclass_forward_and_drops_a_plain_bn(imgs):
    net = make_net()
    ref = net(imgs)
    pairs = capture(net, imgs[:2]).bn_folds
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2")]
    fold_batchnorm(net, pairs)
    assert type(net.bn1) is BNAct and isinstance(net.bn2, nn.Identity)
    torch.testing.assert_close(net(imgs), ref, rtol=1e-5, atol=1e-6)
    assert capture(net, imgs[:2]).bn_folds == []  # a folded BN is not folded again


def test_prepared_model_with_quantizers_off_is_the_float_model(imgs):
    net = make_net()
    q = copy.deepcopy(net)
    prepare(q, resolve_recipe("w8a8"), imgs[:4])
    assert isinstance(q.conv1, PadConv) and isinstance(q.conv1, QuantLayerMixin)
    assert type(q.conv2) is QuantConv2d
    with torch.no_grad(), quantizers_off(q):
        torch.testing.assert_close(q(imgs), net(imgs), rtol=1e-5, atol=1e-6)


def test_subclass_twin_quantizes_weight_and_input(imgs):
    """The subclass twin reads Q(W) and Q(x): its output equals the subclass forward run on
    Q(x) with Q(W) put in its weight."""
    net = make_net()
    q = slimtorch.quantize(net, "w4a4", imgs)
    layer, x = q.conv1, imgs[:4]
    ref = PadConv(1, 8, 3)
    ref.load_state_dict({"weight": layer.weight, "bias": layer.bias})  # frozen: Q(W)
    with torch.no_grad():
        assert torch.equal(layer(x), ref(layer.input_quantizer(x)))
    cos = F.cosine_similarity(q(imgs).flatten(), net(imgs).flatten(), dim=0)
    assert cos > 0.9


def test_deepcopy_save_load_bit_identical(tmp_path, imgs):
    net = make_net()
    q = slimtorch.quantize(net, "w8a8", imgs)
    out = q(imgs)
    assert torch.equal(copy.deepcopy(q)(imgs), out)
    slimtorch.save(q, tmp_path / "a")
    r = slimtorch.load(tmp_path / "a", model=net)
    assert type(r.conv1) is type(q.conv1) and type(r.bn1) is BNAct
    assert torch.equal(r(imgs), out)
    assert torch.equal(r.conv1.weight_int, q.conv1.weight_int)


def test_onnx_export_runs_the_subclass_forward(tmp_path, imgs):
    """(onnxruntime's int8 MatMul differs from PyTorch on AVX2-only CPUs by ~15 % of the
    logit range with plain layers too, so agreement is checked on the top-1.)"""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    q = slimtorch.quantize(make_net(), "w8a8", imgs)
    report = slimtorch.export_onnx(q, tmp_path / "m.onnx", imgs[:2], check_inputs=[imgs[:8]])
    assert report.ort_error is None
    assert report.weight_dq == 3
    assert report.agreement["top1_agreement"] == 100.0
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "Pad" in ops and "Sigmoid" in ops  # PadConv's padding and BNAct's SiLU ran
