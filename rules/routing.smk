# Routing: traces, English-target divergence per layer, the alignment zone and the task experts.


rule trace:
    input:
        data="results/data/{task}.parquet",
        model=get_model_input,
    output:
        tokens="results/traces/{model}/{task}/{lang}.tokens.parquet",
        sequences="results/traces/{model}/{task}/{lang}.sequences.parquet",
    params:
        routing=section("routing"),
        model_source=get_model_source,
        seed=config["seed"],
    threads: config["routing"]["threads"]
    resources:
        runtime=60,
        mem_mb=4000,
    log:
        "results/logs/traces/{model}/{task}/{lang}.log",
    benchmark:
        "results/benchmarks/traces/{model}/{task}/{lang}.tsv"
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/trace.py"


rule trace_general_text:
    input:
        text=get_general_text,
        model=get_model_input,
    output:
        "results/traces/{model}/general_text.sequences.parquet",
    params:
        routing=section("routing"),
        model_source=get_model_source,
        seed=config["seed"],
    threads: config["routing"]["threads"]
    resources:
        runtime=60,
        mem_mb=4000,
    log:
        "results/logs/traces/{model}/general_text.log",
    benchmark:
        "results/benchmarks/traces/{model}/general_text.tsv"
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/trace_general_text.py"


rule divergence:
    input:
        get_sequence_traces,
    output:
        report(
            "results/tables/divergence.csv",
            caption="../workflow/report/divergence_table.rst",
            category="2. Routing",
            labels={"table": "divergence"},
        ),
    params:
        model=MODEL,
        seed=config["routing"]["seed"],
    log:
        "results/logs/tables/divergence.log",
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/divergence.py"


rule alignment_zone:
    input:
        divergence="results/tables/divergence.csv",
        accuracy="results/tables/accuracy_base.csv",
        trace=get_first_sequence_trace,
    output:
        report(
            "results/tables/alignment_zone.csv",
            caption="../workflow/report/alignment_zone_table.rst",
            category="2. Routing",
            labels={"table": "alignment_zone"},
        ),
    params:
        routing=section("routing"),
    log:
        "results/logs/tables/alignment_zone.log",
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/alignment_zone.py"


rule task_experts:
    input:
        traces=get_sequence_traces,
        general=f"results/traces/{MODEL}/general_text.sequences.parquet",
        zone="results/tables/alignment_zone.csv",
    output:
        table=report(
            "results/tables/task_experts.csv",
            caption="../workflow/report/task_experts_table.rst",
            category="2. Routing",
            labels={"table": "task_experts"},
        ),
        languages="results/tables/language_experts.csv",
        masks=expand("results/experts/{model}/{task}.json", model=MODEL, task=TASKS),
    params:
        routing=section("routing"),
        model=MODEL,
        tasks=TASKS,
    log:
        "results/logs/tables/task_experts.log",
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/task_experts.py"


rule plot_routing:
    input:
        divergence="results/tables/divergence.csv",
        accuracy="results/tables/accuracy_base.csv",
        zone="results/tables/alignment_zone.csv",
        experts="results/tables/task_experts.csv",
    output:
        divergence_pdf="results/figures/divergence_by_layer.pdf",
        divergence_png=report(
            "results/figures/divergence_by_layer.png",
            caption="../workflow/report/divergence_by_layer.rst",
            category="2. Routing",
            labels={"figure": "divergence_by_layer"},
        ),
        experts_pdf="results/figures/task_experts.pdf",
        experts_png=report(
            "results/figures/task_experts.png",
            caption="../workflow/report/task_experts.rst",
            category="2. Routing",
            labels={"figure": "task_experts"},
        ),
    params:
        split=config["routing"]["split"],
    log:
        "results/logs/figures/routing.log",
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/plot_routing.py"
