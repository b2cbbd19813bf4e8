"""CheXpert v1.0 (Irvin et al., AAAI 2019) for 5-label classification, split as the paper's §4.2 states.

- Labels: the 5 competition findings (``CLASSES``). A record's ``labels`` lists the positive ones ([] = none).
- Uncertain labels (-1): mapped per finding as GLoRIA (ref. [14], whose protocol §4.2 follows) and MGCA do
  (``CHEXPERT_UNCERTAIN_MAPPINGS`` in their code, "based on the original CheXpert paper"): uncertain Atelectasis,
  Edema and Pleural Effusion count as positive, uncertain Cardiomegaly and Consolidation as negative. Blank = 0.
  The UniMedI paper states no policy.
- Frontal views only (the paper: "191,229 frontal-view chest radiographs").
- Splits: the expert-labelled ``valid.csv`` is the test set; 5,000 frontal training radiographs drawn with a fixed
  seed are the validation set; the rest is train.

Layout (CheXpert-v1.0 or CheXpert-v1.0-small, as downloaded): ``--root`` holds ``train.csv``, ``valid.csv``,
``train/`` and ``valid/``; the CSVs' ``Path`` column starts with the release folder's name
(``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``), which is resolved against ``--root``.
"""

import os
from collections.abc import Iterator
from pathlib import Path

from .downstream import (
    DEFAULT_SEED,
    LabelledXray,
    check_split,
    downstream_command,
    read_xrays,
    require_dir,
    require_file,
    seeded_split,
)
from .pipeline import PrepareLog, read_table

SOURCE = "chexpert"
DESCRIPTION = "CheXpert v1.0 frontal X-rays with the 5 competition labels (classification)"
SPLITS = ("validation", "test", "train")
CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
UNCERTAIN_MAPPING = {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1, "Pleural Effusion": 1}
VALIDATION_SIZE = 5000  # §4.2: "randomly select 5,000 radiographs from training data for validation"
RECORDS_PER_SHARD = 256
VIEW_COLUMN = "Frontal/Lateral"


def read_split(
    root: str | os.PathLike,
    split: str,
    *,
    log: PrepareLog | None = None,
    num_proc: int = 1,
    max_side: int = 512,
    validation_size: int = VALIDATION_SIZE,
) -> Iterator[dict]:
    """Records of one split ("train", "validation" or "test")."""
    return read_xrays(index_chexpert(root, split, validation_size), log, num_proc, max_side)


def index_chexpert(root: str | os.PathLike, split: str, validation_size: int = VALIDATION_SIZE):
    check_split(split, SPLITS, "CheXpert")
    root = require_dir(root, "CheXpert", "train.csv, valid.csv, train/ and valid/")
    table_name = "valid.csv" if split == "test" else "train.csv"
    table = read_table(require_file(root, table_name, "CheXpert"), ("Path", VIEW_COLUMN, *CLASSES))
    table = table[table[VIEW_COLUMN] == "Frontal"]
    if split != "test":
        assignment = seeded_split(table["Path"], {"validation": validation_size}, DEFAULT_SEED)
        table = table[table["Path"].map(assignment) == split]
    for row in table.to_dict("records"):
        relative = Path(row["Path"])
        parts = relative.parts if relative.parts[0] in ("train", "valid") else relative.parts[1:]  # release folder
        yield LabelledXray(
            sample_id=relative.with_suffix("").as_posix(),
            split=split,
            source=SOURCE,
            file=root.joinpath(*parts),
            labels=positive_labels({name: row[name] for name in CLASSES}, f"{root / table_name}, {row['Path']}"),
            metadata={"path": row["Path"]},
        )


def positive_labels(values: dict[str, str], where: str) -> tuple[str, ...]:
    """The positive findings of one CSV row: 1.0 positive, -1.0 through ``UNCERTAIN_MAPPING``, 0.0 or blank not."""
    positive = []
    for name, cell in values.items():
        try:
            value = float(cell) if cell.strip() else 0.0
        except ValueError:
            raise ValueError(f"{where}: {name} = {cell!r} is not 1, 0, -1 or blank") from None
        if value not in (1.0, 0.0, -1.0):
            raise ValueError(f"{where}: {name} = {cell!r} is not 1, 0, -1 or blank")
        if value == 1.0 or (value == -1.0 and UNCERTAIN_MAPPING[name]):
            positive.append(name)
    return tuple(positive)


COMMAND = downstream_command(SOURCE, DESCRIPTION, SPLITS, RECORDS_PER_SHARD, read_split)
