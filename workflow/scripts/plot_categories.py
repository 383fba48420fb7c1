"""Plot the cc/ci/ic/ii shares as stacked bars per target language."""

import polars as pl

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.plotting import plot_categories  # noqa: E402

plot_categories(pl.read_csv(snakemake.input.table), snakemake.output.pdf, snakemake.output.png)
