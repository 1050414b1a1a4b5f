"""Which activation quantizers cost MiniLM its fidelity: quantize with a recipe, then switch the
activation quantizers on by class (layer inputs by their graph source — layer_norm, gelu,
matmul —, and functional-site operands, attention matmuls or residual adds, by site kind, operand
and source) and measure the cosine of the sentence embeddings to the float model. Rows: all on; only one class on; all but one class;
weights only (all activation quantizers off). Writes bench/results/vit_sensitivity_<recipe>.md.

    python bench/vit_sensitivity.py --recipe vit-w4a4-repq [--calib-size 256] [--eval 1000]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import slimtorch
from slimtorch.data.text import load_sentences, text_batches
from slimtorch.eval.fidelity import cosine_fidelity
from slimtorch.eval.machine import machine_markdown
from slimtorch.eval.tasks import TextEmbedding
from slimtorch.export.artifact import write_text_atomic
from slimtorch.quant.prepare import META_ATTR, SITES_ATTR, quant_layers
from slimtorch.quant.quantizer import Mode
from slimtorch.zoo.minilm import embed, load_minilm


def classes(q) -> dict[str, list]:
    """Activation quantizers grouped by what they read, from the captured graph."""
    meta = getattr(q, META_ATTR)
    source = {l["fqn"]: l["source"] for l in meta["graph"]["layers"]}
    out: dict[str, list] = {}
    for fqn, m in quant_layers(q):
        if m.input_quantizer is not None:
            out.setdefault(f"layer input after {source[fqn]}", []).append(m.input_quantizer)
    sites = getattr(q, SITES_ATTR, None)
    for site in meta["graph"]["functional"] if sites is not None else []:
        qs = sites.site(site["key"])
        for i, src in enumerate(site["sources"][:2]):
            out.setdefault(f"{site['kind']} operand {'ab'[i]} after {src}", []).append(qs[i])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="vit-w4a4-repq")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--eval", type=int, default=1000, help="eval sentences")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_minilm()
    calib = TextEmbedding().calibration(args.calib_size, 0, 4)
    batches = text_batches(tok, load_sentences("eval", args.eval), 64)
    with torch.inference_mode():
        ref = embed(model, batches)
    q = slimtorch.quantize(model, args.recipe, calib, seed=0)
    groups = classes(q)
    every = [x for v in groups.values() for x in v]

    def cosine(on: list) -> float:
        for x in every:
            x.mode = Mode.QUANT if any(x is y for y in on) else Mode.OFF
        with torch.inference_mode():
            return cosine_fidelity(ref, embed(q, batches))

    rows = [("all activation quantizers", len(every), cosine(every))]
    for name, qs in groups.items():
        rows.append((f"only {name}", len(qs), cosine(qs)))
    for name, qs in groups.items():
        rows.append((f"all but {name}", len(every) - len(qs),
                     cosine([x for x in every if not any(x is y for y in qs)])))
    rows.append(("none (weights only)", 0, cosine([])))
    lines = [machine_markdown() + f"; recipe {args.recipe}, calibration {args.calib_size} "
             f"sentences, eval {args.eval} sentences.", "",
             "| activation quantizers on | count | cosine to float |", "|---|---:|---:|"]
    lines += [f"| {n} | {c} | {v:.4f} |" for n, c, v in rows]
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / f"vit_sensitivity_{args.recipe}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text + "\n")


if __name__ == "__main__":
    main()
