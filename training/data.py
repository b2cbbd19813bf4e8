"""Streaming input for pretraining: per-rank X-ray and CT streams, mixed at a fixed ratio, collated by the processor.

Every rank reads its own part of each epoch, nothing is routed through rank 0, and the position of each stream is a
small state that checkpoints store, so a resumed run sees exactly the batches it would have seen.
"""

import gc
import io
import math
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
from datasets import load_dataset
from PIL import Image as PILImage

from processing.schema import CT, FEATURES, XRAY, decode_slab_images, decode_volume, undecoded
from processing.shards import check_shard_layout, modality_shards

# datasets sleeps config.SLEEP_TIME_ON_THREADS_SHUTDOWN (5 s) each time a parquet shard iterator closes, a guard
# against pyarrow scanner threads outliving the interpreter. A shuffled stream closes one per shard, so training
# stalled 5 s per shard (1,280 records: 15.3 s with the sleep, 0.6 s without). We close our streams explicitly and
# collect them before exit instead (`MixedBatches.close`).
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0


def shard_files(data: str | list[str], split: str) -> list[str] | None:
    """The `{split}-*.parquet` shards of one or several local folders (e.g. MIMIC-CXR + BIMCV + CT-RATE), or None
    when `data` names a Hub dataset."""
    folders = [Path(d) for d in ([data] if isinstance(data, str) else data)]
    if isinstance(data, str) and not folders[0].exists():
        return None
    files = []
    for folder in folders:
        found = sorted(str(p) for p in folder.glob(f"{split}-*.parquet"))
        if not found:
            raise FileNotFoundError(f"no '{split}-*.parquet' shards in {folder}")
        files += found
    check_shard_layout(files)
    return files


def shard_sizes(files: list[str]) -> list[int]:
    """Records per parquet shard, from the file footers alone."""
    return [pq.ParquetFile(f).metadata.num_rows for f in files]


def rank_range(sizes: list[int], rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s records [start, stop) of `sum(sizes)` records: equal shares up to one record."""
    total = sum(sizes)
    return rank * total // world_size, (rank + 1) * total // world_size


class ModalityStream:
    """An endless, resumable stream of one modality's records for one rank.

    Epoch e of local shards: the shards in a new order (seeded by seed and e), read as one sequence of records, of which
    rank r takes the r-th of `world_size` equal contiguous parts; its part goes through a shuffle buffer (seed + e).
    Every rank thus reads the same number of records per epoch (up to one), each record is read by one rank, and each
    shard by at most two (the one a boundary falls in). A Hub dataset is shuffled and every rank keeps every
    `world_size`-th record (all ranks read the whole stream). The state is (epoch, position in this rank's own
    records); resuming rebuilds that epoch's stream and skips `position` undecoded records.
    """

    def __init__(
        self, data: str | list[str], split: str, modality: str, rank: int, world_size: int, seed: int, buffer: int
    ):
        self.data, self.split, self.modality = data, split, modality
        self.rank, self.world_size, self.seed, self.buffer = rank, world_size, seed, buffer
        self.epoch = 0
        self.position = 0
        self._iterator = None

    def _open_epoch(self):
        files = shard_files(self.data, self.split)
        if files is None:
            dataset = self._hub_part()
        else:  # this modality's own shards when written by `write_shards`: nothing to read and throw away
            dataset = self._shuffled(self._local_part(modality_shards(files, self.modality) or files))
        dataset = dataset.skip(self.position) if self.position else dataset
        dataset.set_epoch(self.epoch)  # last: `skip` returns a dataset at epoch 0
        return iter(dataset)

    def _shuffled(self, dataset):
        """Through a shuffle buffer seeded by seed + epoch (the epoch is set on the final dataset)."""
        return dataset.shuffle(seed=self.seed, buffer_size=self.buffer)

    def _local_part(self, files: list[str]):
        """This rank's contiguous part of the epoch's shard sequence (only the shards it overlaps are opened)."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(files))
        files = [files[i] for i in order]
        sizes = shard_sizes(files)
        start, stop = rank_range(sizes, self.rank, self.world_size)
        ends = np.cumsum(sizes)
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, stop, side="left"))
        opened = files[first : last + 1] if stop > start else files[:1]
        dataset = load_dataset(
            "parquet", data_files={self.split: opened}, split=self.split, streaming=True, features=FEATURES
        )
        return self._modality_only(dataset.skip(start - int(ends[first] - sizes[first])).take(stop - start))

    def _hub_part(self):
        """Every rank streams the whole shuffled dataset and keeps its own every `world_size`-th record."""
        dataset = self._shuffled(self._modality_only(load_dataset(self.data, split=self.split, streaming=True)))
        return dataset.filter(lambda _, index: index % self.world_size == self.rank, with_indices=True)

    def _modality_only(self, dataset):
        """Undecoded records of this stream's modality (shards of several modalities, or a Hub dataset, hold both)."""
        return undecoded(dataset).filter(lambda record: record["modality"] == self.modality)

    def take(self, count: int) -> list[dict]:
        records = []
        while len(records) < count:
            if self._iterator is None:
                self._iterator = self._open_epoch()
            try:
                records.append(next(self._iterator))
                self.position += 1
            except StopIteration:
                if self.position == 0:
                    raise ValueError(
                        f"no {self.modality} records for rank {self.rank}/{self.world_size} in {self.data} "
                        f"(split {self.split!r}); set ct_fraction to 0 or 1 if the data holds one modality"
                    ) from None
                self.epoch, self.position, self._iterator = self.epoch + 1, 0, None
        return records

    def close(self) -> None:
        """Drop the open iterator and join its pyarrow threads now, while pyarrow is fully alive."""
        self._iterator = None
        gc.collect()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._iterator = int(state["epoch"]), int(state["position"]), None


def cts_in_batch(batch_index: int, batch_size: int, ct_fraction: float) -> int:
    """CTs in batch `batch_index`: floor((i+1)·B·f) - floor(i·B·f), so every batch has floor or ceil of B·f CTs and
    any run of batches has the exact ratio up to one sample (also when B·f < 1)."""
    return math.floor((batch_index + 1) * batch_size * ct_fraction + 1e-9) - math.floor(
        batch_index * batch_size * ct_fraction + 1e-9
    )


class MixedBatches:
    """Per-rank batches of `batch_size` records with X-rays and CTs mixed at `ct_fraction`."""

    def __init__(
        self,
        data: str | list[str],
        split: str,
        batch_size: int,
        ct_fraction: float,
        rank=0,
        world_size=1,
        seed=0,
        buffer=1000,
    ):
        self.batch_size, self.ct_fraction = batch_size, ct_fraction
        self.xrays = ModalityStream(data, split, XRAY, rank, world_size, seed, buffer)
        self.cts = ModalityStream(data, split, CT, rank, world_size, seed + 1, buffer)
        self.batches_drawn = 0

    def next_batch(self) -> tuple[list[dict], list[dict]]:
        num_cts = cts_in_batch(self.batches_drawn, self.batch_size, self.ct_fraction)
        cts = self.cts.take(num_cts) if num_cts else []
        xrays = self.xrays.take(self.batch_size - num_cts) if num_cts < self.batch_size else []
        self.batches_drawn += 1
        return xrays, cts

    def close(self) -> None:
        self.xrays.close()
        self.cts.close()

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches_drawn, "xrays": self.xrays.state_dict(), "cts": self.cts.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches_drawn = int(state["batches_drawn"])
        self.xrays.load_state_dict(state["xrays"])
        self.cts.load_state_dict(state["cts"])


class PretrainCollator:
    """Records -> model inputs through `UniMedIProcessor` (X-rays first, then CTs, reports in the same order).

    CT records hold int16 HU already on the processor grid (NIfTI bytes read without decoding, `decode_volume`), so the
    volume processor only windows them (`window_grid`).
    When every CT record stores native slab images, they are windowed and flipped with their volumes and passed as
    `slab_images` (the pseudo-2D images of `pseudo_image_source="native"`).
    """

    def __init__(self, processor, training: bool = True):
        self.processor = processor
        self.training = training

    def __call__(self, xrays: list[dict], cts: list[dict]):
        images = [_decode_image(record) for record in xrays]
        volumes = [decode_volume(record) for record in cts]
        slab_images = [decode_slab_images(record) for record in cts]
        with_slabs = bool(cts) and all(images is not None for images in slab_images)
        batch = self.processor(
            images=images or None,
            volumes=None if with_slabs else volumes or None,
            text=[record["report"] for record in xrays + cts],
            training=self.training,
            return_tensors="pt",
        )
        if with_slabs:
            batch.update(self.processor.volume_processor.window_with_slab_images(volumes, slab_images, self.training))
        return batch


def _decode_image(record: dict) -> PILImage.Image:
    image = record["image"]
    if image is None or image.get("bytes") is None:
        raise ValueError(f"X-ray record {record.get('sample_id')!r} holds no image bytes")
    try:
        return PILImage.open(io.BytesIO(image["bytes"]))
    except (OSError, PILImage.DecompressionBombError) as error:
        raise ValueError(f"X-ray record {record.get('sample_id')!r}: cannot decode its image ({error})") from error
