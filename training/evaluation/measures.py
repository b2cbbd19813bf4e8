"""Zero-shot AUROC per finding, report -> image retrieval, 2D <-> 3D alignment and embedding spread."""

import numpy as np
import torch

from modeling_unimedi.metrics_unimedi import recall_at_k, recall_at_k_relevant
from modeling_unimedi.zero_shot_unimedi import UniMedIZeroShot

from .data import Encoded
from .statistics import auroc, random_hit_probability

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


def zero_shot_aurocs(zero_shot: UniMedIZeroShot, vision: torch.Tensor, labels: list[frozenset], prompts=None) -> dict:
    """AUROC per finding (one vs rest) and their mean over the findings where it is defined."""
    prompts = FINDING_PROMPTS if prompts is None else prompts
    logit_scale = float(zero_shot.model.logit_scale.detach().float().exp())
    result = {}
    for finding, (positive, negative) in prompts.items():
        classes = zero_shot.class_embeddings([positive, negative]).cpu()
        truth = np.array([finding in label_set for label_set in labels], dtype=int)
        result[finding] = auroc(truth, positive_probability(vision, classes, logit_scale))
    return {**result, "mean": _mean_defined(result.values())}


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
        result[f"R@{k}"] = {
            "strict": recall_at_k(similarity, k_used),
            "same_text": recall_at_k_relevant(similarity, relevant, k_used),
            "random_strict": k_used / count,
            "random_same_text": float(
                np.mean([random_hit_probability(count, int(n), k_used) for n in relevant.sum(1)])
            ),
        }
    return result


def nearest_neighbour_agreement(queries, candidates, query_labels, candidate_labels) -> dict:
    """How often each query's most similar candidate has the same label set, and the rate of a random candidate."""
    nearest = (queries @ candidates.T).argmax(dim=1).tolist()
    agreement = [query_labels[i] == candidate_labels[j] for i, j in enumerate(nearest)]
    chance = [np.mean([label == other for other in candidate_labels]) for label in query_labels]
    return {"rate": float(np.mean(agreement)), "random_rate": float(np.mean(chance))}


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float | None:
    """Mean cosine between distinct rows of normalised embeddings: near 1 means they have collapsed to one point."""
    count = len(embeddings)
    if count < 2:
        return None
    total = (embeddings.sum(dim=0) ** 2).sum() - (embeddings**2).sum()
    return float(total / (count * (count - 1)))
