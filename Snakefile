# RA-MoE: routing-aligned fine-tuning of Mixture-of-Experts LLMs.
#
# Data flow (every path below results/):
#   data/{task}.parquet                         parallel task examples, all languages
#   models/{model}/                             pretrained tiny MoE (model.source: pretrain)
#   eval/{model}/base/{task}/{lang}.parquet     per-example base-model correctness
#   categories/{model}/{task}.parquet           cc/ci/ic/ii per train item and target language
#   traces/{model}/{task}/{lang}.*.parquet      routing traces (token top-k, per-sequence distributions)
#   experts/{model}/{task}.json                 task-expert mask and alignment zone, read by fine-tuning
#   checkpoints/{model}/{method}/seed{seed}/{task}/{lang}/   fine-tuned models (sft, ramoe, rise)
#   eval/{model}/{method}/seed{seed}/{task}.parquet          their test results, target language and English
#   eval/{model}/steering/{task}.parquet                     Routing Steering of the base model
#   tables/*.csv, figures/*.{pdf,png}           the paper's tables and figures
# Logs mirror output paths under results/logs/, timings under results/benchmarks/.

from snakemake.utils import min_version

min_version("9.27")


# config.yaml is the default. A --configfile on the command line replaces it instead of being
# merged over it, so a preset never inherits keys it does not set; --config KEY=VALUE alone
# still edits the default.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/evaluate.smk"
include: "rules/categories.smk"
include: "rules/routing.smk"
include: "rules/finetune.smk"
include: "rules/results.smk"


rule all:
    input:
        get_final_outputs(),
