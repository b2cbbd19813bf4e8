"""CT-RATE chest CT volumes with their English reports (ibrahimhamamci/CT-RATE on the Hugging Face Hub).

Each row of the split's reports CSV is one volume (a reconstruction of a scan); its text is Findings_EN then
Impressions_EN, and reports with fewer than three sentences are dropped as for the other sources. Voxel size comes
from the split's metadata CSV (XYSpacing, ZSpacing), replacing the NIfTI header's, and with ``intensity="raw"`` (the
first release) the stored values are mapped to HU with the CSV's RescaleSlope/RescaleIntercept; CT-RATE v2 NIfTIs
already hold HU (``intensity="hu"``). Official splits: ``train`` and ``valid`` (-> "validation"). Layout: README.md.
"""

import argparse
import ast
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from modeling_unimedi.report_processing_unimedi import (
    FINDINGS,
    IMPRESSION,
    MIN_REPORT_SENTENCES,
    count_sentences,
    join_sections,
)

from .pipeline import CTCandidate, DatasetCommand, Drop, PrepareLog, load_ct_record, load_records, read_table

SOURCE = "ct-rate"
SPLITS = ("validation", "train")
INTENSITIES = ("raw", "hu")
REPORT_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
METADATA_COLUMNS = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept")


@dataclass(frozen=True)
class SplitFiles:
    """Where one official split lives under the CT-RATE ``dataset`` folder."""

    volumes: str
    reports: str
    metadata: str


SPLIT_FILES = {
    "train": SplitFiles("train", "radiology_text_reports/train_reports.csv", "metadata/train_metadata.csv"),
    "validation": SplitFiles(
        "valid", "radiology_text_reports/validation_reports.csv", "metadata/validation_metadata.csv"
    ),
}


def read_ct_rate(
    root: str | os.PathLike,
    split: str,
    *,
    intensity: str = "raw",
    log: PrepareLog | None = None,
    num_proc: int = 1,
) -> Iterator[dict]:
    """Records of one split ("train" or "validation"), volumes decoded by ``num_proc`` processes."""
    log = log if log is not None else PrepareLog()
    return load_records(load_ct_record, index_ct_rate(root, split, intensity=intensity, log=log), log, num_proc)


def index_ct_rate(root: str | os.PathLike, split: str, *, intensity: str, log: PrepareLog) -> Iterator[CTCandidate]:
    """One candidate per volume of the split's reports CSV with metadata and a report of >= 3 sentences."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown CT-RATE split {split!r}; expected one of {tuple(SPLIT_FILES)}")
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    root, files = Path(root), SPLIT_FILES[split]
    reports = read_table(root / files.reports, REPORT_COLUMNS)
    metadata = (
        read_table(root / files.metadata, METADATA_COLUMNS).drop_duplicates("VolumeName").set_index("VolumeName")
    )
    for row in reports.itertuples(index=False):
        outcome = _candidate(row, root, files, split, metadata, intensity)
        if isinstance(outcome, Drop):
            log.drop(outcome)
        else:
            yield outcome


def _candidate(row, root: Path, files: SplitFiles, split: str, metadata: pd.DataFrame, intensity: str):
    """The CTCandidate of one reports-CSV row, or the Drop saying why it has none."""
    try:
        sample_id = volume_stem(row.VolumeName)
    except ValueError as error:
        return Drop(row.VolumeName, "volume_name_invalid", str(root / files.reports), str(error))
    try:
        report = join_sections({FINDINGS: row.Findings_EN, IMPRESSION: row.Impressions_EN})
    except ValueError as error:
        return Drop(sample_id, "report_empty", str(root / files.reports), str(error))
    if count_sentences(report) < MIN_REPORT_SENTENCES:
        return Drop(sample_id, "report_too_short", str(root / files.reports), f"{count_sentences(report)} sentences")
    if row.VolumeName not in metadata.index:
        return Drop(sample_id, "metadata_missing", str(root / files.metadata), row.VolumeName)
    try:
        spacing, rescale = _geometry_and_rescale(metadata.loc[row.VolumeName], intensity)
    except ValueError as error:
        return Drop(sample_id, "metadata_invalid", str(root / files.metadata), f"{row.VolumeName}: {error}")
    scan = sample_id.rsplit("_", 1)[0]
    info = {"volume_name": row.VolumeName, "patient_id": scan.rsplit("_", 1)[0], "scan_id": scan}
    path = volume_path(root / files.volumes, row.VolumeName)
    return CTCandidate(sample_id, split, SOURCE, path, report, info, spacing=spacing, rescale=rescale)


def volume_stem(volume_name: str) -> str:
    """The sample id of a volume: "train_1_a_1.nii.gz" -> "train_1_a_1" (split, patient, scan, reconstruction)."""
    stem = volume_name.removesuffix(".nii.gz")
    if stem == volume_name or len(stem.split("_")) != 4:
        raise ValueError(f"unexpected CT-RATE VolumeName {volume_name!r}; expected like 'train_1_a_1.nii.gz'")
    return stem


def volume_path(volumes_dir: Path, volume_name: str) -> Path:
    """train_1_a_1.nii.gz lives in train/train_1/train_1_a/: one folder per patient, then per scan."""
    split, patient, scan, _ = volume_stem(volume_name).split("_")
    return volumes_dir / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / volume_name


def _geometry_and_rescale(row: pd.Series, intensity: str) -> tuple[tuple[float, float, float], tuple | None]:
    """Voxel size (i, j, k) = (XYSpacing[0], XYSpacing[1], ZSpacing) and, for raw intensities, (slope, intercept).

    XYSpacing is the DICOM PixelSpacing written as a list ("[0.75, 0.75]"); CT-RATE stores the in-plane axes first
    and the slices last, as its reference pipeline (CT-CLIP) reads them.
    """
    try:
        xy = ast.literal_eval(row["XYSpacing"])
    except (ValueError, SyntaxError):
        xy = None
    if not isinstance(xy, (list, tuple)) or len(xy) != 2:
        raise ValueError(f"XYSpacing {row['XYSpacing']!r} is not a pair of numbers")
    spacing = (_positive(xy[0], "XYSpacing"), _positive(xy[1], "XYSpacing"), _positive(row["ZSpacing"], "ZSpacing"))
    if intensity == "hu":
        return spacing, None
    return spacing, (
        _finite(row["RescaleSlope"], "RescaleSlope"),
        _finite(row["RescaleIntercept"], "RescaleIntercept"),
    )


def _finite(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} is {value!r}")
    return number


def _positive(value, name: str) -> float:
    number = _finite(value, name)
    if number <= 0:
        raise ValueError(f"{name} {value!r} is not a positive size")
    return number


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--intensity",
        choices=INTENSITIES,
        default="raw",
        help="raw: NIfTIs hold stored values, apply the metadata CSV's RescaleSlope/Intercept (first release); "
        "hu: NIfTIs already hold HU (CT-RATE v2)",
    )


def _open_reader(args: argparse.Namespace):
    options = {"num_proc": args.num_proc, "intensity": args.intensity}
    return options, lambda split, log: read_ct_rate(args.root, split, log=log, **options)


COMMAND = DatasetCommand(
    name="ct-rate",
    help="CT-RATE chest CTs with English reports",
    splits=SPLITS,
    records_per_shard=32,
    add_arguments=_add_arguments,
    open_reader=_open_reader,
)
