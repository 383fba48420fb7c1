"""Evaluate the base model under Routing Steering on a task's test items in every language."""

import json

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.evaluation.run import evaluate_steering  # noqa: E402

evaluate_steering(
    snakemake.input.data,
    snakemake.input.experts,
    snakemake.output[0],
    langs=snakemake.params.langs,
    model_name=snakemake.wildcards.model,
    model_source=snakemake.params.model_source,
    settings=json.loads(snakemake.params.evaluation),
    steering=json.loads(snakemake.params.steering),
    threads=snakemake.threads,
    device=snakemake.config["device"],
)
