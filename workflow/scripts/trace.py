"""Trace the routing of one task's items in one language."""

import json

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.routing.run import trace_task_language  # noqa: E402

trace_task_language(
    snakemake.input.data,
    snakemake.output.tokens,
    snakemake.output.sequences,
    lang=snakemake.wildcards.lang,
    model_source=snakemake.params.model_source,
    settings=json.loads(snakemake.params.routing),
    seed=snakemake.params.seed,
    threads=snakemake.threads,
    device=snakemake.config["device"],
)
