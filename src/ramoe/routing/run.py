"""Entry points of the routing rules: traces, divergence, alignment zone and task experts."""

from __future__ import annotations

import csv
import functools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import polars as pl
import torch

from ramoe.data.schema import read_parallel
from ramoe.io import run_metadata, write_json_atomic
from ramoe.device import resolve_device
from ramoe.models.loading import load_model, model_revision
from ramoe.prompts import chat_options, format_prompts
from ramoe.routing.divergence import divergence_table
from ramoe.routing.experts import expert_mask, language_experts, task_experts
from ramoe.routing.figures import plot_divergence_by_layer, plot_task_experts
from ramoe.routing.traces import capture_traces, read_sequence_trace, read_trace_metadata, trace_texts
from ramoe.routing.zone import ZoneSettings, choose_zone
from ramoe.tables import write_table

log = logging.getLogger(__name__)


def _trace(model_source: Mapping, build_texts: Callable, settings: Mapping, token_path, sequence_path, seed: int,
           threads: int, device: str) -> dict:
    """Load the model and trace the (item_id, lang, text) triples that ``build_texts(tokenizer=...)`` returns."""
    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_source, device=resolve_device(device))
    # The texts are built after loading, because a chat template comes with the tokenizer.
    texts = build_texts(tokenizer=tokenizer)
    provenance = {"model_revision": model_revision(model_source), "dtype": model_source.get("dtype"), "seed": seed}
    summary = capture_traces(
        model,
        tokenizer,
        texts,
        token_path=token_path if settings["token_traces"] else None,
        sequence_path=sequence_path,
        batch_size=settings["batch_size"],
        max_length=settings.get("max_length"),
        provenance=provenance,
    )
    log.info("traced %d sequences, %d tokens in %.1f s", summary["sequences"], summary["tokens"], summary["seconds"])
    return summary


def trace_task_language(
    data_path: str | Path,
    token_path: str | Path,
    sequence_path: str | Path,
    *,
    lang: str,
    model_source: Mapping,
    settings: Mapping,
    seed: int,
    threads: int = 1,
    device: str = "auto",
) -> dict:
    """Trace the routing of one task's items in one language (the ``routing.split`` items)."""
    rows = [r for r in read_parallel(data_path).to_pylist() if r["lang"] == lang and r["split"] == settings["split"]]
    if not rows:
        raise ValueError(f"{data_path} has no {settings['split']!r} items in language {lang!r}.")
    rows.sort(key=lambda r: r["item_id"])
    if settings.get("max_items"):
        rows = rows[: settings["max_items"]]
    build_texts = functools.partial(trace_texts, rows, settings["text"], **chat_options(model_source))
    if not settings["token_traces"]:
        Path(token_path).parent.mkdir(parents=True, exist_ok=True)
        Path(token_path).touch()  # an empty placeholder keeps the rule's outputs fixed
    return _trace(model_source, build_texts, settings, token_path, sequence_path, seed, threads, device)


def read_general_text(path: str | Path, max_passages: int | None = None) -> list[str]:
    """Passages of general text: lines of a .txt file, ``text`` fields of .jsonl, SQuAD contexts of .json,
    or the ``text`` (else ``sentence1``, XNLI's premise) column of a .tsv file with a header row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"general text file {str(path)!r} not found; set routing.general_text.path.")
    if path.suffix == ".json":
        squad = json.loads(path.read_text(encoding="utf-8"))
        passages = [p["context"] for article in squad["data"] for p in article["paragraphs"]]
    elif path.suffix == ".tsv":
        passages = _read_tsv_passages(path)
    elif path.suffix == ".jsonl":
        passages = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        passages = path.read_text(encoding="utf-8").splitlines()
    passages = list(dict.fromkeys(" ".join(p.split()) for p in passages if p.strip()))
    if not passages:
        raise ValueError(f"general text file {path} contains no passages.")
    return passages[:max_passages] if max_passages else passages


def _read_tsv_passages(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        column = next((name for name in ("text", "sentence1") if name in (reader.fieldnames or [])), None)
        if column is None:
            raise ValueError(
                f"general text file {path} has the columns {reader.fieldnames}, but a .tsv file needs a header "
                "row with a 'text' or 'sentence1' column."
            )
        return [row[column] or "" for row in reader]


def trace_general_text(
    text_path: str | Path,
    sequence_path: str | Path,
    *,
    model_source: Mapping,
    settings: Mapping,
    seed: int,
    threads: int = 1,
    device: str = "auto",
) -> dict:
    """Trace the routing of the general English text (per-sequence distributions only)."""
    passages = read_general_text(text_path, settings["general_text"].get("max_passages"))
    build_texts = functools.partial(_general_texts, passages, **chat_options(model_source))
    return _trace(model_source, build_texts, dict(settings, token_traces=False), None, sequence_path, seed, threads,
                  device)


def _general_texts(passages: Sequence[str], *, tokenizer, **chat) -> list[tuple[str, str, str]]:
    """Number the general passages, wrapped in the chat template when task prompts are.

    Task texts and general text then share the template's tokens, so the template adds no
    routing difference to the task-expert contrast.
    """
    texts = format_prompts(tokenizer, passages, **chat)
    return [(f"general-{i:05d}", "en", text) for i, text in enumerate(texts)]


def _trace_paths_by_task(paths: Sequence[str | Path]) -> dict[str, dict[str, Path]]:
    """{task: {lang: path}} from paths shaped ``.../{task}/{lang}.sequences.parquet``."""
    grouped: dict[str, dict[str, Path]] = {}
    for path in map(Path, paths):
        grouped.setdefault(path.parent.name, {})[path.name.split(".")[0]] = path
    return grouped


def write_divergence(sequence_paths: Sequence[str | Path], output_path: str | Path, *, model: str, seed: int) -> pl.DataFrame:
    """Divergence of every target language from English per layer, with the two controls."""
    frames = []
    for task, by_lang in _trace_paths_by_task(sequence_paths).items():
        english = read_sequence_trace(by_lang["en"])
        targets = {lang: read_sequence_trace(p) for lang, p in by_lang.items() if lang != "en"}
        frames.append(divergence_table(english, targets, model=model, task=task, seed=seed))
    table = pl.concat(frames, how="vertical")
    write_table(table, output_path, read_trace_metadata(sequence_paths[0]))
    return table


def zone_settings(settings: Mapping) -> ZoneSettings:
    zone = settings["zone"]
    override = zone.get("override")
    return ZoneSettings(
        metric=zone["metric"],
        threshold=zone["threshold"],
        edge_layers=zone["edge_layers"],
        min_layers=zone["min_layers"],
        fallback=tuple(zone["fallback"]),
        override=tuple(override) if override else None,
        accuracy_split=settings["split"],
    )


def write_alignment_zone(
    divergence_path: str | Path,
    accuracy_path: str | Path,
    trace_path: str | Path,
    output_path: str | Path,
    *,
    settings: Mapping,
) -> pl.DataFrame:
    """Choose the alignment zone per (model, task) from divergence and accuracy gaps."""
    metadata = read_trace_metadata(trace_path)
    divergence = pl.read_csv(divergence_path)
    accuracy = pl.read_csv(accuracy_path)
    zones = choose_zone(
        divergence,
        accuracy,
        moe_layers=metadata["moe_layers"],
        num_layers=metadata["num_layers"],
        settings=zone_settings(settings),
        divergence_column=settings["zone"]["divergence"],
    )
    write_table(zones, output_path, metadata)
    for (task, method, first, last), _ in zones.group_by(["task", "method", "first_layer", "last_layer"]):
        log.info("task %s: alignment zone layers %d-%d (%s)", task, first, last, method)
    return zones


def _write_mask(table: pl.DataFrame, zone: Mapping, path, *, model: str, task: str, top_k: int, tau: float,
                provenance: Mapping) -> None:
    """Write one task's expert mask with its alignment zone, and warn when no expert was selected."""
    mask = expert_mask(table) | {
        "model": model,
        "task": task,
        "top_k": top_k,
        "zone": {"first_layer": zone["first_layer"], "last_layer": zone["last_layer"], "method": zone["method"]},
        "tau": tau,
        "provenance": dict(provenance),
    }
    write_json_atomic(path, mask)

    selected = table.filter(pl.col("selected"))
    log.info("task %s: %d task experts over %d layers (tau %.2f)", task, selected.height,
             selected["layer"].n_unique(), tau)
    if selected.is_empty():
        log.warning(
            "task %s: no expert has delta > tau = %.2f (largest delta %.3f), so the task-expert mask is "
            "empty. Lower routing.experts.tau for this model.", task, tau, table["delta"].max(),
        )


def write_task_experts(
    task_trace_paths: Sequence[str | Path],
    general_trace_path: str | Path,
    zone_path: str | Path,
    *,
    table_path: str | Path,
    language_table_path: str | Path,
    mask_paths: Mapping[str, str | Path],
    model: str,
    settings: Mapping,
) -> pl.DataFrame:
    """Find the task experts per layer, write their masks for training, and tabulate language-specific experts."""
    metadata = read_trace_metadata(general_trace_path)
    cap = settings["experts"].get("max_per_layer") or metadata["top_k"]
    tau = settings["experts"]["tau"]
    general = read_sequence_trace(general_trace_path)
    zones = pl.read_csv(zone_path)
    provenance = run_metadata(**{k: metadata[k] for k in ("model_revision", "seed") if k in metadata})

    task_tables, language_tables = [], []
    for task, by_lang in _trace_paths_by_task(task_trace_paths).items():
        english = read_sequence_trace(by_lang["en"])
        table = task_experts(english, general, tau=tau, top_k=cap, model=model, task=task)
        task_tables.append(table)
        for lang, path in by_lang.items():
            if lang != "en":
                target = read_sequence_trace(path)
                language_tables.append(
                    language_experts(target, english, tau=tau, top_k=cap, model=model, task=task, lang=lang)
                )
        zone = zones.filter(pl.col("task") == task).row(0, named=True)
        _write_mask(table, zone, mask_paths[task], model=model, task=task, top_k=metadata["top_k"], tau=tau,
                    provenance=provenance)

    experts = pl.concat(task_tables, how="vertical")
    write_table(experts, table_path, provenance)
    write_table(pl.concat(language_tables, how="vertical"), language_table_path, provenance)
    return experts


def plot_routing_figures(
    divergence_path, accuracy_path, zone_path, experts_path, *, divergence_pdf, divergence_png, experts_pdf, experts_png,
    split: str,
) -> None:
    zones = pl.read_csv(zone_path)
    plot_divergence_by_layer(pl.read_csv(divergence_path), pl.read_csv(accuracy_path), divergence_pdf, divergence_png,
                             zones=zones, accuracy_split=split)
    plot_task_experts(pl.read_csv(experts_path), zones, experts_pdf, experts_png)
