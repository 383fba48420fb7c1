"""Bootstrap confidence intervals, a paired sign-flip permutation test and correlations, in numpy.

Every random function takes a seed, so the same per-example results always give the same table.
Inputs are per-item scores: shape (items,) or (items, seeds), usually 0/1 correctness. Items are
the unit of resampling because seeds of one method share the same test items.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

# Resamples are drawn in blocks of at most this many indices (16 MB as int64),
# so that memory stays bounded for large test sets.
MAX_BLOCK_CELLS = 2_000_000


def _item_means(values: np.ndarray, name: str) -> np.ndarray:
    """Return the per-item mean over seeds, shape (items,), after checking shape and values."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} has shape {array.shape}; pass shape (items,) or (items, seeds).")
    if array.size == 0:
        raise ValueError(f"{name} has shape {array.shape} and is empty; pass at least one item and one seed.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values; drop or fill those cells before the comparison.")
    # Every row has the same number of seeds, so the mean over all cells of a set of rows
    # equals the mean of their row means.
    return array if array.ndim == 1 else array.mean(axis=1)


def _check_settings(level: float, **counts: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} is not a confidence level; pass a value strictly between 0 and 1, e.g. 0.95.")
    for name, count in counts.items():
        if count < 1:
            raise ValueError(f"{name}={count} is invalid; pass a positive number of resamples.")


def _block_sizes(total: int, n_items: int) -> list[int]:
    """Split ``total`` resamples into blocks of at most MAX_BLOCK_CELLS / n_items rows each."""
    block = max(1, MAX_BLOCK_CELLS // n_items)
    return [min(block, total - start) for start in range(0, total, block)]


def _bootstrap_interval(
    item_scores: np.ndarray, n_boot: int, level: float, rng: np.random.Generator
) -> tuple[float, float, float]:
    """Mean of ``item_scores`` (items,) and its percentile bootstrap interval over items."""
    mean = float(item_scores.mean())
    if item_scores.size == 1 or np.ptp(item_scores) == 0.0:
        # No resample can differ from the data. Returning early keeps the interval exactly
        # zero-width, because summing repeated floats could otherwise shift it by rounding.
        return mean, mean, mean

    n_items = item_scores.size
    means = np.concatenate([
        item_scores[rng.integers(0, n_items, size=(rows, n_items))].mean(axis=1)
        for rows in _block_sizes(n_boot, n_items)
    ])
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return mean, float(low), float(high)


def bootstrap_mean_ci(
    values: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Compute the mean and its percentile bootstrap confidence interval, resampling items.

    ``values`` is (items,) or (items, seeds). For 2-D input whole rows are resampled and the
    statistic is the mean over all cells of the resampled rows, which equals the mean of the
    per-item seed means. Returns (mean, low, high). A single item or constant values give
    (v, v, v). Raises ValueError for empty or non-finite input and for an invalid ``level``
    or ``n_boot``.
    """
    _check_settings(level, n_boot=n_boot)
    item_scores = _item_means(values, "values")
    return _bootstrap_interval(item_scores, n_boot, level, np.random.default_rng(seed))


def _sign_flip_p_value(differences: np.ndarray, n_perm: int, rng: np.random.Generator) -> float:
    """Two-sided p-value of a paired sign-flip permutation test of mean(differences) == 0.

    Uses the +1 correction, (1 + #{|permuted mean| >= |observed mean|}) / (1 + n_perm), so the
    p-value is never 0 and stays valid for a Monte Carlo sample of the sign flips.
    """
    if np.all(differences == 0.0):
        return 1.0
    observed = abs(float(differences.mean()))
    # Different sign patterns can give the same mean up to float rounding, and these ties
    # must count as "at least as extreme".
    threshold = observed - 1e-12 * max(1.0, observed)
    n_items = differences.size
    extreme = 0
    for rows in _block_sizes(n_perm, n_items):
        signs = rng.integers(0, 2, size=(rows, n_items)).astype(np.float64) * 2.0 - 1.0
        extreme += int(np.count_nonzero(np.abs(signs @ differences) / n_items >= threshold))
    return (1.0 + extreme) / (1.0 + n_perm)


def paired_difference(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = 2000,
    n_perm: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Compare two methods evaluated on the same items and return the mean difference a - b.

    ``a`` and ``b`` are (items,) or (items, seeds) scores with the same shape and the same item
    order. Per item d_i = mean over seeds of a minus mean over seeds of b. Returns a dict with
    ``diff`` (mean of d_i), ``ci_low`` and ``ci_high`` (percentile bootstrap over items),
    ``p_value`` (two-sided sign-flip permutation test on d_i with the +1 correction, 1.0 when
    every d_i is 0) and ``n_items``. Bootstrap and permutations draw from separate streams
    derived from ``seed``. Raises ValueError when the shapes differ.
    """
    a_array = np.asarray(a, dtype=np.float64)
    b_array = np.asarray(b, dtype=np.float64)
    if a_array.shape != b_array.shape:
        raise ValueError(
            f"a has shape {a_array.shape} but b has shape {b_array.shape}; pass both methods on the same "
            "items (rows) and seeds (columns), in the same order."
        )
    _check_settings(level, n_boot=n_boot, n_perm=n_perm)
    differences = _item_means(a_array, "a") - _item_means(b_array, "b")

    boot_seed, perm_seed = np.random.SeedSequence(seed).spawn(2)
    diff, low, high = _bootstrap_interval(differences, n_boot, level, np.random.default_rng(boot_seed))
    p_value = _sign_flip_p_value(differences, n_perm, np.random.default_rng(perm_seed))
    return {"diff": diff, "ci_low": low, "ci_high": high, "p_value": p_value, "n_items": int(differences.size)}


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, where tied values share the mean of their ranks (as Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    # A block of tied values at sorted positions first .. first + count - 1 gets rank first + (count + 1) / 2.
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx = x - x.mean()
    dy = y - y.mean()
    denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip(np.sum(dx * dy) / denominator, -1.0, 1.0))


def correlation(x: np.ndarray, y: np.ndarray) -> dict:
    """Compute Pearson's r and Spearman's rho (with average ranks for ties) of paired values.

    Pairs where either value is NaN or infinite are dropped, and ``n`` counts the pairs used.
    Returns {'pearson': r, 'spearman': rho, 'n': n}. With fewer than 3 pairs both coefficients
    are NaN, because any 2 distinct points give r = +-1, which carries no information.
    A constant x or y also gives NaN, because the coefficient divides by its zero spread.
    Raises ValueError when x and y have different lengths.
    """
    x_array = np.asarray(x, dtype=np.float64).ravel()
    y_array = np.asarray(y, dtype=np.float64).ravel()
    if x_array.shape != y_array.shape:
        raise ValueError(f"x has {x_array.size} values but y has {y_array.size}; pass one y per x.")
    finite = np.isfinite(x_array) & np.isfinite(y_array)
    if not finite.all():
        log.warning("correlation drops %d of %d pairs with NaN or infinite values", int((~finite).sum()), finite.size)
    x_array, y_array = x_array[finite], y_array[finite]

    n = int(x_array.size)
    if n < 3:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": n}
    return {
        "pearson": _pearson(x_array, y_array),
        "spearman": _pearson(_average_ranks(x_array), _average_ranks(y_array)),
        "n": n,
    }
