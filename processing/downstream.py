"""What the downstream classification readers (CheXpert, RSNA, COVIDx, CC-CCII, LUNA16) share.

Each reader module exposes the same surface, so the preparation CLI registers it in one line:
``SOURCE`` (CLI name), ``DESCRIPTION``, ``SPLITS``, ``CLASSES`` (the label names its records' ``labels`` column
holds, in the model's output order), ``RECORDS_PER_SHARD`` and ``read_split(root, split, *, log=None, num_proc=1)``,
a generator of schema records. Downstream records carry no report (``report`` is "").
"""

import io
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_unimedi.loading_unimedi import CTVolume, load_xray
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

from .mimic_cxr import xray_bytes
from .pipeline import DatasetCommand, PrepareLog, load_records
from .schema import ct_record, xray_record

DEFAULT_SEED = 0  # every random split below is drawn from this seed, so re-running a reader gives the same split


@dataclass(frozen=True)
class LabelledXray:
    """One X-ray to read, with its labels already known from the dataset's tables."""

    sample_id: str
    split: str
    source: str
    file: Path
    labels: tuple[str, ...]
    metadata: dict


@dataclass(frozen=True)
class LabelledScan:
    """One CT scan (a file or a folder of slices) to read, with its class."""

    sample_id: str
    split: str
    source: str
    file: Path
    label: str
    metadata: dict


def require_dir(path: str | os.PathLike, dataset: str, expected: str) -> Path:
    """``path`` as a folder, or an error saying what the dataset's folder should hold."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{dataset}: {path} is not a folder; expected {expected} (layouts: processing/README.md)"
        )
    return path


def require_file(folder: Path, name: str, dataset: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{dataset}: {name} not found in {folder}; is this the dataset's root folder? (processing/README.md)"
        )
    return path


def check_split(split: str, splits: tuple[str, ...], dataset: str) -> None:
    if split not in splits:
        raise ValueError(f"unknown {dataset} split {split!r}; expected one of {splits}")


def seeded_split(keys, counts: dict[str, int], seed: int = DEFAULT_SEED) -> dict[str, str]:
    """Split of each distinct key: a seeded permutation of the sorted keys, the first ``counts[split]`` of them to each
    named split in order, the rest to "train". Keys are patients (or images, where the paper splits images)."""
    unique = sorted(set(keys))
    if sum(counts.values()) > len(unique):
        raise ValueError(f"cannot take {counts} out of {len(unique)} items")
    order = np.random.default_rng(seed).permutation(len(unique))
    assignment, start = {}, 0
    for split, count in counts.items():
        for position in order[start : start + count]:
            assignment[unique[position]] = split
        start += count
    for position in order[start:]:
        assignment[unique[position]] = "train"
    return assignment


def fraction_counts(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Counts for ``seeded_split`` from shares of ``total`` (rounded half up)."""
    return {split: int(np.floor(total * fraction + 0.5)) for split, fraction in fractions.items()}


def read_xrays(candidates, log: PrepareLog | None, num_proc: int, max_side: int):
    """Records of labelled X-ray candidates, read by ``num_proc`` processes; unreadable files are logged and skipped."""
    log = log if log is not None else PrepareLog()
    return load_records(partial(load_labelled_xray, max_side=max_side), candidates, log, num_proc)


def load_labelled_xray(candidate: LabelledXray, max_side: int = 512) -> dict:
    """A JPEG/PNG is kept as mimic_cxr keeps it; a DICOM (RSNA) becomes an 8-bit PNG after its VOI LUT/window."""
    if candidate.file.suffix.lower() == ".dcm":
        image = _gray_png(load_xray(candidate.file), max_side)
    else:
        image = xray_bytes(candidate.file, max_side)
    return xray_record(
        sample_id=candidate.sample_id,
        source=candidate.source,
        split=candidate.split,
        report="",
        image={"bytes": image, "path": None},
        labels=candidate.labels,
        metadata=candidate.metadata,
    )


def _gray_png(unit_gray: np.ndarray, max_side: int) -> bytes:
    image = Image.fromarray(np.rint(np.clip(unit_gray, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    if max_side > 0:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def labelled_ct_record(candidate: LabelledScan, ct: CTVolume, **metadata) -> dict:
    """A scan put on the volume processor's grid as a CT record carrying its class."""
    processor = UniMedIVolumeProcessor()
    return ct_record(
        sample_id=candidate.sample_id,
        source=candidate.source,
        split=candidate.split,
        report="",
        volume=processor.resample_to_grid(ct),
        spacing=processor.grid_spacing(ct),
        labels=(candidate.label,),
        metadata={**candidate.metadata, **metadata},
    )


def downstream_command(
    name: str, description: str, splits: tuple[str, ...], records_per_shard: int, read_split
) -> DatasetCommand:
    """A downstream reader's entry in ``python -m processing.prepare``: no options beyond the common ones."""

    def open_reader(args):
        return {}, partial(_read_split_of_run, read_split, args.root, args.num_proc)

    return DatasetCommand(name, description, splits, records_per_shard, lambda parser: None, open_reader)


def _read_split_of_run(read_split, root, num_proc: int, split: str, log: PrepareLog):
    return read_split(root, split, log=log, num_proc=num_proc)
