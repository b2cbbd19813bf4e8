"""Evaluation of a trained UniMedI on a split of the ground-truth benchmark, whose findings and lesion slabs are known.

    python -m training.evaluate outputs/demo/final [--data data/groundtruth --split test --out DIR]

writes ``metrics.json``, ``metrics.md``, ``tsne.png`` and ``slice_selection.png`` to ``DIR`` (default: an
``evaluation/`` folder next to the model folder). Measured, for X-rays and CTs separately where it applies:

1. zero-shot AUROC per finding: score = softmax probability of the positive prompt ensemble against the negative
   one (``FINDING_PROMPTS``), one finding against the rest;
2. report -> X-ray and report -> CT retrieval Recall@1/5. "strict": only the query's own image counts, and a
   candidate tied with it ranks before it; "same text": any candidate whose report text equals the query's counts
   (the generator's template reports can repeat word for word, and such duplicates embed identically);
3. slice selection: the share of CTs with a lesion where a slab selected by the model's Eq. 1-2 scores (the CT alone)
   holds it, for the configured k and for the top 20 % of slabs as the authors used, next to the exact hit rate of
   random selection and the chance that random selection does at least as well;
4. 2D<->3D alignment: how often an X-ray's nearest CT (and a CT's nearest X-ray) has the same finding set, next to the
   rate a random neighbour would reach; and a t-SNE map of X-ray, CT and report embeddings.

It is a functional benchmark on synthetic findings in one real anatomy, never a clinical result (see
``processing.groundtruth``).
"""

import argparse
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from sklearn.metrics import roc_auc_score

from modeling_unimedi import UniMedIModel, UniMedIProcessor
from modeling_unimedi.pretraining_unimedi import slab_central_slices, slab_scores_from_attention, top_k_indices
from modeling_unimedi.zero_shot_unimedi import UniMedIZeroShot, recall_at_k
from processing.groundtruth import DISCLAIMER
from processing.groundtruth.reports import FINDING_NAMES, NODULE, NORMAL
from processing.schema import CT, XRAY, decode_volume
from processing.shards import stream_split

LOGGER = logging.getLogger(__name__)
ANY_LESION = "any_lesion"
SELECTION_SHARE = 0.2  # the authors' LUNA16 check kept the top 20 % of slices
RECALL_KS = (1, 5)
SIGNIFICANCE = 0.05
COLLAPSE_COSINE = 0.99  # mean pairwise cosine from which a set of embeddings is reported as collapsed
CONSTANT_SELECTION_SHARE = 0.9  # a selection shared by this share of CTs is reported as a position prior
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


# --- data ------------------------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """One modality of an evaluation split: model inputs (PIL X-rays or int16 HU CT arrays) with what is known."""

    modality: str
    sample_ids: list[str] = field(default_factory=list)
    inputs: list = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    labels: list[frozenset[str]] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sample_ids)


def load_samples(data_dir: str | Path, split: str) -> dict[str, Samples]:
    """X-rays and CTs of a split's shards, decoded; raises ValueError when a record has no labels (not benchmark
    data) or the split holds no sample of either modality."""
    samples = {XRAY: Samples(XRAY), CT: Samples(CT)}
    for record in stream_split(data_dir, split):
        if not record["labels"]:
            raise ValueError(f"{data_dir}: record {record['sample_id']!r} has no labels; evaluate benchmark data")
        target = samples[record["modality"]]
        target.sample_ids.append(record["sample_id"])
        target.inputs.append(record["image"] if record["modality"] == XRAY else decode_volume(record))
        target.reports.append(record["report"])
        target.labels.append(frozenset(record["labels"]))
        target.metadata.append(json.loads(record["metadata"] or "{}"))
    empty = [modality for modality, found in samples.items() if not len(found)]
    if empty:
        raise ValueError(f"{data_dir}: the {split!r} split holds no {' and no '.join(empty)} samples")
    return samples


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[UniMedIModel, UniMedIProcessor]:
    """A saved `final/` folder as the inference model (teacher and DINO heads, if saved, are left out) and its
    processor; raises ValueError when model weights are missing from the folder."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} holds no config.json: give a saved model folder such as outputs/demo/final"
        )
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the pretraining-only weights would be listed as unexpected
    try:
        model, info = UniMedIModel.from_pretrained(model_dir, output_loading_info=True)
        processor = UniMedIProcessor.from_pretrained(model_dir)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ValueError(f"{model_dir}: weights missing from the checkpoint: {sorted(info['missing_keys'])[:5]} ...")
    return model.to(device).eval(), processor


# --- embeddings and scores -------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Normalised embeddings of one modality's images/volumes and of their reports (row i: sample i)."""

    vision: torch.Tensor
    reports: torch.Tensor


def encode(zero_shot: UniMedIZeroShot, samples: Samples) -> Encoded:
    if samples.modality == XRAY:
        vision = zero_shot.encode_images(samples.inputs)
    else:
        vision = zero_shot.encode_volumes(samples.inputs)
    return Encoded(vision=vision.cpu(), reports=zero_shot.encode_texts(samples.reports).cpu())


@torch.inference_mode()
def slab_scores(model: UniMedIModel, processor: UniMedIProcessor, volumes: list, batch_size: int) -> torch.Tensor:
    """(num_volumes, num_slabs) Eq. 1-2 relevance of each depth slab, from the CT alone (as pretraining selects).

    The encoder is the saved student: `final/` keeps no EMA teacher, whose attention selected slabs in training.
    """
    grid = model.config.vision_config.volume_grid
    scores = []
    for start in range(0, len(volumes), batch_size):
        inputs = processor(volumes=volumes[start : start + batch_size]).to(model.device)
        attention = model.vision_model(volume_values=inputs["volume_values"], output_cls_attention=True).cls_attention
        scores.append(slab_scores_from_attention(attention.float(), grid).cpu())
    return torch.cat(scores)


# --- 1. zero-shot classification -------------------------------------------------------------------------------------


def positive_probability(vision: torch.Tensor, class_embeddings: torch.Tensor, logit_scale: float) -> np.ndarray:
    """Softmax probability of class row 0 (the positive ensemble) against row 1 (the negative one)."""
    logits = logit_scale * vision @ class_embeddings.T
    return logits.softmax(dim=-1)[:, 0].numpy()


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when the labels hold one class only (AUROC undefined)."""
    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else None


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


# --- 2. retrieval ----------------------------------------------------------------------------------------------------


def same_text(reports: list[str]) -> torch.Tensor:
    """(n, n) bool: report i and report j are the same text (whitespace-insensitive)."""
    keys = [" ".join(report.split()) for report in reports]
    index = {key: position for position, key in enumerate(dict.fromkeys(keys))}
    ids = torch.tensor([index[key] for key in keys])
    return ids[:, None] == ids[None, :]


def recall_at_k_relevant(similarity: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Share of queries with a relevant candidate among the k most similar; with ties counted against the query, as
    in `recall_at_k` (which this equals when only the diagonal is relevant)."""
    if similarity.shape != relevant.shape or not relevant.any(dim=1).all():
        raise ValueError("relevant must have the similarity's shape and at least one relevant candidate per query")
    best_relevant = similarity.masked_fill(~relevant, -math.inf).max(dim=1).values
    rivals = ((similarity >= best_relevant[:, None]) & ~relevant).sum(dim=1)
    return (rivals < k).float().mean().item()


def random_hit_probability(num_items: int, num_relevant: int, k: int) -> float:
    """Exact chance that k of num_items drawn without replacement include one of num_relevant (hypergeometric)."""
    if not 0 <= num_relevant <= num_items or k < 0:
        raise ValueError(f"need 0 <= num_relevant <= num_items and k >= 0, got {num_relevant}, {num_items}, {k}")
    return 1.0 - math.comb(num_items - num_relevant, k) / math.comb(num_items, k)


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


# --- 3. slice selection ----------------------------------------------------------------------------------------------


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


# --- 4. alignment ----------------------------------------------------------------------------------------------------


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


def collapse_verdicts(spread: dict) -> list[str]:
    """Name every embedding set whose samples have (nearly) collapsed onto one point."""
    return [
        f"{kind.replace('_', ' ')} embeddings have collapsed (mean pairwise cosine {cosine:.4f}): they barely differ "
        "between samples, so they carry (almost) no finding information."
        for kind, cosine in spread.items()
        if cosine is not None and cosine >= COLLAPSE_COSINE
    ]


# --- figures ---------------------------------------------------------------------------------------------------------


def finding_group(labels: frozenset[str]) -> str:
    """One colour per sample: its single finding, "normal", or "several findings"."""
    return next(iter(labels)) if len(labels) == 1 else "several findings"


def plot_embedding_map(encoded: dict[str, Encoded], samples: dict[str, Samples], path: Path) -> None:
    """t-SNE of X-ray, CT and report embeddings, coloured by finding and marked by modality (the paper's Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    groups = {XRAY: ("X-ray", "o"), CT: ("CT", "^"), "report": ("report", "+")}
    points, kinds, colours = [], [], []
    for modality in (XRAY, CT):
        for kind, embeddings in ((modality, encoded[modality].vision), ("report", encoded[modality].reports)):
            points.append(embeddings.numpy())
            kinds += [kind] * len(embeddings)
            colours += [finding_group(labels) for labels in samples[modality].labels]
    points = np.concatenate(points)
    perplexity = max(1.0, min(30.0, (len(points) - 1) / 3))
    mapped = TSNE(perplexity=perplexity, init="pca", random_state=0).fit_transform(points)
    palette = dict(zip([*FINDING_NAMES, NORMAL, "several findings"], plt.get_cmap("tab10").colors))
    figure, axes = plt.subplots(figsize=(8, 7))
    for kind, (name, marker) in groups.items():
        for colour, rgb in palette.items():
            chosen = [i for i, (k, c) in enumerate(zip(kinds, colours)) if k == kind and c == colour]
            if chosen:
                axes.scatter(*mapped[chosen].T, marker=marker, color=rgb, s=28, label=f"{name}: {colour}")
    axes.set_title("t-SNE of X-ray, CT and report embeddings (synthetic findings, functional benchmark)")
    axes.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.05))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_slice_selection(
    processor: UniMedIProcessor, patch_depth: int, cts: Samples, scores: torch.Tensor, k: int, path: Path, count=4
) -> list[str]:
    """For a few CTs with a nodule: the central slice of every depth slab, the selected slabs framed in red and the
    ground-truth nodule slabs marked in green (the paper's Fig. 5). Returns the sample ids shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_slabs = scores.shape[1]
    shown = [i for i, item in enumerate(cts.metadata) if NODULE in lesion_slabs(item, num_slabs)][:count]
    if not shown:
        return []
    volumes = processor(volumes=[cts.inputs[i] for i in shown])["volume_values"]
    all_slabs = torch.arange(num_slabs).expand(len(shown), -1)
    slices = slab_central_slices(volumes, all_slabs, patch_depth)[:, :, 0]  # (CTs, slabs, H, W)
    selected = top_k_indices(scores[shown], k).tolist()
    figure, axes = plt.subplots(len(shown), num_slabs, figsize=(1.6 * num_slabs, 1.9 * len(shown)), squeeze=False)
    for row, index in enumerate(shown):
        nodule_slabs = lesion_slabs(cts.metadata[index], num_slabs)[NODULE]
        for slab in range(num_slabs):
            axis = axes[row, slab]
            axis.imshow(slices[row, slab].numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            chosen = slab in selected[row]
            for spine in axis.spines.values():
                spine.set_edgecolor("red" if chosen else "none")
                spine.set_linewidth(3)
            marker = " nodule" if slab in nodule_slabs else ""
            axis.set_title(f"slab {slab}{marker}", fontsize=7, color="green" if marker else "black")
        axes[row, 0].set_ylabel(cts.sample_ids[index].rsplit("-", 1)[-1], fontsize=7)
    figure.suptitle(f"Top-{k} slabs by Eq. 1-2 (red frame) vs ground-truth nodule slabs (green title)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [cts.sample_ids[i] for i in shown]


# --- verdicts and report ---------------------------------------------------------------------------------------------


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


def evaluate(
    model_dir: str | Path,
    data_dir: str | Path = "data/groundtruth",
    split: str = "test",
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str | None = None,
) -> dict:
    """Every measurement on one saved model; writes metrics.json, metrics.md and the figures; returns the metrics."""
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir) if out_dir is not None else Path(model_dir).parent / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_model(model_dir, device)
    samples = load_samples(data_dir, split)
    zero_shot = UniMedIZeroShot(model, processor, batch_size=batch_size)
    encoded = {modality: encode(zero_shot, samples[modality]) for modality in (XRAY, CT)}
    scores = slab_scores(model, processor, samples[CT].inputs, batch_size)
    num_selected = model.config.num_selected_slices
    selection = slice_selection(scores, samples[CT].metadata, num_selected)
    metrics = {
        "disclaimer": DISCLAIMER,
        "model": str(model_dir),
        "data": str(data_dir),
        "split": split,
        "counts": {modality: len(samples[modality]) for modality in (XRAY, CT)},
        "prompts": FINDING_PROMPTS,
        "zero_shot_auroc": {
            modality: zero_shot_aurocs(zero_shot, encoded[modality].vision, samples[modality].labels)
            for modality in (XRAY, CT)
        },
        "retrieval": {
            f"report_to_{modality}": retrieval_recalls(encoded[modality], samples[modality].reports)
            for modality in (XRAY, CT)
        },
        "slice_selection": selection,
        "alignment": {
            "xray_to_ct": nearest_neighbour_agreement(
                encoded[XRAY].vision, encoded[CT].vision, samples[XRAY].labels, samples[CT].labels
            ),
            "ct_to_xray": nearest_neighbour_agreement(
                encoded[CT].vision, encoded[XRAY].vision, samples[CT].labels, samples[XRAY].labels
            ),
        },
        "embedding_spread": {
            f"{modality}_{kind}": mean_pairwise_cosine(getattr(encoded[modality], kind))
            for modality in (XRAY, CT)
            for kind in ("vision", "reports")
        },
    }
    metrics["verdicts"] = collapse_verdicts(metrics["embedding_spread"]) + selection_verdicts(selection)
    plot_embedding_map(encoded, samples, out_dir / "tsne.png")
    figure_k = num_selected or next(iter(selection_ks(0, scores.shape[1]).values()))
    patch_depth = model.config.vision_config.volume_patch_size[0]
    shown = plot_slice_selection(
        processor, patch_depth, samples[CT], scores, figure_k, out_dir / "slice_selection.png"
    )
    metrics["figures"] = {"tsne": "tsne.png", "slice_selection": "slice_selection.png" if shown else None}
    metrics["figure_cts"] = shown
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    LOGGER.info("evaluated %s on %s/%s in %.1f s -> %s", model_dir, data_dir, split, metrics["seconds"], out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "metrics.md").write_text(markdown_report(metrics))
    return metrics


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


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
        "## Zero-shot AUROC (%)",
        "",
        "| modality | " + " | ".join(FINDING_NAMES) + " | mean |",
        "|---" * (len(FINDING_NAMES) + 2) + "|",
    ]
    for modality, aurocs in metrics["zero_shot_auroc"].items():
        cells = [_percent(aurocs[name]) for name in (*FINDING_NAMES, "mean")]
        lines.append(f"| {modality} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Report -> image retrieval (%)",
        "",
        (
            "Strict: only the query's own image counts (ties rank against it). Same text: any image whose report "
            "text equals the query's counts. Random: the expectation of a random ranking."
        ),
        "",
        "| direction | k | strict | same text | random (strict) | random (same text) |",
        "|---|---|---|---|---|---|",
    ]
    for direction, result in metrics["retrieval"].items():
        for k in RECALL_KS:
            recall = result[f"R@{k}"]
            cells = [_percent(recall[key]) for key in ("strict", "same_text", "random_strict", "random_same_text")]
            lines.append(f"| {direction.replace('_', ' ')} | {k} | " + " | ".join(cells) + " |")
    selection = metrics["slice_selection"]
    lines += [
        "",
        f"## Slice selection ({selection['num_slabs']} depth slabs; Eq. 1-2 on the CT alone)",
        "",
        "Same slabs: the hit rate of giving every CT the model's most common selection (a position prior).",
        "",
        "| lesion | k | CTs | hit rate (%) | random (%) | p (random >= hits) | same slabs (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in selection["rows"]:
        lines.append(
            f"| {row['lesion']} | {row['k']} ({row['rule']}) | {row['cts']} | {_percent(row['hit_rate'])} | "
            f"{_percent(row['random_hit_rate'])} | {row['p_value']:.3f} | {_percent(row['same_slabs_hit_rate'])} |"
        )
    for rule in selection["rules"].values():
        lines.append(
            f"\nAt k = {rule['k']} the most common selection, slab(s) {rule['most_common_selection']}, is made for "
            f"{_percent(rule['most_common_share'])} % of CTs."
        )
    lines += ["", "## 2D <-> 3D alignment (nearest neighbour has the same finding set, %)", ""]
    lines += ["| direction | rate | random |", "|---|---|---|"]
    for direction, result in metrics["alignment"].items():
        lines.append(
            f"| {direction.replace('_', ' ')} | {_percent(result['rate'])} | {_percent(result['random_rate'])} |"
        )
    lines += ["", "## Embedding spread (mean pairwise cosine; near 1 = collapsed)", ""]
    lines += ["| embeddings | mean cosine |", "|---|---|"]
    for kind, cosine in metrics["embedding_spread"].items():
        lines.append(f"| {kind.replace('_', ' ')} | {'n/a' if cosine is None else f'{cosine:.4f}'} |")
    lines += ["", "## Verdicts", "", *[f"- {verdict}" for verdict in metrics["verdicts"]], ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved model folder (the `final/` of a pretraining run)")
    parser.add_argument("--data", default="data/groundtruth", help="ground-truth benchmark shards")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=None, help="output folder (default: evaluation/ next to the model folder)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    metrics = evaluate(args.model, args.data, args.split, args.out, args.batch_size, args.device)
    print(markdown_report(metrics))
    return metrics


if __name__ == "__main__":
    main()
