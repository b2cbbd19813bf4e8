"""BCV, Multi-Atlas Labeling Beyond the Cranial Vault (Landman et al., MICCAI 2015 workshop; paper ref. [18]):
abdominal CTs with 13 organ masks, for 3D semantic segmentation (§4.2, appendix §7.2).

- Masks: ``label/labelNNNN.nii.gz`` values 1-13 are the organs of ``ORGANS`` in order (the challenge's label
  numbering), 0 background; put on the grid by nearest neighbour (``UniMedIVolumeProcessor.labels_to_grid``) exactly
  where the CT goes, stored as ``mask_volume`` with ``mask_labels`` = ``ORGANS``.
- Volumes: the CT (HU as released) through the volume processor, ``fit_mode="resize"`` to ``volume_size``
  (default 48 x 224 x 224: "The 3D volumes are resized to 48 x 224 x 224", appendix §7.2).
- Splits: the paper partitions "following [36]" (UniMiSS) without listing scans; used here is the UNETR split
  (Hatamizadeh et al. 2022, as MONAI's ``dataset_0.json`` for BTCV lists it): the 30 labelled training scans as
  24 train (img0001-0010, img0021-0034) and 6 validation (img0035-0040). The 20 challenge test scans
  (``RawData/Testing``) have no public labels and are not read, so there is no labelled test split: the 6 validation
  scans are where UNETR reports BCV Dice, and where an evaluation of this split reports it.

Layout (Synapse syn3193805, ``Abdomen/RawData.zip`` extracted): ``--root`` holds ``RawData/Training/img/imgNNNN.nii.gz``
and ``RawData/Training/label/labelNNNN.nii.gz``.
"""

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from modeling_unimedi.loading_unimedi import load_ct
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

from .downstream import check_split, require_dir
from .pipeline import DatasetCommand, PrepareLog, load_records, nifti_with_geometry
from .schema import ct_record

SOURCE = "bcv"
DESCRIPTION = "BCV (Beyond the Cranial Vault) abdominal CTs with 13 organ masks (3D segmentation)"
SPLITS = ("validation", "train")
ORGANS = (
    "spleen",
    "right_kidney",
    "left_kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_and_splenic_veins",
    "pancreas",
    "right_adrenal_gland",
    "left_adrenal_gland",
)
CLASSES = ORGANS
SCAN_IDS = {"train": (*range(1, 11), *range(21, 35)), "validation": tuple(range(35, 41))}
VOLUME_SIZE = (48, 224, 224)
RECORDS_PER_SHARD = 8
IMAGES_DIR, LABELS_DIR = Path("RawData/Training/img"), Path("RawData/Training/label")
MAX_AFFINE_DIFFERENCE_MM = 1e-3


@dataclass(frozen=True)
class LabelledVolume:
    """One CT and its label map (same voxel grid), to read together (BCV, AMOS)."""

    sample_id: str
    split: str
    source: str
    file: Path
    label_file: Path
    metadata: dict


def read_split(
    root: str | os.PathLike,
    split: str,
    *,
    log: PrepareLog | None = None,
    num_proc: int = 1,
    volume_size: tuple[int, int, int] = VOLUME_SIZE,
) -> Iterator[dict]:
    """Records of one split ("train" or "validation"), CT and mask on a ``volume_size`` grid."""
    return read_labelled_volumes(index_bcv(root, split), ORGANS, log, num_proc, volume_size)


def read_labelled_volumes(
    candidates, mask_labels, log: PrepareLog | None, num_proc: int, volume_size
) -> Iterator[dict]:
    """CT records with their masks (values named by ``mask_labels``) of ``LabelledVolume`` candidates, loaded by
    ``num_proc`` processes; unreadable scans are logged and skipped."""
    log = log if log is not None else PrepareLog()
    UniMedIVolumeProcessor(volume_size=volume_size)  # a bad size fails here, not once per scan
    load = partial(load_labelled_volume, volume_size=tuple(volume_size), mask_labels=tuple(mask_labels))
    return load_records(load, candidates, log, num_proc)


def index_bcv(root: str | os.PathLike, split: str) -> Iterator[LabelledVolume]:
    check_split(split, SPLITS, "BCV")
    root = require_dir(root, "BCV", f"{IMAGES_DIR}/ and {LABELS_DIR}/")
    for folder in (IMAGES_DIR, LABELS_DIR):
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"BCV: {root / folder} is missing; is {root} the folder holding RawData/?")
    for scan in SCAN_IDS[split]:
        name = f"{scan:04d}"
        yield LabelledVolume(
            sample_id=f"img{name}",
            split=split,
            source=SOURCE,
            file=root / IMAGES_DIR / f"img{name}.nii.gz",
            label_file=root / LABELS_DIR / f"label{name}.nii.gz",
            metadata={"scan": scan},
        )


def load_labelled_volume(candidate: LabelledVolume, volume_size: tuple[int, int, int], mask_labels) -> dict:
    """The CT and its label map (values 1..K named by ``mask_labels``) on the processor grid as one CT record;
    refuses a label map on another grid."""
    image, labels = nifti_with_geometry(candidate.file), nifti_with_geometry(candidate.label_file)
    if image.shape != labels.shape or not np.allclose(image.affine, labels.affine, atol=MAX_AFFINE_DIFFERENCE_MM):
        raise ValueError(
            f"{candidate.label_file}: label map of shape {labels.shape} is not on the grid of {candidate.file.name} "
            f"(shape {image.shape}, or a different affine)"
        )
    processor = UniMedIVolumeProcessor(volume_size=volume_size)
    ct = load_ct(image)
    return ct_record(
        sample_id=candidate.sample_id,
        source=candidate.source,
        split=candidate.split,
        report="",
        volume=processor.resample_to_grid(ct),
        spacing=processor.grid_spacing(ct),
        metadata={**candidate.metadata, "file": candidate.file.name, "source_shape": list(ct.hu.shape)},
        mask=processor.labels_to_grid(labels),
        mask_labels=mask_labels,
    )


def volume_size_command(name: str, description: str, splits, records_per_shard: int, read_split) -> DatasetCommand:
    """A 3D segmentation reader's ``prepare`` entry: the common options plus ``--volume-size``."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--volume-size", type=int, nargs=3, default=VOLUME_SIZE, metavar=("D", "H", "W"),
            help="processor grid of the stored CTs and masks (default: the paper's %(default)s)",
        )  # fmt: skip

    def open_reader(args: argparse.Namespace):
        options = {"volume_size": tuple(args.volume_size)}
        return options, lambda split, log: read_split(args.root, split, log=log, num_proc=args.num_proc, **options)

    return DatasetCommand(name, description, splits, records_per_shard, add_arguments, open_reader)


COMMAND = volume_size_command(SOURCE, DESCRIPTION, SPLITS, RECORDS_PER_SHARD, read_split)
