"""Tabulate every method's test accuracy, the per-method summary and RA-MoE's gain over SFT against the ci share."""

import json

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.analysis.run import write_results  # noqa: E402

write_results(
    [*snakemake.input.base, *snakemake.input.steering, *snakemake.input.finetuned],
    snakemake.input.categories,
    main_path=snakemake.output.main,
    summary_path=snakemake.output.summary,
    gain_path=snakemake.output.gain,
    settings=json.loads(snakemake.params.analysis),
)
