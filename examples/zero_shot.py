"""Zero-shot "normal" vs "pneumonia" classification of real chest X-rays with prompt ensembles, scored by AUROC.

    python examples/zero_shot.py [--model FOLDER] [--images FOLDER]

--model is handled as in embed.py (default outputs/demo/final; a small random model, announced loudly, without one).
--images defaults to the 16 real X-ray JPEGs of pneumonia-model-package; each file's label comes from its name, as
in the Kermany chest X-ray dataset they come from: NORMAL* is normal, *bacteria* / *virus* is pneumonia.
"""

import argparse
import sys
from pathlib import Path

from embed import announce_model, load_model_and_processor
from sklearn.metrics import roc_auc_score

from modeling_unimedi.zero_shot_unimedi import UniMedIZeroShot
from processing.samples import sample_path

CLASS_PROMPTS = {
    "normal": [
        "The lungs are clear.",
        "No focal consolidation, pleural effusion or pneumothorax.",
        "No acute cardiopulmonary process.",
        "Normal chest radiograph.",
    ],
    "pneumonia": [
        "Findings consistent with {}.",
        "Focal airspace consolidation concerning for {}.",
        "Patchy opacities compatible with {}.",
        "There is {} in the lower lobe.",
    ],
}
POSITIVE_CLASS = "pneumonia"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def label_from_name(path: Path) -> str:
    """ "normal" or "pneumonia" from a Kermany-style file name (NORMAL2-IM-..., person..._bacteria_...)."""
    name = path.name.lower()
    if name.startswith("normal"):
        return "normal"
    if "bacteria" in name or "virus" in name:
        return "pneumonia"
    raise ValueError(f"{path}: cannot tell the label from the file name (expected NORMAL*, *bacteria* or *virus*)")


def image_paths(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="saved UniMedIModel folder (default outputs/demo/final)")
    parser.add_argument("--images", type=Path, help="folder of labelled X-rays (default: pneumonia-model-package)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    paths = image_paths(args.images or sample_path("pneumonia_model_package", "datasets/pneumonia-data/val"))
    labels = [label_from_name(path) for path in paths]
    if len(set(labels)) < 2:
        raise ValueError(f"AUROC needs both normal and pneumonia images; all {len(paths)} are {labels[0]}")
    model, processor, weights_are_random = load_model_and_processor(args.model)
    announce_model(args.model, weights_are_random)
    probs, _ = UniMedIZeroShot(model, processor).classify(images=paths, class_prompts=CLASS_PROMPTS)
    class_names = list(CLASS_PROMPTS)
    for path, label, row in zip(paths, labels, probs.tolist(), strict=True):
        scores = "  ".join(f"P({name})={p:.4f}" for name, p in zip(class_names, row, strict=True))
        print(f"{path.name:<36} label={label:<9} {scores}")
    positive_scores = probs[:, class_names.index(POSITIVE_CLASS)].cpu().numpy()
    auroc = roc_auc_score([label == POSITIVE_CLASS for label in labels], positive_scores)
    print(f"AUROC ({POSITIVE_CLASS} vs normal, {len(paths)} X-rays): {auroc:.4f}")
    if weights_are_random:
        print("(random weights: these probabilities and this AUROC are MEANINGLESS)")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
