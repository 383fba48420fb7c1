"""Load and validate the workflow configuration against its JSON schema.

The schema (``schemas/config.schema.yaml``) sets ``additionalProperties: false`` on every object,
gives every key a type, bounds and a description, and fills declared defaults. Checks that JSON
Schema cannot express (a language code that has no definition, an expert count below top-k)
follow in ``check_consistency``. Every error names the key by its dotted path.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SYNTHETIC_TASKS = ("arith", "cause")
REAL_TASKS = ("mgsm", "xcopa")


class ConfigError(ValueError):
    """Raised for an invalid configuration; the message names the key and the fix."""


def load_schema() -> dict:
    text = resources.files("ramoe.schemas").joinpath("config.schema.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _key_path(path) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "".join(parts).lstrip(".") or "(top level)"


def _subschema(schema: dict, error: jsonschema.ValidationError) -> dict:
    node = error.schema
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].split("/")[-1]]
    return node


def _describe(error: jsonschema.ValidationError, schema: dict) -> str:
    """Describe one schema violation in a sentence: the dotted key, its value and what is allowed."""
    key = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(_subschema(schema, error).get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        parts = []
        for name in unknown:
            full = f"{key}.{name}" if error.absolute_path else name
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            parts.append(f"unknown key {full!r}.{hint} Allowed keys here: {', '.join(allowed)}.")
        return " ".join(parts)
    if error.validator == "required":
        return f"{key}: {error.message}. Add it to the config (see config.yaml for an example)."
    if error.validator == "enum":
        return f"{key} = {error.instance!r} is invalid: must be one of {error.validator_value}."
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bound = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[error.validator]
        return f"{key} = {error.instance!r} is out of range: must be {bound} {error.validator_value}."
    return f"{key} = {error.instance!r} is invalid: {error.message}."


def _fill_defaults(node: Any, schema: dict, root: dict) -> None:
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    if isinstance(node, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in node and "default" in sub:
                node[name] = copy.deepcopy(sub["default"])
            if name in node:
                _fill_defaults(node[name], sub, root)
    elif isinstance(node, list) and "items" in schema:
        for item in node:
            _fill_defaults(item, schema["items"], root)


def task_languages(config: Mapping, task: str) -> list[str]:
    """English followed by the target languages of ``task``."""
    return ["en", *config.get("task_languages", {}).get(task, config["target_languages"])]


def check_consistency(config: Mapping) -> None:
    """Cross-key checks that the schema cannot express."""
    data = config["data"]
    source = data["source"]
    tasks = config["tasks"]
    known = SYNTHETIC_TASKS if source == "synthetic" else REAL_TASKS
    wrong = [t for t in tasks if t not in known]
    if wrong:
        raise ConfigError(f"tasks {wrong} are not available with data.source = {source!r}; choose from {list(known)}.")
    unused = sorted(set(config.get("task_languages", {})) - set(tasks))
    if unused:
        raise ConfigError(f"task_languages names tasks {unused} that are not in tasks {tasks}.")
    if source not in data:
        raise ConfigError(f"data.source is {source!r} but the section data.{source} is missing.")
    if source == "synthetic":
        defined = [spec["code"] for spec in data["synthetic"]["languages"]]
        if len(defined) != len(set(defined)):
            raise ConfigError(f"data.synthetic.languages defines a code twice: {defined}.")
        used = {lang for task in tasks for lang in task_languages(config, task)[1:]}
        missing = sorted(used - set(defined))
        if missing:
            raise ConfigError(
                f"target languages {missing} have no definition in data.synthetic.languages (defined: {defined}). "
                "Add a language entry or remove the code."
            )
    else:
        absent = [t for t in tasks if t not in data["real"]["tasks"]]
        if absent:
            raise ConfigError(f"tasks {absent} have no loader settings under data.real.tasks.")
        for task in tasks:
            settings = data["real"]["tasks"][task]
            if settings["source"] == "local" and not settings.get("data_dir"):
                raise ConfigError(f"data.real.tasks.{task}.data_dir is required when its source is 'local'.")
            if settings["source"] == "hub" and not settings.get("hub_id"):
                raise ConfigError(f"data.real.tasks.{task}.hub_id is required when its source is 'hub'.")

    check_routing(config)
    check_finetune(config)

    model = config["model"]
    if model["source"] == "pretrain":
        if "pretrain" not in model:
            raise ConfigError("model.source is 'pretrain' but the section model.pretrain is missing.")
        arch = model["pretrain"]["architecture"]
        if arch["top_k"] > arch["num_experts"]:
            raise ConfigError(
                f"model.pretrain.architecture.top_k = {arch['top_k']} exceeds num_experts = {arch['num_experts']}."
            )
        if arch["hidden_size"] % arch["num_attention_heads"]:
            raise ConfigError(
                f"model.pretrain.architecture.num_attention_heads = {arch['num_attention_heads']} "
                f"does not divide hidden_size = {arch['hidden_size']}."
            )
        if arch["num_attention_heads"] % arch["num_key_value_heads"]:
            raise ConfigError(
                f"model.pretrain.architecture.num_key_value_heads = {arch['num_key_value_heads']} "
                f"does not divide num_attention_heads = {arch['num_attention_heads']}."
            )
        if model["pretrain"]["seq_len"] > arch["max_position_embeddings"]:
            raise ConfigError(
                f"model.pretrain.seq_len = {model['pretrain']['seq_len']} exceeds "
                f"architecture.max_position_embeddings = {arch['max_position_embeddings']}."
            )
        if source == "real" and model["pretrain"]["tokenizer"]["kind"] == "word":
            raise ConfigError("model.pretrain.tokenizer.kind 'word' only covers the synthetic world; use 'byte' for real data.")
    elif model["source"] == "local" and not model.get("path"):
        raise ConfigError("model.path is required when model.source is 'local'.")
    elif model["source"] == "hub" and not model.get("hub_id"):
        raise ConfigError("model.hub_id is required when model.source is 'hub'.")


def check_routing(config: Mapping) -> None:
    routing = config["routing"]
    general = routing["general_text"]
    if general["source"] == "synthetic" and config["data"]["source"] != "synthetic":
        raise ConfigError(
            "routing.general_text.source is 'synthetic' but data.source is 'real'; set "
            "routing.general_text to {source: file, path: <English text>}."
        )
    if general["source"] == "file" and not general.get("path"):
        raise ConfigError("routing.general_text.path is required when routing.general_text.source is 'file'.")
    start, end = routing["zone"]["fallback"]
    if start >= end:
        raise ConfigError(f"routing.zone.fallback = {[start, end]} is invalid: the start must be below the end.")
    override = routing["zone"].get("override")
    if override is not None:
        first, last = override
        if first > last:
            raise ConfigError(f"routing.zone.override = {override} is invalid: first_layer must not exceed last_layer.")
        if config["model"]["source"] == "pretrain":
            num_layers = config["model"]["pretrain"]["architecture"]["num_layers"]
            if last >= num_layers:
                raise ConfigError(
                    f"routing.zone.override = {override} lies outside the model's layers 0..{num_layers - 1}."
                )
    cap = routing["experts"].get("max_per_layer")
    if cap is not None and config["model"]["source"] == "pretrain":
        top_k = config["model"]["pretrain"]["architecture"]["top_k"]
        if cap > top_k:
            raise ConfigError(
                f"routing.experts.max_per_layer = {cap} exceeds the model's top_k = {top_k}; "
                "more task experts than top_k could never all be routed to at once."
            )


def check_finetune(config: Mapping) -> None:
    rise = config["finetune"]["rise"]
    if abs(sum(rise["zone_split"]) - 1.0) > 1e-6:
        raise ConfigError(
            f"finetune.rise.zone_split = {rise['zone_split']} sums to {sum(rise['zone_split']):.4g}; the shallow, "
            "middle and deep shares of the budget must sum to 1."
        )
    start, end = rise["depth_bounds"]
    if not 0 < start < end < 1:
        raise ConfigError(
            f"finetune.rise.depth_bounds = {[start, end]} is invalid: need 0 < middle start < deep start < 1."
        )


def check_input_paths(config: Mapping, base: str | Path = ".") -> None:
    """Raise unless every local input that the config names exists (relative to ``base``)."""
    paths = []
    if config["data"]["source"] == "real":
        for task in config["tasks"]:
            settings = config["data"]["real"]["tasks"][task]
            if settings["source"] == "local":
                paths.append((f"data.real.tasks.{task}.data_dir", settings["data_dir"]))
    general = config["routing"]["general_text"]
    if general["source"] == "file":
        paths.append(("routing.general_text.path", general["path"]))
    if config["model"]["source"] == "local":
        paths.append(("model.path", config["model"]["path"]))
    for key, value in paths:
        resolved = (Path(base) / value).resolve()
        if not resolved.exists():
            raise ConfigError(
                f"{key} = {value!r} does not exist (resolved to {resolved}; relative paths are relative "
                "to the working directory). Point it at the local copy, or pass a config with the right path."
            )


def validate_config(config: Mapping) -> dict:
    """Validate a config mapping, fill schema defaults, and return the completed copy.

    Raises ConfigError listing every violation, each naming its key.
    """
    schema = load_schema()
    completed = copy.deepcopy(dict(config))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(completed), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n".join(f"  - {_describe(e, schema)}" for e in errors)
        raise ConfigError(f"invalid configuration ({len(errors)} problem(s)):\n{lines}")
    _fill_defaults(completed, schema, schema)
    check_consistency(completed)
    return completed


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found.")
    with path.open(encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}.")
    try:
        return validate_config(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
