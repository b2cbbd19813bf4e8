"""One record layout for every UniMedI pretraining/evaluation source, X-ray and CT alike.

Shards are parquet files readable with ``datasets.load_dataset("parquet", data_files=..., streaming=True)`` (or
``load_dataset(folder)`` through the dataset card next to them). A CT is stored already reoriented to the canonical
orientation and resampled to the processor grid, as an uncompressed NIfTI-1 file in a ``datasets.Nifti`` column: the
file's affine carries the voxel spacing and orientation, so a loaded record's ``volume`` is a nibabel image that viewers
show and ``UniMedIProcessor(volumes=[record["volume"]])`` reads like any CT. The voxel axes (i, j, k) of the file are the
grid's (W, H, D), the usual layout of a CT NIfTI (axial slices along k); NIfTI's column-major data is then byte for byte
the row-major (D, H, W) array, which training reads straight from the bytes (``decode_volume``) without decoding
through nibabel. The processor's HU window and normalisation are applied at load time.
"""

import io
import json
from typing import NamedTuple

import numpy as np
import PIL.Image
from datasets import Features, Image, Nifti, Sequence, Value

from modeling_unimedi.loading_unimedi import CANONICAL_ORIENTATION, check_spacing, import_nibabel

XRAY = "xray"
CT = "ct"
MODALITIES = (XRAY, CT)
# The NIfTI axis codes of a stored grid: voxel axes (i, j, k) = grid axes (W, H, D).
GRID_AXCODES = tuple(reversed(CANONICAL_ORIENTATION))
REGENERATE = (
    "regenerate the folder with the current code: `python -m processing.groundtruth --out <folder> --overwrite` for "
    "the generated benchmark, `python -m processing.prepare <dataset> ... --overwrite` for a public dataset"
)
OLD_LAYOUT = (
    "holds a CT in the old layout (raw int16 bytes with a `volume_shape` column); CT records are now NIfTI files "
    "(`datasets.Nifti`): " + REGENERATE
)


FEATURES = Features(
    {
        "sample_id": Value("string"),
        "source": Value("string"),  # e.g. "mimic-cxr", "bimcv", "ct-rate", "groundtruth"
        "split": Value("string"),  # "train" | "validation" | "test"
        "modality": Value("string"),  # XRAY | CT
        "report": Value("string"),  # cleaned English report text (FINDINGS + IMPRESSION)
        "image": Image(),  # X-ray as PNG/JPEG (8- or 16-bit grayscale); None for CT
        # CT: int16 HU on the processor grid as a NIfTI-1 file (``encode_grid``), spacing and orientation in its
        # affine; None for X-ray
        "volume": Nifti(),
        # CT, optional: per depth slab of the grid, its native-resolution image at the 2D input size (the mean or the
        # central of its native slices, ``UniMedIVolumeProcessor.slab_image_reduction``; int16 HU, a NIfTI-1 grid of
        # (num_slabs, H, W) over the same extent as ``volume``); None when not stored and for X-rays
        "slab_images": Nifti(),
        "labels": Sequence(Value("string")),  # finding names when known (benchmark data); [] otherwise
        "metadata": Value("string"),  # JSON object with source-specific extras (ids, view, lesion slabs, ...)
        # Dense labels, optional (None / [] when absent). Mask values: 0 background, k = mask_labels[k - 1].
        "mask_image": Image(),  # X-ray: uint8 label map as an 8-bit grayscale PNG, the size of ``image``
        "mask_volume": Nifti(),  # CT: uint8 label map on the grid of ``volume``, a NIfTI-1 file like it
        "mask_labels": Sequence(Value("string")),  # names of the mask values 1..K
        "boxes": Sequence(Sequence(Value("float32"), length=4)),  # X-ray: [x0, y0, x1, y1] pixels of ``image``
        "box_labels": Sequence(Value("string")),  # the name of each box
    }
)


class Grid(NamedTuple):
    """A (D, H, W) array in CANONICAL_ORIENTATION, as stored, and its voxel size in mm along (D, H, W)."""

    array: np.ndarray
    spacing: tuple[float, float, float]


def undecoded(dataset):
    """``dataset`` (a ``datasets`` Dataset or IterableDataset) with its image and NIfTI columns left as the stored
    bytes, which the collators decode per batch (straight from the bytes for grids, after any shuffle or skip)."""
    present = dataset.features.keys() if dataset.features is not None else FEATURES.keys()
    for name in present:
        feature = FEATURES.get(name)
        if isinstance(feature, (Image, Nifti)):
            dataset = dataset.cast_column(name, type(feature)(decode=False))
    return dataset


def grid_affine(shape: tuple[int, int, int], spacing) -> np.ndarray:
    """The NIfTI affine of a (D, H, W) grid in CANONICAL_ORIENTATION with voxel size ``spacing`` (mm along D, H, W):
    voxel axes (i, j, k) = (W, H, D), axis-aligned, the grid's centre at the world origin."""
    orientations = import_nibabel().orientations
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    zooms = np.asarray(spacing, dtype=np.float64)[::-1]
    for voxel_axis, (world_axis, direction) in enumerate(orientations.axcodes2ornt(GRID_AXCODES)):
        affine[int(world_axis), voxel_axis] = direction * zooms[voxel_axis]
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape[::-1], dtype=np.float64) - 1) / 2)
    return affine


def encode_grid(array: np.ndarray, spacing) -> dict:
    """The ``datasets.Nifti`` value of a (D, H, W) array on a grid in CANONICAL_ORIENTATION (any real dtype, stored
    as is: int16 HU, uint8 labels, ...) with its voxel size in mm along (D, H, W): uncompressed NIfTI-1 bytes."""
    nibabel = import_nibabel()
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"a grid must be a real 3-D (D, H, W) array, got {array.dtype} of shape {array.shape}")
    check_spacing(spacing, "grid")
    affine = grid_affine(array.shape, spacing)
    image = nibabel.Nifti1Image(np.ascontiguousarray(array).T, affine)  # F-order (W, H, D): same bytes as C (D, H, W)
    image.set_qform(affine, code="aligned")
    image.set_sform(affine, code="aligned")
    image.header.set_xyzt_units("mm")
    return {"bytes": image.to_bytes(), "path": None}


def decode_grid(value, name: str) -> Grid:
    """A grid stored by ``encode_grid``: ``value`` is a record's ``datasets.Nifti`` cell, undecoded ({"bytes": ...},
    what streams with ``Nifti(decode=False)`` give) or decoded (a nibabel image). The array is a read-only view of
    the stored bytes when undecoded; ``name`` (e.g. "record 'ct7' volume") names the cell in errors."""
    if value is None:
        raise ValueError(f"{name}: no grid stored")
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name} {OLD_LAYOUT}")
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            raise ValueError(f"{name}: the NIfTI cell holds no bytes (path {value.get('path')!r})")
        if data[:2] == b"\x1f\x8b":
            raise ValueError(f"{name}: the NIfTI is gzip-compressed; grids are stored uncompressed (encode_grid)")
        header = import_nibabel().Nifti1Header(binaryblock=bytes(data[:348]), check=False)
        shape, spacing = _grid_geometry(header, name)
        offset, count = int(header["vox_offset"]), int(np.prod(shape))
        dtype = header.get_data_dtype()
        if len(data) < offset + count * dtype.itemsize:
            raise ValueError(f"{name}: {len(data)} bytes cannot hold a {shape} grid of {dtype} at offset {offset}")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        return Grid(array, spacing)
    header = getattr(value, "header", None)
    if header is None or not hasattr(value, "dataobj"):
        raise TypeError(
            f"{name}: expected a NIfTI cell ({{'bytes': ...}} or a nibabel image), got {type(value).__name__}"
        )
    shape, spacing = _grid_geometry(header, name)
    return Grid(np.asarray(value.dataobj).T.reshape(shape), spacing)


def _grid_geometry(header, name: str) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(D, H, W) shape and spacing of a NIfTI header written by ``encode_grid``; a ValueError for any other NIfTI."""
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) != 3:
        raise ValueError(f"{name}: a grid is 3-D, the NIfTI holds shape {shape}")
    slope, intercept = (float(header[key]) for key in ("scl_slope", "scl_inter"))
    unscaled = (np.isnan(slope) or slope in (0.0, 1.0)) and (np.isnan(intercept) or intercept == 0.0)
    if not unscaled:
        raise ValueError(
            f"{name}: a grid stores its values unscaled, the NIfTI has scl_slope/inter {slope}/{intercept}"
        )
    affine = header.get_best_affine()
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # exact signs: encode_grid writes axis-aligned affines, so any obliquity or another orientation shows here
    if not np.array_equal(np.sign(affine[:3, :3]), np.sign(grid_affine(shape[::-1], (1.0, 1.0, 1.0))[:3, :3])):
        codes = "".join(str(code) for code in import_nibabel().orientations.aff2axcodes(affine))
        raise ValueError(
            f"{name}: not a grid in the canonical orientation (voxel axes {codes}, expected {''.join(GRID_AXCODES)} "
            "without obliquity): store CTs with encode_grid"
        )
    return shape[::-1], tuple(float(z) for z in zooms[::-1])


def decode_volume(record: dict) -> np.ndarray:
    """The (D, H, W) int16 HU array of a CT record."""
    volume = decode_grid(record.get("volume"), f"record {record.get('sample_id')!r} volume").array
    if volume.dtype != np.int16:
        raise ValueError(f"record {record.get('sample_id')!r} volume: a CT is stored as int16 HU, got {volume.dtype}")
    return volume


def decode_slab_images(record: dict) -> np.ndarray | None:
    """A CT record's stored native slab images (int16 HU, (num_slabs, H, W)), or None when it has none."""
    if record.get("slab_images") is None:
        return None
    return decode_grid(record["slab_images"], f"record {record.get('sample_id')!r} slab_images").array


def _checked_hu(volume: np.ndarray, what: str) -> np.ndarray:
    """``volume`` rounded to int16 after checking it is finite and fits the int16 range."""
    if volume.ndim != 3:
        raise ValueError(f"{what} must be 3-D, got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise ValueError(f"{what} holds non-finite voxels; refusing to store it")
    lo, hi = float(volume.min()), float(volume.max())
    if lo < np.iinfo(np.int16).min or hi > np.iinfo(np.int16).max:
        raise ValueError(f"{what}: values [{lo}, {hi}] do not fit int16 Hounsfield units")
    return np.rint(volume).astype(np.int16)


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
    if record.get("mask_volume") is None:
        return None
    name = f"record {record.get('sample_id')!r} mask_volume"
    mask = decode_grid(record["mask_volume"], name).array
    if mask.dtype != np.uint8:
        raise ValueError(f"{name}: a label map is stored as uint8, got {mask.dtype}")
    return mask


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
        "slab_images": None,
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
    """A record for one CT already in CANONICAL_ORIENTATION on the processor grid (HU, ``spacing`` in mm along D, H, W);
    ``slab_images`` (optional, HU (num_slabs, H, W)): its native slab images
    (``UniMedIVolumeProcessor.native_slab_images``), stored as a grid over the same extent (slab i centred on the
    grid's depth slab i), so that a viewer overlays them on the volume; ``mask`` (optional): an integer label map on
    the same grid (``UniMedIVolumeProcessor.labels_to_grid``), values named by ``mask_labels``."""
    volume = _checked_hu(volume, f"CT {sample_id!r} volume")
    if mask is not None and np.shape(mask) != volume.shape:
        raise ValueError(f"CT mask of shape {np.shape(mask)} is not on the volume's grid {volume.shape}")
    if slab_images is not None:
        slab_images = _checked_hu(slab_images, f"CT {sample_id!r} slab_images")
        extent = np.asarray(spacing, dtype=np.float64) * volume.shape
        slab_images = encode_grid(slab_images, tuple(extent / slab_images.shape))
    return {
        "sample_id": sample_id,
        "source": source,
        "split": split,
        "modality": CT,
        "report": report,
        "image": None,
        "volume": encode_grid(volume, spacing),
        "slab_images": slab_images,
        "labels": list(labels),
        "metadata": json.dumps(metadata or {}),
        "mask_image": None,
        "mask_volume": None if mask is None else encode_grid(_checked_mask(mask, 3, mask_labels, "CT mask"), spacing),
        "mask_labels": list(mask_labels),
        "boxes": [],
        "box_labels": [],
    }
