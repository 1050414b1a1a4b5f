"""Architectures we did not write, built small and random-initialised, for coverage checks.

One list (``ARCHS``) shared by ``tests/test_coverage.py`` and ``bench/coverage.py``: torchvision
and timm image models (CNNs, ViTs, hybrids, MLP-mixers, mobile nets) on 64×64 images, and Hugging
Face ``transformers`` models built from tiny configs (hidden 32-64, 2 layers; no hub). The rules
that make random weights realistic are in ``coverage_base``.
"""
from __future__ import annotations

from .coverage_base import IMAGE, Arch, timm_arch, torchvision_arch
from .coverage_hf import HF_ARCHS

TORCHVISION = [
    torchvision_arch("resnet18", "cnn"),
    torchvision_arch("resnet50", "cnn", slow=True),
    torchvision_arch("densenet121", "cnn"),
    torchvision_arch("googlenet", "cnn", aux_logits=False, init_weights=True),
    torchvision_arch("squeezenet1_1", "cnn"),
    torchvision_arch("regnet_x_400mf", "cnn"),
    torchvision_arch("regnet_y_400mf", "cnn"),
    torchvision_arch("mobilenet_v2", "mobile"),
    torchvision_arch("mobilenet_v3_small", "mobile"),
    torchvision_arch("mobilenet_v3_large", "mobile"),
    torchvision_arch("efficientnet_b0", "mobile"),
    torchvision_arch("mnasnet0_5", "mobile"),
    torchvision_arch("shufflenet_v2_x0_5", "mobile"),
    torchvision_arch("vit_b_16", "vit", slow=True, image_size=IMAGE),
    torchvision_arch("swin_t", "vit", slow=True),
]

TIMM = [
    timm_arch("efficientnet_b2", "mobile"),
    timm_arch("tf_efficientnet_b0", "mobile"),
    timm_arch("mobilenetv3_small_100", "mobile"),
    timm_arch("tf_mobilenetv3_small_100", "mobile"),
    timm_arch("mobilenetv4_conv_small", "mobile"),
    timm_arch("ghostnet_100", "mobile"),
    timm_arch("ghostnetv2_100", "mobile"),
    timm_arch("lcnet_050", "mobile"),
    timm_arch("rexnet_100", "mobile"),
    timm_arch("mobilevit_xs", "hybrid"),
    timm_arch("mobilevitv2_050", "hybrid"),
    timm_arch("levit_128s", "hybrid", img_size=IMAGE),
    timm_arch("coat_lite_tiny", "hybrid", slow=True, img_size=IMAGE),
    timm_arch("edgenext_xx_small", "hybrid"),
    timm_arch("resnet26d", "cnn"),
    timm_arch("resnest14d", "cnn"),
    timm_arch("regnetx_002", "cnn"),
    timm_arch("dla34", "cnn"),
    timm_arch("cspresnet50", "cnn", slow=True),
    timm_arch("dpn68", "cnn", slow=True),
    timm_arch("repvgg_a0", "cnn"),
    timm_arch("convnext_tiny", "cnn", slow=True),
    timm_arch("poolformer_s12", "mlp", slow=True),
    timm_arch("mixer_s16_224", "mlp", img_size=IMAGE),
    timm_arch("resmlp_12_224", "mlp", img_size=IMAGE),
    timm_arch("gmlp_s16_224", "mlp", img_size=IMAGE),
    timm_arch("vit_tiny_patch16_224", "vit", img_size=IMAGE),
    timm_arch("deit_tiny_patch16_224", "vit", img_size=IMAGE),
    timm_arch("pit_ti_224", "vit", img_size=IMAGE),
    timm_arch("swin_tiny_patch4_window7_224", "vit", slow=True, img_size=IMAGE,
              window_size=2),
    timm_arch("xcit_nano_12_p16_224", "vit", img_size=IMAGE),
]

ARCHS: dict[str, Arch] = {a.name: a for a in TORCHVISION + TIMM + HF_ARCHS}
