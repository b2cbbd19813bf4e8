"""LUNA16 (Setio et al., "Validation, comparison, and combination of algorithms for automatic detection of pulmonary
nodules in computed tomography images: the LUNA16 challenge", Med. Image Anal. 42, 2017) as volume classification.

The paper classifies "each CT volume into pulmonary nodule or normal" without saying how a volume is labelled.
Choice: a scan is "nodule" when ``annotations.csv`` lists at least one nodule for it (the challenge's reference
standard: nodules >= 3 mm accepted by at least 3 of 4 LIDC-IDRI radiologists, Setio et al. §2.2), else "normal".
(The 3D patch track of UniMiSS/Joint, "LUNA2016-v2", classifies
``candidates_V2.csv`` patches instead; that is a different task and is not what §4.2 describes.)

- Volumes: the MetaImage (.mhd/.raw) scans read with SimpleITK, reoriented exactly to the canonical orientation
  from their direction cosines, put on the processor grid; values are HU as released.
- Splits: not stated in the paper; the challenge's own ten folds are kept whole: subset0-7 train, subset8
  validation, subset9 test (80 % / 10 % / 10 %).

Layout (luna16.grand-challenge.org download, extracted): ``--root`` holds ``annotations.csv`` (seriesuid, coordX,
coordY, coordZ, diameter_mm) and ``subset0/`` ... ``subset9/`` with ``<seriesuid>.mhd`` + ``<seriesuid>.raw``.
Needs ``pip install SimpleITK``.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from modeling_unimedi.loading_unimedi import load_ct

from .downstream import LabelledScan, check_split, downstream_command, labelled_ct_record, require_dir, require_file
from .pipeline import PrepareLog, load_records, read_table

SOURCE = "luna16"
DESCRIPTION = "LUNA16 chest CT scans, nodule vs normal (classification)"
SPLITS = ("validation", "test", "train")
CLASSES = ("nodule", "normal")
FOLDS = {"train": tuple(range(8)), "validation": (8,), "test": (9,)}
RECORDS_PER_SHARD = 32
ANNOTATIONS_CSV = "annotations.csv"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def read_split(
    root: str | os.PathLike, split: str, *, log: PrepareLog | None = None, num_proc: int = 1
) -> Iterator[dict]:
    """Records of one split ("train", "validation" or "test")."""
    log = log if log is not None else PrepareLog()
    return load_records(load_scan, index_luna16(root, split), log, num_proc)


def index_luna16(root: str | os.PathLike, split: str) -> Iterator[LabelledScan]:
    check_split(split, SPLITS, "LUNA16")
    root = require_dir(root, "LUNA16", f"{ANNOTATIONS_CSV} and subset0/ ... subset9/")
    with_nodules = set(read_table(require_file(root, ANNOTATIONS_CSV, "LUNA16"), ("seriesuid",))["seriesuid"])
    for fold in FOLDS[split]:
        folder = root / f"subset{fold}"
        if not folder.is_dir():
            raise FileNotFoundError(f"LUNA16: {folder} is missing; the {split} split needs subset{FOLDS[split]}")
        for header in sorted(folder.glob("*.mhd")):
            label = "nodule" if header.stem in with_nodules else "normal"
            yield LabelledScan(header.stem, split, SOURCE, header, label, {"subset": fold, "seriesuid": header.stem})


def read_metaimage(path: Path):
    """A .mhd/.raw scan as a nibabel image with its RAS affine, so ``load_ct`` reorients it exactly."""
    try:
        import SimpleITK as sitk
    except ImportError as error:
        raise ImportError("reading LUNA16 .mhd scans needs SimpleITK: pip install SimpleITK") from error
    import nibabel as nib

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3:
        raise ValueError(f"{path}: {image.GetDimension()}-D image; expected a 3-D CT")
    voxels_zyx = sitk.GetArrayFromImage(image)  # SimpleITK's array order is (k, j, i)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin())
    nifti = nib.Nifti1Image(np.ascontiguousarray(voxels_zyx.transpose(2, 1, 0)), affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    return nifti


def load_scan(candidate: LabelledScan) -> dict:
    ct = load_ct(read_metaimage(candidate.file))
    return labelled_ct_record(candidate, ct, source_shape=list(ct.hu.shape))


COMMAND = downstream_command(SOURCE, DESCRIPTION, SPLITS, RECORDS_PER_SHARD, read_split)
