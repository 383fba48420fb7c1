"""Build a pretraining corpus from the train items of real tasks (prompt plus gold answer)."""

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.data.corpus import write_task_corpus  # noqa: E402

write_task_corpus(snakemake.input, snakemake.output[0])
