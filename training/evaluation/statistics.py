"""Statistics of the evaluation: AUROC with a bootstrap confidence interval and its chance p-value (scikit-learn,
scipy), exact hit rates of random selection and their tail probabilities, exact binomial intervals, McNemar's exact
test for paired hit/miss outcomes and permutation p-values, so every measured rate stands next to what chance gives on
the same data, with its uncertainty. Every random draw here uses a fixed seed: the same embeddings give the same
intervals."""

import math

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000
PERMUTATIONS = 2000
SEED = 0


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when the labels hold one class only (AUROC undefined)."""
    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else None


def auroc_with_ci(labels: np.ndarray, scores: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES) -> dict | None:
    """AUROC, its percentile bootstrap interval (cases resampled with a fixed seed, resamples holding one class
    skipped; each resample's AUROC from the Mann-Whitney rank sum, equal to scikit-learn's), and the one-sided p-value against chance (0.5) from the Mann-Whitney U test, whose statistic is
    AUROC x positives x negatives. None when AUROC is undefined."""
    value = auroc(labels, scores)
    if value is None:
        return None
    drawn = np.random.default_rng(SEED).integers(len(labels), size=(resamples, len(labels)))
    truth, ranks = labels[drawn], stats.rankdata(scores[drawn], axis=1)  # all resamples at once
    positives = truth.sum(axis=1)
    negatives = len(labels) - positives
    defined = (positives > 0) & (negatives > 0)
    rank_sums = (ranks * truth).sum(axis=1)[defined]  # Mann-Whitney: AUROC from the positives' rank sum
    replicates = (rank_sums - positives[defined] * (positives[defined] + 1) / 2) / (
        positives[defined] * negatives[defined]
    )
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    chance = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0], alternative="greater")
    return {"auroc": value, "ci": [float(low), float(high)], "p_vs_chance": float(chance.pvalue),
            "positives": int(labels.sum()), "negatives": int(len(labels) - labels.sum())}  # fmt: skip


def binomial_ci(successes: int, trials: int) -> list[float]:
    """Exact (Clopper-Pearson) interval of a rate."""
    interval = stats.binomtest(successes, trials).proportion_ci(confidence_level=CONFIDENCE, method="exact")
    return [float(interval.low), float(interval.high)]


def random_hit_probability(num_items: int, num_relevant: int, k: int) -> float:
    """Exact chance that k of num_items drawn without replacement include one of num_relevant (hypergeometric)."""
    if not 0 <= num_relevant <= num_items or k < 0:
        raise ValueError(f"need 0 <= num_relevant <= num_items and k >= 0, got {num_relevant}, {num_items}, {k}")
    return 1.0 - math.comb(num_items - num_relevant, k) / math.comb(num_items, k)


def poisson_binomial_tail(probabilities, hits: int) -> float:
    """P(at least `hits` successes) for independent trials with these success probabilities."""
    distribution = np.array([1.0])
    for probability in probabilities:
        distribution = np.convolve(distribution, [1.0 - probability, probability])
    return float(distribution[hits:].sum())


def rate_against_chance(successes: int, chance_probabilities) -> dict:
    """A rate of independent successes (one trial per chance probability) with its exact interval, next to the
    chance rate (the mean of each trial's success probability under chance) and the one-sided exact
    (Poisson-binomial) p-value of reaching it by chance."""
    trials = len(chance_probabilities)
    return {"rate": successes / trials, "ci": binomial_ci(successes, trials), "n": trials,
            "random_rate": float(np.mean(chance_probabilities)),
            "p_vs_random": poisson_binomial_tail(chance_probabilities, successes)}  # fmt: skip


def mcnemar_exact(first: list[bool], second: list[bool]) -> dict:
    """Exact McNemar test that ``first`` succeeds more often than ``second`` on the same cases: among the discordant
    cases, ``first``-only successes against a fair coin (one-sided binomial)."""
    only_first = sum(a and not b for a, b in zip(first, second))
    only_second = sum(b and not a for a, b in zip(first, second))
    discordant = only_first + only_second
    p_value = stats.binomtest(only_first, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    return {"only_first": only_first, "only_second": only_second, "p_value": float(p_value)}


def welch_greater_p(higher: list[float], lower: list[float]) -> float | None:
    """One-sided Welch t-test that ``higher``'s values (e.g. one run's result per training seed) exceed ``lower``'s;
    None below two values each or without any spread, where the test is undefined."""
    if min(len(higher), len(lower)) < 2 or (np.ptp(higher) == 0 and np.ptp(lower) == 0):
        return None
    return float(stats.ttest_ind(higher, lower, equal_var=False, alternative="greater").pvalue)


def permutation_p_value(statistic, labels: np.ndarray, observed: float, permutations: int = PERMUTATIONS) -> float:
    """One-sided p-value of ``observed`` = ``statistic(labels)`` against ``statistic`` of the labels randomly
    reassigned (fixed seed), with the +1 correction that keeps it valid."""
    rng = np.random.default_rng(SEED)
    at_least = sum(statistic(rng.permutation(labels)) >= observed for _ in range(permutations))
    return (1 + at_least) / (1 + permutations)


def hit_statistics(selected: list[set[int]], targets: list[set[int]], num_slabs: int, k: int) -> dict:
    """Hit rate of the selections against the lesion slabs with its exact interval, the exact expectation of k random
    slabs, and the one-sided chance that random selection hits at least as many CTs (p-value)."""
    hits = sum(bool(chosen & target) for chosen, target in zip(selected, targets))
    against = rate_against_chance(hits, [random_hit_probability(num_slabs, len(target), k) for target in targets])
    return {
        "cts": len(targets),
        "hits": hits,
        "hit_rate": against["rate"],
        "ci": against["ci"],
        "random_hit_rate": against["random_rate"],
        "p_value": against["p_vs_random"],
    }
