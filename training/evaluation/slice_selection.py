"""Slice selection against the ground truth: do the slabs Eq. 1-2 scores highest hold the CT's lesions?"""

import itertools
import math
from collections import Counter

import numpy as np
import torch

from modeling_unimedi.slices_unimedi import top_k_indices
from processing.groundtruth.reports import FINDING_NAMES

from .statistics import binomial_ci, hit_statistics, mcnemar_exact

ANY_LESION = "any_lesion"
SELECTION_SHARE = 0.2  # the authors' LUNA16 check kept the top 20 % of slices


def lesion_slabs(metadata: dict, num_model_slabs: int) -> dict[str, set[int]]:
    """Model depth slabs holding each finding's lesions (and any lesion), from the generator's slab annotation.

    The generator and the model cut the same depth into equal slabs (``num_slabs`` vs the model's depth tokens);
    model slab j holds generator slab s when their depth intervals overlap. Lesions outside the grid have no slabs.
    """
    generator_slabs = metadata["num_slabs"]
    by_finding: dict[str, set[int]] = {}
    for lesion in metadata.get("lesions", []):
        slabs = {
            model_slab
            for slab in lesion["slabs"]
            for model_slab in range(num_model_slabs)
            if model_slab * generator_slabs < (slab + 1) * num_model_slabs
            and slab * num_model_slabs < (model_slab + 1) * generator_slabs
        }
        if slabs:
            by_finding.setdefault(lesion["finding"], set()).update(slabs)
            by_finding.setdefault(ANY_LESION, set()).update(slabs)
    return by_finding


def selection_ks(num_selected: int, num_slabs: int) -> dict[str, int]:
    """The k values to test: the model's configured k (when > 0) and the top 20 % (rounded, at least one slab), as
    one rule when they are the same k."""
    top_share = max(1, math.floor(SELECTION_SHARE * num_slabs + 0.5))
    if num_selected == top_share:
        return {"configured_and_top_20_percent": top_share}
    return ({"configured": num_selected} if num_selected > 0 else {}) | {"top_20_percent": top_share}


def best_constant_selection(targets: list[set[int]], num_slabs: int, k: int) -> frozenset[int]:
    """The k slabs that, given to every CT, hit the most of these lesion slab sets (ties: the lowest slabs)."""
    options = [frozenset(option) for option in itertools.combinations(range(num_slabs), k)]
    return max(options, key=lambda option: sum(bool(option & target) for target in targets))


def constant_baseline(slabs: frozenset[int], targets: list[set[int]], model_hits: list[bool]) -> dict:
    """Hit rate (exact interval) of giving every CT ``slabs``, and McNemar's exact one-sided p-value that the
    model's per-CT selection hits more often on the same CTs."""
    hits = [bool(slabs & target) for target in targets]
    versus = mcnemar_exact(model_hits, hits)
    return {"slabs": sorted(slabs), "hit_rate": sum(hits) / len(hits), "ci": binomial_ci(sum(hits), len(hits)),
            "p_model_better": versus["p_value"], "model_only_hits": versus["only_first"],
            "constant_only_hits": versus["only_second"]}  # fmt: skip


def slice_selection(
    scores: torch.Tensor, metadata: list[dict], num_selected: int, train_metadata: list[dict] | None = None
) -> dict:
    """Hit statistics per lesion kind (any lesion, then each finding) and per k of `selection_ks`.

    Also per k: the model's most common selection and its share of CTs, and (per row) the hit rate of making that one
    selection for every CT. A model that always picks the same slabs only has a position prior; that baseline shows
    how much of its hit rate the prior alone explains (the most common selection is read from the model's outputs,
    never from the labels). Two constant-slab baselines per row, each with McNemar's test of the model against it:
    ``train_constant``, the best k slabs on ``train_metadata``'s CTs (a prior anyone could learn from the training
    labels; absent without them), and ``test_optimal_constant``, the best k slabs on these CTs (an upper bound no
    constant rule can beat).
    """
    num_slabs = scores.shape[1]
    targets = [lesion_slabs(item, num_slabs) for item in metadata]
    train_targets = [lesion_slabs(item, num_slabs) for item in train_metadata or []]
    rules, rows = {}, []
    for rule, k in selection_ks(num_selected, num_slabs).items():
        chosen = [frozenset(row.tolist()) for row in top_k_indices(scores, k)]
        (most_common, count), *_ = Counter(chosen).most_common(1)
        rules[rule] = {"k": k, "most_common_selection": sorted(most_common), "most_common_share": count / len(chosen)}
        for kind in (ANY_LESION, *FINDING_NAMES):
            having = [i for i, target in enumerate(targets) if kind in target]
            if not having:
                continue
            kind_targets = [targets[i][kind] for i in having]
            stats = hit_statistics([chosen[i] for i in having], kind_targets, num_slabs, k)
            model_hits = [bool(chosen[i] & targets[i][kind]) for i in having]
            same_slabs = np.mean([bool(most_common & target) for target in kind_targets])
            row = {"lesion": kind, "rule": rule, "k": k, **stats, "same_slabs_hit_rate": float(same_slabs)}
            train_kind = [target[kind] for target in train_targets if kind in target]
            if train_kind:
                train_best = best_constant_selection(train_kind, num_slabs, k)
                row["train_constant"] = constant_baseline(train_best, kind_targets, model_hits)
            test_best = best_constant_selection(kind_targets, num_slabs, k)
            row["test_optimal_constant"] = constant_baseline(test_best, kind_targets, model_hits)
            rows.append(row)
    return {"num_slabs": num_slabs, "rules": rules, "rows": rows}
