"""Statistics of the evaluation: AUROC (scikit-learn), exact hit rates of random selection and their tail
probabilities, so every measured rate stands next to what chance gives on the same data."""

import math

import numpy as np
from sklearn.metrics import roc_auc_score


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when the labels hold one class only (AUROC undefined)."""
    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else None


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


def hit_statistics(selected: list[set[int]], targets: list[set[int]], num_slabs: int, k: int) -> dict:
    """Hit rate of the selections against the lesion slabs, the exact expectation of k random slabs, and the
    one-sided chance that random selection hits at least as many CTs (p-value)."""
    hits = sum(bool(chosen & target) for chosen, target in zip(selected, targets))
    random_rates = [random_hit_probability(num_slabs, len(target), k) for target in targets]
    return {
        "cts": len(targets),
        "hits": hits,
        "hit_rate": hits / len(targets),
        "random_hit_rate": float(np.mean(random_rates)),
        "p_value": poisson_binomial_tail(random_rates, hits),
    }
