# Pretraining of the tiny MoE (only when model.source is pretrain).


rule pretrain:
    input:
        corpus="results/data/pretrain_corpus.txt",
        tasks=expand("results/data/{task}.parquet", task=TASKS),
    output:
        directory("results/models/{model}"),
    params:
        pretrain=section("model", "pretrain") if config["model"]["source"] == "pretrain" else None,
        synthetic=section("data", "synthetic") if config["data"]["source"] == "synthetic" else None,
    threads: config["model"].get("pretrain", {}).get("threads", 1)
    resources:
        runtime=120,
        mem_mb=4000,
    log:
        "results/logs/pretrain/{model}.log",
    benchmark:
        "results/benchmarks/pretrain/{model}.tsv"
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/pretrain.py"
