"""The evaluation task of zoo diffusion models (``eval.tasks.TASKS["diffusion"]``).

Outputs are ``n_eval`` samples drawn with fixed noise seeds (DDIM-50 by default), so float
and quantized models are paired image by image; the score is ``diffusion.metrics`` against
the 10k test images (FD/KID on resnet20 features, precision/recall, classifier IS) plus the
paired MSE to the float samples. Calibration for a recipe that does not make its own
(``calib.source: data``) is forward-noised training images, x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε at
uniformly drawn t; diffusion recipes (``calib.source: diffusion``) sample the float model's
own trajectory instead (``diffusion.calibration``). ``keep`` writes ``DIR/samples.png`` next
to the artifact: the first float samples over the quantized ones from the same noise, which
``slimtorch report`` shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .schedule import DDPMSchedule, sample

SAMPLES_FILE = "samples.png"   # float row(s) over quantized row(s), same noise
GRID_COLUMNS = 16


def write_grid(images: torch.Tensor, out, nrow: int) -> None:
    """``images`` in [−1, 1] [B, C, H, W] as a PNG grid of ``nrow`` columns at ``out``,
    written atomically (a half-written file never appears under its name)."""
    from torchvision.utils import save_image

    from ..export.artifact import atomic_path
    with atomic_path(out, 0o644) as tmp:
        save_image((images.clamp(-1, 1) + 1) / 2, tmp, format="png", nrow=nrow, padding=1)


@dataclass
class DiffusionTask:
    data_dir: str | None = None
    n_eval: int = 500
    sampler: str = "ddim"
    steps: int = 50
    eval_seed: int = 0
    batch_size: int = 250
    shape: tuple[int, ...] = (1, 28, 28)
    kind: str = "diffusion"

    @classmethod
    def for_entry(cls, entry, data_dir: str | None = None) -> "DiffusionTask":
        return cls(data_dir, shape=tuple(entry.input_shape))

    def calibration(self, n: int, seed: int, batch_size: int) -> list[tuple]:
        """``n`` forward-noised training images (x_t, t), t uniform over the schedule."""
        from ..data.fashion_mnist import load_fashion_mnist
        from ..zoo.ddpm import to_unit
        gen = torch.Generator().manual_seed(seed)
        images = load_fashion_mnist("train", self.data_dir)[0]
        x0 = to_unit(images[torch.randperm(images.shape[0], generator=gen)[:n]])
        schedule = DDPMSchedule()
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=gen)
        xt = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        return [(xt[i:i + batch_size], t[i:i + batch_size]) for i in range(0, n, batch_size)]

    def outputs(self, model: nn.Module, progress: bool = False) -> torch.Tensor:
        return sample(model, self.n_eval, sampler=self.sampler, steps=self.steps,
                      seed=self.eval_seed, shape=self.shape, batch_size=self.batch_size,
                      progress=progress)

    def keep(self, out_dir, fp_samples: torch.Tensor, q_samples: torch.Tensor) -> list[str]:
        """Write ``out_dir/samples.png``: up to 16 float samples over the quantized samples
        from the same noise (paired column by column); returns the file names written."""
        n = min(GRID_COLUMNS, fp_samples.shape[0], q_samples.shape[0])
        write_grid(torch.cat([fp_samples[:n], q_samples[:n]]), Path(out_dir) / SAMPLES_FILE, n)
        return [SAMPLES_FILE]

    def score(self, samples: torch.Tensor, fp_samples: torch.Tensor | None = None) -> dict:
        from .metrics import score_samples
        return score_samples(samples, reference=fp_samples, data_dir=self.data_dir)
