# Config validation, wildcard constraints and input functions shared by every rule file.

import json

from ramoe.config import check_input_paths, task_languages, validate_config

# Validate before any job is planned: a misspelt key, an out-of-range value or a missing input
# path stops the run here.
config = validate_config(config)
check_input_paths(config)

MODEL = config["model"]["name"]
TASKS = config["tasks"]
LANGS_BY_TASK = {task: task_languages(config, task) for task in TASKS}
LANGS = sorted({lang for langs in LANGS_BY_TASK.values() for lang in langs})


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    task="|".join(TASKS),
    lang="|".join(LANGS),


# Keys that set how a job runs; changing them reruns nothing, although another thread count can
# change floating-point sums and so the last digits of a result.
EXECUTION_KEYS = ("threads",)


def section(*keys):
    """A config section as canonical JSON, so that a rule reruns exactly when that section changes."""
    node = config
    for key in keys:
        node = node[key]
    return json.dumps({k: v for k, v in node.items() if k not in EXECUTION_KEYS}, sort_keys=True)


def get_real_loader(wildcards):
    return config["data"]["real"]["tasks"][wildcards.task]


def get_task_langs(wildcards):
    return LANGS_BY_TASK[wildcards.task]


def get_model_input(wildcards):
    """The checkpoint folder a rule depends on; empty for local folders and hub ids, which are loaded as params."""
    if config["model"]["source"] == "pretrain":
        return f"results/models/{wildcards.model}"
    return []


def get_model_source(wildcards):
    model = config["model"]
    if model["source"] == "pretrain":
        return {"kind": "local", "path": f"results/models/{wildcards.model}", "revision": None, "dtype": model["dtype"]}
    if model["source"] == "local":
        return {"kind": "local", "path": model["path"], "revision": None, "dtype": model["dtype"]}
    return {"kind": "hub", "path": model["hub_id"], "revision": model.get("revision"), "dtype": model["dtype"]}


def get_base_evaluations(wildcards):
    return [
        f"results/eval/{MODEL}/base/{task}/{lang}.parquet" for task in TASKS for lang in LANGS_BY_TASK[task]
    ]


def get_task_evaluations(wildcards):
    return expand(
        "results/eval/{model}/base/{task}/{lang}.parquet",
        model=wildcards.model,
        task=wildcards.task,
        lang=LANGS_BY_TASK[wildcards.task],
    )


def get_general_text(wildcards):
    general = config["routing"]["general_text"]
    if general["source"] == "synthetic":
        return "results/data/general_text.txt"
    return general["path"]


def get_sequence_traces(wildcards):
    return [
        f"results/traces/{MODEL}/{task}/{lang}.sequences.parquet" for task in TASKS for lang in LANGS_BY_TASK[task]
    ]


def get_first_sequence_trace(wildcards):
    return get_sequence_traces(wildcards)[0]


def get_final_outputs():
    figures = ["categories", "divergence_by_layer", "task_experts"]
    return [
        "results/tables/accuracy_base.csv",
        "results/tables/categories.csv",
        "results/tables/divergence.csv",
        "results/tables/alignment_zone.csv",
        "results/tables/task_experts.csv",
        *expand("results/figures/{name}.{ext}", name=figures, ext=["pdf", "png"]),
    ]
