# cc/ci/ic/ii: English correctness (first letter) joined with target correctness on train items.


rule categories:
    input:
        get_task_evaluations,
    output:
        "results/categories/{model}/{task}.parquet",
    log:
        "results/logs/categories/{model}/{task}.log",
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/categories.py"


rule categories_table:
    input:
        expand("results/categories/{model}/{task}.parquet", model=MODEL, task=TASKS),
    output:
        report(
            "results/tables/categories.csv",
            caption="../workflow/report/categories_table.rst",
            category="1. Base model",
            labels={"table": "categories"},
        ),
    log:
        "results/logs/tables/categories.log",
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/categories_table.py"


rule plot_categories:
    input:
        table="results/tables/categories.csv",
    output:
        pdf="results/figures/categories.pdf",
        png=report(
            "results/figures/categories.png",
            caption="../workflow/report/categories.rst",
            category="1. Base model",
            labels={"figure": "categories"},
        ),
    log:
        "results/logs/figures/categories.log",
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/plot_categories.py"
