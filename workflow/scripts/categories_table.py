"""Tabulate the cc/ci/ic/ii shares per model, task and target language."""

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.evaluation.run import write_categories_table  # noqa: E402

write_categories_table(snakemake.input, snakemake.output[0])
