"""Result tables, statistics and figures that compare the fine-tuning and steering methods."""
