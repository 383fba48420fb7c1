# Stage 3: fine-tune per (method, seed, task, target language), then evaluate every checkpoint on
# the test items of its language and of English. Routing Steering evaluates the base model.


rule finetune:
    input:
        unpack(get_finetune_inputs),
    output:
        directory("results/checkpoints/{model}/{method}/seed{seed}/{task}/{lang}"),
    params:
        settings=get_finetune_settings,
        routing=section("routing"),
        model_source=get_model_source,
    threads: config["finetune"]["threads"]
    resources:
        runtime=120,
        mem_mb=4000,
    log:
        "results/logs/checkpoints/{model}/{method}/seed{seed}/{task}/{lang}.log",
    benchmark:
        "results/benchmarks/checkpoints/{model}/{method}/seed{seed}/{task}/{lang}.tsv"
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/finetune.py"


rule evaluate_finetuned:
    input:
        data="results/data/{task}.parquet",
        checkpoints=get_task_checkpoints,
    output:
        "results/eval/{model}/{method}/seed{seed}/{task}.parquet",
    params:
        evaluation=section("evaluation"),
        dtype=config["model"]["dtype"],
        langs=get_target_langs,
    threads: config["evaluation"]["threads"]
    resources:
        runtime=60,
        mem_mb=4000,
    log:
        "results/logs/eval/{model}/{method}/seed{seed}/{task}.log",
    benchmark:
        "results/benchmarks/eval/{model}/{method}/seed{seed}/{task}.tsv"
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/evaluate_finetuned.py"


rule evaluate_steering:
    input:
        data="results/data/{task}.parquet",
        model=get_model_input,
        experts="results/experts/{model}/{task}.json",
    output:
        "results/eval/{model}/steering/{task}.parquet",
    params:
        evaluation=section("evaluation"),
        steering=section("steering"),
        model_source=get_model_source,
        langs=get_task_langs,
    threads: config["evaluation"]["threads"]
    resources:
        runtime=60,
        mem_mb=4000,
    log:
        "results/logs/eval/{model}/steering/{task}.log",
    benchmark:
        "results/benchmarks/eval/{model}/steering/{task}.tsv"
    conda:
        "../envs/ramoe.yaml"
    script:
        "../workflow/scripts/evaluate_steering.py"
