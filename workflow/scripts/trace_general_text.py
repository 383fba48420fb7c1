"""Trace the routing of the general English text, the reference for task experts."""

import json

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.routing.run import trace_general_text  # noqa: E402

trace_general_text(
    snakemake.input.text,
    snakemake.output[0],
    model_source=snakemake.params.model_source,
    settings=json.loads(snakemake.params.routing),
    seed=snakemake.params.seed,
    threads=snakemake.threads,
    device=snakemake.config["device"],
)
