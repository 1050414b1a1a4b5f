"""Mixed-precision commands: ``slimtorch sensitivity`` and ``slimtorch allocate``.

    slimtorch sensitivity --model zoo:resnet20 --bits 2,3,4,6,8 --out sens/
    slimtorch allocate sens/ --avg-bits 4 --out w4avg.yaml     # or --size-bytes N
    slimtorch quantize --model zoo:resnet20 --recipe w4avg.yaml --out q/

``sensitivity`` measures each layer at each bit width (``eval.sensitivity``) on the model's
calibration split: the first ``--calib-size`` images set the ranges, the next ``--held-size``
are measured on; it writes ``DIR/sensitivity.json`` and a Markdown table ``DIR/sensitivity.md``.
``allocate`` solves the budgeted allocation (``quant.allocate``) and writes the base recipe
(``--recipe``, default: the one the sensitivity was measured with) with one override per layer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import SlimtorchError

console = Console()


def run_sensitivity(source: str, *, recipe: str = "w4a8", bits=(2, 3, 4, 6, 8),
                    calib_size: int = 512, held_size: int = 512, seed: int = 0,
                    probes: int = 4, hessian_samples: int = 256, out: str | Path | None = None,
                    data_dir: str | None = None) -> dict[str, Any]:
    """``layer_sensitivity`` of a known model on its task's calibration split (written to
    ``out`` when given)."""
    from .eval.sensitivity import layer_sensitivity
    from .eval.tasks import task_for
    from .export.artifact import write_json_atomic, write_text_atomic
    from .zoo.sources import load_model
    if calib_size < 1 or held_size < 1:
        raise SlimtorchError("--calib-size and --held-size must be at least 1")
    task = task_for(source, data_dir)
    items = task.calibration(calib_size + held_size, seed, calib_size + held_size)
    import torch
    data = torch.cat(items) if isinstance(items[0], torch.Tensor) else None
    if data is None:
        raise SlimtorchError(f"sensitivity runs on image classifiers (zoo models); {source} "
                             "is not one: use slimtorch.eval.sensitivity.layer_sensitivity")
    sens = layer_sensitivity(load_model(source), data[:calib_size], data[calib_size:],
                             recipe=recipe, bits=bits, seed=seed, probes=probes,
                             hessian_samples=hessian_samples)
    sens["model"] = source
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out) / "sensitivity.json", sens)
        write_text_atomic(Path(out) / "sensitivity.md", sensitivity_markdown(sens) + "\n")
    return sens


def sensitivity_markdown(sens: dict[str, Any]) -> str:
    """Per-layer ΔKL at each bit width, and the proxies' rank correlations with it."""
    bits = [int(b) for b in sens["bits"]]

    def at(t, b):
        return t[b] if b in t else t[str(b)]
    lines = [f"ΔKL(float ‖ quantized) with one layer's weights at b bits (activations "
             f"{_act_bits(sens)}), {sens['held_samples']} held images:", "",
             "| layer | params | " + " | ".join(f"W{b}" for b in bits) + " |",
             "|---|---:|" + "---:|" * len(bits)]
    for l in sens["layers"]:
        lines.append(f"| {l['fqn']} | {l['params']} | "
                     + " | ".join(f"{at(l['kl'], b):.2e}" for b in bits) + " |")
    lines += ["", "Spearman ρ of each proxy with ΔKL:", "",
              "| proxy | " + " | ".join(f"W{b}" for b in bits) + " | pooled |",
              "|---|" + "---:|" * (len(bits) + 1)]
    for name, row in sens["spearman"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[f'w{b}']:.3f}" for b in bits)
                     + f" | {row['pooled']:.3f} |")
    if sens.get("blocks"):
        lines += ["", "Per block (a reconstruction unit's layers quantized together): ΔKL, and "
                  "in brackets the sum of its layers' own ΔKL:", "",
                  "| block | layers | params | " + " | ".join(f"W{b}" for b in bits) + " |",
                  "|---|---:|---:|" + "---:|" * len(bits)]
        for blk in sens["blocks"]:
            lines.append(f"| {blk['name']} | {len(blk['layers'])} | {blk['params']} | " + " | ".join(
                f"{at(blk['kl'], b):.2e} ({at(blk['sum_of_layers_kl'], b):.2e})"
                for b in bits) + " |")
    return "\n".join(lines)


def _act_bits(sens) -> str:
    a = sens["recipe"].get("activations")
    return f"A{a['bits']}" if a else "float"


def read_sensitivity(d: str | Path) -> dict[str, Any]:
    path = Path(d) / "sensitivity.json" if Path(d).is_dir() else Path(d)
    if not path.is_file():
        raise SlimtorchError(f"{path} not found: run `slimtorch sensitivity --out DIR` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SlimtorchError(f"{path} is not valid JSON ({e}); rerun slimtorch sensitivity")


def run_allocate(sens_dir: str | Path, out: str | Path, *, avg_bits: float | None = None,
                 size_bytes: int | None = None, criterion: str = "kl",
                 recipe: str | None = None, bits=None) -> tuple[dict, Any]:
    """Allocate from a sensitivity directory; write the mixed recipe YAML to ``out``."""
    from .export.artifact import write_text_atomic
    from .quant.allocate import allocate_from_sensitivity, mixed_recipe
    from .recipe import Recipe, resolve_recipe
    sens = read_sensitivity(sens_dir)
    alloc = allocate_from_sensitivity(sens, avg_bits=avg_bits, size_bytes=size_bytes,
                                      criterion=criterion, bits=bits)
    base = resolve_recipe(recipe) if recipe else Recipe.from_dict(sens["recipe"])
    mixed = mixed_recipe(base, alloc)
    head = (f"# slimtorch allocate {sens_dir} ({criterion}): {len(alloc['layers'])} layers, "
            f"average {alloc['avg_bits']:.3f} weight bits, {alloc['cost']} of {alloc['budget']} "
            f"budget bits, optimal: {alloc['exact']}\n")
    write_text_atomic(Path(out), head + mixed.to_yaml())
    return alloc, mixed


def _bits_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SlimtorchError(f"--bits takes a comma-separated list like 2,4,8, got {s!r}")


def cmd_sensitivity(args) -> None:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    sens = run_sensitivity(args.model, recipe=args.recipe, bits=_bits_list(args.bits),
                           calib_size=args.calib_size, held_size=args.held_size,
                           seed=args.seed, probes=args.probes, out=args.out,
                           data_dir=args.data_dir)
    console.print(sensitivity_markdown(sens), markup=False, highlight=False, soft_wrap=True)
    console.print(f"written to [bold]{args.out}/sensitivity.json[/bold]")


def cmd_allocate(args) -> None:
    alloc, mixed = run_allocate(args.dir, args.out, avg_bits=args.avg_bits,
                                size_bytes=args.size_bytes, criterion=args.criterion,
                                recipe=args.recipe,
                                bits=_bits_list(args.bits) if args.bits else None)
    for fqn, b in alloc["layers"].items():
        console.print(f"{fqn}: W{b}", markup=False, highlight=False)
    console.print(f"average {alloc['avg_bits']:.3f} weight bits; recipe written to "
                  f"[bold]{args.out}[/bold]")


def register(sub) -> None:
    s = sub.add_parser("sensitivity", help="per-layer sensitivity to weight bits (ΔKL, "
                       "agreement) and proxies (HAWQ trace, SQNR, coding length)")
    s.add_argument("--model", required=True, help="zoo:NAME")
    s.add_argument("--recipe", default="w4a8", help="base recipe (its activations and "
                   "weight spec; the weight bits are varied)")
    s.add_argument("--bits", default="2,3,4,6,8", help="candidate weight bit widths")
    s.add_argument("--calib-size", type=int, default=512, help="images setting the ranges")
    s.add_argument("--held-size", type=int, default=512, help="images measured on")
    s.add_argument("--probes", type=int, default=4, help="Hutchinson probes per layer")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int)
    s.add_argument("--data-dir")
    s.add_argument("--out", required=True, help="directory for sensitivity.json/.md")
    s.set_defaults(fn=cmd_sensitivity)
    a = sub.add_parser("allocate", help="per-layer weight bits under a budget, as a recipe")
    a.add_argument("dir", help="directory of slimtorch sensitivity")
    g = a.add_mutually_exclusive_group(required=True)
    g.add_argument("--avg-bits", type=float, help="average weight bits over the layers")
    g.add_argument("--size-bytes", type=int, help="bytes of weight codes (scales excluded)")
    a.add_argument("--criterion", default="kl", help="kl (measured), agreement_drop, hawq, "
                   "sqnr, coding_length")
    a.add_argument("--bits", help="candidate bits (default: all measured)")
    a.add_argument("--recipe", help="base recipe of the output (default: the measured one), "
                   "e.g. w4a8-adaround for reconstruction")
    a.add_argument("--out", required=True, help="recipe YAML to write")
    a.set_defaults(fn=cmd_allocate)
