"""Writing and streaming parquet shards in the UniMedI record layout (see ``processing.schema``)."""

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset
from datasets.utils.logging import disable_progress_bar

from .schema import FEATURES, MODALITIES


def write_shards(
    records: Iterable[dict], out_dir: str | os.PathLike, split: str, records_per_shard: int = 64
) -> list[Path]:
    """Write ``records`` as ``{split}-{modality}-00000.parquet``, ...; each shard appears atomically.

    X-rays and CTs go to separate shards, so a training stream of one modality never reads (or skips) the other's
    ~1 MB CT records; many small shards let every rank and dataloader worker of a streaming run read its own files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    disable_progress_bar()  # one "Creating parquet" bar per shard buries the preparation logs
    paths: list[Path] = []
    counts = dict.fromkeys(MODALITIES, 0)
    for modality, chunk in _chunks_by_modality(records, records_per_shard):
        path = out_dir / f"{split}-{modality}-{counts[modality]:05d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        Dataset.from_list(chunk, features=FEATURES).to_parquet(str(tmp))
        os.replace(tmp, path)
        counts[modality] += 1
        paths.append(path)
    return paths


def modality_shards(files: list[str], modality: str) -> list[str]:
    """The shards of `files` that hold only `modality` (named by `write_shards`)."""
    return [f for f in files if Path(f).name.split("-")[1:2] == [modality]]


def stream_split(data_dir: str | os.PathLike, split: str) -> IterableDataset:
    """The ``split`` shards of ``data_dir`` as a streaming dataset (records decoded lazily)."""
    files = sorted(str(p) for p in Path(data_dir).glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no '{split}-*.parquet' shards in {data_dir}")
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
