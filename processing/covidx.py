"""COVIDx CXR v6 (Wang et al., Sci. Rep. 2020, COVID-Net) for 3-class classification, split as §4.2 states.

- Labels: one of ``CLASSES`` per image (normal, pneumonia, COVID-19), from the release's split lists.
- Splits: the release's test list is the test set (the paper: "we use the original validation dataset as test
  data"; COVIDx ships train and test lists only); 10 % of the training patients, drawn with a fixed seed, are the
  validation set (the paper splits 10 % of the training set; whole patients are taken so none spans two splits).

Layout (the COVID-Net repository's ``create_COVIDx`` output or the Kaggle COVIDx CXR release): ``--root`` holds one
``train*.txt`` and one ``test*.txt`` list (lines ``patient_id filename class data_source``) and the images in
``train/`` and ``test/``.
"""

import os
from collections.abc import Iterator
from pathlib import Path

from .downstream import (
    DEFAULT_SEED,
    LabelledXray,
    check_split,
    downstream_command,
    fraction_counts,
    read_xrays,
    require_dir,
    seeded_split,
)
from .pipeline import PrepareLog

SOURCE = "covidx"
DESCRIPTION = "COVIDx CXR v6 chest X-rays, normal / pneumonia / COVID-19 (classification)"
SPLITS = ("validation", "test", "train")
CLASSES = ("normal", "pneumonia", "COVID-19")
VALIDATION_FRACTION = 0.1  # §4.2: "manually split 10% of original training set for validation"
RECORDS_PER_SHARD = 256


def read_split(
    root: str | os.PathLike, split: str, *, log: PrepareLog | None = None, num_proc: int = 1, max_side: int = 512
) -> Iterator[dict]:
    """Records of one split ("train", "validation" or "test")."""
    return read_xrays(index_covidx(root, split), log, num_proc, max_side)


def index_covidx(root: str | os.PathLike, split: str) -> Iterator[LabelledXray]:
    check_split(split, SPLITS, "COVIDx")
    root = require_dir(root, "COVIDx", "train*.txt, test*.txt, train/ and test/")
    release_split = "test" if split == "test" else "train"
    rows = read_list(split_list(root, release_split))
    if split != "test":
        patients = [row[0] for row in rows]
        counts = fraction_counts(len(set(patients)), {"validation": VALIDATION_FRACTION})
        assignment = seeded_split(patients, counts, DEFAULT_SEED)
        rows = [row for row in rows if assignment[row[0]] == split]
    for patient_id, filename, label, data_source in rows:
        yield LabelledXray(
            sample_id=Path(filename).stem,
            split=split,
            source=SOURCE,
            file=root / release_split / filename,
            labels=(label,),
            metadata={"patient_id": patient_id, "data_source": data_source},
        )


def split_list(root: Path, release_split: str) -> Path:
    found = sorted(root.glob(f"{release_split}*.txt"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"COVIDx: expected exactly one {release_split}*.txt split list in {root}, found {[p.name for p in found]}"
        )
    return found[0]


def read_list(path: Path) -> list[tuple[str, str, str, str]]:
    """(patient_id, filename, class, data_source) of each line; the class must be one of ``CLASSES``."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4 or fields[2] not in CLASSES:
            raise ValueError(
                f"{path}:{number}: expected 'patient_id filename class data_source' with class in {CLASSES}, "
                f"got {line!r}"
            )
        rows.append(tuple(fields))
    return rows


COMMAND = downstream_command(SOURCE, DESCRIPTION, SPLITS, RECORDS_PER_SHARD, read_split)
