"""Model definitions of the slimtorch zoo, sized for Fashion-MNIST (input [B, 1, 28, 28], 10 classes).

- ResNet20: the CIFAR ResNet of He et al., "Deep Residual Learning for Image Recognition" (2016).
- MobileNetV2Small: inverted residuals of Sandler et al., "MobileNetV2" (2018), narrowed for 28x28.
- TinyViT: a small Vision Transformer, Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021).

Plain nn.Modules with explicit ops, so graph capture sees every conv, matmul, softmax and add.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same' padding for odd k) followed by BatchNorm."""
    conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN, option B) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c_in, c_out, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(c_out, c_out, 3)
        self.relu2 = nn.ReLU()
        same = stride == 1 and c_in == c_out
        self.shortcut = nn.Identity() if same else nn.Sequential(*conv_bn(c_in, c_out, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20: 3x3 stem, 3 stages x 3 BasicBlocks (16/32/64 ch), avg pool, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, 16, 3), nn.ReLU())
        blocks, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(3):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))  # [B, 64, 7, 7]
        x = torch.flatten(self.pool(x), 1)  # [B, 64, 1, 1] -> [B, 64]
        return self.fc(x)


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear project 1x1; residual add at stride 1, same width."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*conv_bn(c_in, hidden, 1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += conv_bn(hidden, c_out, 1)
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2Small(nn.Module):
    """A narrow MobileNetV2 for 28x28 inputs: stride-2 stem, 8 inverted residual blocks, 1x1 head.

    Spatial sizes: 28 -> 14 (stem, as in the paper) -> 7 -> 4. Depthwise convolutions are slow on
    CPU at high resolution, so the network downsamples early to keep training well under 30 min.
    """

    # (expand t, out channels c, repeats n, first stride s), as in the paper's Table 2
    CONFIG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 48, 3, 2), (4, 96, 2, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 1, last_channels: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, 16, 3, stride=2), nn.ReLU6())
        blocks, c_in = [], 16
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*conv_bn(c_in, last_channels, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))  # [B, last_channels, 4, 4]
        x = torch.flatten(self.pool(x), 1)  # [B, C, 1, 1] -> [B, C]
        return self.fc(self.dropout(x))


class Attention(nn.Module):
    """Multi-head self-attention written with explicit matmuls and softmax."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}.")
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim)  # [B, N, 3d] -> [B, N, 3, H, Dh]
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, H, N, Dh]
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, H, N, Dh]
        attn = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, N, N]
        attn = attn.softmax(dim=-1)
        out = attn @ v  # [B, H, N, Dh]
        out = out.transpose(1, 2).reshape(b, n, d)  # [B, N, H, Dh] -> [B, N, d]
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class TinyViT(nn.Module):
    """A tiny ViT: conv patch embedding, cls token + learned positions, pre-norm blocks, cls head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 2.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be divisible by patch {patch}.")
        num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, d, 28/p, 28/p]
        x = x.flatten(2).transpose(1, 2)  # [B, d, P] -> [B, P, d]
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # [1, 1, d] -> [B, 1, d]
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # [B, P + 1, d]
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # cls token [B, d] -> [B, classes]
