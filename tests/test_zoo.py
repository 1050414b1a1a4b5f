"""Model zoo: registry behaviour, architectures, and the accuracy of the bundled weights."""

import pytest
import torch

from slimtorch.data.fashion_mnist import test_set
from slimtorch.errors import SlimtorchError, UnknownModelError
from slimtorch.zoo import registry
from slimtorch.zoo.registry import ZOO, list_models, load_zoo_model, model_card
from slimtorch.zoo.train import augment

NAMES = ["resnet20", "mobilenetv2", "vit"]


@pytest.fixture(scope="module")
def fmnist_test():
    return test_set()


def test_list_models_names():
    rows = list_models()
    assert [r["name"] for r in rows] == NAMES + ["efficientnet_lite2", "smollm2-135m", "ddpm"]
    assert all(r["params"] > 10_000 and r["description"] for r in rows)
    assert [r["task"] for r in rows] == ["fashion_mnist"] * 3 + ["imagenet_photos", "causal_lm", "diffusion"]
    assert rows[-2]["params"] == 134_515_008  # SmolLM2-135M, LM head tied


def test_unknown_name_lists_known_models():
    with pytest.raises(UnknownModelError) as info:
        load_zoo_model("resnet9000")
    assert all(name in str(info.value) for name in NAMES)


def test_missing_weights_say_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(SlimtorchError, match="slimtorch zoo train vit"):
        load_zoo_model("vit")


@pytest.mark.parametrize("name", NAMES)
def test_untrained_model_shapes(name):
    model = load_zoo_model(name, pretrained=False)
    assert not model.training
    with torch.inference_mode():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_accuracy_matches_card(name, fmnist_test):
    x, y = fmnist_test
    model = load_zoo_model(name)
    assert not model.training
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    top1 = 100.0 * float((pred == y).float().mean())
    card = model_card(name)
    assert top1 >= ZOO[name].target_top1
    assert abs(card["test_top1"] - top1) <= 0.05
    assert card["minutes"] < 30 and card["params"] == sum(p.numel() for p in model.parameters())
    assert card["command"] == f"slimtorch zoo train {name} --epochs {card['epochs']} --seed {card['seed']}"


def test_augment_is_a_shifted_or_flipped_copy():
    x = torch.randn(16, 1, 28, 28)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for img, src in zip(out, x):
        center = [img[0, 2:-2, 2:-2], img[0].flip(-1)[2:-2, 2:-2]]  # [24, 24] each
        windows = [src[0, dy:dy + 24, dx:dx + 24] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(c, w) for c in center for w in windows)
