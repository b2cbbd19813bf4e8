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
   random selection and the chance that random selection does at least as well, and next to constant-slab rules
   (the best slab on the train split's CTs, and the best on the test CTs as an upper bound; McNemar's exact test);
4. 2D<->3D alignment: how often an X-ray's nearest CT (and a CT's nearest X-ray) has the same finding set, next to the
   rate a random neighbour would reach and a permutation p-value; and a t-SNE map of X-ray, CT and report embeddings.

Every number comes with its uncertainty (``training.evaluation.statistics``): AUROC with a bootstrap 95 % interval and
the Mann-Whitney p-value against 50, rates with exact binomial intervals and exact p-values against their random
rate. Prompts (``FINDING_PROMPTS``) and every threshold are fixed in code, never tuned on test numbers.

It is a functional benchmark on synthetic findings in one real anatomy, never a clinical result (see
``processing.groundtruth``).
"""

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from modeling_unimedi import UniMedIModel, UniMedIProcessor
from modeling_unimedi.zero_shot_unimedi import UniMedIZeroShot
from processing.groundtruth import DISCLAIMER
from processing.schema import CT, XRAY
from training.evaluation.data import Encoded, Samples, encode, load_ct_metadata, load_model, load_samples, slab_scores
from training.evaluation.measures import (
    FINDING_PROMPTS,
    auroc_statistics,
    aurocs_of,
    finding_scores,
    mean_pairwise_cosine,
    nearest_neighbour_agreement,
    retrieval_recalls,
)
from training.evaluation.plots import plot_embedding_map, plot_slice_selection
from training.evaluation.report import collapse_verdicts, markdown_report, selection_verdicts
from training.evaluation.slice_selection import selection_ks, slice_selection

LOGGER = logging.getLogger(__name__)
MODALITIES = (XRAY, CT)
TRAIN_SPLIT = "train"  # where the constant-slab baseline learns its slab


def evaluate(
    model_dir: str | Path,
    data_dir: str | Path = "data/groundtruth",
    split: str = "test",
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str | None = None,
    volume_embedding: str | None = None,
) -> dict:
    """Every measurement on one saved model; writes metrics.json, metrics.md and the figures; returns the metrics.

    `volume_embedding` overrides the model's `config.volume_embedding` (CT embeddings of the 3D tokens alone, or
    with the selected slices' tokens as pretraining's [CLS] saw them)."""
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir) if out_dir is not None else Path(model_dir).parent / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_model(model_dir, device)
    if volume_embedding is not None:
        model.config.volume_embedding = volume_embedding
    samples = load_samples(data_dir, split)
    zero_shot = UniMedIZeroShot(model, processor, batch_size=batch_size)
    encoded = {modality: encode(zero_shot, samples[modality]) for modality in MODALITIES}
    scores = slab_scores(model, processor, samples[CT].inputs, batch_size)
    metrics = {
        "disclaimer": DISCLAIMER,
        "model": str(model_dir),
        "data": str(data_dir),
        "split": split,
        "volume_embedding": model.config.volume_embedding,
        "counts": {modality: len(samples[modality]) for modality in MODALITIES},
        "prompts": FINDING_PROMPTS,
        **measure(zero_shot, samples, encoded, scores, load_ct_metadata(data_dir, TRAIN_SPLIT)),
    }
    metrics["verdicts"] = collapse_verdicts(metrics["embedding_spread"]) + selection_verdicts(
        metrics["slice_selection"]
    )
    metrics.update(draw_figures(model, processor, samples, encoded, scores, out_dir))
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    LOGGER.info("evaluated %s on %s/%s in %.1f s -> %s", model_dir, data_dir, split, metrics["seconds"], out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "metrics.md").write_text(markdown_report(metrics))
    return metrics


def measure(
    zero_shot: UniMedIZeroShot,
    samples: dict[str, Samples],
    encoded: dict[str, Encoded],
    scores: torch.Tensor,
    train_ct_metadata: list[dict] | None = None,
) -> dict:
    """Measurements 1-4 of the module doc, from the embeddings and the CTs' slab scores, each with its interval or
    p-value against chance; ``train_ct_metadata`` gives the constant-slab baseline its training-split slab."""
    vision = {modality: encoded[modality].vision for modality in MODALITIES}
    labels = {modality: samples[modality].labels for modality in MODALITIES}
    zero_shot_scores = {
        modality: finding_scores(zero_shot, vision[modality], labels[modality]) for modality in MODALITIES
    }
    num_selected = zero_shot.model.config.num_selected_slices
    return {
        "zero_shot_auroc": {modality: aurocs_of(zero_shot_scores[modality]) for modality in MODALITIES},
        "zero_shot_statistics": {modality: auroc_statistics(zero_shot_scores[modality]) for modality in MODALITIES},
        "retrieval": {
            f"report_to_{modality}": retrieval_recalls(encoded[modality], samples[modality].reports)
            for modality in MODALITIES
        },
        "slice_selection": slice_selection(scores, samples[CT].metadata, num_selected, train_ct_metadata),
        "alignment": {
            "xray_to_ct": nearest_neighbour_agreement(vision[XRAY], vision[CT], labels[XRAY], labels[CT]),
            "ct_to_xray": nearest_neighbour_agreement(vision[CT], vision[XRAY], labels[CT], labels[XRAY]),
        },
        "embedding_spread": {
            f"{modality}_{kind}": mean_pairwise_cosine(getattr(encoded[modality], kind))
            for modality in MODALITIES
            for kind in ("vision", "reports")
        },
    }


def draw_figures(
    model: UniMedIModel,
    processor: UniMedIProcessor,
    samples: dict[str, Samples],
    encoded: dict[str, Encoded],
    scores: torch.Tensor,
    out_dir: Path,
) -> dict:
    """tsne.png and slice_selection.png (at the configured k, else the top 20 %); returns their metrics entries."""
    plot_embedding_map(encoded, samples, out_dir / "tsne.png")
    num_selected = model.config.num_selected_slices
    figure_k = num_selected or next(iter(selection_ks(0, scores.shape[1]).values()))
    patch_depth = model.config.vision_config.volume_patch_size[0]
    shown = plot_slice_selection(
        processor, patch_depth, samples[CT], scores, figure_k, out_dir / "slice_selection.png"
    )
    return {
        "figures": {"tsne": "tsne.png", "slice_selection": "slice_selection.png" if shown else None},
        "figure_cts": shown,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved model folder (the `final/` of a pretraining run)")
    parser.add_argument("--data", default="data/groundtruth", help="ground-truth benchmark shards")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=None, help="output folder (default: evaluation/ next to the model folder)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--volume-embedding",
        choices=("volume", "volume_with_slices"),
        help="CT embeddings from the 3D tokens alone or with the selected slices (default: the model's config)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    metrics = evaluate(
        args.model, args.data, args.split, args.out, args.batch_size, args.device, args.volume_embedding
    )
    print(markdown_report(metrics))
    return metrics


if __name__ == "__main__":
    main()
