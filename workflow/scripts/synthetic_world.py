"""Generate the synthetic parallel world: task data, pretraining corpus and general text."""

import json

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.synthetic.world import write_world  # noqa: E402

write_world(
    json.loads(snakemake.params.synthetic),
    tasks=snakemake.params.tasks,
    target_languages=snakemake.params.langs,
    task_paths=dict(zip(snakemake.params.tasks, snakemake.output.tasks, strict=True)),
    corpus_path=snakemake.output.corpus,
    general_path=snakemake.output.general,
)
