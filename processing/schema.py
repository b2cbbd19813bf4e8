"""One record layout for every UniMedI pretraining/evaluation source, X-ray and CT alike.

Shards are parquet files readable with ``datasets.load_dataset("parquet", data_files=..., streaming=True)``.
CT volumes are stored already reoriented to the canonical orientation and resampled to the processor grid as
raw little-endian int16 Hounsfield units, so training never pays for NIfTI/DICOM decoding; the processor's HU
window and normalisation are still applied at load time.
"""

import io
import json

import numpy as np
import PIL.Image
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
        # CT, optional: per depth slab of the grid, its central native-resolution slice at the 2D input size (int16 HU,
        # C-order, shape slab_images_shape = (num_slabs, H, W)); None / [] when not stored and for X-rays
        "slab_images": Value("binary"),
        "slab_images_shape": Sequence(Value("int32")),
        "labels": Sequence(Value("string")),  # finding names when known (benchmark data); [] otherwise
        "metadata": Value("string"),  # JSON object with source-specific extras (ids, view, lesion slabs, ...)
        # Dense labels, optional (None / [] when absent). Mask values: 0 background, k = mask_labels[k - 1].
        "mask_image": Image(),  # X-ray: uint8 label map as an 8-bit grayscale PNG, the size of ``image``
        "mask_volume": Value("binary"),  # CT: uint8 label map, C-order, on the grid of ``volume`` (volume_shape)
        "mask_labels": Sequence(Value("string")),  # names of the mask values 1..K
        "boxes": Sequence(Sequence(Value("float32"), length=4)),  # X-ray: [x0, y0, x1, y1] pixels of ``image``
        "box_labels": Sequence(Value("string")),  # the name of each box
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


def decode_slab_images(record: dict) -> np.ndarray | None:
    """A CT record's stored native slab images (int16 HU, (num_slabs, H, W)), or None when it has none."""
    if not record.get("slab_images"):
        return None
    return decode_volume({**record, "volume": record["slab_images"], "volume_shape": record["slab_images_shape"]})


def encode_mask_image(mask: np.ndarray, mask_labels) -> dict:
    """An X-ray's (H, W) label map as {"bytes": 8-bit grayscale PNG} after checking its values are named."""
    mask = _checked_mask(mask, 2, mask_labels, "X-ray mask")
    buffer = io.BytesIO()
    PIL.Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def decode_mask_image(record: dict) -> np.ndarray | None:
    """An X-ray record's (H, W) uint8 label map, or None when it has none."""
    stored = record.get("mask_image")
    if stored is None:
        return None
    if isinstance(stored, dict):
        stored = PIL.Image.open(io.BytesIO(stored["bytes"])) if stored.get("bytes") else PIL.Image.open(stored["path"])
    mask = np.asarray(stored)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"record {record.get('sample_id')!r}: mask_image is not an 8-bit grayscale label map")
    return mask


def decode_mask_volume(record: dict) -> np.ndarray | None:
    """A CT record's (D, H, W) uint8 label map on the grid of its volume, or None when it has none."""
    data = record.get("mask_volume")
    if not data:
        return None
    shape = tuple(int(s) for s in record["volume_shape"])
    if len(data) != int(np.prod(shape)):
        raise ValueError(
            f"record {record.get('sample_id')!r}: mask_volume has {len(data)} bytes, expected {int(np.prod(shape))} "
            f"for shape {shape}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def checked_boxes(boxes, box_labels) -> tuple[list[list[float]], list[str]]:
    """Boxes as [x0, y0, x1, y1] float lists (finite, x0 <= x1, y0 <= y1), one name each."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) if len(boxes) else np.zeros((0, 4), np.float32)
    if len(boxes) != len(box_labels):
        raise ValueError(f"{len(boxes)} boxes but {len(box_labels)} box_labels: each box needs one name")
    if not np.isfinite(boxes).all() or (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"boxes must be finite [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, got {boxes.tolist()}")
    return boxes.tolist(), [str(label) for label in box_labels]


def _checked_mask(mask: np.ndarray, ndim: int, mask_labels, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != ndim or mask.dtype.kind not in "iub":
        raise ValueError(f"{what} must be a {ndim}-D integer label map, got {mask.dtype} of shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > len(mask_labels) or mask.max() > 255):
        raise ValueError(
            f"{what} holds values {mask.min()}..{mask.max()}; values must be 0 (background) or 1..{len(mask_labels)} "
            f"(named by mask_labels {list(mask_labels)}), at most 255"
        )
    return np.ascontiguousarray(mask, dtype=np.uint8)


def xray_record(
    *, sample_id, source, split, report, image, labels=(), metadata=None, mask=None, mask_labels=(), boxes=(),
    box_labels=()
) -> dict:  # fmt: skip
    """A record for one X-ray; ``image`` is a PIL image, a path, or {"bytes": ...}. Optional dense labels: ``mask``
    ((H, W) integer label map the size of the image, values named by ``mask_labels``), ``boxes`` ([x0, y0, x1, y1]
    pixels) named by ``box_labels``."""
    boxes, box_labels = checked_boxes(boxes, box_labels)
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
        "slab_images": None,
        "slab_images_shape": [],
        "labels": list(labels),
        "metadata": json.dumps(metadata or {}),
        "mask_image": None if mask is None else encode_mask_image(mask, mask_labels),
        "mask_volume": None,
        "mask_labels": list(mask_labels),
        "boxes": boxes,
        "box_labels": box_labels,
    }


def ct_record(
    *, sample_id, source, split, report, volume, spacing, labels=(), metadata=None, slab_images=None, mask=None,
    mask_labels=()
) -> dict:  # fmt: skip
    """A record for one CT already in CANONICAL_ORIENTATION on the processor grid; ``slab_images`` (optional, HU
    (num_slabs, H, W)): its native slab images (``UniMedIVolumeProcessor.native_slab_images``); ``mask`` (optional):
    an integer label map on the same grid (``UniMedIVolumeProcessor.labels_to_grid``), values named by
    ``mask_labels``."""
    if mask is not None and np.shape(mask) != volume.shape:
        raise ValueError(f"CT mask of shape {np.shape(mask)} is not on the volume's grid {volume.shape}")
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
        "slab_images": None if slab_images is None else encode_volume(slab_images),
        "slab_images_shape": [] if slab_images is None else list(slab_images.shape),
        "labels": list(labels),
        "metadata": json.dumps(metadata or {}),
        "mask_image": None,
        "mask_volume": None if mask is None else _checked_mask(mask, 3, mask_labels, "CT mask").tobytes(),
        "mask_labels": list(mask_labels),
        "boxes": [],
        "box_labels": [],
    }
