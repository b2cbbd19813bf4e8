"""RSNA Pneumonia Detection Challenge, stage 2 (Shih et al., Radiol. AI 2019): classification, segmentation and
detection (§4.2 and appendix §7).

- Label: "pneumonia" when the image has at least one box with ``Target`` 1 in ``stage_2_train_labels.csv``
  (the challenge's "Lung Opacity" class); a record's ``labels`` is ["pneumonia"] or [].
- Boxes: every ``Target`` 1 row (x, y, width, height in the DICOM's pixels; several rows per image) becomes a
  ``boxes`` entry [x0, y0, x1, y1] scaled to the stored image, ``box_labels`` "pneumonia"; ``mask_image`` marks the
  pixels whose centre lies in a box (value 1, ``mask_labels`` ["pneumonia"]), as §7 "create[s] masks for the
  pneumonia-affected areas based on the provided bounding boxes". Negative images have no boxes and an empty mask.
- Splits, drawn with a fixed seed over the patients (one image each in RSNA); only the labelled stage-2 training
  images are used (the stage-2 test images have no public labels):
  ``task="classification"``: 70 % / 15 % / 15 % train / validation / test, as §4.2 states after GLoRIA (ref. [14]);
  ``task="dense"`` (segmentation and detection): "We randomly split the original training set into
  16,010/5,337/5,337 for training/validation/testing" (§4.2), i.e. 5,337 / 26,684 of the images each for
  validation and test, the rest for training.
- Images: DICOM, stored as 8-bit PNG after the file's VOI LUT/window.

Layout (``kaggle competitions download -c rsna-pneumonia-detection-challenge``, extracted): ``--root`` holds
``stage_2_train_labels.csv`` (patientId, x, y, width, height, Target) and ``stage_2_train_images/<patientId>.dcm``.
"""

import argparse
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image

from modeling_unimedi.loading_unimedi import import_pydicom

from .downstream import (
    DEFAULT_SEED,
    LabelledXray,
    check_split,
    fraction_counts,
    load_labelled_xray,
    require_dir,
    require_file,
    seeded_split,
)
from .pipeline import DatasetCommand, PrepareLog, load_records, read_table
from .schema import checked_boxes, encode_mask_image

SOURCE = "rsna"
DESCRIPTION = "RSNA Pneumonia stage 2 chest X-rays: pneumonia vs normal, pneumonia boxes and box masks"
SPLITS = ("validation", "test", "train")
CLASSES = ("pneumonia",)
TASKS = ("classification", "dense")
SPLIT_FRACTIONS = {
    "classification": {"test": 0.15, "validation": 0.15},  # §4.2: 70 % / 15 % / 15 %
    "dense": {"test": 5337 / 26684, "validation": 5337 / 26684},  # §4.2: 16,010 / 5,337 / 5,337 of 26,684
}
RECORDS_PER_SHARD = 256
LABELS_CSV = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"


@dataclass(frozen=True)
class RsnaXray(LabelledXray):
    """An RSNA image with its pneumonia boxes, [x0, y0, x1, y1] in the DICOM's pixels."""

    boxes: tuple[tuple[float, float, float, float], ...] = ()


def read_split(
    root: str | os.PathLike,
    split: str,
    *,
    log: PrepareLog | None = None,
    num_proc: int = 1,
    max_side: int = 512,
    task: str = "classification",
) -> Iterator[dict]:
    """Records of one split ("train", "validation" or "test") of the ``task``'s split ("classification" or
    "dense"); every record carries its boxes and box mask whichever the split."""
    log = log if log is not None else PrepareLog()
    return load_records(partial(load_rsna_xray, max_side=max_side), index_rsna(root, split, task), log, num_proc)


def index_rsna(root: str | os.PathLike, split: str, task: str = "classification") -> Iterator[RsnaXray]:
    check_split(split, SPLITS, "RSNA")
    if task not in TASKS:
        raise ValueError(f"unknown RSNA task {task!r}; expected one of {TASKS}")
    root = require_dir(root, "RSNA", f"{LABELS_CSV} and {IMAGES_DIR}/")
    path = require_file(root, LABELS_CSV, "RSNA")
    table = read_table(path, ("patientId", "x", "y", "width", "height", "Target"))
    unknown = sorted(set(table["Target"]) - {"0", "1"})
    if unknown:
        raise ValueError(f"{path}: Target values {unknown}; expected 0 or 1")
    boxes: dict[str, list] = {patient_id: [] for patient_id in sorted(set(table["patientId"]))}
    for line, row in enumerate(table.itertuples(index=False), start=2):
        if row.Target == "1":
            boxes[row.patientId].append(_box(row, f"{path}:{line}"))
    assignment = seeded_split(boxes, fraction_counts(len(boxes), SPLIT_FRACTIONS[task]), DEFAULT_SEED)
    for patient_id, patient_boxes in boxes.items():
        if assignment[patient_id] == split:
            yield RsnaXray(
                sample_id=patient_id,
                split=split,
                source=SOURCE,
                file=root / IMAGES_DIR / f"{patient_id}.dcm",
                labels=CLASSES if patient_boxes else (),
                metadata={"patient_id": patient_id, "task": task},
                boxes=tuple(patient_boxes),
            )


def _box(row, where: str) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1] of a Target 1 row; an error naming the line when its box is missing or not a box."""
    try:
        x, y, width, height = (float(getattr(row, name)) for name in ("x", "y", "width", "height"))
    except ValueError as error:
        raise ValueError(f"{where}: a Target 1 row needs numeric x, y, width, height ({error})") from error
    if not all(math.isfinite(v) for v in (x, y, width, height)) or width <= 0 or height <= 0:
        raise ValueError(f"{where}: box x={x}, y={y}, width={width}, height={height} is not a box")
    return (x, y, x + width, y + height)


def load_rsna_xray(candidate: RsnaXray, max_side: int = 512) -> dict:
    """The X-ray record (``load_labelled_xray``) with the boxes scaled to the stored image and their mask."""
    record = load_labelled_xray(candidate, max_side)
    header = import_pydicom().dcmread(candidate.file, stop_before_pixels=True)
    with Image.open(io.BytesIO(record["image"]["bytes"])) as stored:
        width, height = stored.size
    scale = np.array([width / int(header.Columns), height / int(header.Rows)] * 2, dtype=np.float64)
    boxes = [np.asarray(box, dtype=np.float64) * scale for box in candidate.boxes]
    mask = np.zeros((height, width), dtype=np.uint8)
    columns, rows = np.arange(width) + 0.5, np.arange(height) + 0.5  # pixel centres
    for x0, y0, x1, y1 in boxes:
        mask[np.ix_((rows >= y0) & (rows < y1), (columns >= x0) & (columns < x1))] = 1
    boxes, box_labels = checked_boxes([np.clip(box, 0, [width, height] * 2) for box in boxes], CLASSES * len(boxes))
    return {**record, "mask_image": encode_mask_image(mask, CLASSES), "mask_labels": list(CLASSES), "boxes": boxes,
            "box_labels": box_labels}  # fmt: skip


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="classification",
        help="which split of §4.2: classification (70/15/15 %%) or dense, for segmentation and detection "
        "(16,010/5,337/5,337 images)",
    )


def _open_reader(args: argparse.Namespace):
    options = {"task": args.task}
    return options, lambda split, log: read_split(args.root, split, log=log, num_proc=args.num_proc, **options)


COMMAND = DatasetCommand(SOURCE, DESCRIPTION, SPLITS, RECORDS_PER_SHARD, _add_arguments, _open_reader)
