"""Tabulate base-model accuracy per model, task, language and split."""

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.evaluation.run import write_accuracy_table  # noqa: E402

write_accuracy_table(snakemake.input, snakemake.output.table)
