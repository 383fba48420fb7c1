"""Pretrain the tiny MoE and save it with its tokenizer as a Hugging Face checkpoint folder."""

import json

from ramoe.io import setup_logging

setup_logging(snakemake.log[0])

from ramoe.training.pretrain import pretrain_from_corpus  # noqa: E402

pretrain_from_corpus(
    snakemake.input.corpus,
    # save_every is left out of the params (changing it reruns nothing), so it comes from the config
    {**json.loads(snakemake.params.pretrain), "save_every": snakemake.config["model"]["pretrain"]["save_every"]},
    snakemake.output[0],
    task_paths=snakemake.input.tasks,
    threads=snakemake.threads,
)
