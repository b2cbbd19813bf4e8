"""Writing and streaming parquet shards in the UniMedI record layout (see ``processing.schema``)."""

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset

from .schema import FEATURES


def write_shards(records: Iterable[dict], out_dir: str | os.PathLike, split: str, records_per_shard: int = 64) -> list[Path]:
    """Write ``records`` as ``{split}-00000.parquet``, ... in ``out_dir``; each shard appears atomically.

    Many small shards let every rank and dataloader worker of a streaming run read its own files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for chunk in _chunks(records, records_per_shard):
        path = out_dir / f"{split}-{len(paths):05d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        Dataset.from_list(chunk, features=FEATURES).to_parquet(str(tmp))
        os.replace(tmp, path)
        paths.append(path)
    return paths


def stream_split(data_dir: str | os.PathLike, split: str) -> IterableDataset:
    """The ``split`` shards of ``data_dir`` as a streaming dataset (records decoded lazily)."""
    files = sorted(str(p) for p in Path(data_dir).glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no '{split}-*.parquet' shards in {data_dir}")
    return load_dataset("parquet", data_files={split: files}, split=split, streaming=True, features=FEATURES)


def _chunks(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
