# Base-model evaluation: per-example correctness for every task and language, both splits.


rule evaluate_base:
    input:
        data="results/data/{task}.parquet",
        model=get_model_input,
    output:
        "results/eval/{model}/base/{task}/{lang}.parquet",
    params:
        evaluation=section("evaluation"),
        model_source=get_model_source,
        seed=config["seed"],
    threads: config["evaluation"]["threads"]
    resources:
        runtime=60,
        mem_mb=4000,
    log:
        "results/logs/eval/{model}/base/{task}/{lang}.log",
    benchmark:
        "results/benchmarks/eval/{model}/base/{task}/{lang}.tsv"
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/evaluate_base.py"


rule accuracy_base:
    input:
        get_base_evaluations,
    output:
        table=report(
            "results/tables/accuracy_base.csv",
            caption="../workflow/report/accuracy_base.rst",
            category="1. Base model",
            labels={"table": "accuracy_base"},
        ),
    log:
        "results/logs/tables/accuracy_base.log",
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/accuracy_base.py"
