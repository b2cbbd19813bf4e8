"""Slice selection against the ground truth: do the slabs Eq. 1-2 scores highest hold the CT's lesions?"""

import math
from collections import Counter

import numpy as np
import torch

from modeling_unimedi.pretraining_unimedi import top_k_indices
from processing.groundtruth.reports import FINDING_NAMES

from .statistics import hit_statistics

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


def slice_selection(scores: torch.Tensor, metadata: list[dict], num_selected: int) -> dict:
    """Hit statistics per lesion kind (any lesion, then each finding) and per k of `selection_ks`.

    Also per k: the model's most common selection and its share of CTs, and (per row) the hit rate of making that one
    selection for every CT. A model that always picks the same slabs only has a position prior; that baseline shows
    how much of its hit rate the prior alone explains (the most common selection is read from the model's outputs,
    never from the labels).
    """
    num_slabs = scores.shape[1]
    targets = [lesion_slabs(item, num_slabs) for item in metadata]
    rules, rows = {}, []
    for rule, k in selection_ks(num_selected, num_slabs).items():
        chosen = [frozenset(row.tolist()) for row in top_k_indices(scores, k)]
        (most_common, count), *_ = Counter(chosen).most_common(1)
        rules[rule] = {"k": k, "most_common_selection": sorted(most_common), "most_common_share": count / len(chosen)}
        for kind in (ANY_LESION, *FINDING_NAMES):
            having = [i for i, target in enumerate(targets) if kind in target]
            if having:
                stats = hit_statistics([chosen[i] for i in having], [targets[i][kind] for i in having], num_slabs, k)
                same_slabs = np.mean([bool(most_common & targets[i][kind]) for i in having])
                rows.append({"lesion": kind, "rule": rule, "k": k, **stats, "same_slabs_hit_rate": float(same_slabs)})
    return {"num_slabs": num_slabs, "rules": rules, "rows": rows}
