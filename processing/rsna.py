"""RSNA Pneumonia Detection Challenge, stage 2 (Shih et al., Radiol. AI 2019), as binary classification (§4.2).

- Label: "pneumonia" when the image has at least one box with ``Target`` 1 in ``stage_2_train_labels.csv``
  (the challenge's "Lung Opacity" class); a record's ``labels`` is ["pneumonia"] or [].
- Splits: 70 % / 15 % / 15 % train / validation / test, drawn with a fixed seed over the patients (one image each in
  RSNA), as §4.2 states after GLoRIA (ref. [14]); only the labelled stage-2 training images are used (the stage-2
  test images have no public labels).
- Images: DICOM, stored as 8-bit PNG after the file's VOI LUT/window.

Layout (``kaggle competitions download -c rsna-pneumonia-detection-challenge``, extracted): ``--root`` holds
``stage_2_train_labels.csv`` (patientId, x, y, width, height, Target) and ``stage_2_train_images/<patientId>.dcm``.
"""

import os
from collections.abc import Iterator

from .downstream import (
    DEFAULT_SEED,
    LabelledXray,
    check_split,
    downstream_command,
    fraction_counts,
    read_xrays,
    require_dir,
    require_file,
    seeded_split,
)
from .pipeline import PrepareLog, read_table

SOURCE = "rsna"
DESCRIPTION = "RSNA Pneumonia stage 2 chest X-rays, pneumonia vs normal (classification)"
SPLITS = ("validation", "test", "train")
CLASSES = ("pneumonia",)
SPLIT_FRACTIONS = {"test": 0.15, "validation": 0.15}  # §4.2: 70 % / 15 % / 15 %
RECORDS_PER_SHARD = 256
LABELS_CSV = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"


def read_split(
    root: str | os.PathLike, split: str, *, log: PrepareLog | None = None, num_proc: int = 1, max_side: int = 512
) -> Iterator[dict]:
    """Records of one split ("train", "validation" or "test")."""
    return read_xrays(index_rsna(root, split), log, num_proc, max_side)


def index_rsna(root: str | os.PathLike, split: str) -> Iterator[LabelledXray]:
    check_split(split, SPLITS, "RSNA")
    root = require_dir(root, "RSNA", f"{LABELS_CSV} and {IMAGES_DIR}/")
    table = read_table(require_file(root, LABELS_CSV, "RSNA"), ("patientId", "Target"))
    unknown = sorted(set(table["Target"]) - {"0", "1"})
    if unknown:
        raise ValueError(f"{root / LABELS_CSV}: Target values {unknown}; expected 0 or 1")
    positive = table.groupby("patientId", sort=True)["Target"].agg(lambda targets: "1" in set(targets))
    assignment = seeded_split(positive.index, fraction_counts(len(positive), SPLIT_FRACTIONS), DEFAULT_SEED)
    for patient_id, is_positive in positive.items():
        if assignment[patient_id] == split:
            yield LabelledXray(
                sample_id=patient_id,
                split=split,
                source=SOURCE,
                file=root / IMAGES_DIR / f"{patient_id}.dcm",
                labels=CLASSES if is_positive else (),
                metadata={"patient_id": patient_id},
            )


COMMAND = downstream_command(SOURCE, DESCRIPTION, SPLITS, RECORDS_PER_SHARD, read_split)
