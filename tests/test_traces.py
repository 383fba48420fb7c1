"""Routing traces streamed to Parquet, on a tiny random OLMoE and a word-level tokenizer (CPU)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from test_routing_capture import COMMON_CONFIG, FAMILY_CASES, build_model
from transformers import AutoModelForCausalLM

from ramoe.models.tokenizer import build_word_tokenizer
from ramoe.routing import RouterCapture, describe_moe, traces
from ramoe.routing.traces import (
    METADATA_KEY,
    SEQUENCE_TRACE_SCHEMA,
    TOKEN_TRACE_SCHEMA,
    capture_traces,
    read_sequence_trace,
    read_trace_metadata,
    sequence_rows_per_group,
    trace_texts,
)

# Four special tokens plus 60 words fill the 64-token vocabulary of the tiny model.
WORDS = [f"w{index}" for index in range(60)]
NUM_EXPERTS = 4
TOP_K = 2
NUM_LAYERS = 3

# Word counts differ, so every batch of more than one text has padding.
TEXTS = [
    ("item-0", "en", "w5 w17 w3"),
    ("item-0", "de", "w8 w21 w40 w11 w2 w9 w33"),
    ("item-1", "en", "w12"),
    ("item-1", "de", "w44 w45 w46 w47 w48 w49 w50 w51 w52 w53 w54"),
    ("item-2", "en", "w1 w2 w3 w4 w5"),
    ("item-2", "de", "w59 w0 w30 w31"),
    ("item-3", "en", "w6 w7 w8 w9 w10 w11 w12 w13 w14"),
    ("item-3", "de", "w22 w23"),
]


@pytest.fixture
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model() -> transformers.PreTrainedModel:
    config = transformers.OlmoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def run_traces(model, tokenizer, folder, name, texts=TEXTS, *, token=True, **kwargs) -> tuple[dict, dict]:
    """Trace ``texts`` into ``folder`` and return the summary and the two output paths."""
    paths = {"token": folder / f"{name}.tokens.parquet" if token else None, "sequence": folder / f"{name}.seq.parquet"}
    options = {"batch_size": 4, **kwargs}
    summary = capture_traces(
        model, tokenizer, texts, token_path=paths["token"], sequence_path=paths["sequence"], **options
    )
    return summary, paths


def parallel_row(task_type: str, prompt: str, choices: list[str], answer: str) -> dict:
    return {
        "item_id": "item-9",
        "lang": "en",
        "task": "test",
        "task_type": task_type,
        "split": "test",
        "prompt": prompt,
        "choices": choices,
        "answer": answer,
        "source": "synthetic",
    }


def test_trace_texts_prompt_and_solved():
    rows = [
        parallel_row("generative", "w1 has w2 . answer :", [], "12"),
        parallel_row("multiple_choice", "w3 is w4 . so", ["w5 w6 .", "w7 w8 ."], "1"),
        parallel_row("multiple_choice", "The man fell, so", [" he cried.", " he laughed."], "0"),
        parallel_row("multiple_choice", "prompt ending in a space ", ["first", "second"], "1"),
    ]

    assert trace_texts(rows) == [("item-9", "en", row["prompt"]) for row in rows]
    solved = [text for _, _, text in trace_texts(rows, text="solved")]
    assert solved[0] == "w1 has w2 . answer : 12"
    assert solved[1] == "w3 is w4 . so w7 w8 ."
    assert solved[2] == "The man fell, so he cried."
    assert solved[3] == "prompt ending in a space second"


def test_trace_texts_invalid_input():
    with pytest.raises(ValueError, match="text mode 'answer'"):
        trace_texts([], text="answer")
    with pytest.raises(ValueError, match="not a valid index into 2 choices"):
        trace_texts([parallel_row("multiple_choice", "p", ["a", "b"], "2")], text="solved")
    with pytest.raises(ValueError, match="task_type 'cloze'"):
        trace_texts([parallel_row("cloze", "p", [], "1")], text="solved")


def test_sequence_trace_matches_router_logits(model, tokenizer, tmp_path):
    text = "w4 w9 w13 w27 w2 w58"
    summary, paths = run_traces(model, tokenizer, tmp_path, "hand", [("item-0", "en", text)], batch_size=1)
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        router_logits = model(input_ids=input_ids, output_router_logits=True).router_logits
    with RouterCapture(model) as capture, torch.no_grad():
        model(input_ids=input_ids)

    n_tokens = input_ids.shape[1]
    assert summary["tokens"] == n_tokens
    assert summary["sequence_rows"] == NUM_LAYERS
    assert summary["token_rows"] == NUM_LAYERS * n_tokens * TOP_K
    sequences = read_sequence_trace(paths["sequence"]).sort("layer")
    tokens = pl.read_parquet(paths["token"])
    assert sequences["layer"].to_list() == list(range(NUM_LAYERS))
    assert sequences["n_tokens"].to_list() == [n_tokens] * NUM_LAYERS

    for layer, logits in enumerate(router_logits):
        probabilities = torch.softmax(logits.float(), dim=-1)
        assert probabilities.shape == (n_tokens, NUM_EXPERTS)
        row = sequences.row(layer, named=True)

        expected_probs = probabilities.mean(dim=0)
        np.testing.assert_allclose(row["probs"], expected_probs.numpy(), rtol=0, atol=1e-6)

        top_ids = probabilities.topk(TOP_K, dim=-1).indices
        expected_counts = torch.bincount(top_ids.reshape(-1), minlength=NUM_EXPERTS)
        assert row["topk_counts"] == expected_counts.tolist()
        assert sum(row["topk_counts"]) == n_tokens * TOP_K

        entropies = [-sum(p * math.log(p) for p in token.tolist()) for token in probabilities]
        assert row["entropy"] == pytest.approx(sum(entropies) / n_tokens, abs=1e-6)

        layer_rows = tokens.filter(pl.col("layer") == layer)
        assert layer_rows["token"].to_list() == [t for t in range(n_tokens) for _ in range(TOP_K)]
        assert layer_rows["rank"].to_list() == list(range(TOP_K)) * n_tokens
        assert layer_rows["token_id"].to_list() == [int(t) for t in input_ids[0] for _ in range(TOP_K)]
        ids, weights = capture.top_k(layer)
        stored_experts = layer_rows["expert"].to_numpy().reshape(n_tokens, TOP_K)
        stored_weights = layer_rows["weight"].to_numpy().reshape(n_tokens, TOP_K)
        np.testing.assert_array_equal(stored_experts, ids.numpy())
        # The float16 weight is the float32 weight rounded to the nearest float16.
        np.testing.assert_array_equal(stored_weights, weights.numpy().astype(np.float16))
        assert stored_weights.dtype == np.float16


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_changes_no_stored_value(model, tokenizer, tmp_path, padding_side):
    tokenizer.padding_side = padding_side
    run_traces(model, tokenizer, tmp_path, "single", batch_size=1)
    padded_summary, _ = run_traces(model, tokenizer, tmp_path, "padded", batch_size=4)
    assert padded_summary["sequences"] == len(TEXTS)

    single = read_sequence_trace(tmp_path / "single.seq.parquet")
    padded = read_sequence_trace(tmp_path / "padded.seq.parquet")
    for column in ("item_id", "lang", "layer", "n_tokens", "topk_counts"):
        assert padded[column].to_list() == single[column].to_list(), column
    np.testing.assert_allclose(
        np.stack(padded["probs"].to_list()), np.stack(single["probs"].to_list()), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(padded["entropy"].to_numpy(), single["entropy"].to_numpy(), rtol=0, atol=1e-6)

    single_tokens = pl.read_parquet(tmp_path / "single.tokens.parquet")
    padded_tokens = pl.read_parquet(tmp_path / "padded.tokens.parquet")
    assert padded_tokens.height == single_tokens.height
    for column in ("item_id", "lang", "layer", "token", "token_id", "rank", "expert"):
        assert padded_tokens[column].to_list() == single_tokens[column].to_list(), column
    # Float32 weights that differ by 1e-7 can round to neighbouring float16 values, one ulp
    # (at most 2^-11 for a weight below 1) apart.
    np.testing.assert_allclose(
        padded_tokens["weight"].to_numpy().astype(np.float32), single_tokens["weight"].to_numpy().astype(np.float32),
        rtol=0, atol=2.0**-11,
    )


def test_schema_types_and_encodings(model, tokenizer, tmp_path):
    _, paths = run_traces(model, tokenizer, tmp_path, "schema")

    for path, schema in ((paths["token"], TOKEN_TRACE_SCHEMA), (paths["sequence"], SEQUENCE_TRACE_SCHEMA)):
        stored = pq.read_schema(path)
        assert stored.remove_metadata().equals(schema), f"{path.name}: {stored}"
        file_metadata = pq.ParquetFile(path).metadata
        for group in range(file_metadata.num_row_groups):
            for column in range(file_metadata.num_columns):
                assert file_metadata.row_group(group).column(column).compression == "ZSTD"

    token_columns = pq.ParquetFile(paths["token"]).metadata.row_group(0)
    encodings = {
        token_columns.column(i).path_in_schema: token_columns.column(i).encodings
        for i in range(token_columns.num_columns)
    }
    assert "RLE_DICTIONARY" in encodings["item_id"]
    assert "RLE_DICTIONARY" in encodings["lang"]
    assert "BYTE_STREAM_SPLIT" in encodings["weight"]
    sequence_columns = pq.ParquetFile(paths["sequence"]).metadata.row_group(0)
    sequence_encodings = {
        sequence_columns.column(i).path_in_schema: sequence_columns.column(i).encodings
        for i in range(sequence_columns.num_columns)
    }
    assert "BYTE_STREAM_SPLIT" in sequence_encodings["probs.list.element"]
    assert "BYTE_STREAM_SPLIT" in sequence_encodings["topk_counts.list.element"]

    table = pq.read_table(paths["token"])
    assert table.schema.field("item_id").type == TOKEN_TRACE_SCHEMA.field("item_id").type
    assert sorted(set(table["item_id"].to_pylist())) == sorted({item for item, _, _ in TEXTS})


def test_provenance_round_trip(model, tokenizer, tmp_path):
    provenance = {"model_revision": "local:tiny:sha256-0123", "dtype": "float32", "seed": 7}
    _, paths = run_traces(model, tokenizer, tmp_path, "provenance", provenance=provenance)

    for trace, path in paths.items():
        metadata = read_trace_metadata(path)
        assert metadata["trace"] == trace
        assert metadata["model_revision"] == "local:tiny:sha256-0123"
        assert metadata["dtype"] == "float32"
        assert metadata["seed"] == 7
        assert metadata["versions"]["torch"] == torch.__version__
        assert metadata["versions"]["pyarrow"] == pa.__version__
        assert metadata["model_type"] == "olmoe"
        assert metadata["num_experts"] == NUM_EXPERTS
        assert metadata["top_k"] == TOP_K
        assert metadata["moe_layers"] == [0, 1, 2]
        assert metadata["scoring"] == "softmax"
        assert metadata["padding_side"] == "left"
        assert metadata["model_dtype"] == "float32"
        assert json.loads(pq.read_schema(path).metadata[METADATA_KEY]) == metadata


def test_provenance_errors_write_nothing(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"must not set \['num_experts'\]"):
        run_traces(model, tokenizer, tmp_path, "reserved", provenance={"num_experts": 8})
    with pytest.raises(ValueError, match="not JSON-serializable"):
        run_traces(model, tokenizer, tmp_path, "object", provenance={"dtype": torch.float32})
    assert list(tmp_path.iterdir()) == []


def test_read_trace_metadata_rejects_foreign_file(tmp_path):
    path = tmp_path / "plain.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(path)

    with pytest.raises(ValueError, match="not written by capture_traces"):
        read_trace_metadata(path)
    with pytest.raises(ValueError, match="not a sequence trace"):
        read_sequence_trace(path)


def test_small_row_groups_same_content(model, tokenizer, tmp_path):
    default_summary, default_paths = run_traces(model, tokenizer, tmp_path, "default")
    small_summary, small_paths = run_traces(model, tokenizer, tmp_path, "small", rows_per_group=20)

    assert small_summary["token_rows"] == default_summary["token_rows"]
    # A sequence row has two values per expert, so its row groups contain 20 // 4 experts = 5 rows.
    assert sequence_rows_per_group(20, NUM_EXPERTS) == 5
    assert sequence_rows_per_group(3, NUM_EXPERTS) == 1
    for trace, group_size in (("token", 20), ("sequence", 5)):
        default_file = pq.ParquetFile(default_paths[trace])
        small_file = pq.ParquetFile(small_paths[trace])
        assert default_file.metadata.num_row_groups == 1
        group_rows = [small_file.metadata.row_group(g).num_rows for g in range(small_file.metadata.num_row_groups)]
        assert len(group_rows) > 2
        assert all(rows == group_size for rows in group_rows[:-1]), group_rows
        assert 0 < group_rows[-1] <= group_size
        # Row groups carry their own item_id and lang dictionaries, so compare decoded rows.
        assert small_file.read().to_pylist() == default_file.read().to_pylist()


def test_failing_run_leaves_no_file(model, tokenizer, tmp_path):
    router = dict(model.named_modules())[describe_moe(model).router_modules[1]]
    files_during_run: list[list[str]] = []

    def fail_on_second_batch(module, args, output):
        files_during_run.append(sorted(path.name for path in tmp_path.iterdir()))
        if len(files_during_run) == 2:
            raise RuntimeError("simulated failure in the second batch")

    handle = router.register_forward_hook(fail_on_second_batch)
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            run_traces(model, tokenizer, tmp_path, "failed", batch_size=2, rows_per_group=4)
    finally:
        handle.remove()

    # Row groups of the first batch were already written, but only to the temporary files.
    assert len(files_during_run[1]) == 2
    assert all(name.startswith(".tmp-") for name in files_during_run[1])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing_batch", [1, 4])
def test_writer_thread_error_reaches_caller(model, tokenizer, tmp_path, monkeypatch, failing_batch):
    """An error while building or writing rows on the writer thread stops the run and leaves no file.

    Batch 1 fails while batch 2's forward runs; batch 4 (of 4) fails after the last forward.
    """
    original = traces._append_rows
    calls = []

    def append_or_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_batch:
            raise OSError("simulated disk error on the writer thread")
        return original(*args, **kwargs)

    monkeypatch.setattr(traces, "_append_rows", append_or_fail)
    with pytest.raises(OSError, match="simulated disk error"):
        run_traces(model, tokenizer, tmp_path, "writer", batch_size=2, rows_per_group=4)
    assert len(TEXTS) == 8  # four batches of two
    assert len(calls) == failing_batch
    assert list(tmp_path.iterdir()) == []


def test_without_token_path(model, tokenizer, tmp_path):
    summary, paths = run_traces(model, tokenizer, tmp_path, "sequence-only", token=False)

    assert summary["token_bytes"] is None
    assert summary["token_rows"] is None
    assert summary["sequence_bytes"] == paths["sequence"].stat().st_size
    assert [path.name for path in tmp_path.iterdir()] == ["sequence-only.seq.parquet"]
    assert read_sequence_trace(paths["sequence"]).height == len(TEXTS) * NUM_LAYERS


def test_bfloat16_model_stores_float32(model, tokenizer, tmp_path):
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    _, paths = run_traces(model_bf16, tokenizer, tmp_path, "bf16")

    sequences = read_sequence_trace(paths["sequence"])
    assert sequences.schema["probs"] == pl.List(pl.Float32)
    sums = np.stack(sequences["probs"].to_list()).astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(sums, 1.0, rtol=0, atol=1e-6)
    assert read_trace_metadata(paths["sequence"])["model_dtype"] == "bfloat16"


def test_max_length_truncates(model, tokenizer, tmp_path):
    summary, paths = run_traces(model, tokenizer, tmp_path, "truncated", max_length=4)

    sequences = read_sequence_trace(paths["sequence"])
    word_counts = {(item, lang): len(text.split()) for item, lang, text in TEXTS}
    expected = [min(word_counts[(item, lang)] + 1, 4) for item, lang in zip(sequences["item_id"], sequences["lang"])]
    assert sequences["n_tokens"].to_list() == expected
    assert summary["truncated"] == sum(count + 1 > 4 for count in word_counts.values())
    assert pl.read_parquet(paths["token"])["token"].max() == 3


def test_invalid_arguments(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="appears twice"):
        run_traces(model, tokenizer, tmp_path, "duplicate", [TEXTS[0], TEXTS[0]])
    with pytest.raises(ValueError, match="no texts"):
        run_traces(model, tokenizer, tmp_path, "empty", [])
    with pytest.raises(ValueError, match="batch_size"):
        run_traces(model, tokenizer, tmp_path, "batch", batch_size=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_every_family_writes_consistent_traces(family, tokenizer, tmp_path):
    config_class, extra, moe_layers, num_experts = FAMILY_CASES[family]
    family_model = build_model(config_class(**COMMON_CONFIG, **extra))
    summary, paths = run_traces(family_model, tokenizer, tmp_path, family, TEXTS[:3], batch_size=3)

    sequences = read_sequence_trace(paths["sequence"])
    assert summary["layers"] == len(moe_layers)
    assert sorted(set(sequences["layer"].to_list())) == moe_layers
    assert all(len(probs) == num_experts for probs in sequences["probs"].to_list())
    sums = np.stack(sequences["probs"].to_list()).astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(sums, 1.0, rtol=0, atol=1e-5)
    counts = np.stack(sequences["topk_counts"].to_list()).sum(axis=1)
    np.testing.assert_array_equal(counts, sequences["n_tokens"].to_numpy() * 2)
    tokens = pl.read_parquet(paths["token"])
    assert tokens.height == summary["tokens"] * len(moe_layers) * 2
    assert read_trace_metadata(paths["token"])["scoring"] == ("sigmoid" if family == "deepseek_v3" else "softmax")
