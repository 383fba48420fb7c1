# The comparison of methods: per-seed accuracies with intervals, RA-MoE against SFT, figures.


rule main_results:
    input:
        base=get_base_evaluations,
        steering=expand("results/eval/{model}/steering/{task}.parquet", model=MODEL, task=TASKS),
        finetuned=get_finetuned_evaluations,
        categories="results/tables/categories.csv",
    output:
        main=report(
            "results/tables/main_results.csv",
            caption="../workflow/report/main_results_table.rst",
            category="3. Results",
            labels={"table": "main_results"},
        ),
        summary=report(
            "results/tables/method_summary.csv",
            caption="../workflow/report/method_summary.rst",
            category="3. Results",
            labels={"table": "method_summary"},
        ),
        gain=report(
            "results/tables/ci_vs_gain.csv",
            caption="../workflow/report/ci_vs_gain_table.rst",
            category="3. Results",
            labels={"table": "ci_vs_gain"},
        ),
    params:
        analysis=section("analysis"),
    log:
        "results/logs/tables/main_results.log",
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/main_results.py"


rule plot_results:
    input:
        summary="results/tables/method_summary.csv",
        gain="results/tables/ci_vs_gain.csv",
    output:
        main_pdf="results/figures/main_results.pdf",
        main_png=report(
            "results/figures/main_results.png",
            caption="../workflow/report/main_results.rst",
            category="3. Results",
            labels={"figure": "main_results"},
        ),
        gain_pdf="results/figures/ci_vs_gain.pdf",
        gain_png=report(
            "results/figures/ci_vs_gain.png",
            caption="../workflow/report/ci_vs_gain.rst",
            category="3. Results",
            labels={"figure": "ci_vs_gain"},
        ),
    log:
        "results/logs/figures/results.log",
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/plot_results.py"
