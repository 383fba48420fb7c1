"""Bad input: every case stops with one error that names the bad value and the fix, and writes nothing.

Workflow cases run ``snakemake`` in a temporary folder and expect a non-zero exit and the message
in its output. When the config and its inputs are checked before any job is planned, no
``results/`` folder may exist afterwards. When a job fails, no file and no ``.tmp-`` leftover may
exist at that job's output path.
Package cases call the function that a rule calls and expect the exception type and message, and
no output or ``.tmp-`` leftover where the function writes.

Cases in this file (W: workflow, P: package):

| #  | bad input                                                        | level | error                        |
| -- | ---------------------------------------------------------------- | ----- | ---------------------------- |
| 1  | out-of-range value (finetune.batch_size: 0)                      | W     | ConfigError, key and bound   |
| 2  | unknown model family (model.pretrain.architecture.family)        | W     | ConfigError, allowed values  |
| 3  | value of the wrong type (evaluation.batch_size: "16")            | P     | ConfigError, key and type    |
| 4  | unknown task (tasks: [paws_x])                                    | P     | ConfigError, allowed tasks   |
| 5  | synthetic language defined twice                                 | P     | ConfigError, the codes       |
| 6  | RISE zone_split not summing to 1                                 | P     | ConfigError, the sum         |
| 7  | seq_len above max_position_embeddings                            | P     | ConfigError, both values     |
| 8  | config file whose top level is a list                            | P     | ConfigError, the type        |
| 9  | local checkpoint with a model_type transformers does not know    | W     | ConfigError, supported types |
| 10 | local checkpoint of a known but unsupported MoE (JetMoE)         | P     | ConfigError, supported types |
| 11 | dense Llama checkpoint as model.source: local                    | W     | ConfigError, no MoE layers   |
| 12 | model.path folder without config.json                            | P     | ConfigError, the folder      |
| 13 | zone override outside a local checkpoint's layers                | W     | ConfigError, the layers      |
| 14 | routing.experts.max_per_layer above a local checkpoint's top_k   | W     | ConfigError, top_k           |
| 15 | MGSM language file missing (real data)                           | W     | ConfigError, available langs |
| 16 | language with no prompt template (real data)                     | P     | ConfigError, supported langs |
| 17 | data_dir that is a file, not a folder                            | P     | ConfigError, the path        |
| 18 | XCOPA from the hub without the local data_dir                    | P     | ConfigError, the key file    |
| 19 | truncated MGSM TSV reaching the real_task job                    | W     | job fails, file and line     |
| 20 | item ids that differ between languages                           | P     | ParallelDataError, the ids   |
| 21 | duplicate item ids in one language                               | P     | ParallelDataError, the ids   |
| 22 | duplicated XCOPA line (real data)                                | P     | ParallelDataError, the id    |
| 23 | malformed row: choice index outside the choices                  | P     | ParallelDataError, the item  |
| 24 | task type the loader does not know                               | P     | ParallelDataError, the type  |
| 25 | truncated Parquet data file                                      | P     | ParallelDataError, the fix   |
| 26 | Parquet data file with no rows                                   | P     | ParallelDataError, the fix   |
| 27 | Parquet data file with an unknown split label                    | P     | ParallelDataError, the row   |
| 28 | Parquet data file missing a column                               | P     | ParallelDataError, column    |
| 29 | language with no ci examples (RA-MoE)                            | P     | warning, trains as SFT       |
| 30 | non-finite loss in the finetune rule's entry point               | P     | FloatingPointError, step/ids |
| 31 | results/ path that is a regular file (root ignores chmod)        | W     | ConfigError, the fix         |
| 32 | model.source: pretrain without a model.pretrain section          | P     | ConfigError, the section     |
| 33 | results/ below a file, or on a read-only mount                   | P     | ConfigError, the fix         |

Covered by other test files (not repeated here):

| bad input                                        | test                                                                |
| ------------------------------------------------ | ------------------------------------------------------------------- |
| misspelt nested and top-level key                | test_config: test_misspelt_key_rejected, test_misspelt_top_level_key |
| misspelt key through snakemake                   | test_workflow: test_misspelt_key_stops_run                          |
| out-of-range values, family 'llama'              | test_config: test_out_of_range_value                                |
| undefined synthetic language, en as target       | test_config: test_undefined_language_rejected, test_english_not_a_target |
| top_k above num_experts                          | test_config: test_top_k_above_experts                               |
| zone override outside the pretrained layers      | test_config: test_zone_override_outside_layers; test_zone           |
| max_per_layer above the pretrained top_k         | test_config: test_expert_cap_above_top_k                            |
| missing config file, missing general text        | test_config: test_missing_config_file, test_missing_input_path      |
| missing MGSM/XCOPA language file in the loader   | test_real_data: test_missing_language_file_named, test_xcopa_missing_language_file_named |
| truncated, malformed and empty TSV, bad JSONL    | test_real_data: test_truncated_tsv_names_line and the four after it |
| MGSM/XCOPA line removed or shifted               | test_real_data: test_*_removed_line_names_id, test_mgsm_shifted_lines_detected |
| unknown real task in the loader                  | test_real_data: test_unknown_task_rejected                          |
| dense model, unrecognised MoE router             | test_routing_capture: test_dense_llama_raises_no_moe_layers and the two after it |
| non-finite loss in train()                       | test_finetune: test_non_finite_loss_names_the_step_and_items        |
| hub model and hub data sets offline              | test_offline (with time bounds)                                     |
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
import yaml
from transformers import AutoModelForCausalLM

from conftest import REPO
from ramoe.config import ConfigError, check_input_paths, check_results_folder, load_config, validate_config
from ramoe.data.real import load_xcopa
from ramoe.data.schema import PARALLEL_SCHEMA, TASK_TYPES, ParallelDataError, read_parallel, write_parallel
from ramoe.models.build import tiny_moe_config
from ramoe.models.tokenizer import build_word_tokenizer
from ramoe.routing.adapters import FAMILIES
from ramoe.training.run import finetune_task_language

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
WORDS = "tom has 3 apples . sells 1 how many does have ? answer : 2 mia is hungry so eats bread drinks water".split()
ARCH = dict(family="olmoe", num_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
            top_k=2, expert_size=8, max_position_embeddings=64, router_aux_loss_coef=0.01)


def run_snakemake(workdir: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    """Write ``config`` into ``workdir`` and run snakemake there, with stdout and stderr joined in ``.output``."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run(
        [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "1", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    result.output = result.stdout + result.stderr
    return result


def leftovers(folder: Path) -> list[Path]:
    """Temporary files or folders that an interrupted atomic write would leave below ``folder``."""
    return [path for path in folder.rglob(".tmp-*")]


def assert_stopped_before_jobs(result: subprocess.CompletedProcess, workdir: Path, *messages: str) -> None:
    assert result.returncode != 0
    for message in messages:
        assert message in result.output
    assert not (workdir / "results").exists()


def real_config(tiny_config: dict, mgsm_dir: Path, general_text: Path) -> dict:
    """The tiny config switched to MGSM in German from ``mgsm_dir``."""
    config = copy.deepcopy(tiny_config)
    config["tasks"] = ["mgsm"]
    config["target_languages"] = ["de"]
    config["data"] = {"source": "real", "real": {"test_fraction": 0.4, "split_seed": 0,
                                                   "tasks": {"mgsm": {"source": "local", "data_dir": str(mgsm_dir)}}}}
    config["model"]["pretrain"]["tokenizer"] = {"kind": "byte", "vocab_size": 300}
    config["routing"]["general_text"] = {"source": "file", "path": str(general_text)}
    return config


def local_model_config(tiny_config: dict, path: Path) -> dict:
    config = copy.deepcopy(tiny_config)
    config["model"] = {"name": "local-moe", "source": "local", "path": str(path), "dtype": "float32"}
    return config


@pytest.fixture(scope="module")
def word_tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, word_tokenizer) -> Path:
    """A 2-layer, 4-expert, top-2 OLMoE saved with its tokenizer."""
    config = tiny_moe_config(ARCH, vocab_size=len(word_tokenizer), pad_id=word_tokenizer.pad_token_id,
                             bos_id=word_tokenizer.bos_token_id, eos_id=word_tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("moe") / "model"
    model.save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory, moe_checkpoint, word_tokenizer) -> Path:
    """The same model with NaN token embeddings, so the first training loss is NaN."""
    model = AutoModelForCausalLM.from_pretrained(moe_checkpoint)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    folder = tmp_path_factory.mktemp("nan") / "model"
    model.save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> Path:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)
    folder = tmp_path_factory.mktemp("llama") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture
def general_text(tmp_path) -> Path:
    path = tmp_path / "general.txt"
    path.write_text("the sun is warm .\nrain falls in spring .\n", encoding="utf-8")
    return path


@pytest.fixture
def mgsm_copy(tmp_path, shared_data) -> Path:
    folder = tmp_path / "mgsm"
    folder.mkdir()
    for lang in ("en", "de", "zh"):
        shutil.copy(shared_data / "mgsm" / f"mgsm_{lang}.tsv", folder)
    return folder


# --------------------------------------------------------------------------- config values


def test_out_of_range_stops_workflow(tmp_path, tiny_config):
    tiny_config["finetune"]["batch_size"] = 0
    result = run_snakemake(tmp_path, tiny_config, "-n")
    assert_stopped_before_jobs(result, tmp_path, "finetune.batch_size = 0 is out of range: must be >= 1")


def test_unknown_family_stops_workflow(tmp_path, tiny_config):
    tiny_config["model"]["pretrain"]["architecture"]["family"] = "mixtral"
    result = run_snakemake(tmp_path, tiny_config, "-n")
    assert_stopped_before_jobs(result, tmp_path,
                               "model.pretrain.architecture.family = 'mixtral' is invalid: must be one of ['olmoe'")


def test_wrong_type_named(tiny_config):
    tiny_config["evaluation"]["batch_size"] = "16"
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_config)
    assert "evaluation.batch_size = '16' is invalid" in str(error.value)
    assert "'integer'" in str(error.value)


def test_unknown_task_named(tiny_config):
    tiny_config["tasks"] = ["arith", "paws_x"]
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_config)
    assert "tasks[1] = 'paws_x' is invalid: must be one of ['arith', 'cause', 'mgsm', 'xcopa'" in str(error.value)


def test_language_defined_twice(tiny_config):
    languages = tiny_config["data"]["synthetic"]["languages"]
    languages.append(dict(languages[0]))
    with pytest.raises(ConfigError, match=r"defines a code twice: \['xa', 'xb', 'xc', 'xd', 'xa'\]"):
        validate_config(tiny_config)


def test_rise_split_must_sum_to_one(tiny_config):
    tiny_config["finetune"]["rise"]["zone_split"] = [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match=r"finetune.rise.zone_split = \[0.5, 0.5, 0.5\] sums to 1.5"):
        validate_config(tiny_config)


def test_sequence_longer_than_positions(tiny_config):
    tiny_config["model"]["pretrain"]["seq_len"] = 128
    with pytest.raises(ConfigError, match="seq_len = 128 exceeds architecture.max_position_embeddings = 64"):
        validate_config(tiny_config)


def test_config_file_not_a_mapping(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("- seed: 0\n- tasks: [arith]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="the top level must be a mapping of keys, got list"):
        load_config(path)


def test_pretrain_section_missing(tiny_config):
    del tiny_config["model"]["pretrain"]
    with pytest.raises(ConfigError, match="model.source is 'pretrain' but the section model.pretrain is missing"):
        validate_config(tiny_config)


# --------------------------------------------------------------------------- local checkpoints


def test_unknown_model_type_stops_workflow(tmp_path, tiny_config):
    folder = tmp_path / "custom-moe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "ramoe_custom_moe", "num_experts": 8}))
    result = run_snakemake(tmp_path, local_model_config(tiny_config, folder), "-n")
    assert_stopped_before_jobs(
        result, tmp_path, "model_type 'ramoe_custom_moe', which transformers 5.25.0 does not know",
        f"Supported MoE model types: {', '.join(sorted(FAMILIES))}.",
    )


def test_unrecognised_moe_checkpoint(tmp_path, tiny_config):
    config = transformers.JetMoeConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_key_value_heads=2,
                                       kv_channels=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    config.save_pretrained(tmp_path / "jetmoe")
    config = validate_config(local_model_config(tiny_config, tmp_path / "jetmoe"))
    with pytest.raises(ConfigError) as error:
        check_input_paths(config)
    assert "is not a supported MoE checkpoint" in str(error.value)
    assert "model_type 'jetmoe'" in str(error.value)
    assert "Supported model types: deepseek_v3" in str(error.value)


def test_dense_llama_stops_workflow(tmp_path, tiny_config, llama_checkpoint):
    result = run_snakemake(tmp_path, local_model_config(tiny_config, llama_checkpoint), "-n")
    assert_stopped_before_jobs(result, tmp_path, f"model.path = '{llama_checkpoint}' is not a Mixture-of-Experts model",
                               "LlamaForCausalLM", "RA-MoE needs a model with routers")


def test_folder_without_config_json(tmp_path, tiny_config):
    (tmp_path / "weights").mkdir()
    config = validate_config(local_model_config(tiny_config, tmp_path / "weights"))
    with pytest.raises(ConfigError, match="has no config.json, so it is not a Hugging Face checkpoint folder"):
        check_input_paths(config)


def test_override_outside_checkpoint_layers(tmp_path, tiny_config, moe_checkpoint):
    config = local_model_config(tiny_config, moe_checkpoint)
    config["routing"]["zone"]["override"] = [1, 3]
    result = run_snakemake(tmp_path, config, "-n")
    assert_stopped_before_jobs(result, tmp_path, "routing.zone.override = [1, 3] lies outside the model's layers 0..1",
                               "Choose first_layer and last_layer among [0, 1]")


def test_expert_cap_above_checkpoint_top_k(tmp_path, tiny_config, moe_checkpoint):
    config = local_model_config(tiny_config, moe_checkpoint)
    config["routing"]["experts"]["max_per_layer"] = 3
    result = run_snakemake(tmp_path, config, "-n")
    assert_stopped_before_jobs(result, tmp_path, "routing.experts.max_per_layer = 3 exceeds the model's top_k = 2",
                               "Set it to at most 2")


def test_valid_local_checkpoint_accepted(tiny_config, moe_checkpoint):
    config = local_model_config(tiny_config, moe_checkpoint)
    config["routing"]["experts"]["max_per_layer"] = 2
    check_input_paths(validate_config(config))


# --------------------------------------------------------------------------- real data files


def test_missing_language_file_stops_workflow(tmp_path, tiny_config, mgsm_copy, general_text):
    (mgsm_copy / "mgsm_de.tsv").unlink()
    result = run_snakemake(tmp_path, real_config(tiny_config, mgsm_copy, general_text), "-n")
    assert_stopped_before_jobs(result, tmp_path, "cannot load task 'mgsm' in languages ['en', 'de']",
                               "mgsm_de.tsv not found", "Languages available in", "['en', 'zh']")


def test_language_without_template(tiny_config, mgsm_copy, general_text):
    config = real_config(tiny_config, mgsm_copy, general_text)
    config["target_languages"] = ["de", "pt"]
    with pytest.raises(ConfigError) as error:
        check_input_paths(validate_config(config))
    assert "(data.real.tasks.mgsm, target_languages)" in str(error.value)
    assert "no prompt template for language(s) ['pt']" in str(error.value)


def test_data_dir_is_a_file(tiny_config, mgsm_copy, general_text):
    config = real_config(tiny_config, mgsm_copy / "mgsm_en.tsv", general_text)
    with pytest.raises(ConfigError, match=r"data_dir .*mgsm_en\.tsv is not a folder"):
        check_input_paths(validate_config(config))


def test_xcopa_hub_needs_local_key(tiny_config, general_text):
    config = real_config(tiny_config, Path("unused"), general_text)
    config["tasks"] = ["xcopa"]
    config["target_languages"] = ["th"]
    config["data"]["real"]["tasks"] = {"xcopa": {"source": "hub", "hub_id": "cambridgeltl/xcopa"}}
    with pytest.raises(ConfigError, match=r"data.real.tasks.xcopa.data_dir is required, also with source 'hub'.*xcopa_key.tsv"):
        validate_config(config)


def test_truncated_tsv_fails_job(tmp_path, tiny_config, mgsm_copy, general_text):
    path = mgsm_copy / "mgsm_de.tsv"
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: text.rindex("\t")], encoding="utf-8")
    result = run_snakemake(tmp_path, real_config(tiny_config, mgsm_copy, general_text), "results/data/mgsm.parquet")
    assert result.returncode != 0
    assert "real_task" in result.output
    log = (tmp_path / "results/logs/data/real_task/mgsm.log").read_text(encoding="utf-8")
    assert "mgsm_de.tsv, line 250: expected 2 tab-separated fields (question, answer), got 1" in log
    assert not (tmp_path / "results/data/mgsm.parquet").exists()
    assert leftovers(tmp_path / "results") == []


# --------------------------------------------------------------------------- parallel rows and files


def schema_rows() -> list[dict]:
    """Two parallel generative items in English and xa."""
    rows = []
    for lang in ("en", "xa"):
        for index, split in ((0, "train"), (1, "test")):
            rows.append({"item_id": f"arith-{index}", "lang": lang, "task": "arith", "task_type": "generative",
                         "split": split, "prompt": f"tom has {index} apples . answer :", "choices": [],
                         "answer": str(index), "source": "synthetic"})
    return rows


def assert_write_rejected(rows: list[dict], path: Path, match: str) -> None:
    with pytest.raises(ParallelDataError, match=match):
        write_parallel(rows, path, name="task 'arith'")
    assert not path.exists()
    assert leftovers(path.parent) == []


def test_ids_differ_between_languages(tmp_path):
    rows = schema_rows()
    rows[3]["item_id"] = "arith-7"
    assert_write_rejected(rows, tmp_path / "arith.parquet",
                          r"language 'xa' is not parallel to 'en': 1 missing id\(s\) \['arith-1'\], 1 extra id\(s\) \['arith-7'\]")


def test_duplicate_ids(tmp_path):
    rows = schema_rows()
    rows[1]["item_id"] = "arith-0"
    rows[1]["split"] = "train"
    assert_write_rejected(rows, tmp_path / "arith.parquet", r"language 'en' has duplicate item ids \['arith-0'\]")


def test_duplicated_xcopa_line(tmp_path, shared_data):
    folder = tmp_path / "xcopa"
    shutil.copytree(shared_data / "xcopa", folder, ignore=shutil.ignore_patterns("data-gmt"))
    path = folder / "data" / "th" / "val.th.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join([*lines[:4], lines[3], *lines[4:]]), encoding="utf-8")
    with pytest.raises(ParallelDataError, match=r"language 'th' has duplicate item ids \['copa-404'\]"):
        load_xcopa(["en", "th"], data_dir=folder)


def test_choice_index_outside_choices(tmp_path):
    rows = schema_rows()
    for row in rows:
        row.update(task_type="multiple_choice", choices=[" a .", " b ."], answer="0")
    rows[2]["answer"] = "2"
    assert_write_rejected(rows, tmp_path / "cause.parquet",
                          r"item 'arith-0' \('xa'\): answer '2' is not a valid index into 2 choices")


def test_unknown_task_type(tmp_path):
    rows = schema_rows()
    rows[0]["task_type"] = "summarization"
    assert_write_rejected(rows, tmp_path / "arith.parquet",
                          re.escape(f"unknown task_type 'summarization'; expected one of {TASK_TYPES}"))


@pytest.fixture
def parquet_file(tmp_path) -> Path:
    path = tmp_path / "arith.parquet"
    write_parallel(schema_rows(), path, name="task 'arith'")
    return path


def test_truncated_parquet(parquet_file):
    data = parquet_file.read_bytes()
    parquet_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ParallelDataError) as error:
        read_parallel(parquet_file)
    assert f"{parquet_file} is not a readable Parquet file" in str(error.value)
    assert "delete it and rerun the rule that writes it" in str(error.value)


def test_parquet_without_rows(tmp_path):
    path = tmp_path / "arith.parquet"
    pq.write_table(PARALLEL_SCHEMA.empty_table(), path)
    with pytest.raises(ParallelDataError, match=r"arith.parquet has no rows. Delete it and rerun"):
        read_parallel(path)


def test_parquet_unknown_split(tmp_path):
    rows = schema_rows()
    rows[2]["split"] = "validation"
    path = tmp_path / "arith.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=PARALLEL_SCHEMA), path)
    with pytest.raises(ParallelDataError) as error:
        read_parallel(path)
    assert "row 2 (item 'arith-0', 'xa'): unknown split 'validation'; expected one of ('train', 'test')" in str(error.value)


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "arith.parquet"
    pq.write_table(pa.Table.from_pylist(schema_rows(), schema=PARALLEL_SCHEMA).drop_columns(["answer"]), path)
    with pytest.raises(ParallelDataError, match=r"column 'answer' is missing; expected \['item_id'"):
        read_parallel(path)


# --------------------------------------------------------------------------- fine-tuning


def finetune_inputs(folder: Path, categories: dict[str, str]) -> dict:
    """Write data, categories and an expert mask for fine-tuning on arith in xa.

    ``categories`` maps each train item id to its category in xa.
    """
    rows = []
    for lang in ("en", "xa"):
        for index in range(4):
            rows.append({"item_id": f"a-{index}", "lang": lang, "task": "arith", "task_type": "generative",
                         "split": "train", "prompt": f"tom has {index} apples . how many apples does tom have ? answer :",
                         "choices": [], "answer": str(index), "source": "synthetic"})
    rows.append({**rows[0], "item_id": "a-9", "split": "test"})
    rows.append({**rows[4], "item_id": "a-9", "split": "test"})
    write_parallel(rows, folder / "arith.parquet", name="task 'arith'")
    pl.DataFrame({"model": "m", "task": "arith", "lang": "xa", "item_id": list(categories),
                  "category": list(categories.values())}).write_parquet(folder / "categories.parquet")
    (folder / "mask.json").write_text(json.dumps({"layers": {"0": [1], "1": [2]},
                                                   "zone": {"first_layer": 0, "last_layer": 1, "method": "override"}}))
    return {"data_path": folder / "arith.parquet", "categories_path": folder / "categories.parquet",
            "experts_path": folder / "mask.json", "trace_paths": {"en": folder / "never-read.parquet"}}


def finetune_settings(tiny_config: dict) -> dict:
    return dict(validate_config(tiny_config)["finetune"], batch_size=2, lr=1e-3, log_every=1)


def test_language_without_ci_trains_as_sft(tmp_path, tiny_config, moe_checkpoint, caplog):
    inputs = finetune_inputs(tmp_path, {f"a-{i}": "cc" for i in range(4)})
    output = tmp_path / "ckpt"
    with caplog.at_level(logging.WARNING, logger="ramoe.training.run"):
        records = finetune_task_language(
            **inputs, output_dir=output, method="ramoe", task="arith", lang="xa",
            model_source={"kind": "local", "path": str(moe_checkpoint), "revision": None, "dtype": "float32"},
            settings=finetune_settings(tiny_config), routing={"text": "prompt", "max_length": None}, seed=0,
            device="cpu",
        )
    assert "language xa has no ci examples" in caplog.text
    assert "RA-MoE trains exactly as SFT here" in caplog.text
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["align_loss"] == 0.0 and r["ci_rows"] == 0 for r in records)
    saved = json.loads((output / "finetune_config.json").read_text())
    assert saved["n_ci"] == 0
    assert saved["n_ci_aligned"] == 0
    assert (output / "model.safetensors").is_file()


def test_nan_loss_stops_finetune_rule(tmp_path, tiny_config, nan_checkpoint):
    inputs = finetune_inputs(tmp_path, {"a-0": "ci", "a-1": "cc", "a-2": "ci", "a-3": "ii"})
    output = tmp_path / "checkpoints" / "ckpt"
    with pytest.raises(FloatingPointError) as error:
        finetune_task_language(
            **inputs, output_dir=output, method="sft", task="arith", lang="xa",
            model_source={"kind": "local", "path": str(nan_checkpoint), "revision": None, "dtype": "float32"},
            settings=finetune_settings(tiny_config), routing={"text": "prompt", "max_length": None}, seed=0,
            device="cpu",
        )
    message = str(error.value)
    assert "non-finite loss at step 1" in message
    batch_ids = re.findall(r"'(a-\d)'", message.split("batch items ")[1])
    assert len(set(batch_ids)) == 2  # finetune.batch_size
    assert set(batch_ids) <= {"a-0", "a-1", "a-2", "a-3"}
    assert "Lower finetune.lr or check these items" in message
    assert not output.exists()
    assert leftovers(tmp_path / "checkpoints") == []


# --------------------------------------------------------------------------- results folder


def test_results_folder_check(tmp_path, monkeypatch):
    check_results_folder(tmp_path)  # results/ does not exist yet and can be created
    (tmp_path / "results").write_text("not a folder\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"cannot write results: '{tmp_path}/results' exists but is not a folder"):
        check_results_folder(tmp_path)
    with pytest.raises(ConfigError, match=f"'{tmp_path}/results' is not a folder, so '{tmp_path}/results/results'"):
        check_results_folder(tmp_path / "results")
    (tmp_path / "results").unlink()
    # A read-only mount is what os.access reports to root. Emulate one.
    monkeypatch.setattr("ramoe.config.os.access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=f"the results folder '{tmp_path}/results' is not writable"):
        check_results_folder(tmp_path)


def test_results_under_a_file_fails(tmp_path, tiny_config):
    # Tests run as root, and chmod does not stop root from writing. A regular file where the
    # folder should be makes results/ unusable instead.
    (tmp_path / "results").write_text("not a folder\n", encoding="utf-8")
    result = run_snakemake(tmp_path, tiny_config, "results/data/arith.parquet")
    assert result.returncode != 0
    assert "cannot write results: 'results' exists but is not a folder" in result.output
    assert "run the workflow in another working directory (snakemake --directory)" in result.output
    assert "Job stats" not in result.output  # stopped before planning
    assert (tmp_path / "results").read_text(encoding="utf-8") == "not a folder\n"
