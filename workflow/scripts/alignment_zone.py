"""Choose the alignment zone from divergence and the accuracy gap."""

import json

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.routing.run import write_alignment_zone  # noqa: E402

write_alignment_zone(
    snakemake.input.divergence,
    snakemake.input.accuracy,
    snakemake.input.trace,
    snakemake.output[0],
    settings=json.loads(snakemake.params.routing),
)
