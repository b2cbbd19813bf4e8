"""AMOS 2022 (Ji et al., "AMOS: A Large-Scale Abdominal Multi-Organ Benchmark for Versatile Medical Image
Segmentation", NeurIPS 2022 Datasets and Benchmarks): abdominal CTs with 15 organ masks, 3D segmentation (appendix
§8.1, "divided into 200/100 CTs for training/validation", trained as BCV).

- Masks: values 1-15 are the organs of ``ORGANS`` in the order of AMOS22's ``dataset.json``; as BCV
  (``processing.bcv``): CT and mask through the volume processor onto one grid (default 48 x 224 x 224).
- Splits: ``imagesTr``/``labelsTr`` -> "train", ``imagesVa``/``labelsVa`` -> "validation", CTs only: AMOS numbers
  its CTs amos_0001-0500 and its MRIs amos_0501-0600, and the paper's 200/100 are the CTs of these folders. The test
  scans (``imagesTs``) have no public labels and are not read.

Layout (AMOS22 release, extracted): ``--root`` holds ``imagesTr/amos_NNNN.nii.gz``, ``labelsTr/amos_NNNN.nii.gz``,
``imagesVa/`` and ``labelsVa/`` alike.
"""

import os
from collections.abc import Iterator

from .bcv import VOLUME_SIZE, LabelledVolume, read_labelled_volumes, volume_size_command
from .downstream import check_split, require_dir
from .pipeline import PrepareLog

SOURCE = "amos"
DESCRIPTION = "AMOS22 abdominal CTs with 15 organ masks (3D segmentation)"
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
    "pancreas",
    "right_adrenal_gland",
    "left_adrenal_gland",
    "duodenum",
    "bladder",
    "prostate_or_uterus",
)
CLASSES = ORGANS
FOLDER_SUFFIX = {"train": "Tr", "validation": "Va"}
LAST_CT_ID = 500  # amos_0501 and above are MRI
RECORDS_PER_SHARD = 8


def read_split(
    root: str | os.PathLike,
    split: str,
    *,
    log: PrepareLog | None = None,
    num_proc: int = 1,
    volume_size: tuple[int, int, int] = VOLUME_SIZE,
) -> Iterator[dict]:
    """Records of one split ("train" or "validation"), CT and mask on a ``volume_size`` grid."""
    return read_labelled_volumes(index_amos(root, split), ORGANS, log, num_proc, volume_size)


def index_amos(root: str | os.PathLike, split: str) -> Iterator[LabelledVolume]:
    check_split(split, SPLITS, "AMOS")
    root = require_dir(root, "AMOS", "imagesTr/, labelsTr/, imagesVa/ and labelsVa/")
    images, labels = root / f"images{FOLDER_SUFFIX[split]}", root / f"labels{FOLDER_SUFFIX[split]}"
    for folder in (images, labels):
        if not folder.is_dir():
            raise FileNotFoundError(f"AMOS: {folder} is missing; is {root} the AMOS22 folder?")
    for label_file in sorted(labels.glob("amos_*.nii.gz")):
        name = label_file.name.removesuffix(".nii.gz")
        scan = name.removeprefix("amos_")
        if not scan.isdigit():
            raise ValueError(f"AMOS: {label_file} is not named amos_NNNN.nii.gz")
        if int(scan) <= LAST_CT_ID:
            yield LabelledVolume(name, split, SOURCE, images / label_file.name, label_file, {"scan": int(scan)})


COMMAND = volume_size_command(SOURCE, DESCRIPTION, SPLITS, RECORDS_PER_SHARD, read_split)
