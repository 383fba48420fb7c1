"""Plot the comparison of methods and RA-MoE's gain over SFT against the ci share."""

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.analysis.run import plot_results  # noqa: E402

plot_results(
    snakemake.input.summary,
    snakemake.input.gain,
    main_pdf=snakemake.output.main_pdf,
    main_png=snakemake.output.main_png,
    gain_pdf=snakemake.output.gain_pdf,
    gain_png=snakemake.output.gain_png,
)
