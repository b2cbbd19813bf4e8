"""Writing and streaming parquet shards in the UniMedI record layout (see ``processing.schema``)."""

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
from datasets import Dataset, IterableDataset, load_dataset
from datasets.table import embed_table_storage

from .schema import FEATURES, MODALITIES, OLD_LAYOUT, REGENERATE

ROW_GROUP_RECORDS = 32  # a streaming reader holds one row group: ~60 MB of CTs with their slab images


def write_shards(
    records: Iterable[dict], out_dir: str | os.PathLike, split: str, records_per_shard: int = 64
) -> list[Path]:
    """Write ``records`` as ``{split}-{modality}-00000.parquet``, ..., and the dataset card of the folder; each shard
    appears atomically.

    X-rays and CTs go to separate shards, so a training stream of one modality never reads (or skips) the other's
    ~1 MB CT records; many small shards let every rank and dataloader worker of a streaming run read its own files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    counts = dict.fromkeys(MODALITIES, 0)
    for modality, chunk in _chunks_by_modality(records, records_per_shard):
        path = out_dir / f"{split}-{modality}-{counts[modality]:05d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        _write_parquet(chunk, tmp)
        os.replace(tmp, path)
        counts[modality] += 1
        paths.append(path)
    if paths:
        write_dataset_card(out_dir)  # kept current as splits are added; `processing.prepare` adds the license
    return paths


def _write_parquet(records: list[dict], path: Path) -> None:
    """One shard, compressed with zstd level 1. `Dataset.to_parquet` stores media cells uncompressed, as media files
    usually are compressed already; the NIfTI cells are raw int16, which zstd level 1 shrinks to about 0.64 of their
    size at snappy's decompression cost: a generated benchmark CT record (volume and slab images) takes 1.10 MiB,
    1.77 uncompressed (`benchmarks/data_throughput.py` prints the size per record)."""
    table = embed_table_storage(Dataset.from_list(records, features=FEATURES).data.table)  # paths -> file bytes
    pq.write_table(
        table,
        path,
        row_group_size=ROW_GROUP_RECORDS,
        compression="zstd",
        compression_level=1,
        use_dictionary=False,
        write_page_index=True,
    )


def modality_shards(files: list[str], modality: str) -> list[str]:
    """The shards of `files` that hold only `modality` (named by `write_shards`)."""
    return [f for f in files if Path(f).name.split("-")[1:2] == [modality]]


def check_shard_layout(files: list[str]) -> None:
    """Refuse shards written in an older record layout (from their parquet footers alone), which would otherwise fail
    deep inside ``datasets`` with a column-cast error."""
    for file in files:
        names = pq.read_schema(file).names
        if "volume_shape" in names:
            raise ValueError(f"{file} {OLD_LAYOUT}")
        missing, extra = sorted(set(FEATURES) - set(names)), sorted(set(names) - set(FEATURES))
        if missing or extra:
            raise ValueError(
                f"{file}: not the current UniMedI record layout (missing columns {missing}, unknown columns {extra}); "
                + REGENERATE
            )


def stream_split(data_dir: str | os.PathLike, split: str) -> IterableDataset:
    """The ``split`` shards of ``data_dir`` as a streaming dataset (records decoded lazily)."""
    files = sorted(str(p) for p in Path(data_dir).glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no '{split}-*.parquet' shards in {data_dir}")
    check_shard_layout(files)
    return load_dataset("parquet", data_files={split: files}, split=split, streaming=True, features=FEATURES)


def _chunks_by_modality(records: Iterable[dict], size: int) -> Iterator[tuple[str, list[dict]]]:
    chunks: dict[str, list[dict]] = {}
    for record in records:
        modality = record["modality"]
        if modality not in MODALITIES:
            raise ValueError(
                f"record {record.get('sample_id')!r}: unknown modality {modality!r}; expected {MODALITIES}"
            )
        chunk = chunks.setdefault(modality, [])
        chunk.append(record)
        if len(chunk) == size:
            yield modality, chunks.pop(modality)
    for modality, chunk in chunks.items():
        yield modality, chunk


CARD_FILE = "README.md"
TASK_CATEGORIES = ["zero-shot-image-classification", "image-feature-extraction"]
CARD_TAGS = ["medical", "chest-x-ray", "ct", "nifti", "radiology-reports", "unimedi"]
COLUMN_DESCRIPTIONS = {
    "sample_id": "unique id of the sample within its source",
    "source": 'dataset the record comes from ("mimic-cxr", "ct-rate", "groundtruth", ...)',
    "split": '"train", "validation" or "test"',
    "modality": '"xray" or "ct"',
    "report": "English report text (FINDINGS + IMPRESSION)",
    "image": "X-ray: PNG/JPEG (8- or 16-bit grayscale); null for CTs",
    "volume": (
        "CT: a NIfTI-1 file (decodes to a nibabel image) of int16 Hounsfield units, already reoriented and resampled "
        "to the model grid (voxel axes L, P, S; 128 x 128 x 32 by default), voxel size and orientation in its affine; "
        "null for X-rays"
    ),
    "slab_images": (
        "CT, optional: per depth slab of the grid, the mean of its slices of the original-resolution CT at the 2D "
        "input size (int16 HU NIfTI over the same extent as `volume`); null when not stored and for X-rays"
    ),
    "labels": "finding names when known (benchmark and downstream data); empty otherwise",
    "metadata": "JSON object with source-specific extras (ids, view, lesion slabs, ...)",
    "mask_image": "X-ray, optional: uint8 label map (8-bit grayscale PNG) the size of `image`; 0 = background",
    "mask_volume": "CT, optional: uint8 label map as a NIfTI-1 file on the grid of `volume`; 0 = background",
    "mask_labels": "names of the mask values 1..K; empty without a mask",
    "boxes": "X-ray, optional: boxes as [x0, y0, x1, y1] pixels of `image`",
    "box_labels": "the name of each box",
}


def write_dataset_card(out_dir: str | os.PathLike, license: str = "other", description: str = "") -> Path:
    """Write ``README.md`` next to the shards of ``out_dir``: the YAML metadata that ``load_dataset(out_dir)`` and the
    Hub read (one config with each split's shards, the features, license, task categories, size, source datasets) and a description of the columns. ``license``: the source data's license id ("other": the source's own
    terms); ``description``: a first paragraph about the data."""
    from huggingface_hub import DatasetCard, DatasetCardData

    out_dir = Path(out_dir)
    files = {split: sorted(out_dir.glob(f"{split}-*.parquet")) for split in _split_names(out_dir)}
    check_shard_layout([str(path) for paths in files.values() for path in paths])
    sizes = {split: sum(pq.ParquetFile(path).metadata.num_rows for path in paths) for split, paths in files.items()}
    sources = sorted(
        {
            source
            for paths in files.values()
            for path in paths
            for source in pq.read_table(path, columns=["source"])["source"].to_pylist()
        }
    )
    data = DatasetCardData(
        license=license,
        license_name=f"{'-'.join(sources)}-terms" if license == "other" else None,
        language=["en"],
        pretty_name=f"UniMedI records: {', '.join(sources)}",
        task_categories=TASK_CATEGORIES,
        tags=CARD_TAGS,
        size_categories=[_size_category(sum(sizes.values()))],
        source_datasets=sources,
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"{split}-*.parquet"} for split in files],
            }
        ],
        dataset_info={"features": FEATURES._to_yaml_list()},
    )
    columns = "\n".join(f"| `{name}` | {COLUMN_DESCRIPTIONS[name]} |" for name in FEATURES)
    counts = ", ".join(f"{split} {size}" for split, size in sizes.items())
    terms = (
        "derived from the source datasets named above, whose own terms of use apply"
        if license == "other"
        else f"license `{license}`"
    )
    intro = f"\n{description}\n" if description else ""
    body = f"""
# UniMedI records: {", ".join(sources)}
{intro}
Chest X-rays and CT volumes with their reports in the record layout of UniMedI's `processing/schema.py`, written
as parquet shards ({counts} records; X-rays and CTs in separate shards). Data {terms}.

```python
from datasets import load_dataset

ds = load_dataset("<this folder or repo id>", split="{next(iter(files), "train")}")
ct = ds.filter(lambda modality: modality == "ct", input_columns="modality")[0]
ct["volume"]  # a nibabel image on the model grid: ct["volume"].affine holds spacing and orientation
inputs = processor(volumes=[ct["volume"]], text=[ct["report"]])  # UniMedIProcessor
```

| column | content |
|---|---|
{columns}

How the shards were made: `prepare_summary.json` (`python -m processing.prepare`) or `manifest.json`
(`python -m processing.groundtruth`) next to them.
"""
    path = out_dir / CARD_FILE
    DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}").save(path)
    return path


def _split_names(out_dir: Path) -> list[str]:
    """The splits with shards in ``out_dir``, in the usual order (train, validation, test, then others)."""
    found = {path.name.split("-")[0] for path in out_dir.glob("*-*.parquet")}
    order = ["train", "validation", "test"]
    return [split for split in order if split in found] + sorted(found - set(order))


def _size_category(count: int) -> str:
    """The Hub's size category of ``count`` records."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if count < limit:
            return name
    return "1M<n<10M" if count < 10_000_000 else "10M<n<100M"
