"""Entry point of the ``finetune`` rule: train one method on one task in one target language."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ramoe.data.schema import read_parallel
from ramoe.io import atomic_path, run_metadata
from ramoe.device import resolve_device
from ramoe.models.loading import load_model, model_revision
from ramoe.prompts import chat_options
from ramoe.routing.adapters import describe_moe
from ramoe.routing.traces import read_sequence_trace
from ramoe.training import rise
from ramoe.training.finetune import (
    METHODS,
    RoutingAligner,
    build_examples,
    describe_trainable,
    load_teacher,
    read_ci_items,
    read_expert_mask,
    set_trainable,
    train,
)
from ramoe.training.alignment import aligned_layers
from ramoe.training.distributed import ShardedAligner, launch_finetune, rank, wrap_model, world_size
from ramoe.training.pretrain import set_seed
from ramoe.training.resume import resume_folder

log = logging.getLogger(__name__)


def _train_rows(data_path: str | Path, lang: str, max_items: int | None) -> list[dict]:
    rows = [r for r in read_parallel(data_path).to_pylist() if r["lang"] == lang and r["split"] == "train"]
    if not rows:
        raise ValueError(f"{data_path} has no train items in language {lang!r}.")
    rows.sort(key=lambda r: r["item_id"])
    return rows[:max_items] if max_items else rows


def _ramoe_aligner(model, examples, *, settings: Mapping, experts_path, teacher_path, lang: str) -> tuple[RoutingAligner | None, dict]:
    """Build the alignment term, or None (with a warning) when there is nothing to align."""
    layout = describe_moe(model)
    align = settings["alignment"]
    experts_by_layer, zone = read_expert_mask(experts_path)
    layers = aligned_layers(zone, experts_by_layer, layout.moe_layers, align["loss"])
    ci_items = {e.item_id for e in examples if e.is_ci}
    info = {"zone": list(zone), "alignment_layers": layers, "task_experts": {str(k): v for k, v in experts_by_layer.items()},
            "n_ci": len(ci_items), "n_ci_aligned": 0}
    if not ci_items:
        log.warning("language %s has no ci examples (English correct, target incorrect) among its train items, so "
                    "the alignment loss is never applied and RA-MoE trains exactly as SFT here.", lang)
        return None, info
    if not layers:
        log.warning("the alignment zone %d-%d has no layer with task experts, so the %s alignment loss is empty and "
                    "RA-MoE trains exactly as SFT. Lower routing.experts.tau or widen the zone.", *zone, align["loss"])
        return None, info
    teacher = load_teacher(teacher_path, ci_items, layers)
    info["n_ci_aligned"] = len(teacher)
    log.info("RA-MoE: %d ci examples of %d aligned over layers %s (%s loss, lambda %g, beta %g)", len(teacher),
             len(examples), layers, align["loss"], align["lambda"], align["beta"])
    aligner = RoutingAligner(teacher, experts_by_layer, layers, loss=align["loss"], beta=align["beta"], eps=align["eps"])
    return aligner, info


def _rise_selection(model, *, settings: Mapping, trace_paths: Mapping[str, str | Path], lang: str) -> tuple[dict, dict]:
    """RISE's selected experts {layer: ids} for ``lang`` from the traces of every language of the task."""
    layout = describe_moe(model)
    options = settings["rise"]
    freqs = rise.activation_frequencies({code: read_sequence_trace(path) for code, path in trace_paths.items()})
    bounds = tuple(options["depth_bounds"])
    scores = rise.rise_scores(freqs, target_lang=lang, num_layers=layout.num_layers, alpha=options["alpha"], bounds=bounds)
    budget = rise.budget_size(len(layout.moe_layers) * layout.num_experts, options["budget_fraction"])
    selection = rise.select_experts(scores, budget, options["zone_split"])
    selected = rise.selected_by_layer(selection)
    log.info("RISE: %d experts selected for %s: %s", budget, lang, selected)
    return selected, {"rise_budget": budget, "rise_experts": {str(k): v for k, v in selected.items()}}


def finetune_task_language(
    data_path: str | Path,
    categories_path: str | Path,
    output_dir: str | Path,
    *,
    method: str,
    task: str,
    lang: str,
    model_source: Mapping,
    settings: Mapping,
    routing: Mapping,
    seed: int,
    experts_path: str | Path | None = None,
    trace_paths: Mapping[str, str | Path] | None = None,
    threads: int = 1,
    device: str = "auto",
    processes: int = 1,
) -> list[dict]:
    """Fine-tune the base model with ``method`` on the train items of ``task`` in ``lang`` and save it.

    ``settings`` is the ``finetune`` config section, ``routing`` the ``routing`` section (its
    ``text`` and ``max_length`` fix the span the alignment loss averages). ``experts_path`` (the
    task-expert mask with the zone) and ``trace_paths`` ({lang: sequence trace}; RA-MoE reads
    English, RISE every language) are needed by ``ramoe`` and ``rise``. With ``processes``
    (``finetune.processes``) above 1, torchrun launches that many DDP processes, which share
    ``threads`` (see ramoe.training.distributed). Otherwise the training runs in this process.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not a trained method {METHODS}.")
    arguments = {
        "data_path": str(data_path),
        "categories_path": str(categories_path),
        "output_dir": str(output_dir),
        "method": method,
        "task": task,
        "lang": lang,
        "model_source": dict(model_source),
        "settings": dict(settings),
        "routing": dict(routing),
        "seed": seed,
        "experts_path": None if experts_path is None else str(experts_path),
        "trace_paths": {code: str(path) for code, path in (trace_paths or {}).items()},
    }
    if processes > 1:
        return launch_finetune(arguments, processes=processes, device=device, threads=threads)
    return finetune_in_process(**arguments, threads=threads, device=device)


def finetune_in_process(
    data_path: str | Path,
    categories_path: str | Path,
    output_dir: str | Path,
    *,
    method: str,
    task: str,
    lang: str,
    model_source: Mapping,
    settings: Mapping,
    routing: Mapping,
    seed: int,
    experts_path: str | Path | None = None,
    trace_paths: Mapping[str, str | Path] | None = None,
    threads: int = 1,
    device: str = "auto",
) -> list[dict]:
    """Fine-tune in this process, or as one DDP worker when a process group is initialised.

    Takes the arguments of ``finetune_task_language``. In a process group every worker trains
    its share of each global batch and only rank 0 saves the checkpoint and returns the records.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not a trained method {METHODS}.")
    torch.set_num_threads(threads)
    rows = _train_rows(data_path, lang, settings.get("max_train_items"))
    device = resolve_device(device)
    model, tokenizer = load_model(model_source, device=device)
    layout = describe_moe(model)
    ci_items = read_ci_items(categories_path, lang) & {r["item_id"] for r in rows}
    examples = build_examples(rows, tokenizer, ci_items=ci_items, span_text=routing["text"],
                              max_span=routing.get("max_length"), **chat_options(model_source))
    info: dict = {"n_train": len(examples), "n_ci": len(ci_items), "processes": world_size()}
    lr_settings = dict(settings)

    aligner, align_weight, no_decay = None, 0.0, []
    if method == "rise":
        selected, selection_info = _rise_selection(model, settings=settings, trace_paths=trace_paths, lang=lang)
        info.update(selection_info)
        parameters, _hooks = rise.freeze_for_rise(model, layout, selected)
        no_decay = parameters  # decoupled weight decay would move the frozen slices
        if settings["rise"].get("lr"):
            lr_settings["lr"] = settings["rise"]["lr"]
    else:
        set_seed(seed)  # LoRA draws its A factors here, so the seed fixes them in every process
        parameters = set_trainable(model, layout, settings["trainable"], lora=settings.get("lora"))
        if method == "ramoe":
            aligner, align_info = _ramoe_aligner(model, examples, settings=settings, experts_path=experts_path,
                                                 teacher_path=trace_paths["en"], lang=lang)
            info.update(align_info)
            align_weight = settings["alignment"]["lambda"]
    log.info("%s on %s/%s, seed %d: %d train items (%d ci), training %s", method, task, lang, seed, len(examples),
             len(ci_items), describe_trainable(model, parameters))

    # In a process group, each worker forwards its rows of every global batch (see distributed.py).
    training_model, training_aligner = model, aligner
    if world_size() > 1:
        training_model = wrap_model(model, device)
        training_aligner = None if aligner is None else ShardedAligner(aligner)

    def run_training(metrics_path: Path | None) -> list[dict]:
        return train(training_model, examples, lr_settings, seed=seed, pad_id=tokenizer.pad_token_id,
                     parameters=parameters, no_decay=no_decay, aligner=training_aligner, align_weight=align_weight,
                     metrics_path=metrics_path, desc=f"{method} {task}/{lang} seed {seed}",
                     # NOTE: DDP workers would all write one resume folder, so only a single process resumes.
                     resume_dir=resume_folder(output_dir) if world_size() == 1 else None)

    if rank() != 0:
        run_training(None)
        return []
    with atomic_path(output_dir) as tmp:
        tmp.mkdir(parents=True)
        records = run_training(tmp / "metrics.jsonl")
        if method != "rise" and settings.get("trainable") == "lora":
            # Evaluation loads a plain transformers checkpoint, so the adapters are folded into
            # the base weights before saving; the checkpoint needs no PEFT to load.
            from ramoe.training.lora import merge_lora

            model = merge_lora(model)
            info["lora_merged"] = True
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = run_metadata(seed=seed, method=method, task=task, lang=lang, settings=dict(settings),
                              routing_text=routing["text"], base_model_revision=model_revision(model_source), **info)
        (tmp / "finetune_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    log.info("saved %s checkpoint to %s", method, output_dir)
    return records
