# Parallel task data: the synthetic world, or real datasets from local files or the hub.

if config["data"]["source"] == "synthetic":

    rule synthetic_world:
        output:
            tasks=expand("results/data/{task}.parquet", task=TASKS),
            corpus="results/data/pretrain_corpus.txt",
            general="results/data/general_text.txt",
        params:
            synthetic=section("data", "synthetic"),
            tasks=TASKS,
            langs=[lang for lang in LANGS if lang != "en"],
        log:
            "results/logs/data/synthetic_world.log",
        conda:
            "../envs/ramoe.yaml"
        script:
            "../workflow/scripts/synthetic_world.py"

else:

    rule real_task:
        output:
            "results/data/{task}.parquet",
        params:
            loader=get_real_loader,
            test_fraction=config["data"]["real"]["test_fraction"],
            split_seed=config["data"]["real"]["split_seed"],
            langs=get_task_langs,
        log:
            "results/logs/data/real_task/{task}.log",
        conda:
            "../envs/ramoe.yaml"
        script:
            "../workflow/scripts/real_task.py"

    rule pretrain_corpus:
        input:
            expand("results/data/{task}.parquet", task=TASKS),
        output:
            "results/data/pretrain_corpus.txt",
        log:
            "results/logs/data/pretrain_corpus.log",
        conda:
            "../envs/ramoe.yaml"
        script:
            "../workflow/scripts/pretrain_corpus.py"
