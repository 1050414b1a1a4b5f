"""The main job, shared by the CLI and the benchmarks: quantize a known model with a recipe,
evaluate float and quantized on the model's task, and report metrics."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ._version import versions
from .api import quantize
from .errors import SlimtorchError
from .eval.size import fp_size_bytes, quantized_size_bytes
from .eval.tasks import task_for
from .export.artifact import save, write_json_atomic
from .methods import method_handler
from .prune import pruning_record
from .quant.prepare import META_ATTR
from .recipe import resolve_recipe
from .sparsity.masks import sparsity_summary
from .zoo.sources import load_model


def run_quantize(source: str, recipe: str, *, calib_size: int | None = None, seed: int = 0,
                 out: str | Path | None = None, data_dir: str | None = None,
                 progress: bool = False, fp_cache: dict | None = None, resume: bool = False,
                 eval_size: int | None = None, calib_source: str | None = None,
                 train_size: int | None = None) -> tuple[dict[str, Any], torch.nn.Module]:
    """Quantize ``source`` with ``recipe``; returns the metrics (written to ``out`` too, with
    the artifact, when given) and the quantized model. ``calib_size`` samples of calibration
    data (None: the task's default, 1024 images / sentences or 128 LM segments);
    ``eval_size``: evaluate on the first N evaluation items only (a quick look; None: the
    task's fixed set), recorded in the metrics and used again by ``run_eval``.
    Methods that train (``srste``) get the task's training split (``train_size`` images, None:
    all of it); it is loaded only when the recipe has such a method.

    Reconstruction methods keep per-unit state in ``OUT/recon-state`` until the artifact is
    written. ``resume=True`` continues an interrupted run from it; without it, finding that
    directory is an error (it is never silently reused, nor silently thrown away).

    ``calib_source="data-free"`` (CLI ``--calib data-free``) overrides the recipe's
    ``calib.source``: the calibration set is synthesised from the float model
    (``data.synthetic``), ``calib_size`` inputs (default: the recipe's ``calib.samples``) of
    the zoo entry's input shape; no training image is read."""
    work = Path(out) / "recon-state" if out is not None else None  # resumable unit state
    if work is not None and work.exists() and not resume:
        raise SlimtorchError(f"{work} holds the state of an interrupted run; pass --resume "
                             "(resume=True) to continue it, or delete that directory")
    recipe_obj = with_calib_source(resolve_recipe(recipe), source, calib_source, calib_size)
    task = with_eval_size(task_for(source, data_dir), eval_size)
    eval_note = {"eval_size": eval_size} if eval_size is not None else {}
    if recipe_obj.calib.source != "data":  # made from the model inside quantize (timed)
        calib, calib_size = None, recipe_obj.calib.samples
    else:
        if calib_size is None:
            calib_size = getattr(task, "calib_size", 1024)
        calib = task.calibration(calib_size, seed, recipe_obj.calib.batch_size)
    train, train_note = training_data(task, recipe_obj, train_size, seed)
    model = load_model(source)
    fp_out = (fp_cache or {}).get(source)
    if fp_out is None:
        fp_out = task.outputs(model, progress)
        if fp_cache is not None:
            fp_cache[source] = fp_out
    oneshot, spent = {}, [0.0]

    def before_recovery(name, m):  # the pruned model's score before `recover` trains it
        if method_handler(name).config.shrinks and "recover" in recipe_obj.method_names:
            t = time.perf_counter()
            was = m.training
            oneshot.update(task.score(task.outputs(m.eval()), fp_out))
            m.train(was)
            spent[0] += time.perf_counter() - t
        return {}
    t0 = time.perf_counter()
    qmodel = quantize(model, recipe_obj, calib, seed=seed, progress=progress, work_dir=work,
                      train_data=train, on_method=before_recovery)
    calib_seconds = time.perf_counter() - t0 - spent[0]
    t0 = time.perf_counter()
    q_out = task.outputs(qmodel, progress)
    eval_seconds = time.perf_counter() - t0
    fp_score, q_score = task.score(fp_out), task.score(q_out, fp_out)
    metrics = {"model": source, "recipe": recipe_obj.name,
               "method": "+".join(recipe_obj.method_names),
               "task": task.kind, "calib_size": calib_size, "seed": seed,
               "calib_source": recipe_obj.calib.source,
               **eval_note, **train_note,
               "fp_size_bytes": fp_size_bytes(model),
               "q_size_bytes": quantized_size_bytes(qmodel),
               "calib_seconds": round(calib_seconds, 3),
               "eval_seconds": round(eval_seconds, 3),
               "threads": torch.get_num_threads(), "versions": versions()}
    for k, v in fp_score.items():
        metrics[f"fp_{k}"] = v
    for k, v in q_score.items():
        metrics[f"q_{k}"] = v
    if "calibration" in getattr(qmodel, META_ATTR, {}):
        metrics["calibration"] = getattr(qmodel, META_ATTR)["calibration"]
    check = getattr(qmodel, META_ATTR, {}).get("self_check")
    if check:
        metrics["self_check"] = check  # output SQNR/cosine on a calibration batch, worst layers
    pruned = pruning_record(qmodel)
    if pruned is not None:  # structured pruning: params, MACs, the score before recovery
        metrics["pruning"] = {"params": pruned["params"], "macs": pruned["macs"],
                              "criterion": pruned.get("criterion", "lowrank"),
                              **({"before_recovery": oneshot} if oneshot else {})}
    sparse = sparsity_summary(qmodel)
    if sparse is not None:  # masked layers: sparsity per layer and over the model
        metrics["sparsity"] = sparse
    # each method's resolved config, what `auto` became, its stats (per-unit losses, seconds)
    metrics["methods"] = getattr(qmodel, META_ATTR, {}).get("methods", [])
    if out is not None:
        save(qmodel, out, extra={"task": task.kind, **eval_note})
        shutil.rmtree(work, ignore_errors=True)
        if hasattr(task, "keep"):  # a task's own view of the outputs (diffusion: samples.png)
            metrics["files"] = task.keep(out, fp_out, q_out)
        write_json_atomic(Path(out) / "metrics.json", metrics)
    return metrics, qmodel


def with_calib_source(recipe, source: str, calib_source: str | None, calib_size: int | None):
    """``recipe`` with ``calib.source`` set to ``calib_source`` (None: as the recipe says); a
    data-free recipe gets the zoo entry's input shape and ``calib_size`` samples when given."""
    from .recipe import DATA_FREE_KEYS, Recipe
    if calib_source not in (None, "data", "data-free"):
        raise SlimtorchError(f"--calib must be 'data' or 'data-free', got {calib_source!r}")
    if calib_source is None and recipe.calib.source == "data":
        return recipe
    calib = recipe.calib.model_dump(mode="json")
    calib["source"] = calib_source or calib["source"]
    if calib["source"] == "data":  # a data-free recipe run on data: drop its settings
        calib = {k: v for k, v in calib.items() if k not in DATA_FREE_KEYS}
    else:
        calib["shape"] = calib["shape"] or list(_image_shape(source))
        calib["samples"] = calib_size or calib["samples"]
    return Recipe.from_dict({**recipe.to_dict(), "calib": calib}, source=recipe.name)


def _image_shape(source: str) -> tuple[int, ...]:
    """One input sample's shape for data-free synthesis: zoo image models only."""
    from .zoo.registry import get_entry
    scheme, _, name = source.partition(":")
    entry = get_entry(name) if scheme == "zoo" else None
    if entry is None or entry.task == "causal_lm":
        raise SlimtorchError(f"data-free calibration synthesises image inputs; {source} does "
                             "not take images: calibrate it on data (drop --calib data-free)")
    return tuple(entry.input_shape)


def training_data(task, recipe, train_size: int | None, seed: int) -> tuple[list | None, dict]:
    """The task's training items when a recipe method trains (``MethodConfig.trains``), and
    the metrics note ``{"train_size": N}``; (None, {}) when none trains. A task without a
    training split gives None (the method trains on the calibration data and says so)."""
    trains = [n for n, m in zip(recipe.method_names, recipe.methods) if getattr(m, "trains",
                                                                              False)]
    if not trains:
        if train_size is not None:
            raise SlimtorchError(f"--train-size feeds methods that train (srste); recipe "
                                 f"{recipe.name!r} has none: drop --train-size")
        return None, {}
    if train_size is not None and train_size < 1:
        raise SlimtorchError(f"--train-size must be at least 1, got {train_size}")
    if not hasattr(task, "training"):
        if train_size is not None:
            raise SlimtorchError(f"task {task.kind} has no training split for "
                                 f"{', '.join(trains)}: drop --train-size (it trains on the "
                                 "calibration data)")
        return None, {}
    items = task.training(train_size, seed)
    return items, {"train_size": sum(len(x) for x in items)}


def with_eval_size(task, eval_size: int | None):
    """``task`` evaluating its first ``eval_size`` items (tasks with a fixed count ``n_eval``:
    LM windows, sentences, photos); None leaves it as it is."""
    if eval_size is None:
        return task
    if not hasattr(task, "n_eval"):
        raise SlimtorchError(f"--eval-size applies to tasks with a fixed evaluation count "
                             f"(causal LM windows, sentences, photos); {task.kind} scores its "
                             "whole test set: drop --eval-size")
    if not 1 <= eval_size <= task.n_eval:
        raise SlimtorchError(f"--eval-size must be between 1 and {task.n_eval} (the task's "
                             f"evaluation set), got {eval_size}")
    task.n_eval = eval_size
    return task


def _artifact_source(directory: str | Path, from_python: str) -> tuple[dict, str]:
    """(config, model source) of a saved artifact; an artifact of a custom model has no source
    the CLI can rebuild, and the error says to use Python (``from_python``)."""
    from .export.artifact import read_config
    cfg = read_config(directory)
    if not cfg.get("source"):
        raise SlimtorchError(f"this artifact was made from a custom model; {from_python}")
    return cfg, cfg["source"]


def run_eval(directory: str | Path, *, data_dir: str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Reload an artifact and evaluate it against its float model again."""
    from .export.artifact import load
    cfg, source = _artifact_source(directory, "evaluate it from Python")
    task = with_eval_size(task_for(source, data_dir), cfg.get("eval_size"))
    qmodel = load(directory)
    fp_out = task.outputs(load_model(source), progress)
    q_out = task.outputs(qmodel, progress)
    scores = {f"q_{k}": v for k, v in task.score(q_out, fp_out).items()}
    scores.update({f"fp_{k}": v for k, v in task.score(fp_out).items()})
    return {"model": source, "recipe": cfg["meta"]["recipe"]["name"], **scores}


def run_inspect(directory: str | Path, *, samples: int = 32, seed: int = 0,
                data_dir: str | None = None):
    """Per-layer self-check of a saved artifact against its float model, on ``samples``
    calibration inputs of the model's task (``eval.selfcheck.check``)."""
    from .eval.selfcheck import check
    from .export.artifact import load
    cfg, source = _artifact_source(
        directory, "inspect it from Python: slimtorch.inspect(qmodel, float_model, inputs)")
    if samples < 1:
        raise SlimtorchError(f"--samples must be at least 1, got {samples}")
    task = task_for(source, data_dir)
    item = task.calibration(samples, seed, samples)[0]
    qmodel = load(directory)
    return check(qmodel, load_model(source), item, meta=cfg["meta"])


def causal_lm_entry(source: str | None):
    """The zoo entry of ``source`` when it is a zoo causal language model, else None."""
    from .zoo.registry import get_entry
    scheme, _, name = (source or "").partition(":")
    entry = get_entry(name) if scheme == "zoo" else None
    return entry if entry is not None and entry.task == "causal_lm" else None


def run_generate(directory: str | Path, prompt: str, *, max_new_tokens: int = 32,
                 fake_quant: bool = False) -> tuple[str, dict[str, Any]]:
    """Greedy continuation of ``prompt`` by a saved causal-LM artifact (a zoo LLM), run on the
    int8 / packed low-bit kernels (``intops.lower``) unless ``fake_quant``. Returns the text and
    {new_tokens, seconds, tokens_per_s, int8_layers, packed_layers, fake_quant_layers}."""
    from .export.artifact import load
    from .intops import lower, lowering_summary
    cfg, source = _artifact_source(directory, "generate from Python: qmodel.generate(...)")
    entry = causal_lm_entry(source)
    if entry is None:
        raise SlimtorchError(f"{directory} holds {source}, not a language model: `generate` "
                             "needs an artifact of a causal LM such as zoo:smollm2-135m")
    if max_new_tokens < 1:
        raise SlimtorchError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    tok, qmodel = entry.tokenizer(), load(directory)
    if not fake_quant:
        qmodel = lower(qmodel)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = qmodel.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=tok.eos_token_id)
        seconds = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    summary = lowering_summary(qmodel)
    info = {"new_tokens": n, "seconds": round(seconds, 3),
            "tokens_per_s": round(n / max(seconds, 1e-9), 2),
            "int8_layers": len(summary["int8"]), "packed_layers": len(summary["packed"]),
            "fake_quant_layers": len(summary["fake_quant"])}
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), info
