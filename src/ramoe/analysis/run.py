"""Entry points of the results rules: the main tables and their figures."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl

from ramoe.analysis.figures import plot_ci_vs_gain, plot_main_results
from ramoe.analysis.results import ci_vs_gain, main_results, method_summary
from ramoe.evaluation.run import read_provenance
from ramoe.io import run_metadata
from ramoe.tables import write_table

log = logging.getLogger(__name__)

# The per-example columns the result tables need; base files lack train_lang.
COLUMNS = ("model", "method", "seed", "task", "lang", "train_lang", "split", "item_id", "correct", "parse_failure")


def read_examples(paths: Sequence[str | Path]) -> pl.DataFrame:
    """Test rows of every per-example file, with train_lang null where a file has none."""
    frames = []
    for path in paths:
        frame = pl.read_parquet(path)
        if "train_lang" not in frame.columns:
            frame = frame.with_columns(train_lang=pl.lit(None, dtype=pl.String))
        frames.append(frame.filter(pl.col("split") == "test").select(COLUMNS))
    return pl.concat(frames, how="vertical")


def write_results(
    example_paths: Sequence[str | Path],
    categories_path: str | Path,
    *,
    main_path: str | Path,
    summary_path: str | Path,
    gain_path: str | Path,
    settings: Mapping,
) -> pl.DataFrame:
    """Write main_results.csv (per seed), method_summary.csv (over seeds) and ci_vs_gain.csv."""
    examples = read_examples(example_paths)
    boot, perms, seed = settings["bootstrap"], settings["permutations"], settings["seed"]
    provenance = run_metadata(seed=seed, analysis=dict(settings),
                              model_revision=read_provenance(example_paths[0]).get("model_revision"))

    main = main_results(examples, n_boot=boot, seed=seed)
    write_table(main, main_path, provenance)
    summary = method_summary(examples, n_boot=boot, seed=seed)
    write_table(summary, summary_path, provenance)
    log.info("test accuracy by method (mean over seeds):\n%s",
             summary.select("task", "lang", "train_lang", "method", "n_seeds", "accuracy", "ci_low", "ci_high"))

    methods = set(examples["method"].unique().to_list())
    if {"sft", "ramoe"} <= methods:
        gain = ci_vs_gain(examples, pl.read_csv(categories_path), n_boot=boot, n_perm=perms, seed=seed)
        for row in gain.iter_rows(named=True):
            log.info("%s/%s: ci share %.2f (%d ci items), RA-MoE - SFT = %+.3f [%+.3f, %+.3f], p = %.3g", row["task"],
                     row["lang"], row["ci_share"], row["n_ci"], row["gain"], row["gain_ci_low"], row["gain_ci_high"],
                     row["p_value"])
        if gain.height:
            log.info("correlation of ci share with gain across %d task-language pairs: Pearson %.3f, Spearman %.3f",
                     gain["n_pairs"][0], gain["pearson_r"][0], gain["spearman_r"][0])
    else:
        log.warning("finetune.methods lacks sft or ramoe, so ci_vs_gain.csv has no rows.")
        gain = pl.DataFrame(schema={"model": pl.String, "task": pl.String, "lang": pl.String, "ci_share": pl.Float64,
                                    "gain": pl.Float64})
    write_table(gain, gain_path, provenance)
    return main


def plot_results(summary_path, gain_path, *, main_pdf, main_png, gain_pdf, gain_png) -> None:
    plot_main_results(pl.read_csv(summary_path), main_pdf, main_png)
    plot_ci_vs_gain(pl.read_csv(gain_path), gain_pdf, gain_png)
