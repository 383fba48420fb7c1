"""Load one real parallel task (local files or hub) into the parallel schema."""

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.data.real import load_task  # noqa: E402
from ramoe.data.schema import write_parallel  # noqa: E402

loader = snakemake.params.loader
rows = load_task(
    snakemake.wildcards.task,
    snakemake.params.langs,
    source=loader["source"],
    data_dir=loader.get("data_dir"),
    **({"hub_id": loader["hub_id"]} if loader.get("hub_id") else {}),
    test_fraction=snakemake.params.test_fraction,
    split_seed=snakemake.params.split_seed,
)
write_parallel(
    rows,
    snakemake.output[0],
    name=f"task {snakemake.wildcards.task!r}",
    provenance={"seed": snakemake.params.split_seed, "source": loader["source"]},
)
