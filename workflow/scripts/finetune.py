"""Fine-tune one method on one task in one target language and save the checkpoint.

With finetune.processes above 1 the package function launches DDP workers through torchrun.
"""

import json
from pathlib import Path

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.training.run import finetune_task_language  # noqa: E402

# traces are named {lang}.sequences.parquet
traces = {Path(path).name.split(".")[0]: path for path in snakemake.input.get("traces", [])}
finetune_task_language(
    snakemake.input.data,
    snakemake.input.categories,
    snakemake.output[0],
    method=snakemake.wildcards.method,
    task=snakemake.wildcards.task,
    lang=snakemake.wildcards.lang,
    model_source=snakemake.params.model_source,
    # save_every is left out of the params (changing it reruns nothing), so it comes from the config
    settings={**json.loads(snakemake.params.settings), "save_every": snakemake.config["finetune"]["save_every"]},
    routing=json.loads(snakemake.params.routing),
    seed=int(snakemake.wildcards.seed),
    experts_path=snakemake.input.get("experts"),
    trace_paths=traces,
    threads=snakemake.threads,
    device=snakemake.config["device"],
    processes=snakemake.config["finetune"]["processes"],
)
