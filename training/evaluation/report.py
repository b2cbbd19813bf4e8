"""Plain-language verdicts on the measurements and the markdown report of one model."""

from processing.groundtruth.reports import FINDING_NAMES
from processing.schema import CT, XRAY

from .markdown import percent, table
from .measures import RECALL_KS

SIGNIFICANCE = 0.05
COLLAPSE_COSINE = 0.99  # mean pairwise cosine from which a set of embeddings is reported as collapsed
CONSTANT_SELECTION_SHARE = 0.9  # a selection shared by this share of CTs is reported as a position prior


def collapse_verdicts(spread: dict) -> list[str]:
    """Name every embedding set whose samples have (nearly) collapsed onto one point."""
    return [
        f"{kind.replace('_', ' ')} embeddings have collapsed (mean pairwise cosine {cosine:.4f}): they barely differ "
        "between samples, so they carry (almost) no finding information."
        for kind, cosine in spread.items()
        if cosine is not None and cosine >= COLLAPSE_COSINE
    ]


def selection_verdicts(selection: dict) -> list[str]:
    """Plain statements of whether attentive selection beat random selection, per lesion kind and k, and whether it
    is a fixed position prior (the same slabs for nearly every CT)."""
    verdicts = []
    for rule in selection["rules"].values():
        if rule["most_common_share"] >= CONSTANT_SELECTION_SHARE:
            verdicts.append(
                f"Selection is (nearly) constant: slab(s) {rule['most_common_selection']} for "
                f"{rule['most_common_share']:.0%} of CTs at k = {rule['k']}, a position prior rather than a choice "
                "driven by each CT; any gain over random comes from where lesions tend to lie."
            )
    for row in selection["rows"]:
        versus = f"{row['hit_rate']:.1%} vs random {row['random_hit_rate']:.1%}, p = {row['p_value']:.3f}"
        where = f"{row['lesion']} (k = {row['k']}, {row['cts']} CTs)"
        if row["hit_rate"] <= row["random_hit_rate"]:
            verdict = f"Attentive selection does NOT beat random selection for {where}: {versus}."
        elif row["p_value"] >= SIGNIFICANCE:
            verdict = f"Attentive selection is above random for {where} but not significantly: {versus}."
        else:
            verdict = f"Attentive selection beats random for {where}: {versus}."
        if row["hit_rate"] > row["random_hit_rate"] and row["same_slabs_hit_rate"] >= row["hit_rate"]:
            slabs = selection["rules"][row["rule"]]["most_common_selection"]
            verdict += (
                f" Yet always choosing its most common slab(s) {slabs} would hit {row['same_slabs_hit_rate']:.1%}: "
                "a position prior, not a per-CT choice, explains the gain."
            )
        verdicts.append(verdict)
    return verdicts


def markdown_report(metrics: dict) -> str:
    """One model's results as markdown tables (percentages), the disclaimer first."""
    lines = [
        f"# UniMedI on the ground-truth benchmark ({metrics['split']} split)",
        "",
        (
            f"**{metrics['disclaimer']}** These numbers test that training and evaluation work; they are not a "
            "clinical result."
        ),
        "",
        f"Model `{metrics['model']}`, data `{metrics['data']}`: "
        + f"{metrics['counts'][XRAY]} X-rays, {metrics['counts'][CT]} CTs.",
        *_zero_shot_section(metrics["zero_shot_auroc"]),
        *_retrieval_section(metrics["retrieval"]),
        *_selection_section(metrics["slice_selection"]),
        *_alignment_section(metrics["alignment"]),
        *_spread_section(metrics["embedding_spread"]),
        "",
        "## Verdicts",
        "",
        *[f"- {verdict}" for verdict in metrics["verdicts"]],
        "",
    ]
    return "\n".join(lines)


def _zero_shot_section(aurocs_by_modality: dict) -> list[str]:
    rows = [
        [modality, *(percent(aurocs[name]) for name in (*FINDING_NAMES, "mean"))]
        for modality, aurocs in aurocs_by_modality.items()
    ]
    return ["", "## Zero-shot AUROC (%)", "", *table(["modality", *FINDING_NAMES, "mean"], rows)]


def _retrieval_section(retrieval: dict) -> list[str]:
    header = ["direction", "k", "strict", "same text", "random (strict)", "random (same text)"]
    keys = ("strict", "same_text", "random_strict", "random_same_text")
    rows = [
        [direction.replace("_", " "), k, *(percent(result[f"R@{k}"][key]) for key in keys)]
        for direction, result in retrieval.items()
        for k in RECALL_KS
    ]
    return [
        "",
        "## Report -> image retrieval (%)",
        "",
        (
            "Strict: only the query's own image counts (ties rank against it). Same text: any image whose report "
            "text equals the query's counts. Random: the expectation of a random ranking."
        ),
        "",
        *table(header, rows),
    ]


def _selection_section(selection: dict) -> list[str]:
    header = ["lesion", "k", "CTs", "hit rate (%)", "random (%)", "p (random >= hits)", "same slabs (%)"]
    rows = [
        [
            row["lesion"],
            f"{row['k']} ({row['rule']})",
            row["cts"],
            percent(row["hit_rate"]),
            percent(row["random_hit_rate"]),
            f"{row['p_value']:.3f}",
            percent(row["same_slabs_hit_rate"]),
        ]
        for row in selection["rows"]
    ]
    lines = [
        "",
        f"## Slice selection ({selection['num_slabs']} depth slabs; Eq. 1-2 on the CT alone)",
        "",
        "Same slabs: the hit rate of giving every CT the model's most common selection (a position prior).",
        "",
        *table(header, rows),
    ]
    for rule in selection["rules"].values():
        lines.append(
            f"\nAt k = {rule['k']} the most common selection, slab(s) {rule['most_common_selection']}, is made for "
            f"{percent(rule['most_common_share'])} % of CTs."
        )
    return lines


def _alignment_section(alignment: dict) -> list[str]:
    rows = [
        [direction.replace("_", " "), percent(result["rate"]), percent(result["random_rate"])]
        for direction, result in alignment.items()
    ]
    title = "## 2D <-> 3D alignment (nearest neighbour has the same finding set, %)"
    return ["", title, "", *table(["direction", "rate", "random"], rows)]


def _spread_section(spread: dict) -> list[str]:
    rows = [[kind.replace("_", " "), "n/a" if cosine is None else f"{cosine:.4f}"] for kind, cosine in spread.items()]
    title = "## Embedding spread (mean pairwise cosine; near 1 = collapsed)"
    return ["", title, "", *table(["embeddings", "mean cosine"], rows)]
