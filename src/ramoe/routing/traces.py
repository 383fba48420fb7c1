"""Routing traces of a model over parallel texts, streamed to Parquet.

``capture_traces`` runs batched forward passes under ``RouterCapture`` and writes two files:

* the token trace, one row per (item, lang, layer, token, rank): the expert the router
  selected at that rank and its weight, as ``RouterCapture.all_layers`` returns them. The
  weight is stored as float16 (absolute error at most 2.4e-4 for a weight in [0, 1]), which
  halves the file, because at top-2 of 16 experts a float32 weight column was 86% of its bytes.
* the sequence trace, one row per (item, lang, layer): the mean routing distribution over the
  sequence's tokens, how many tokens selected each expert, and the mean routing entropy.

Padding never reaches a file: each forward call's rows are read through its attention mask,
and ``token`` counts only non-padding tokens, so the special tokens the tokenizer adds (BOS) are
token 0. Rows are written in input order, and inside one sequence by layer, token and rank.

Both files are written through ``ParquetWriter`` in row groups, so memory stays flat however
many texts are traced, and only renamed to their final paths once complete. The token trace's
row groups hold ``rows_per_group`` rows. A sequence-trace row carries two values per expert, so
its row groups hold ``rows_per_group // num_experts`` rows (at least 1), which keeps its buffer
no larger than the token writer's. With 65536 rows for both, the sequence writer held every row
of a 1000-text run until the end, and the working memory grew 1.44 times from 500 to 1000 texts.
The provenance is stored as JSON in the Parquet schema metadata under ``METADATA_KEY``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ramoe.evaluation.inference import halve_batch_size, release_cached_memory
from ramoe.io import atomic_path, run_metadata
from ramoe.prompts import format_prompts
from ramoe.routing.adapters import MoELayout, describe_moe
from ramoe.routing.capture import RouterCapture

log = logging.getLogger(__name__)

METADATA_KEY = b"ramoe"
# Version 2 stores the token trace's weight as float16 (version 1: float32).
TRACE_FORMAT_VERSION = 2
TEXT_MODES = ("prompt", "solved")

_KEY_TYPE = pa.dictionary(pa.int32(), pa.string())

TOKEN_TRACE_SCHEMA = pa.schema(
    [
        pa.field("item_id", _KEY_TYPE, nullable=False),
        pa.field("lang", _KEY_TYPE, nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("token", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("rank", pa.int8(), nullable=False),
        pa.field("expert", pa.int16(), nullable=False),
        pa.field("weight", pa.float16(), nullable=False),
    ]
)

SEQUENCE_TRACE_SCHEMA = pa.schema(
    [
        pa.field("item_id", _KEY_TYPE, nullable=False),
        pa.field("lang", _KEY_TYPE, nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("probs", pa.list_(pa.float32()), nullable=False),
        pa.field("topk_counts", pa.list_(pa.int32()), nullable=False),
        pa.field("entropy", pa.float32(), nullable=False),
    ]
)

# Parquet encodings per column. Every column is also zstd-compressed. The choice was measured on
# the token trace of a random 4-layer, 64-expert, top-8 OLMoE over 200 texts (14.8k tokens).
# Dictionary encoding of all integer columns and BYTE_STREAM_SPLIT of the weights gave 1.80 MB.
# Dictionary encoding of item_id, lang, layer and rank only gave 2.25 MB.
_TOKEN_ENCODINGS = {
    "use_dictionary": ["item_id", "lang", "layer", "token", "token_id", "rank", "expert"],
    "use_byte_stream_split": ["weight"],
}
# BYTE_STREAM_SPLIT of the list values made the English arith sequence trace of the default model
# 15% smaller (241 kB to 204 kB) than plain zstd.
_SEQUENCE_ENCODINGS = {
    "use_dictionary": ["item_id", "lang", "layer"],
    "use_byte_stream_split": ["probs.list.element", "topk_counts.list.element", "entropy"],
}

# Metadata fields that capture_traces computes itself, so a caller's provenance must not set them.
_COMPUTED_METADATA_FIELDS = frozenset(
    {
        "format_version",
        "trace",
        "versions",
        "model_type",
        "num_experts",
        "top_k",
        "num_layers",
        "moe_layers",
        "scoring",
        "selection",
        "selection_options",
        "model_dtype",
        "padding_side",
        "max_length",
        "batch_size",
        "texts",
    }
)


def trace_texts(
    rows: Sequence[Mapping],
    text: str = "prompt",
    *,
    tokenizer: Any = None,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[tuple[str, str, str]]:
    """Build the (item_id, lang, text) triples of parallel-schema rows, in row order.

    ``text="prompt"`` traces the prompt alone. ``text="solved"`` appends the gold answer: the
    correct choice for ``multiple_choice`` rows (an XNLI label word, an XCOPA sentence), and the
    answer for ``generative`` rows (an MGSM number, an XQuAD span). A choice that starts with
    whitespace is appended as it is (XCOPA and XNLI choices do). Otherwise a single space
    separates the answer from the prompt, unless the prompt already ends with whitespace.

    With ``chat_template`` the prompt is first wrapped in the ``tokenizer``'s chat template
    (``ramoe.prompts.format_prompts``), exactly as evaluation wraps it.
    """
    if text not in TEXT_MODES:
        raise ValueError(f"text mode {text!r} is not one of {TEXT_MODES}.")
    if chat_template and tokenizer is None:
        raise ValueError("chat_template is true but no tokenizer was given to render the template.")
    prompts = format_prompts(
        tokenizer, [row["prompt"] for row in rows], chat_template=chat_template, chat_template_kwargs=chat_template_kwargs
    )
    triples = []
    for row, prompt in zip(rows, prompts, strict=True):
        if text == "solved":
            prompt = prompt + _answer_suffix(row, prompt)
        triples.append((row["item_id"], row["lang"], prompt))
    return triples


def _answer_suffix(row: Mapping, prompt: str) -> str:
    task_type = row["task_type"]
    if task_type == "generative":
        # A chat template ends with the header of the reply, often a newline, where the answer
        # starts without a space.
        return ("" if prompt[-1:].isspace() else " ") + row["answer"]
    if task_type != "multiple_choice":
        raise ValueError(
            f"item {row['item_id']!r} ({row['lang']!r}): task_type {task_type!r} is not 'generative' "
            "or 'multiple_choice'."
        )
    choices = list(row["choices"])
    answer = row["answer"]
    if not answer.isdigit() or int(answer) >= len(choices):
        raise ValueError(
            f"item {row['item_id']!r} ({row['lang']!r}): answer {answer!r} is not a valid index into "
            f"{len(choices)} choices."
        )
    choice = choices[int(answer)]
    if choice[:1].isspace() or prompt[-1:].isspace():
        return choice
    return " " + choice


def capture_traces(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[tuple[str, str, str]],
    *,
    token_path: str | Path | None,
    sequence_path: str | Path,
    batch_size: int,
    max_length: int | None = None,
    provenance: Mapping | None = None,
    rows_per_group: int = 65536,
) -> dict:
    """Run batched forward passes over ``texts`` under RouterCapture and stream both traces to Parquet.

    ``texts`` contains (item_id, lang, text) triples (see ``trace_texts``), each (item_id, lang)
    pair at most once. Texts are encoded with the tokenizer's special tokens, truncated to
    ``max_length`` tokens on the tokenizer's ``truncation_side`` when it is set, and padded on
    its ``padding_side``. ``token_path=None`` skips the token trace. ``provenance`` (for example
    model revision, dtype and seed) must be JSON-serializable. It is stored in both files
    together with the package versions and the model's MoE layout. A forward pass that runs out
    of device memory is retried at half the batch size (down to 1), which the metadata's
    ``batch_size`` does not record. ``rows_per_group`` sets the row-group size of the token
    trace; the sequence trace's follows from it (``sequence_rows_per_group``).

    Returns a summary: ``sequences``, ``tokens`` (non-padding tokens after truncation),
    ``truncated`` (texts cut to ``max_length``), ``layers``, ``token_rows``, ``sequence_rows``,
    ``token_bytes`` (None without a token trace), ``sequence_bytes`` and ``seconds``.
    """
    _check_arguments(texts, token_path, sequence_path, batch_size, max_length, rows_per_group)
    if batch_size > 1 and tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token, so batches of more than one text cannot be padded. "
            "Set tokenizer.pad_token (load_model uses the EOS token) or pass batch_size=1."
        )
    layout = describe_moe(model)
    if model.training:
        # Dropout, and PhiMoE's sampled expert choice, make a training-mode trace irreproducible.
        log.warning(
            "%s is in training mode, so dropout applies to the traced forward passes. Call model.eval() first.",
            type(model).__name__,
        )
    if layout.num_experts > np.iinfo(np.int16).max or layout.top_k > np.iinfo(np.int8).max:
        raise ValueError(
            f"{layout.family}: {layout.num_experts} experts and top-{layout.top_k} do not fit the trace "
            "columns expert (int16) and rank (int8)."
        )
    metadata = _trace_metadata(model, tokenizer, layout, provenance, batch_size, max_length, len(texts))

    started = time.perf_counter()
    keys = _KeyTable()
    tokens = 0
    truncated = 0
    log.info(
        "tracing %d texts through %d MoE layers of %s (%d experts, top-%d), batch size %d, to %s%s",
        len(texts),
        len(layout.moe_layers),
        layout.family,
        layout.num_experts,
        layout.top_k,
        batch_size,
        sequence_path,
        "" if token_path is None else f" and {token_path}",
    )
    with contextlib.ExitStack() as outputs:
        sequence_writer = _RowGroupWriter(
            outputs.enter_context(atomic_path(sequence_path)),
            _with_metadata(SEQUENCE_TRACE_SCHEMA, metadata, "sequence"),
            keys,
            sequence_rows_per_group(rows_per_group, layout.num_experts),
            _SEQUENCE_ENCODINGS,
        )
        outputs.callback(sequence_writer.close)
        token_writer = None
        if token_path is not None:
            token_writer = _RowGroupWriter(
                outputs.enter_context(atomic_path(token_path)),
                _with_metadata(TOKEN_TRACE_SCHEMA, metadata, "token"),
                keys,
                rows_per_group,
                _TOKEN_ENCODINGS,
            )
            outputs.callback(token_writer.close)

        # One writer thread turns a batch's statistics into rows and writes them while the next
        # forward runs: Parquet encoding and zstd release the GIL, and on a GPU the CPU would
        # otherwise wait for them. Leaving the ExitStack waits for it before closing the writers.
        writer_thread = outputs.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-writer"))
        written: Future | None = None
        with RouterCapture(model, layout) as capture, torch.inference_mode():
            progress = outputs.enter_context(
                tqdm(total=len(texts), desc="routing traces", unit="text", mininterval=5.0)
            )
            start = 0
            size = batch_size
            while start < len(texts):
                batch = texts[start : start + size]
                input_ids, attention_mask, batch_truncated = _encode_batch(tokenizer, batch, max_length)
                capture.clear()
                # Only the forward pass is retried at half the batch size after running out of
                # memory. It allocates the activations, and no row of the batch is written before it ends.
                try:
                    _forward(model, input_ids, attention_mask)
                except torch.OutOfMemoryError as error:
                    size = halve_batch_size(size, error, f"routing traces, texts {start}-{start + len(batch) - 1}")
                    batch = None
                if batch is None:
                    capture.clear()
                    release_cached_memory()
                    continue
                truncated += batch_truncated
                tokens += int(attention_mask.sum())
                codes = [keys.add(item_id, lang) for item_id, lang, _ in batch]
                routed = _route_batch(capture, layout, codes, input_ids, attention_mask, token_writer is not None)
                if written is not None:
                    written.result()  # at most one batch waits, and a writer error surfaces here
                written = writer_thread.submit(_append_rows, routed, layout.moe_layers, sequence_writer, token_writer)
                progress.update(len(batch))
                start += len(batch)
            if written is not None:
                written.result()
        # Leaving the ExitStack closes both writers, then renames the files onto their paths.

    summary = {
        "sequences": len(texts),
        "tokens": tokens,
        "truncated": truncated,
        "layers": len(layout.moe_layers),
        "token_rows": None if token_writer is None else token_writer.rows_written,
        "sequence_rows": sequence_writer.rows_written,
        "token_bytes": None if token_path is None else Path(token_path).stat().st_size,
        "sequence_bytes": Path(sequence_path).stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if truncated:
        log.warning(
            "%d of %d texts were longer than max_length=%d tokens and were truncated", truncated, len(texts), max_length
        )
    log.info("wrote routing traces of %d texts (%d tokens): %s", len(texts), tokens, summary)
    return summary


def sequence_rows_per_group(rows_per_group: int, num_experts: int) -> int:
    """Return the rows per sequence-trace row group for ``rows_per_group`` token-trace rows (see the module docstring)."""
    return max(1, rows_per_group // num_experts)


def _check_arguments(
    texts: Sequence[tuple[str, str, str]],
    token_path: str | Path | None,
    sequence_path: str | Path,
    batch_size: int,
    max_length: int | None,
    rows_per_group: int,
) -> None:
    if not texts:
        raise ValueError("no texts to trace. Check the data file and the language list.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if rows_per_group < 1:
        raise ValueError(f"rows_per_group must be at least 1, got {rows_per_group}.")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be None or at least 1, got {max_length}.")
    if token_path is not None and Path(token_path).resolve() == Path(sequence_path).resolve():
        raise ValueError(f"token_path and sequence_path are the same file {str(sequence_path)!r}.")
    seen: set[tuple[str, str]] = set()
    for item_id, lang, _text in texts:
        if (item_id, lang) in seen:
            raise ValueError(
                f"item {item_id!r} in language {lang!r} appears twice in the texts, so its trace rows "
                "could not be told apart. Pass each (item_id, lang) pair once."
            )
        seen.add((item_id, lang))


def _trace_metadata(
    model: torch.nn.Module,
    tokenizer: Any,
    layout: MoELayout,
    provenance: Mapping | None,
    batch_size: int,
    max_length: int | None,
    num_texts: int,
) -> dict:
    provenance = dict(provenance or {})
    reserved = sorted(_COMPUTED_METADATA_FIELDS & set(provenance))
    if reserved:
        raise ValueError(f"provenance must not set {reserved}: capture_traces records these fields itself.")
    seed = provenance.pop("seed", None)
    parameter = next(model.parameters(), None)
    metadata = run_metadata(
        seed,
        **provenance,
        format_version=TRACE_FORMAT_VERSION,
        model_type=layout.family,
        num_experts=layout.num_experts,
        top_k=layout.top_k,
        num_layers=layout.num_layers,
        moe_layers=layout.moe_layers,
        scoring=layout.scoring,
        selection=layout.selection,
        selection_options=dict(layout.selection_options),
        model_dtype=None if parameter is None else str(parameter.dtype).removeprefix("torch."),
        padding_side=tokenizer.padding_side,
        max_length=max_length,
        batch_size=batch_size,
        texts=num_texts,
    )
    try:
        json.dumps(metadata)
    except TypeError as error:
        raise ValueError(
            f"provenance is not JSON-serializable: {error}. Pass strings, numbers, lists and dicts."
        ) from error
    return metadata


def _with_metadata(schema: pa.Schema, metadata: Mapping, trace: str) -> pa.Schema:
    text = json.dumps({**metadata, "trace": trace}, sort_keys=True, ensure_ascii=False)
    return schema.with_metadata({METADATA_KEY: text.encode("utf-8")})


def _encode_batch(
    tokenizer: Any, batch: Sequence[tuple[str, str, str]], max_length: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Encode, truncate and pad one batch. Returns (input_ids, attention_mask, number of truncated texts)."""
    encoded = tokenizer([text for _, _, text in batch], add_special_tokens=True)["input_ids"]
    truncated = 0
    if max_length is not None:
        keep_end = tokenizer.truncation_side == "left"
        for index, ids in enumerate(encoded):
            if len(ids) > max_length:
                truncated += 1
                encoded[index] = ids[-max_length:] if keep_end else ids[:max_length]
    for (item_id, lang, _), ids in zip(batch, encoded, strict=True):
        if not ids:
            raise ValueError(
                f"item {item_id!r} ({lang!r}) encodes to no tokens, so it has no routing. "
                "Drop empty texts before tracing."
            )

    width = max(len(ids) for ids in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    left = tokenizer.padding_side == "left"
    for row, ids in enumerate(encoded):
        start = width - len(ids) if left else 0
        input_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, start : start + len(ids)] = 1
    return input_ids, attention_mask, truncated


def _forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    device = next(model.parameters()).device
    # Position ids count only real tokens, so a left-padded sequence gets the same positions as
    # it would alone. logits_to_keep=1 skips the vocabulary projection of all but the last token.
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
        logits_to_keep=1,
    )


@dataclass
class _RoutedBatch:
    """The routing statistics of one forward call, on the CPU, ready to become trace rows.

    Shapes: ``mean_probabilities`` and ``topk_counts`` (batch, layers, experts), ``entropy``
    (batch, layers), ``n_tokens`` (batch,), ``expert_ids`` and ``weights`` (batch * seq, layers,
    top_k) in the routers' row order, and ``input_ids`` and ``mask`` (batch, seq).
    ``weights`` is None without a token trace.
    """

    codes: list[tuple[int, int]]
    mean_probabilities: torch.Tensor
    entropy: torch.Tensor
    topk_counts: torch.Tensor
    n_tokens: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor | None
    input_ids: torch.Tensor
    mask: torch.Tensor


def _route_batch(
    capture: RouterCapture,
    layout: MoELayout,
    codes: list[tuple[int, int]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    with_tokens: bool,
) -> _RoutedBatch:
    """Compute one forward call's per-sequence statistics on the model's device and move them to the CPU.

    Everything is computed for the whole batch at once through the attention mask, because a
    Python loop over sequences cost about a quarter of the forward pass's time.
    """
    batch, seq_len = attention_mask.shape
    num_layers = len(layout.moe_layers)
    # (batch * seq, layers, experts) and twice (batch * seq, layers, top_k), float32.
    probabilities, expert_ids, weights = capture.all_layers(call=0)
    device = probabilities.device
    mask = attention_mask.to(device=device, dtype=torch.bool)
    n_tokens = mask.sum(dim=1)  # (batch,)

    # Padding rows get weight 0, so the sums run over each sequence's real tokens only.
    token_weights = mask.to(probabilities.dtype).reshape(batch, seq_len, 1, 1)
    divisor = n_tokens.to(probabilities.dtype).reshape(batch, 1, 1)
    grid = probabilities.reshape(batch, seq_len, num_layers, -1)
    mean_probabilities = (grid * token_weights).sum(dim=1) / divisor  # (batch, layers, experts)
    # xlogy gives 0 for p = 0, where p * log(p) would be NaN.
    token_entropy = -torch.special.xlogy(grid, grid).sum(dim=-1, keepdim=True)  # (batch, seq, layers, 1)
    entropy = (token_entropy * token_weights).sum(dim=1).squeeze(-1) / divisor.squeeze(-1)  # (batch, layers)

    # Selections per (sequence, layer, expert): a padding token adds 0 to its expert's count.
    top_k = expert_ids.shape[-1]
    selected = _to_grid(expert_ids, batch).reshape(batch, num_layers, -1)  # (batch, layers, seq * top_k)
    ones = mask.to(torch.int32)[:, None, :, None].expand(-1, num_layers, -1, top_k)
    counts = torch.zeros((batch, num_layers, layout.num_experts), dtype=torch.int32, device=device)
    counts.scatter_add_(2, selected, ones.reshape(batch, num_layers, -1))

    return _RoutedBatch(
        codes=codes,
        mean_probabilities=mean_probabilities.cpu(),
        entropy=entropy.cpu(),
        topk_counts=counts.cpu(),
        n_tokens=n_tokens.cpu(),
        expert_ids=expert_ids.cpu(),
        weights=weights.cpu() if with_tokens else None,
        input_ids=input_ids.cpu(),
        mask=attention_mask.to(torch.bool).cpu(),
    )


def _append_rows(
    routed: _RoutedBatch,
    layers: Sequence[int],
    sequence_writer: _RowGroupWriter,
    token_writer: _RowGroupWriter | None,
) -> None:
    """Append the rows of one forward call to both writers: sequence by sequence, then layer by layer.

    It uses NumPy and pyarrow only, so it can run on the writer thread while the next forward runs.
    """
    batch, seq_len = routed.mask.shape
    num_layers = len(layers)
    rows = batch * num_layers
    layer_column = np.asarray(layers, dtype=np.int16)
    item_codes, lang_codes = np.asarray(routed.codes, dtype=np.int32).reshape(batch, 2).T
    sequence_writer.append(
        {
            "item_id": np.repeat(item_codes, num_layers),
            "lang": np.repeat(lang_codes, num_layers),
            "layer": np.tile(layer_column, batch),
            "n_tokens": np.repeat(routed.n_tokens.numpy().astype(np.int32), num_layers),
            "probs": routed.mean_probabilities.reshape(rows, -1).numpy(),
            "topk_counts": routed.topk_counts.reshape(rows, -1).numpy(),
            "entropy": routed.entropy.reshape(rows).numpy(),
        }
    )
    if token_writer is None:
        return
    # Rows in (sequence, layer, token, rank) order. The padded (batch, layers, seq) grid is read
    # through the attention mask, so padding positions are skipped, and each kept position
    # becomes top_k rows.
    top_k = routed.expert_ids.shape[-1]
    mask = routed.mask.numpy()
    keep = np.broadcast_to(mask[:, None, :], (batch, num_layers, seq_len))
    triples = int(keep.sum())  # kept (sequence, layer, token) triples

    def per_token(values: np.ndarray) -> np.ndarray:
        """Read a (batch, seq) array at the kept triples and repeat each value top_k times."""
        return np.repeat(np.broadcast_to(values[:, None, :], keep.shape)[keep], top_k)

    rows_per_sequence_layer = mask.sum(axis=1) * top_k  # (batch,)
    token_writer.append(
        {
            "item_id": np.repeat(item_codes, rows_per_sequence_layer * num_layers),
            "lang": np.repeat(lang_codes, rows_per_sequence_layer * num_layers),
            "layer": np.repeat(np.tile(layer_column, batch), np.repeat(rows_per_sequence_layer, num_layers)),
            "token": per_token(np.cumsum(mask, axis=1, dtype=np.int32) - 1),
            "token_id": per_token(routed.input_ids.numpy().astype(np.int32)),
            "rank": np.tile(np.arange(top_k, dtype=np.int8), triples),
            # (batch, layers, seq, top_k) read at the kept triples: (triples, top_k), flattened.
            "expert": _to_grid(routed.expert_ids, batch).numpy()[keep].astype(np.int16).reshape(-1),
            # Rounded to the nearest float16 (see the module docstring).
            "weight": _to_grid(routed.weights, batch).numpy()[keep].astype(np.float16).reshape(-1),
        }
    )


def _to_grid(flat: torch.Tensor, batch: int) -> torch.Tensor:
    """Reshape (batch * seq, layers, top_k) rows to (batch, layers, seq, top_k)."""
    return flat.reshape(batch, -1, *flat.shape[1:]).permute(0, 2, 1, 3)


class _KeyTable:
    """Integer codes of the item ids and languages seen so far, shared by both writers.

    It grows with the number of distinct item ids and languages, not with the number of tokens.
    """

    def __init__(self) -> None:
        self.item_ids: list[str] = []
        self.langs: list[str] = []
        self._item_codes: dict[str, int] = {}
        self._lang_codes: dict[str, int] = {}

    def add(self, item_id: str, lang: str) -> tuple[int, int]:
        """Assign codes to unseen values and return the (item code, language code) of a sequence."""
        if item_id not in self._item_codes:
            self._item_codes[item_id] = len(self.item_ids)
            self.item_ids.append(item_id)
        if lang not in self._lang_codes:
            self._lang_codes[lang] = len(self.langs)
            self.langs.append(lang)
        return self._item_codes[item_id], self._lang_codes[lang]


class _RowGroupWriter:
    """A ParquetWriter that buffers column arrays and writes row groups of exactly ``rows_per_group`` rows.

    Only the last row group may be shorter. ``item_id`` and ``lang`` arrive as codes of the
    shared ``_KeyTable`` and are written as dictionary columns whose dictionary holds only the
    values of that row group. List columns arrive as 2-D arrays, one row per trace row.
    """

    def __init__(
        self,
        path: Path,
        schema: pa.Schema,
        keys: _KeyTable,
        rows_per_group: int,
        encodings: Mapping[str, Any],
    ) -> None:
        self.schema = schema
        self.keys = keys
        self.rows_per_group = rows_per_group
        self.rows_written = 0
        self._pending: dict[str, list[np.ndarray]] = {name: [] for name in schema.names}
        self._pending_rows = 0
        self._closed = False
        self._writer = pq.ParquetWriter(path, schema, compression="zstd", **encodings)

    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        for name in self.schema.names:
            self._pending[name].append(columns[name])
        self._pending_rows += len(columns[self.schema.names[0]])
        if self._pending_rows >= self.rows_per_group:
            self._flush_full_groups()

    def close(self) -> None:
        """Write the buffered rows as the last row group and close the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._pending_rows:
                self._write(self._take(self._pending_rows))
        finally:
            self._writer.close()

    def _flush_full_groups(self) -> None:
        full_rows = self._pending_rows - self._pending_rows % self.rows_per_group
        columns = self._take(full_rows)
        for start in range(0, full_rows, self.rows_per_group):
            self._write({name: array[start : start + self.rows_per_group] for name, array in columns.items()})

    def _take(self, count: int) -> dict[str, np.ndarray]:
        """Remove the first ``count`` buffered rows and return them, one array per column."""
        first_rows = {}
        for name, arrays in self._pending.items():
            joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            first_rows[name] = joined[:count]
            self._pending[name] = [joined[count:]] if count < len(joined) else []
        self._pending_rows -= count
        return first_rows

    def _write(self, columns: Mapping[str, np.ndarray]) -> None:
        arrays = []
        for field in self.schema:
            values = columns[field.name]
            if field.name == "item_id":
                arrays.append(_dictionary_array(values, self.keys.item_ids))
            elif field.name == "lang":
                arrays.append(_dictionary_array(values, self.keys.langs))
            elif pa.types.is_list(field.type):
                arrays.append(_list_array(values, field.type))
            else:
                arrays.append(pa.array(values, type=field.type))
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._writer.write_table(table, row_group_size=self.rows_per_group)
        self.rows_written += table.num_rows


def _dictionary_array(codes: np.ndarray, names: list[str]) -> pa.DictionaryArray:
    used, indices = np.unique(codes, return_inverse=True)
    dictionary = pa.array([names[code] for code in used], type=pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32)), dictionary)


def _list_array(values: np.ndarray, list_type: pa.ListType) -> pa.ListArray:
    rows, width = values.shape
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=list_type.value_type)
    return pa.ListArray.from_arrays(offsets, flat, type=list_type)


def read_sequence_trace(path: str | Path) -> pl.DataFrame:
    """Read a sequence trace as a DataFrame with item_id and lang as strings and probs and topk_counts as lists."""
    table = pq.read_table(path)
    missing = [name for name in SEQUENCE_TRACE_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: columns {missing} are missing, so it is not a sequence trace. "
            f"Expected columns {SEQUENCE_TRACE_SCHEMA.names}."
        )
    frame = pl.from_arrow(table.select(SEQUENCE_TRACE_SCHEMA.names))
    return frame.with_columns(pl.col("item_id").cast(pl.String), pl.col("lang").cast(pl.String))


def read_trace_metadata(path: str | Path) -> dict:
    """Read the provenance JSON that capture_traces stored in a trace file's schema metadata."""
    metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{path}: the Parquet schema metadata has no {METADATA_KEY.decode()!r} key, so the file was "
            "not written by capture_traces."
        )
    return json.loads(metadata[METADATA_KEY])
