"""Load and validate the workflow configuration against its JSON schema.

The schema (``schemas/config.schema.yaml``) sets ``additionalProperties: false`` on every object,
gives every key a type, bounds and a description, and fills declared defaults. Checks that JSON
Schema cannot express (a language code that has no definition, an expert count below top-k)
follow in ``check_consistency``. Every error names the key by its dotted path.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ramoe import hub

SYNTHETIC_TASKS = ("arith", "cause")
REAL_TASKS = ("mgsm", "xcopa", "xnli", "xquad")


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
            if task == "xcopa" and not settings.get("data_dir"):
                raise ConfigError(
                    "data.real.tasks.xcopa.data_dir is required, also with source 'hub': English COPA and "
                    "the corrected answer key (xcopa_key.tsv) are always read from the local XCOPA folder."
                )

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
    if override is not None and override[0] > override[1]:
        raise ConfigError(f"routing.zone.override = {override} is invalid: first_layer must not exceed last_layer.")
    # A missing model.pretrain section is reported by check_consistency after this check.
    if config["model"]["source"] == "pretrain" and "pretrain" in config["model"]:
        arch = config["model"]["pretrain"]["architecture"]
        check_routing_fits_model(config, moe_layers=list(range(arch["num_layers"])), top_k=arch["top_k"])


def check_routing_fits_model(config: Mapping, *, moe_layers: list[int], top_k: int) -> None:
    """Raise unless the zone override lies on MoE layers and the expert cap is at most top_k.

    ``moe_layers`` are the decoder layers that have a router. In the pretrained model that is
    every layer, while DeepSeek-V3 starts with dense layers.
    """
    routing = config["routing"]
    override = routing["zone"].get("override")
    if override is not None:
        first, last = override
        if first not in moe_layers or last not in moe_layers:
            raise ConfigError(
                f"routing.zone.override = {override} lies outside the model's layers {moe_layers[0]}..{moe_layers[-1]} "
                f"that have a router. Choose first_layer and last_layer among {moe_layers}."
            )
    cap = routing["experts"].get("max_per_layer")
    if cap is not None and cap > top_k:
        raise ConfigError(
            f"routing.experts.max_per_layer = {cap} exceeds the model's top_k = {top_k}. "
            "More task experts than top_k could never all be routed to at once. Set it to at most "
            f"{top_k}, or null to use top_k."
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
    finetune = config["finetune"]
    if finetune["processes"] > 1 and config["model"].get("device_map"):
        raise ConfigError(
            f"finetune.processes = {finetune['processes']} keeps a whole model copy in every process, but "
            f"model.device_map = {config['model']['device_map']!r} spreads one model over several devices. "
            "Set model.device_map: null, or finetune.processes: 1."
        )
    if finetune["trainable"] == "lora":
        lora = finetune["lora"]
        weight_targets = lora["routers"] or lora["expert_parameters"]
        if not weight_targets and not lora["attention_modules"]:
            raise ConfigError(
                "finetune.lora targets nothing: attention_modules and expert_parameters are empty and routers is "
                "false. Name at least one target."
            )
        if lora["dropout"] > 0 and weight_targets:
            raise ConfigError(
                f"finetune.lora.dropout = {lora['dropout']} works only on attention_modules: PEFT adapts the routers "
                "and expert tensors through their weights, where input dropout is undefined. Set dropout: 0, or "
                "routers: false and expert_parameters: []."
            )


def check_input_paths(config: Mapping, base: str | Path = ".") -> None:
    """Raise unless every input that the config names can be read and ``base/results`` can be written.

    Local paths must exist, real data files must exist for every language, a local checkpoint
    must be a supported MoE model that fits the routing settings, and no hub input may be
    requested while the hub is offline. Relative paths are relative to ``base``. A workflow
    calls this before planning, so none of these stops a run after hours of earlier jobs.
    """
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
            local_only = (
                " The general text is read from a local file only (.txt, .jsonl, .tsv or SQuAD .json), "
                "never from the hub."
                if key == "routing.general_text.path" else ""
            )
            raise ConfigError(
                f"{key} = {value!r} does not exist (resolved to {resolved}; relative paths are relative "
                "to the working directory). Point it at the local copy, or pass a config with the right path."
                + local_only
            )
    _check_hub_offline(config)
    if config["data"]["source"] == "real":
        _check_real_data_files(config, base)
    if config["model"]["source"] == "local":
        _check_local_model(config, base)
    check_results_folder(base)


def _check_hub_offline(config: Mapping) -> None:
    """Raise when the config requests a hub model or hub data set while the hub is offline."""
    variable = hub.offline_variable()
    if config["model"]["source"] == "hub" and variable is not None:
        hub_id, revision = config["model"]["hub_id"], config["model"].get("revision")
        if hub.cached_snapshot(hub_id, revision) is None:
            raise ConfigError(
                f"model.hub_id = {hub_id!r} (revision {revision or 'main'!r}) needs the Hugging Face hub, but the "
                f"hub is offline ({variable}={os.environ[variable]}) and the model is not in the cache "
                f"{hub.cache_folder()}. Download it there on a connected machine (hf download "
                f"{hub_id}), or set model.source: local with model.path pointing at its folder."
            )
    if config["data"]["source"] == "real":
        from ramoe.data.real import require_hub_online

        for task in config["tasks"]:
            settings = config["data"]["real"]["tasks"][task]
            if settings["source"] == "hub":
                try:
                    require_hub_online(settings["hub_id"])
                except RuntimeError as error:
                    raise ConfigError(f"data.real.tasks.{task}.source is 'hub': {error}") from None


def _check_real_data_files(config: Mapping, base: str | Path) -> None:
    """Raise unless the data files of every real task exist for each of its languages."""
    from ramoe.data.real import local_files

    for task in config["tasks"]:
        settings = config["data"]["real"]["tasks"][task]
        data_dir = settings.get("data_dir")
        langs = task_languages(config, task)
        try:
            local_files(task, langs, source=settings["source"],
                        data_dir=None if data_dir is None else Path(base) / data_dir)
        except (OSError, ValueError) as error:
            key = f"task_languages.{task}" if task in config.get("task_languages", {}) else "target_languages"
            raise ConfigError(
                f"cannot load task {task!r} in languages {langs} (data.real.tasks.{task}, {key}): {error}"
            ) from None


def _check_local_model(config: Mapping, base: str | Path) -> None:
    """Raise unless model.path is a checkpoint of a supported MoE model that fits the routing settings."""
    from ramoe.routing.adapters import NoMoELayersError, UnsupportedMoEModelError, describe_checkpoint

    value = config["model"]["path"]
    folder = Path(base) / value
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.path = {value!r} has no config.json, so it is not a Hugging Face checkpoint folder. Point "
            "model.path at the folder that contains config.json and the weights."
        )
    try:
        layout = describe_checkpoint(folder)
    except NoMoELayersError as error:
        raise ConfigError(
            f"model.path = {value!r} is not a Mixture-of-Experts model: {error} RA-MoE needs a model with routers."
        ) from None
    except (UnsupportedMoEModelError, ValueError) as error:
        raise ConfigError(f"model.path = {value!r} is not a supported MoE checkpoint: {error}") from None
    check_routing_fits_model(config, moe_layers=layout.moe_layers, top_k=layout.top_k)


def check_results_folder(base: str | Path = ".") -> None:
    """Raise unless ``base/results`` is, or can be created as, a writable folder.

    Uses os.access, which reports a read-only file system to root too, while root ignores
    permission bits, so only a read-only mount or a non-folder in the way is caught for root.
    """
    results = Path(base) / "results"
    existing = results
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == results:
            problem = f"{str(results)!r} exists but is not a folder"
        else:
            problem = f"{str(existing)!r} is not a folder, so {str(results)!r} cannot be created"
        raise ConfigError(
            f"cannot write results: {problem}. Move that file away, or run the workflow in another working "
            "directory (snakemake --directory)."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"the results folder {str(results)!r} is not writable ({str(existing)!r} denies writes). Make it "
            "writable, or run the workflow in another working directory (snakemake --directory)."
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
