"""Tabulate English-target routing divergence per layer, with the two controls."""

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.routing.run import write_divergence  # noqa: E402

write_divergence(snakemake.input, snakemake.output[0], model=snakemake.params.model, seed=snakemake.params.seed)
