"""Clean-CC-CCII (He et al., "Benchmarking deep learning models and automated model design for COVID-19 detection
with chest CT scans", 2020; cleaned from CC-CCII, Zhang et al., Cell 2020) for 3-class classification.

The paper's description matches this release exactly: 340,190 slices of 3,993 scans from 2,698 patients, classes
novel coronavirus pneumonia (NCP), common pneumonia (CP) and Normal.

- One record per scan: its slices, in the numeric order of their file names, stacked into a (D, H, W) volume and put
  on the processor grid (32 x 128 x 128) by ``UniMedIVolumeProcessor.resample_to_grid``. The slices are 8-bit
  images already windowed by the release, not Hounsfield units: grey 0..255 is stored linearly as -1000..1000 HU,
  so the processor's default window (-1000, 1000) gives back exactly the released intensities. The release carries
  no voxel size; 1 mm is recorded (``metadata["spacing_known"] = false``).
- Splits: neither the paper nor the appendix states one; whole patients are drawn with a fixed seed into 70 % / 15 %
  / 15 % train / validation / test (RSNA's ratio in §4.2), so no patient spans two splits.

Layout: ``--root`` holds ``NCP/``, ``CP/`` and ``Normal/``, each ``<patient_id>/<scan_id>/<slice>.png`` (or .jpg).
"""

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_unimedi.loading_unimedi import CTVolume

from .downstream import (
    DEFAULT_SEED,
    LabelledScan,
    check_split,
    downstream_command,
    fraction_counts,
    labelled_ct_record,
    require_dir,
    seeded_split,
)
from .pipeline import Drop, PrepareLog, load_records

SOURCE = "cc-ccii"
DESCRIPTION = "Clean-CC-CCII chest CT scans, NCP / CP / Normal (classification)"
SPLITS = ("validation", "test", "train")
CLASSES = ("NCP", "CP", "Normal")
SPLIT_FRACTIONS = {"test": 0.15, "validation": 0.15}
RECORDS_PER_SHARD = 32
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_TO_HU = (-1000.0, 1000.0)  # grey 0 and 255; equal to the volume processor's default HU window
MIN_SLICES = 2


def read_split(
    root: str | os.PathLike, split: str, *, log: PrepareLog | None = None, num_proc: int = 1
) -> Iterator[dict]:
    """Records of one split ("train", "validation" or "test")."""
    log = log if log is not None else PrepareLog()
    return load_records(load_scan, index_cc_ccii(root, split, log), log, num_proc)


def index_cc_ccii(root: str | os.PathLike, split: str, log: PrepareLog) -> Iterator[LabelledScan]:
    check_split(split, SPLITS, "CC-CCII")
    root = require_dir(root, "CC-CCII", "NCP/, CP/ and Normal/ folders of <patient>/<scan>/<slice>.png")
    missing = [label for label in CLASSES if not (root / label).is_dir()]
    if missing:
        raise FileNotFoundError(f"CC-CCII: {root} lacks the class folder(s) {missing}; expected {CLASSES}")
    scans = [(label, scan) for label in CLASSES for scan in sorted((root / label).glob("*/*")) if scan.is_dir()]
    patients = [f"{label}/{scan.parent.name}" for label, scan in scans]
    assignment = seeded_split(patients, fraction_counts(len(set(patients)), SPLIT_FRACTIONS), DEFAULT_SEED)
    for (label, scan), patient in zip(scans, patients):
        if assignment[patient] != split:
            continue
        sample_id = f"{label}/{scan.parent.name}/{scan.name}"
        if len(slice_files(scan)) < MIN_SLICES:
            log.drop(Drop(sample_id, "ct_series_not_a_volume", str(scan), f"fewer than {MIN_SLICES} slices"))
            continue
        metadata = {"patient_id": scan.parent.name, "scan_id": scan.name, "spacing_known": False}
        yield LabelledScan(sample_id, split, SOURCE, scan, label, metadata)


def slice_files(scan: Path) -> list[Path]:
    """The scan's slice images in the numeric order of their names (0.png, 1.png, ..., 10.png)."""
    files = [path for path in scan.iterdir() if path.suffix.lower() in SLICE_SUFFIXES]
    return sorted(files, key=lambda path: (int(path.stem) if path.stem.isdigit() else float("inf"), path.name))


def load_scan(candidate: LabelledScan) -> dict:
    """Stack the slices, map grey to HU, resample to the processor grid."""
    slices = []
    for path in slice_files(candidate.file):
        with Image.open(path) as image:
            slices.append(np.asarray(image.convert("L"), dtype=np.float32))
    shapes = {grey.shape for grey in slices}
    if len(shapes) != 1:
        raise ValueError(f"{candidate.file}: slices of different sizes {sorted(shapes)}")
    low, high = GREY_TO_HU
    hu = low + np.stack(slices) / 255.0 * (high - low)
    ct = CTVolume(hu=hu, spacing=(1.0, 1.0, 1.0), source=str(candidate.file))
    return labelled_ct_record(candidate, ct, num_slices=len(slices), slice_shape=list(slices[0].shape))


COMMAND = downstream_command(SOURCE, DESCRIPTION, SPLITS, RECORDS_PER_SHARD, read_split)
