"""Helpers every downstream task uses: reading a split of prepared shards, seeded stratified label fractions."""

import numpy as np
import torch
from datasets import load_dataset

from processing.schema import FEATURES, undecoded
from processing.shards import modality_shards
from training.data import shard_files

SPLITS = ("train", "validation", "test")


def load_split(data: str, modality: str, split: str):
    """A split's records of one modality, images, volumes and masks left undecoded (decoded per batch)."""
    files = shard_files(data, split)
    if files is None:
        raise FileNotFoundError(f"data folder {data} does not exist (write it with a processing/ reader)")
    own = modality_shards(files, modality)
    dataset = load_dataset("parquet", data_files={split: own or files}, split=split, features=FEATURES)
    if not own:
        dataset = dataset.filter(lambda value: value == modality, input_columns="modality")
    if len(dataset) == 0:
        raise ValueError(f"{data}: the {split!r} split holds no {modality} records")
    return undecoded(dataset)


def stratified_subset(strata: list[str], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of round(fraction * N) items (at least 1) with each stratum's share kept.

    Quotas by largest remainder, so tiny fractions of rare strata still add up to the exact size (scikit-learn's
    stratified split refuses strata of one item and subsets smaller than the number of strata, both common at 1 %).
    """
    if fraction >= 1.0:
        return np.arange(len(strata))
    rng = np.random.default_rng(seed)
    names, inverse = np.unique(np.asarray(strata), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(names))
    total = max(1, round(fraction * len(strata)))
    exact = counts * total / len(strata)
    quotas = np.floor(exact).astype(int)
    remainder_order = np.lexsort((rng.random(len(names)), -(exact - quotas)))
    quotas[remainder_order[: total - quotas.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(inverse == i), size=q, replace=False) for i, q in enumerate(quotas) if q]
    return np.sort(np.concatenate(chosen))


def batch_size(batch: dict) -> int:
    """Samples in a collated batch: the first dimension of its image or volume tensor."""
    for key in ("pixel_values", "volume_values"):
        if isinstance(batch.get(key), torch.Tensor):
            return batch[key].shape[0]
    raise KeyError("a downstream batch holds `pixel_values` or `volume_values`")
