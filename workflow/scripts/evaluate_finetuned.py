"""Evaluate the fine-tuned checkpoints of one method and seed on a task's test items."""

import json

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.evaluation.run import evaluate_finetuned  # noqa: E402

evaluate_finetuned(
    snakemake.input.data,
    dict(zip(snakemake.params.langs, snakemake.input.checkpoints, strict=True)),
    snakemake.output[0],
    method=snakemake.wildcards.method,
    seed=int(snakemake.wildcards.seed),
    model_name=snakemake.wildcards.model,
    settings=json.loads(snakemake.params.evaluation),
    dtype=snakemake.params.dtype,
    device_map=snakemake.config["model"].get("device_map"),
    threads=snakemake.threads,
    device=snakemake.config["device"],
)
