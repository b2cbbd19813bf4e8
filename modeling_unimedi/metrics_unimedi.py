"""Retrieval metrics on a (num_queries, num_candidates) similarity matrix: the pure functions the zero-shot module and
the evaluation scripts share. Ties count against the query (a candidate scoring exactly as high as a relevant one
ranks before it), so a constant similarity matrix never scores a perfect recall.
"""

import math

import torch


def recall_at_k(similarity: torch.Tensor, k: int) -> float:
    """Share of queries whose positive is among the k most similar candidates.

    `similarity` is (num_queries, num_candidates) and the i-th query's positive is the i-th candidate (so
    num_queries <= num_candidates; extra candidates are distractors). For the other direction pass `similarity.T`.
    Ties count against the query: a candidate scoring exactly as high as the positive ranks before it, so a constant
    similarity matrix does not score a perfect recall.
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (num_queries, num_candidates), got shape {tuple(similarity.shape)}")
    num_queries, num_candidates = similarity.shape
    if num_queries == 0 or num_queries > num_candidates:
        raise ValueError(
            f"similarity has {num_queries} queries and {num_candidates} candidates; the i-th query's positive is the "
            "i-th candidate, so there must be at least one query and no more queries than candidates"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not torch.isfinite(similarity).all():
        raise ValueError("similarity holds NaN or infinite values")
    diagonal = torch.eye(num_queries, num_candidates, dtype=torch.bool, device=similarity.device)
    return recall_at_k_relevant(similarity, diagonal, k)


def recall_at_k_relevant(similarity: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Share of queries with a relevant candidate among the k most similar; `relevant` is a bool matrix of the
    similarity's shape with at least one relevant candidate per query (`recall_at_k` when only the diagonal is)."""
    if similarity.shape != relevant.shape or not relevant.any(dim=1).all():
        raise ValueError("relevant must have the similarity's shape and at least one relevant candidate per query")
    best_relevant = similarity.masked_fill(~relevant, -math.inf).max(dim=1).values
    rivals = ((similarity >= best_relevant[:, None]) & ~relevant).sum(dim=1)  # at least as similar, not relevant
    return (rivals < k).float().mean().item()


__all__ = ["recall_at_k", "recall_at_k_relevant"]
