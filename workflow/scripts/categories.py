"""Label every train item of one task cc/ci/ic/ii per target language."""

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.evaluation.run import write_categories  # noqa: E402

write_categories(snakemake.input, snakemake.output[0])
