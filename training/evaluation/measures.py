"""Zero-shot AUROC per finding, report -> image retrieval, 2D <-> 3D alignment and embedding spread."""

import numpy as np
import torch

from modeling_unimedi.metrics_unimedi import recall_at_k, recall_at_k_relevant
from modeling_unimedi.zero_shot_unimedi import UniMedIZeroShot

from .data import Encoded
from .statistics import auroc, auroc_with_ci, permutation_p_value, random_hit_probability, rate_against_chance

RECALL_KS = (1, 5)
# Positive and negative prompt ensembles per finding: generic radiology phrasing, written once and never tuned on data.
FINDING_PROMPTS = {
    "nodule": (
        ["There is a pulmonary nodule.", "A nodule is present in the lung.", "Nodular opacity in the lung."],
        ["No pulmonary nodules.", "There is no nodule or mass.", "No nodule is seen."],
    ),
    "pleural_effusion": (
        ["There is a pleural effusion.", "Pleural effusion is present.", "Pleural fluid is seen."],
        ["No pleural effusion.", "There is no pleural fluid.", "No effusion is seen."],
    ),
    "consolidation": (
        ["There is consolidation.", "Airspace consolidation in the lung.", "Focal consolidation is present."],
        ["No focal consolidation.", "There is no consolidation.", "The lungs are clear without consolidation."],
    ),
}


def positive_probability(vision: torch.Tensor, class_embeddings: torch.Tensor, logit_scale: float) -> np.ndarray:
    """Softmax probability of class row 0 (the positive ensemble) against row 1 (the negative one)."""
    logits = logit_scale * vision @ class_embeddings.T
    return logits.softmax(dim=-1)[:, 0].numpy()


def finding_scores(zero_shot: UniMedIZeroShot, vision: torch.Tensor, labels: list[frozenset], prompts=None) -> dict:
    """Per finding: (truth 0/1, zero-shot probability of the positive ensemble) over the samples."""
    prompts = FINDING_PROMPTS if prompts is None else prompts
    logit_scale = float(zero_shot.model.logit_scale.detach().float().exp())
    result = {}
    for finding, (positive, negative) in prompts.items():
        classes = zero_shot.class_embeddings([positive, negative]).cpu()
        truth = np.array([finding in label_set for label_set in labels], dtype=int)
        result[finding] = (truth, positive_probability(vision, classes, logit_scale))
    return result


def zero_shot_aurocs(zero_shot: UniMedIZeroShot, vision: torch.Tensor, labels: list[frozenset], prompts=None) -> dict:
    """AUROC per finding (one vs rest) and their mean over the findings where it is defined."""
    return aurocs_of(finding_scores(zero_shot, vision, labels, prompts))


def aurocs_of(scores: dict) -> dict:
    """AUROC per finding of `finding_scores` and their mean over the findings where it is defined."""
    result = {finding: auroc(truth, probability) for finding, (truth, probability) in scores.items()}
    return {**result, "mean": _mean_defined(result.values())}


def auroc_statistics(scores: dict) -> dict:
    """Per finding of `finding_scores`: AUROC with its bootstrap 95 % interval and p-value against chance (50)."""
    return {finding: auroc_with_ci(truth, probability) for finding, (truth, probability) in scores.items()}


def _mean_defined(values) -> float | None:
    defined = [value for value in values if value is not None]
    return float(np.mean(defined)) if defined else None


def same_text(reports: list[str]) -> torch.Tensor:
    """(n, n) bool: report i and report j are the same text (whitespace-insensitive)."""
    keys = [" ".join(report.split()) for report in reports]
    index = {key: position for position, key in enumerate(dict.fromkeys(keys))}
    ids = torch.tensor([index[key] for key in keys])
    return ids[:, None] == ids[None, :]


def retrieval_recalls(encoded: Encoded, reports: list[str], ks=RECALL_KS) -> dict:
    """Report -> image Recall@k, strict and same-text, with each one's random-ranking expectation."""
    similarity = encoded.reports @ encoded.vision.T
    relevant = same_text(reports)
    count = len(reports)
    result = {"num_queries": count, "queries_with_duplicate_text": int((relevant.sum(dim=1) > 1).sum())}
    for k in ks:
        k_used = min(k, count)
        strict = recall_at_k(similarity, k_used)
        same = recall_at_k_relevant(similarity, relevant, k_used)
        same_chance = [random_hit_probability(count, int(n), k_used) for n in relevant.sum(1)]
        strict_test = rate_against_chance(round(strict * count), [k_used / count] * count)
        same_test = rate_against_chance(round(same * count), same_chance)
        result[f"R@{k}"] = {
            "strict": strict,
            "same_text": same,
            "random_strict": k_used / count,
            "random_same_text": float(np.mean(same_chance)),
            "strict_ci": strict_test["ci"],
            "same_text_ci": same_test["ci"],
            "p_strict": strict_test["p_vs_random"],
            "p_same_text": same_test["p_vs_random"],
        }
    return result


def nearest_neighbour_agreement(queries, candidates, query_labels, candidate_labels) -> dict:
    """How often each query's most similar candidate has the same label set, its exact 95 % interval, the rate of a
    random candidate, and the permutation p-value (candidates' label sets shuffled, neighbours kept) of reaching the
    rate without embeddings that carry the findings."""
    nearest = (queries @ candidates.T).argmax(dim=1).numpy()
    names = {labels: index for index, labels in enumerate(dict.fromkeys([*query_labels, *candidate_labels]))}
    query_ids = np.array([names[labels] for labels in query_labels])
    candidate_ids = np.array([names[labels] for labels in candidate_labels])

    def agreement(ids: np.ndarray) -> float:
        return float(np.mean(query_ids == ids[nearest]))

    rate = agreement(candidate_ids)
    chance = [np.mean(candidate_ids == query_id) for query_id in query_ids]
    result = rate_against_chance(round(rate * len(query_ids)), chance)
    return {"rate": rate, "ci": result["ci"], "random_rate": result["random_rate"],
            "p_permutation": permutation_p_value(agreement, candidate_ids, rate)}  # fmt: skip


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float | None:
    """Mean cosine between distinct rows of normalised embeddings: near 1 means they have collapsed to one point."""
    count = len(embeddings)
    if count < 2:
        return None
    total = (embeddings.sum(dim=0) ** 2).sum() - (embeddings**2).sum()
    return float(total / (count * (count - 1)))
