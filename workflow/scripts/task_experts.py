"""Find the task experts per layer, write their masks, and the language-specific experts."""

import json

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.routing.run import write_task_experts  # noqa: E402

write_task_experts(
    snakemake.input.traces,
    snakemake.input.general,
    snakemake.input.zone,
    table_path=snakemake.output.table,
    language_table_path=snakemake.output.languages,
    mask_paths=dict(zip(snakemake.params.tasks, snakemake.output.masks, strict=True)),
    model=snakemake.params.model,
    settings=json.loads(snakemake.params.routing),
)
