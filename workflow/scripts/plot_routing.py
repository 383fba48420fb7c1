"""Plot divergence by layer and the task-expert heatmap."""

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.routing.run import plot_routing_figures  # noqa: E402

plot_routing_figures(
    snakemake.input.divergence,
    snakemake.input.accuracy,
    snakemake.input.zone,
    snakemake.input.experts,
    divergence_pdf=snakemake.output.divergence_pdf,
    divergence_png=snakemake.output.divergence_png,
    experts_pdf=snakemake.output.experts_pdf,
    experts_png=snakemake.output.experts_png,
    split=snakemake.params.split,
)
