"""Evaluate the base model on one task and language (train and test items)."""

import json

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.evaluation.run import evaluate_task_language  # noqa: E402

evaluate_task_language(
    snakemake.input.data,
    snakemake.output[0],
    lang=snakemake.wildcards.lang,
    model_name=snakemake.wildcards.model,
    model_source=snakemake.params.model_source,
    settings=json.loads(snakemake.params.evaluation),
    seed=snakemake.params.seed,
    threads=snakemake.threads,
    device=snakemake.config["device"],
)
