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
        constant = row.get("train_constant")
        if constant is not None:
            beats = "beats" if constant["p_model_better"] < SIGNIFICANCE else "does NOT significantly beat"
            verdict += (
                f" It {beats} always choosing the train split's best slab(s) {constant['slabs']}: "
                f"{constant['hit_rate']:.1%}, McNemar p = {constant['p_model_better']:.3f}."
            )
        verdicts.append(verdict)
    return verdicts


LEARNED_AUROC = 0.9  # the demo's target for pleural effusion, the finding with the strongest image signal
LEARNED_RECALL_FACTOR = 2.0  # report -> image R@5 at least this many times its random rate


def learning_verdicts(metrics: dict) -> list[str]:
    """Whether the model learned, in words: pleural effusion zero-shot AUROC against 50 % (the finding every
    modality shows best), report -> image R@5 against random, and whether any embedding set collapsed."""
    verdicts = []
    for modality, name in ((XRAY, "X-rays"), (CT, "CTs")):
        effusion = metrics.get("zero_shot_statistics", {}).get(modality, {}).get("pleural_effusion")
        if effusion is None:
            verdicts.append(f"Pleural effusion AUROC on {name}: undefined (one class only in the split).")
            continue
        low, high = effusion["ci"]
        shown = (f"{percent(effusion['auroc'])} (95 % CI {percent(low)}-{percent(high)}) vs 50.0 at chance, "
                 f"p = {effusion['p_vs_chance']:.2g}")  # fmt: skip
        if effusion["auroc"] >= LEARNED_AUROC and low > 0.5:
            verdict = f"LEARNED: zero-shot pleural effusion on {name} is recognised, AUROC {shown}."
        elif low > 0.5:
            verdict = f"PARTLY LEARNED: pleural effusion on {name} is above chance but below 90, AUROC {shown}."
        else:
            verdict = f"NOT LEARNED: pleural effusion on {name} is not distinguishable from chance, AUROC {shown}."
        verdicts.append(verdict)
    for direction, result in metrics["retrieval"].items():
        recall = result["R@5"]
        factor = recall["strict"] / recall["random_strict"]
        shown = (f"R@5 {percent(recall['strict'])} vs random {percent(recall['random_strict'])} "
                 f"({factor:.1f}x, p = {recall.get('p_strict', float('nan')):.2g})")  # fmt: skip
        learned = factor >= LEARNED_RECALL_FACTOR and recall.get("p_strict", 1.0) < SIGNIFICANCE
        word = "LEARNED" if learned else "NOT LEARNED"
        verdicts.append(f"{word}: {direction.replace('_', ' ')} retrieval {shown}.")
    collapsed = collapse_verdicts(metrics["embedding_spread"])
    verdicts.append(
        f"COLLAPSED: {len(collapsed)} embedding set(s); see the verdicts below."
        if collapsed
        else f"No embedding set has collapsed (every mean pairwise cosine < {COLLAPSE_COSINE})."
    )
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
        "",
        "## Did the model learn?",
        "",
        *[f"- {verdict}" for verdict in learning_verdicts(metrics)],
        *_zero_shot_section(metrics["zero_shot_auroc"], metrics.get("zero_shot_statistics")),
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


def interval(ci: list[float] | None) -> str:
    """A 95 % interval of rates as percentages."""
    return "n/a" if ci is None else f"{percent(ci[0])}-{percent(ci[1])}"


def _zero_shot_section(aurocs_by_modality: dict, statistics: dict | None) -> list[str]:
    rows = [
        [modality, *(percent(aurocs[name]) for name in (*FINDING_NAMES, "mean"))]
        for modality, aurocs in aurocs_by_modality.items()
    ]
    lines = ["", "## Zero-shot AUROC (%; chance 50.0)", "", *table(["modality", *FINDING_NAMES, "mean"], rows)]
    if statistics:
        detail = [
            [
                modality,
                name,
                percent(stat["auroc"]),
                interval(stat["ci"]),
                f"{stat['p_vs_chance']:.2g}",
                f"{stat['positives']}/{stat['negatives']}",
            ]
            for modality, by_finding in statistics.items()
            for name, stat in by_finding.items()
            if stat is not None
        ]
        header = ["modality", "finding", "AUROC", "95 % CI (bootstrap)", "p vs 50 (Mann-Whitney)", "pos/neg"]
        lines += ["", *table(header, detail)]
    return lines


def _retrieval_section(retrieval: dict) -> list[str]:
    header = ["direction", "k", "strict", "95 % CI", "random", "p", "same text", "95 % CI", "random", "p"]
    rows = []
    for direction, result in retrieval.items():
        for k in RECALL_KS:
            recall = result[f"R@{k}"]
            row = [direction.replace("_", " "), k]
            for kind, random_key in (("strict", "random_strict"), ("same_text", "random_same_text")):
                row += [percent(recall[kind]), interval(recall.get(f"{kind}_ci")), percent(recall[random_key]),
                        _p(recall.get(f"p_{kind}"))]  # fmt: skip
            rows.append(row)
    return [
        "",
        "## Report -> image retrieval (%)",
        "",
        (
            "Strict: only the query's own image counts (ties rank against it). Same text: any image whose report "
            "text equals the query's counts. Random: the expectation of a random ranking; p: exact one-sided "
            "chance of reaching the recall by random ranking."
        ),
        "",
        *table(header, rows),
    ]


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _constant_cell(baseline: dict | None) -> str:
    if baseline is None:
        return "n/a"
    return (f"{percent(baseline['hit_rate'])} (slab {baseline['slabs']}; model better p = "
            f"{baseline['p_model_better']:.2g})")  # fmt: skip


def _selection_section(selection: dict) -> list[str]:
    header = ["lesion", "k", "CTs", "hit rate (%)", "95 % CI", "random (%)", "p vs random", "same slabs (%)",
              "train-best constant (%)", "test-optimal constant (%)"]  # fmt: skip
    rows = [
        [
            row["lesion"],
            f"{row['k']} ({row['rule']})",
            row["cts"],
            percent(row["hit_rate"]),
            interval(row.get("ci")),
            percent(row["random_hit_rate"]),
            f"{row['p_value']:.3g}",
            percent(row["same_slabs_hit_rate"]),
            _constant_cell(row.get("train_constant")),
            _constant_cell(row.get("test_optimal_constant")),
        ]
        for row in selection["rows"]
    ]
    lines = [
        "",
        f"## Slice selection ({selection['num_slabs']} depth slabs; Eq. 1-2 on the CT alone)",
        "",
        (
            "Same slabs: the hit rate of giving every CT the model's most common selection (a position prior). "
            "Train-best constant: the slab(s) hitting most train-split CTs, given to every test CT; test-optimal "
            "constant: the best any constant choice could do on these CTs (an upper bound). p: McNemar's exact "
            "one-sided test that the model's per-CT choice hits more often than the constant on the same CTs."
        ),
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
        [
            direction.replace("_", " "),
            percent(result["rate"]),
            interval(result.get("ci")),
            percent(result["random_rate"]),
            _p(result.get("p_permutation")),
        ]
        for direction, result in alignment.items()
    ]
    title = "## 2D <-> 3D alignment (nearest neighbour has the same finding set, %)"
    header = ["direction", "rate", "95 % CI", "random", "p (permutation)"]
    return ["", title, "", *table(header, rows)]


def _spread_section(spread: dict) -> list[str]:
    rows = [[kind.replace("_", " "), "n/a" if cosine is None else f"{cosine:.4f}"] for kind, cosine in spread.items()]
    title = f"## Embedding spread (mean pairwise cosine; >= {COLLAPSE_COSINE} = collapsed)"
    return ["", title, "", *table(["embeddings", "mean cosine"], rows)]
