"""``slimtorch sample SRC --n 64 --out grid.png``: images from a diffusion model — a saved
artifact directory (its PTQD correction applied when its recipe has one) or a zoo model
(``zoo:ddpm``, float) — as a PNG grid, with a progress bar."""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from .errors import SlimtorchError

console = Console()


def load_diffusion_model(source: str) -> torch.nn.Module:
    """A saved artifact (a directory) or a zoo source, checked to be a diffusion model."""
    from .diffusion.calibration import check_time_model
    if Path(source).is_dir():
        from .api import load
        model = load(source)
    else:
        from .zoo.sources import load_model
        model = load_model(source)
    check_time_model(model)
    return model


def sample_grid(source: str, out: str | Path, *, n: int = 64, sampler: str = "ddim",
                steps: int = 50, seed: int = 0, ptqd: bool = True,
                progress: bool = True) -> torch.Tensor:
    """Sample ``n`` images from ``source`` and write them to ``out`` as a PNG grid (written
    atomically); returns the samples in [−1, 1]."""
    from .diffusion.calibration import sample_shape
    from .diffusion.schedule import sample
    from .diffusion.task import write_grid
    if n < 1:
        raise SlimtorchError(f"--n must be at least 1, got {n}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise SlimtorchError(f"--out must name a .png file, got {out}")
    if not out.parent.is_dir():
        raise SlimtorchError(f"{out.parent} does not exist: create it or choose another --out")
    model = load_diffusion_model(source)
    x = sample(model, n, sampler=sampler, steps=steps, seed=seed, shape=sample_shape(model),
               ptqd=ptqd, progress=progress)
    write_grid(x, out, nrow=int(n ** 0.5 + 0.5))
    return x


def cmd_sample(args) -> None:
    x = sample_grid(args.source, args.out, n=args.n, sampler=args.sampler, steps=args.steps,
                    seed=args.seed, ptqd=not args.no_ptqd)
    console.print(f"wrote {args.n} samples ({args.sampler}, seed {args.seed}) to {args.out}; "
                  f"pixel mean {x.mean():.3f}, std {x.std():.3f}")


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a diffusion model into a PNG grid")
    p.add_argument("source", help="an artifact directory, or zoo:ddpm (float)")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (shared across models)")
    p.add_argument("--no-ptqd", action="store_true",
                   help="do not apply the artifact's PTQD noise correction")
    p.set_defaults(fn=cmd_sample)
