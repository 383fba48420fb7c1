# Config validation, wildcard constraints and input functions shared by every rule file.

import json

from ramoe.config import check_input_paths, task_languages, validate_config

# Validate before any job is planned: a misspelt key, an out-of-range value or a missing input
# path stops the run here.
# In place, so that scripts reading snakemake.config also see the filled-in defaults.
config.update(validate_config(config))
check_input_paths(config)

MODEL = config["model"]["name"]
TASKS = config["tasks"]
LANGS_BY_TASK = {task: task_languages(config, task) for task in TASKS}
LANGS = sorted({lang for langs in LANGS_BY_TASK.values() for lang in langs})
TRAINED_METHODS = config["finetune"]["methods"]
SEEDS = config["finetune"]["seeds"]


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    task="|".join(TASKS),
    lang="|".join(LANGS),
    method="sft|ramoe|rise",
    seed=r"\d+",


# Keys that set how a job runs; changing them reruns nothing, although another thread count can
# change floating-point sums and so the last digits of a result. save_every (steps between saves
# of the training state to resume from) never changes a result.
EXECUTION_KEYS = ("threads", "save_every")


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
        source = {"kind": "local", "path": f"results/models/{wildcards.model}", "revision": None, "dtype": model["dtype"]}
    elif model["source"] == "local":
        source = {"kind": "local", "path": model["path"], "revision": None, "dtype": model["dtype"]}
    else:
        source = {"kind": "hub", "path": model["hub_id"], "revision": model.get("revision"), "dtype": model["dtype"]}
    # Only a set device_map enters the params, so configs without it rerun nothing.
    if model.get("device_map"):
        source["device_map"] = model["device_map"]
    # Tracing and fine-tuning wrap prompts as evaluation does; only a chat template that is on
    # enters the params, so configs without one rerun nothing.
    evaluation = config["evaluation"]
    if evaluation.get("chat_template"):
        source["chat_template"] = True
        source["chat_template_kwargs"] = evaluation.get("chat_template_kwargs", {})
    return source


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


def get_target_langs(wildcards):
    return LANGS_BY_TASK[wildcards.task][1:]


# Settings of the finetune section that every trained method reads; methods, seeds, threads and
# processes only decide which jobs exist or how they run, and the method subsections are added
# per method (lora only where it is the trainable set).
FINETUNE_OWN_KEYS = ("methods", "seeds", "threads", "processes", "alignment", "rise", "lora")


def get_finetune_settings(wildcards):
    """The finetune settings of one method as canonical JSON: a RISE setting never reruns SFT."""
    settings = {k: v for k, v in config["finetune"].items() if k not in FINETUNE_OWN_KEYS + EXECUTION_KEYS}
    if wildcards.method == "ramoe":
        settings["alignment"] = config["finetune"]["alignment"]
    if wildcards.method == "rise":
        settings["rise"] = config["finetune"]["rise"]
    elif settings["trainable"] == "lora":
        settings["lora"] = config["finetune"]["lora"]
    return json.dumps(settings, sort_keys=True)


def get_finetune_inputs(wildcards):
    """Data, categories and model of every method; RA-MoE adds the expert mask and English trace, RISE every trace."""
    inputs = {
        "data": f"results/data/{wildcards.task}.parquet",
        "categories": f"results/categories/{wildcards.model}/{wildcards.task}.parquet",
        "model": get_model_input(wildcards),
    }
    trace = "results/traces/{model}/{task}/{lang}.sequences.parquet"
    if wildcards.method == "ramoe":
        inputs["experts"] = f"results/experts/{wildcards.model}/{wildcards.task}.json"
        inputs["traces"] = [trace.format(model=wildcards.model, task=wildcards.task, lang="en")]
    elif wildcards.method == "rise":
        inputs["traces"] = [
            trace.format(model=wildcards.model, task=wildcards.task, lang=lang) for lang in LANGS_BY_TASK[wildcards.task]
        ]
    return inputs


def get_task_checkpoints(wildcards):
    return expand(
        "results/checkpoints/{model}/{method}/seed{seed}/{task}/{lang}",
        model=wildcards.model,
        method=wildcards.method,
        seed=wildcards.seed,
        task=wildcards.task,
        lang=get_target_langs(wildcards),
    )


def get_finetuned_evaluations(wildcards):
    return expand(
        "results/eval/{model}/{method}/seed{seed}/{task}.parquet",
        model=MODEL,
        method=TRAINED_METHODS,
        seed=SEEDS,
        task=TASKS,
    )


def get_final_outputs():
    figures = ["categories", "divergence_by_layer", "task_experts", "main_results", "ci_vs_gain"]
    return [
        "results/tables/accuracy_base.csv",
        "results/tables/categories.csv",
        "results/tables/divergence.csv",
        "results/tables/alignment_zone.csv",
        "results/tables/task_experts.csv",
        "results/tables/main_results.csv",
        "results/tables/ci_vs_gain.csv",
        *expand("results/figures/{name}.{ext}", name=figures, ext=["pdf", "png"]),
    ]
