"""One record layout for every UniMedI pretraining/evaluation source, X-ray and CT alike.

Shards are parquet files readable with ``datasets.load_dataset("parquet", data_files=..., streaming=True)``.
CT volumes are stored already reoriented to the canonical orientation and resampled to the processor grid as
raw little-endian int16 Hounsfield units, so training never pays for NIfTI/DICOM decoding; the processor's HU
window and normalisation are still applied at load time.
"""

import json

import numpy as np
from datasets import Features, Image, Sequence, Value

from modeling_unimedi.loading_unimedi import CANONICAL_ORIENTATION

XRAY = "xray"
CT = "ct"
MODALITIES = (XRAY, CT)


FEATURES = Features(
    {
        "sample_id": Value("string"),
        "source": Value("string"),  # e.g. "mimic-cxr", "bimcv", "ct-rate", "groundtruth"
        "split": Value("string"),  # "train" | "validation" | "test"
        "modality": Value("string"),  # XRAY | CT
        "report": Value("string"),  # cleaned English report text (FINDINGS + IMPRESSION)
        "image": Image(),  # X-ray as PNG/JPEG (8- or 16-bit grayscale); None for CT
        "volume": Value("binary"),  # CT: int16 HU, C-order, shape volume_shape; None for X-ray
        "volume_shape": Sequence(Value("int32")),  # CT: (D, H, W); [] for X-ray
        "spacing": Sequence(Value("float32")),  # CT: voxel size in mm along (D, H, W); [] for X-ray
        "orientation": Value("string"),  # CT: CANONICAL_ORIENTATION; "" for X-ray
        "labels": Sequence(Value("string")),  # finding names when known (benchmark data); [] otherwise
        "metadata": Value("string"),  # JSON object with source-specific extras (ids, view, lesion slabs, ...)
    }
)


def encode_volume(volume: np.ndarray) -> bytes:
    """Serialise a (D, H, W) HU volume as int16 bytes after checking it fits the int16 range."""
    if volume.ndim != 3:
        raise ValueError(f"CT volume must be 3-D (D, H, W), got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise ValueError("CT volume holds non-finite voxels; refusing to store it")
    lo, hi = float(volume.min()), float(volume.max())
    if lo < np.iinfo(np.int16).min or hi > np.iinfo(np.int16).max:
        raise ValueError(f"CT values [{lo}, {hi}] do not fit int16 Hounsfield units")
    return np.ascontiguousarray(np.rint(volume), dtype="<i2").tobytes()


def decode_volume(record: dict) -> np.ndarray:
    """The (D, H, W) int16 HU array of a CT record."""
    shape = tuple(int(s) for s in record["volume_shape"])
    data = record["volume"]
    if data is None or len(shape) != 3:
        raise ValueError(f"record {record.get('sample_id')!r} holds no CT volume")
    expected = int(np.prod(shape)) * 2
    if len(data) != expected:
        raise ValueError(
            f"record {record.get('sample_id')!r}: volume has {len(data)} bytes, expected {expected} for shape {shape}"
        )
    return np.frombuffer(data, dtype="<i2").reshape(shape)


def xray_record(*, sample_id, source, split, report, image, labels=(), metadata=None) -> dict:
    """A record for one X-ray; ``image`` is a PIL image, a path, or {"bytes": ...}."""
    return {
        "sample_id": sample_id,
        "source": source,
        "split": split,
        "modality": XRAY,
        "report": report,
        "image": image,
        "volume": None,
        "volume_shape": [],
        "spacing": [],
        "orientation": "",
        "labels": list(labels),
        "metadata": json.dumps(metadata or {}),
    }


def ct_record(*, sample_id, source, split, report, volume, spacing, labels=(), metadata=None) -> dict:
    """A record for one CT already in CANONICAL_ORIENTATION on the processor grid."""
    return {
        "sample_id": sample_id,
        "source": source,
        "split": split,
        "modality": CT,
        "report": report,
        "image": None,
        "volume": encode_volume(volume),
        "volume_shape": list(volume.shape),
        "spacing": [float(s) for s in spacing],
        "orientation": CANONICAL_ORIENTATION,
        "labels": list(labels),
        "metadata": json.dumps(metadata or {}),
    }
