"""MIMIC-CXR-JPG 2.0.0 frontal chest X-rays with their MIMIC-CXR free-text reports, as UniMedI records.

Follows the paper (§4.1): lateral views are left out (only ViewPosition PA and AP are kept), the report text is
FINDINGS + IMPRESSION, and reports with fewer than three sentences are dropped. Splits are MIMIC-CXR-JPG's official
``mimic-cxr-2.0.0-split.csv`` ("validate" becomes "validation"). Assumed layout: processing/README.md.
"""

import argparse
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
from PIL import Image

from modeling_unimedi.report_processing_unimedi import MIN_REPORT_SENTENCES, count_sentences, report_text

from .pipeline import MISSING_FILE, UNREADABLE_FILE, DatasetCommand, Drop, PrepareLog, load_records, read_table
from .schema import xray_record

SOURCE = "mimic-cxr"
SPLITS = ("validation", "test", "train")
OFFICIAL_SPLITS = {"train": "train", "validate": "validation", "test": "test"}
FRONTAL_VIEWS = frozenset({"PA", "AP"})
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
JPEG_QUALITY = 95


@dataclass(frozen=True)
class XrayCandidate:
    """One frontal X-ray whose report passed the filters; only the image remains to be read."""

    sample_id: str
    split: str
    file: Path
    report: str
    metadata: dict


def read_mimic_cxr(
    root: str | os.PathLike,
    reports_root: str | os.PathLike,
    split: str,
    *,
    log: PrepareLog | None = None,
    num_proc: int = 1,
    max_side: int = 512,
) -> Iterator[dict]:
    """Records of one split ("train", "validation" or "test"), images read by ``num_proc`` processes.

    ``max_side`` > 0 downsizes images whose longer side exceeds it (re-encoded as JPEG quality 95; the model sees
    224 px); smaller 8-bit grayscale images are stored as their original bytes.
    """
    log = log if log is not None else PrepareLog()
    candidates = index_mimic_cxr(root, reports_root, split, log)
    return load_records(partial(load_xray, max_side=max_side), candidates, log, num_proc)


def index_mimic_cxr(
    root: str | os.PathLike, reports_root: str | os.PathLike, split: str, log: PrepareLog
) -> Iterator[XrayCandidate]:
    """Frontal images of ``split`` with usable reports; lateral views and short or empty reports go to ``log``."""
    if split not in SPLITS:
        raise ValueError(f"unknown MIMIC-CXR split {split!r}; expected one of {SPLITS}")
    root, reports_root = Path(root), Path(reports_root)
    table = _image_table(root)
    reports = _StudyReports(reports_root)
    for row in table[table["split"] == split].itertuples(index=False):
        image_file = _study_dir(root, row.subject_id, row.study_id) / f"{row.dicom_id}.jpg"
        if row.ViewPosition not in FRONTAL_VIEWS:
            log.drop(Drop(row.dicom_id, "view_not_frontal", str(image_file), row.ViewPosition or "missing"))
            continue
        report, drop = reports.get(row.subject_id, row.study_id, row.dicom_id)
        if drop is not None:
            log.drop(drop)
            continue
        metadata = {
            "subject_id": row.subject_id,
            "study_id": row.study_id,
            "dicom_id": row.dicom_id,
            "view_position": row.ViewPosition,
        }
        yield XrayCandidate(row.dicom_id, split, image_file, report, metadata)


def load_xray(candidate: XrayCandidate, max_side: int = 512) -> dict:
    """The record of one candidate; the image is fully decoded so a truncated JPEG fails here, not in training."""
    return xray_record(
        sample_id=candidate.sample_id,
        source=SOURCE,
        split=candidate.split,
        report=candidate.report,
        image={"bytes": xray_bytes(candidate.file, max_side), "path": None},
        metadata=candidate.metadata,
    )


def xray_bytes(path: Path, max_side: int) -> bytes:
    """The stored image: original bytes when already small 8-bit grayscale, else a downsized grayscale JPEG."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode not in ("L", "RGB"):  # converting 16-bit or palette images to "L" would clip or recolour
            raise ValueError(f"{path}: {image.mode!r} image; MIMIC-CXR-JPG images are 8-bit grayscale JPEGs")
        if image.mode == "L" and (max_side <= 0 or max(image.size) <= max_side):
            return data
        gray = image.convert("L")
    if max_side > 0:
        gray.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    gray.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _image_table(root: Path) -> pd.DataFrame:
    """dicom_id, subject_id, study_id, ViewPosition and mapped split of every image, in study order."""
    metadata = _read_csv(root, METADATA_CSV, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    splits = _read_csv(root, SPLIT_CSV, ("dicom_id", "split"))
    table = metadata.merge(splits[["dicom_id", "split"]], on="dicom_id", how="left")
    unsplit = table.loc[table["split"].isna(), "dicom_id"]
    if len(unsplit):
        raise ValueError(
            f"{len(unsplit)} images of {METADATA_CSV} have no row in {SPLIT_CSV} (e.g. {unsplit.iloc[0]}): "
            f"are both CSVs in {root} from MIMIC-CXR-JPG 2.0.0?"
        )
    unknown = sorted(set(table["split"]) - OFFICIAL_SPLITS.keys())
    if unknown:
        raise ValueError(f"{root / SPLIT_CSV}: unknown split values {unknown}; expected {sorted(OFFICIAL_SPLITS)}")
    table["split"] = table["split"].map(OFFICIAL_SPLITS)
    return table.sort_values(["subject_id", "study_id", "dicom_id"], kind="stable")


def _read_csv(root: Path, name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """``name`` or ``name.gz`` (as PhysioNet ships it) from ``root``."""
    path = next((root / candidate for candidate in (name, f"{name}.gz") if (root / candidate).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"neither {name} nor {name}.gz found in {root}")
    return read_table(path, columns)


def _study_dir(root: Path, subject_id: str, study_id: str) -> Path:
    """files/p10/p10000032/s50414267: subjects are grouped by the first two digits of their id."""
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"


class _StudyReports:
    """The training text of each study's report, read once for all images of the study (rows come in study order)."""

    def __init__(self, reports_root: Path):
        self.reports_root = reports_root
        self._study = None
        self._result = None

    def get(self, subject_id: str, study_id: str, dicom_id: str) -> tuple[str | None, Drop | None]:
        if self._study != (subject_id, study_id):
            self._study = (subject_id, study_id)
            self._result = self._read(subject_id, study_id)
        report, reason, file, detail = self._result
        return report, None if reason is None else Drop(dicom_id, reason, file, detail)

    def _read(self, subject_id: str, study_id: str) -> tuple:
        path = _study_dir(self.reports_root, subject_id, study_id).with_suffix(".txt")
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, MISSING_FILE, str(path), "report file not found"
        except (OSError, UnicodeDecodeError) as error:
            return None, UNREADABLE_FILE, str(path), f"{type(error).__name__}: {error}"
        try:
            text = report_text(raw)
        except ValueError as error:
            return None, "report_empty", str(path), str(error)
        sentences = count_sentences(text)
        if sentences < MIN_REPORT_SENTENCES:
            return None, "report_too_short", str(path), f"{sentences} sentences"
        return text, None, str(path), ""


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reports", required=True, type=Path, help="folder of mimic-cxr-reports (holds files/p10/...)"
    )
    parser.add_argument(
        "--max-side", type=int, default=512, help="downscale X-rays whose longer side exceeds this (0 keeps originals)"
    )


def _open_reader(args: argparse.Namespace):
    options = {"num_proc": args.num_proc, "max_side": args.max_side}
    return options, lambda split, log: read_mimic_cxr(args.root, args.reports, split, log=log, **options)


COMMAND = DatasetCommand(
    name="mimic-cxr",
    help="MIMIC-CXR-JPG 2.0.0 frontal X-rays with MIMIC-CXR reports",
    splits=SPLITS,
    records_per_shard=256,
    add_arguments=_add_arguments,
    open_reader=_open_reader,
    input_files=("reports",),
)
