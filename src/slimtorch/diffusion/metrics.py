"""Sample quality of a Fashion-MNIST diffusion model, offline, on a domain classifier.

Inception-based FID downloads its network at run time, so every metric here reads the
features of the project's own Fashion-MNIST ``resnet20`` (zoo) instead: the 64-d input of its
final Linear (penultimate features) for distances, its logits for the Inception Score. These
numbers are labelled "FD/KID on resnet20 features" and are never comparable with Inception
FIDs. Against the 10k test images:

- ``fd``: Fréchet distance ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_rΣ_g)^½) (torchmetrics
  ``FrechetInceptionDistance(feature=...)``); biased upwards at small N: compare equal N only.
- ``kid``: kernel inception distance, cubic polynomial-kernel MMD, mean ± std over subsets
  (torchmetrics ``KernelInceptionDistance``).
- ``precision`` / ``recall``: k-NN manifolds of Kynkäänniemi et al. (NeurIPS 2019), k = 3: a
  generated sample is precise when it lies in some real sample's k-NN ball; a real sample is
  recalled when it lies in some generated sample's ball (N real = N generated, seeded).
- ``is``: classifier-based Inception Score exp E[KL(p(y|x) ‖ p(y))] (torchmetrics
  ``InceptionScore``, 10 splits) and ``class_hist``, the predicted-class histogram (%).
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import torch
from torch import Tensor, nn

from ..data.fashion_mnist import MEAN, STD


class ClassifierFeatures(nn.Module):
    """Images in [0, 1] [B, 1, 28, 28] -> the classifier's penultimate features (input of its
    last Linear) or, with ``logits=True``, its logits."""

    def __init__(self, classifier: nn.Module, logits: bool = False):
        super().__init__()
        self.clf, self.logits = classifier.eval(), logits
        self.head = [m for m in classifier.modules() if isinstance(m, nn.Linear)][-1]
        self.num_features = self.head.out_features if logits else self.head.in_features

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = (x.float() - MEAN) / STD
        if self.logits:
            return self.clf(x)
        got = []
        handle = self.head.register_forward_pre_hook(lambda m, a: got.append(a[0]))
        try:
            self.clf(x)
        finally:
            handle.remove()
        return got[0].flatten(1)  # [B, features]


class _Given(nn.Module):
    """Features computed beforehand, passed through (torchmetrics runs its ``feature`` module
    on what ``update`` gets: the test set's features are then computed once per process)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, f: Tensor) -> Tensor:
        return f


@lru_cache(maxsize=2)
def _real_features(data_dir=None) -> tuple[Tensor, Tensor]:
    """(penultimate features, logits) of the 10k test images."""
    real = test_images(data_dir)
    feats, logits = ClassifierFeatures(_classifier()), ClassifierFeatures(_classifier(), True)
    return (torch.cat([feats(b) for b in real.split(1000)]),
            torch.cat([logits(b) for b in real.split(1000)]))


@lru_cache(maxsize=1)
def _classifier() -> nn.Module:
    from ..zoo.registry import load_zoo_model
    return load_zoo_model("resnet20")


def to_unit(samples: Tensor) -> Tensor:
    """[−1, 1] model space -> [0, 1] images."""
    return ((samples.clamp(-1, 1) + 1) / 2).float()


def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (k-NN balls) of feature sets real [N, d], fake [M, d]."""
    def radii(f: Tensor) -> Tensor:  # distance to the k-th nearest other point
        return torch.cat([torch.cdist(c, f).kthvalue(k + 1, dim=1).values
                          for c in f.split(1000)])

    def covered(points: Tensor, centres: Tensor, r: Tensor) -> float:
        inside = [(torch.cdist(c, centres) <= r[None, :]).any(1) for c in points.split(1000)]
        return torch.cat(inside).float().mean().item()

    r_real, r_fake = radii(real), radii(fake)
    return covered(fake, real, r_real), covered(real, fake, r_fake)


def test_images(data_dir=None) -> Tensor:
    """The 10k Fashion-MNIST test images in [0, 1], [10000, 1, 28, 28]."""
    from ..data.fashion_mnist import load_fashion_mnist
    return load_fashion_mnist("test", data_dir)[0].float().div(255).unsqueeze(1)


@torch.no_grad()
def score_samples(samples: Tensor, *, reference: Tensor | None = None, seed: int = 0,
                  data_dir=None) -> dict:
    """FD, KID, precision/recall, classifier IS and class histogram of ``samples``
    [N, 1, 28, 28] in [−1, 1] against the test set; ``reference`` (the float model's samples
    from the same noise) adds the paired per-image MSE to them. Deterministic for one ``seed``
    (KID's random subsets, IS's shuffle, the real subset for precision/recall)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance
    feats, logits = ClassifierFeatures(_classifier()), ClassifierFeatures(_classifier(), True)
    real_f, _ = _real_features(data_dir)
    fake = to_unit(samples)
    n = fake.shape[0]
    fake_f = torch.cat([feats(b) for b in fake.split(1000)])  # [n, d]
    fake_l = torch.cat([logits(b) for b in fake.split(1000)])  # [n, 10]
    with warnings.catch_warnings():  # "will save all extracted features": 10k x 64 here
        warnings.simplefilter("ignore", UserWarning)
        fid = FrechetInceptionDistance(feature=_Given(real_f.shape[1]))
        kid = KernelInceptionDistance(feature=_Given(real_f.shape[1]),
                                      subset_size=min(1000, n), subsets=50)
        inception = InceptionScore(feature=_Given(fake_l.shape[1]), splits=10)
    for metric in (fid, kid):
        metric.update(real_f, real=True)
        metric.update(fake_f, real=False)
    with torch.random.fork_rng():  # KID's subsets and IS's shuffle draw from the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
        inception.update(fake_l)
        is_mean, _ = inception.compute()
    gen = torch.Generator().manual_seed(seed)
    sub = real_f[torch.randperm(real_f.shape[0], generator=gen)[:n]]
    precision, recall = knn_precision_recall(sub, fake_f)
    hist = torch.bincount(fake_l.argmax(1), minlength=10).float() / n * 100
    out = {"n": n, "fd": round(float(fid.compute()), 3),
           "kid": round(float(kid_mean) * 1e3, 3), "kid_std": round(float(kid_std) * 1e3, 3),
           "precision": round(precision, 4), "recall": round(recall, 4),
           "is": round(float(is_mean), 3),
           "class_hist": [round(float(h), 1) for h in hist]}
    if reference is not None:
        out["mse_to_float"] = round(float((samples - reference).pow(2).mean()), 5)
    return out
