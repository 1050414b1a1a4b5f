import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stem, one residual block, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(x + y)
        return self.fc(x.mean((2, 3)))


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = SmallCNN()
    for bn in (m.bn0, m.bn1, m.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture
def cnn():
    return make_cnn()


@pytest.fixture
def images():
    return torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return (20 * torch.log10(ref.norm() / (ref - test).norm())).item()


def load_minilm_or_skip():
    """MiniLM and its tokenizer, or skip the test when transformers/the model are missing."""
    pytest.importorskip("transformers")
    from slimtorch.errors import UnknownModelError
    from slimtorch.zoo.minilm import load_minilm

    try:
        return load_minilm()
    except UnknownModelError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def calib():
    """64 Fashion-MNIST calibration images (skips when the dataset is not installed)."""
    from slimtorch.data.fashion_mnist import calibration_set
    from slimtorch.errors import SlimtorchError
    try:
        return calibration_set(64, 0)
    except SlimtorchError:
        pytest.skip("Fashion-MNIST not installed")
