"""Reading X-rays and CT volumes from files, images and arrays: what UniMedI's processors take as input.

Decoding lives here, apart from the processors (which keep geometry and intensity only), as transformers keeps it in
``image_utils.load_image`` and MONAI in ``LoadImage``.

``load_xray`` (intensity rule): 8-bit images are divided by 255; every other input (16-bit PNG/TIFF, DICOM after its
modality LUT and VOI LUT/window, integer or float arrays) is min-max scaled by its own value range, except float arrays
already inside [0, 1], which are kept. Colour and alpha are reduced to luminance (alpha dropped). DICOM MONOCHROME1
images are inverted so that bone is bright, as in MONOCHROME2.

``load_ct`` reads NIfTI files, DICOM series folders (or one multi-frame DICOM), nibabel images and arrays into a
``CTVolume`` in CANONICAL_ORIENTATION using exact flips/transposes only (no interpolation: label masks survive).

Declared sizes are checked before anything is allocated, and an input that would be read wrongly (sheared DICOM series,
guessed NIfTI voxel sizes, multi-page images, complex data, ...) is refused with an error naming the file and the
problem; the README lists them ("What inputs are refused").
"""

import io
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
# ITU-R 601-2 luma weights, the ones PIL uses for mode "L".
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
PIL_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")

# Array axes (D, H, W) of a loaded CT: D runs inferior->superior, H anterior->posterior, W patient right->left,
# i.e. nibabel axis codes ("S", "P", "L"). An axial slice volume[d] then displays in radiological convention
# (anterior at the top, the patient's right on the viewer's left), the same way a frontal X-ray is shown.
CANONICAL_ORIENTATION = "SPL"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# DICOM patient coordinates are LPS; nibabel affines are RAS: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Largest relative spread of slice gaps accepted in a DICOM series (a larger one usually means a missing slice).
MAX_SLICE_GAP_SPREAD = 0.1
# Most voxels a loaded CT, a DICOM image or a processor's intermediate grid may have (4 GiB as float32): a damaged
# header or a setting asking for more is refused before anything is allocated.
MAX_VOXELS = 2**30
# DEFLATE cannot compress by more than 1032:1, so a .nii.gz holds at most this many times its size in data.
MAX_GZIP_RATIO = 1032
# In-plane shift of consecutive DICOM slices, relative to their spacing, above which a series is sheared (gantry tilt).
MAX_SLICE_SHEAR = 0.01
# EXIF orientation tag: values 2-8 mean the stored pixels must be flipped/rotated for display.
EXIF_ORIENTATION = 0x0112
MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # a DICOMDIR


def existing_path(source: str | os.PathLike) -> Path:
    """``source`` as a Path, or a FileNotFoundError that names it."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return path


def import_pydicom():
    """pydicom, imported on first use: it is an optional dependency (``pip install unimedi[dicom]``)."""
    try:
        import pydicom
    except ImportError as err:
        raise ImportError("reading DICOM needs pydicom: pip install 'pydicom>=3'") from err
    return pydicom


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` carries the DICOM Part 10 signature ("DICM" after the 128-byte preamble)."""
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def read_dicom(path: Path):
    """The pydicom Dataset of ``path``; a ValueError naming the file when it is not readable DICOM."""
    pydicom = import_pydicom()
    try:
        return pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: not a readable DICOM file ({err})") from err


def dicom_pixels(dataset, name: str) -> np.ndarray:
    """Decoded stored pixel values of a DICOM dataset, with errors that name the file.

    The declared size is checked against MAX_VOXELS before decoding, so a damaged header cannot ask for a huge array.
    """
    if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ValueError(f"{name}: DICOM file holds no pixel data (no PixelData element)")
    size_tags = ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel")
    declared = [int(dataset.get(tag) or 1) for tag in size_tags]
    if min(declared) < 1 or math.prod(declared) > MAX_VOXELS:
        raise ValueError(
            f"{name}: DICOM header declares {' x '.join(map(str, declared))} ({'/'.join(size_tags)}) values; "
            f"that is empty or more than {MAX_VOXELS}"
        )
    try:
        return dataset.pixel_array
    except Exception as err:  # pydicom raises many types for undecodable or truncated pixel data
        raise ValueError(f"{name}: cannot decode DICOM pixel data ({err})") from err


def checked_number(name: str, value, kind: type = float):
    """``value`` as a finite ``kind`` (int or float), else a ValueError naming the setting: saved JSON settings can hold
    strings, NaN or Infinity where a number belongs."""
    accepted = (int, np.integer) if kind is int else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, accepted) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite {kind.__name__}, got {value!r}")
    return kind(value)


def checked_bool(name: str, value) -> bool:
    """``value`` if it is True or False, else a ValueError naming the setting (``bool("false")`` would be True)."""
    if value is not True and value is not False:
        raise ValueError(f"`{name}` must be true or false, got {value!r}")
    return value


def checked_numbers(name: str, value, kind: type = float, length: int | None = None) -> tuple:
    """A list/tuple of finite ``kind`` values (exactly ``length`` of them when given), else a ValueError naming it."""
    if not isinstance(value, (list, tuple, np.ndarray)) or (length is not None and len(value) != length):
        raise ValueError(f"`{name}` must be a list of {length or 'any number of'} {kind.__name__}s, got {value!r}")
    return tuple(checked_number(f"{name}[{index}]", item, kind) for index, item in enumerate(value))


def check_real(values: np.ndarray, name: str) -> None:
    """Refuse arrays that are not real numbers (complex, object, strings): casting would silently drop information."""
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{name}: array of dtype {values.dtype} is not real-valued image data")


def load_xray(source, apply_voi_lut: bool = True) -> np.ndarray:
    """One X-ray as float32 (H, W) grayscale in [0, 1], bright bone (see the module docstring for the rule).

    ``source``: a path (PNG, JPEG, BMP, TIFF, DICOM; files without a known extension are read as DICOM when they carry
    the DICOM signature), a PIL image, or a numpy/torch array shaped (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_xray_file(existing_path(source), apply_voi_lut)
    if isinstance(source, Image.Image):
        return _pil_to_unit_gray(source, "<PIL image>")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _array_to_unit_gray(source, "<array>")
    raise TypeError(f"cannot read an X-ray from {type(source).__name__}; give a path, PIL image or array")


def _load_xray_file(path: Path, apply_voi_lut: bool) -> np.ndarray:
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; an X-ray is a single image file")
    suffix = path.suffix.lower()
    if suffix in RASTER_EXTENSIONS:
        return _read_raster(path)
    if suffix in DICOM_EXTENSIONS or is_dicom_file(path):
        return _read_dicom_xray(path, apply_voi_lut)
    raise ValueError(
        f"{path}: unknown X-ray file extension {suffix!r}; expected one of {RASTER_EXTENSIONS + DICOM_EXTENSIONS}"
    )


def _read_raster(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return _pil_to_unit_gray(image, str(path))
    except Image.DecompressionBombError as err:  # a header declaring far more pixels than an X-ray has
        raise ValueError(f"{path}: image too large to decode safely ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL reports truncated/corrupt data as these
        raise ValueError(f"{path}: not a readable image ({err})") from err


def _pil_to_unit_gray(image: Image.Image, name: str) -> np.ndarray:
    """Gray [0, 1] of a PIL image shown upright: EXIF orientation applied; multi-page files are refused.

    MPO files (camera JPEGs with extra pictures) are read as their primary image, frame 0, as the MPO format defines.
    """
    if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
        raise ValueError(f"{name}: {image.n_frames}-page image; an X-ray is a single picture, give one page")
    image.load()
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in PIL_HIGH_DEPTH_MODES:
        return _scale_to_unit(np.asarray(image), name)
    return _scale_to_unit(np.asarray(image.convert("L")), name)


def _array_to_unit_gray(array, name: str) -> np.ndarray:
    values = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    check_real(values, name)
    if values.ndim == 3:
        values = _luminance(_channels_last(values, channels_first_default=isinstance(array, torch.Tensor), name=name))
    if values.ndim != 2:
        raise ValueError(f"{name}: X-ray array must be (H, W), (H, W, C) or (C, H, W), got shape {values.shape}")
    return _scale_to_unit(values, name)


def _channels_last(values: np.ndarray, channels_first_default: bool, name: str) -> np.ndarray:
    """(H, W, C) view of a 3-D array whose channel axis (size 1, 3 or 4) is first or last."""
    first, last = values.shape[0] in (1, 3, 4), values.shape[-1] in (1, 3, 4)
    if not (first or last):
        raise ValueError(f"{name}: cannot find a channel axis of size 1, 3 or 4 in shape {values.shape}")
    if first and (channels_first_default or not last):
        return np.moveaxis(values, 0, -1)
    return values


def _luminance(values: np.ndarray) -> np.ndarray:
    """Gray (H, W) from (H, W, C): one channel is kept, RGB(A) is reduced to luma (alpha dropped)."""
    if values.shape[-1] == 1:
        return values[..., 0]
    luma = values[..., :3].astype(np.float32) @ LUMA_WEIGHTS
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8) if values.dtype == np.uint8 else luma


def _scale_to_unit(gray: np.ndarray, name: str) -> np.ndarray:
    """[0, 1] float32: uint8 / 255, float already in [0, 1] kept, anything else min-max scaled."""
    if gray.size == 0:
        raise ValueError(f"{name}: image of shape {gray.shape} holds no pixels")
    if gray.dtype == np.uint8:
        return gray.astype(np.float32) / 255.0
    if np.issubdtype(gray.dtype, np.floating) and gray.min() >= 0.0 and gray.max() <= 1.0:
        return gray.astype(np.float32)
    return _min_max(gray, name)


def _min_max(values: np.ndarray, name: str) -> np.ndarray:
    """Values scaled by their own range to [0, 1] float32; a constant image becomes 0."""
    values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: image holds NaN or infinite pixel values")
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _read_dicom_xray(path: Path, apply_voi_lut: bool) -> np.ndarray:
    dicom_pixel_tools = import_pydicom().pixels
    dataset = read_dicom(path)
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ValueError(f"{path}: multi-frame DICOM ({frames} frames) is not a single X-ray")
    pixels = dicom_pixels(dataset, str(path))
    if dataset.get("PhotometricInterpretation") == "PALETTE COLOR":  # stored values index a colour table
        pixels = _dicom_lut(dicom_pixel_tools.apply_color_lut, pixels, dataset, path, "palette colour table")
    if pixels.ndim == 3:  # colour: pydicom already converted YBR to RGB
        return _scale_to_unit(_luminance(pixels), str(path))
    values = _dicom_lut(dicom_pixel_tools.apply_modality_lut, pixels, dataset, path, "modality LUT / rescale")
    if apply_voi_lut:
        _check_window_width(dataset, path)
        values = _dicom_lut(dicom_pixel_tools.apply_voi_lut, values, dataset, path, "VOI LUT / window")
    unit = _min_max(np.asarray(values), str(path))  # DICOM values have no fixed range
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are bright: invert
        unit = 1.0 - unit
    return unit


def _dicom_lut(apply, pixels: np.ndarray, dataset, path: Path, what: str) -> np.ndarray:
    try:
        return apply(pixels, dataset)
    except Exception as err:  # pydicom raises ValueError/KeyError/IndexError for malformed tables
        raise ValueError(f"{path}: cannot apply the DICOM {what} ({err})") from err


def _check_window_width(dataset, path: Path) -> None:
    """A window of width <= 0 maps nothing; pydicom's message does not name the file or the way out."""
    if "VOILUTSequence" in dataset or "WindowWidth" not in dataset:
        return
    width = float(dataset.WindowWidth[0] if dataset["WindowWidth"].VM > 1 else dataset.WindowWidth)
    if not (math.isfinite(width) and width > 0):  # pydicom applies the first window
        raise ValueError(
            f"{path}: DICOM WindowWidth must be positive, got {width}; "
            "pass apply_voi_lut=False to read the image without its window"
        )


@dataclass
class CTVolume:
    """A CT (or label mask) in CANONICAL_ORIENTATION, values exactly as stored."""

    hu: np.ndarray  # float32 (D, H, W): HU, or labels for a mask
    spacing: tuple[float, float, float]  # mm along (D, H, W)
    source: str  # file/folder name or "<array>" for error messages


def load_ct(source, spacing=None) -> CTVolume:
    """Read a CT into CANONICAL_ORIENTATION with exact flips/transposes only.

    ``source``: a ``.nii``/``.nii.gz`` path, a DICOM series folder (slices ordered by position along the slice normal,
    rescaled to HU), a multi-frame DICOM file, a nibabel image, or a numpy/torch (D, H, W) array taken as already
    canonical, for which ``spacing`` (mm along D, H, W) is required.
    """
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _from_array(source, spacing)
    if spacing is not None:
        raise ValueError(f"{_describe(source)}: spacing is only for arrays; files and images carry their own")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(existing_path(source))
    if _is_nibabel_image(source):
        return _from_spatial_image(source, source.get_filename() or "<nibabel image>")
    raise TypeError(f"cannot read a CT from {type(source).__name__}; give a path, nibabel image or array")


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def _load_path(path: Path) -> CTVolume:
    if path.is_dir():
        return _load_dicom_series(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return _load_nifti(path)
    if path.name.lower().endswith(DICOM_EXTENSIONS) or is_dicom_file(path):
        return _load_dicom_file(path)
    raise ValueError(
        f"{path}: unknown CT file type; expected a NIfTI file {NIFTI_SUFFIXES}, a DICOM file or a DICOM series folder"
    )


def import_nibabel():
    try:
        import nibabel
    except ImportError as err:
        raise ImportError("reading NIfTI and reorienting CT volumes needs nibabel: pip install nibabel") from err
    return nibabel


def _is_nibabel_image(source) -> bool:
    """Without importing nibabel: a caller holding a nibabel image has already imported it."""
    nibabel = sys.modules.get("nibabel")
    return nibabel is not None and isinstance(source, nibabel.spatialimages.SpatialImage)


def _load_nifti(path: Path) -> CTVolume:
    """The header is checked as stored before nibabel reads it: nibabel silently replaces a zero or negative pixdim."""
    nibabel = import_nibabel()
    header = _stored_nifti_header(path)
    if header is not None:
        _check_nifti_header(header, path)
    try:
        image = nibabel.load(path)
    except (nibabel.filebasedimages.ImageFileError, nibabel.spatialimages.HeaderDataError, OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read NIfTI file ({err})") from err
    return _from_spatial_image(image, str(path))


def _stored_nifti_header(path: Path):
    """The NIfTI-1/2 header of ``path`` exactly as stored (nibabel's load fixes some fields), or None if neither."""
    nibabel = import_nibabel()
    try:
        with nibabel.openers.ImageOpener(path) as handle:
            raw = handle.read(nibabel.Nifti2Header.sizeof_hdr)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: cannot read NIfTI file ({err})") from err
    for header_class in (nibabel.Nifti1Header, nibabel.Nifti2Header):
        if len(raw) >= header_class.sizeof_hdr and header_class.sizeof_hdr in (
            int.from_bytes(raw[:4], "little"),
            int.from_bytes(raw[:4], "big"),
        ):
            return header_class.from_fileobj(io.BytesIO(raw), check=False)
    return None


def _check_nifti_header(header, path: Path) -> None:
    """Refuse headers that would allocate more than the file can hold, or whose values would be guessed or lost."""
    dims = [int(d) for d in header["dim"]]
    if not 1 <= dims[0] <= 7 or min(dims[1 : dims[0] + 1]) < 1:
        raise ValueError(f"{path}: NIfTI dim field {dims} is not a valid image shape")
    try:
        dtype = header.get_data_dtype()
    except import_nibabel().spatialimages.HeaderDataError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf":
        kind = header.get_value_label("datatype")
        raise ValueError(
            f"{path}: NIfTI datatype {kind!r} is not real-valued voxel data; store the CT as int16 or float"
        )
    num_voxels = math.prod(dims[1 : dims[0] + 1])
    if num_voxels > MAX_VOXELS:
        raise ValueError(f"{path}: NIfTI header declares shape {dims[1 : dims[0] + 1]}, over {MAX_VOXELS} voxels")
    data_bytes, file_bytes = num_voxels * dtype.itemsize, path.stat().st_size
    compressed = path.name.lower().endswith(".gz")
    room = file_bytes * MAX_GZIP_RATIO if compressed else file_bytes - int(header["vox_offset"])
    if data_bytes > room:
        raise ValueError(
            f"{path}: NIfTI header declares shape {dims[1 : dims[0] + 1]} ({data_bytes} bytes of {dtype}), more than "
            f"this {file_bytes}-byte file can hold: the file is truncated or its header damaged"
        )
    pixdim = [float(v) for v in header["pixdim"][1:4]]
    if not all(math.isfinite(v) and v > 0 for v in pixdim):
        raise ValueError(
            f"{path}: NIfTI pixdim (voxel size in mm) {pixdim} is not positive, so the spacing is unknown"
        )
    slope, intercept = float(header["scl_slope"]), float(header["scl_inter"])
    scaled = slope != 0 and not math.isnan(slope)  # NIfTI: scl_slope 0 or NaN means the values are not scaled
    if math.isinf(slope) or (scaled and not math.isfinite(intercept)):
        raise ValueError(f"{path}: NIfTI scl_slope/scl_inter ({slope}, {intercept}) must be finite")


def _nibabel_data(image, name: str) -> tuple[np.ndarray, float, float]:
    """Stored values and the file's (slope, intercept), applied later in float32 (nibabel's path is float64)."""
    nibabel = import_nibabel()
    proxy = image.dataobj
    try:
        if hasattr(proxy, "get_unscaled"):
            return proxy.get_unscaled(), float(proxy.slope), float(proxy.inter)
        return np.asarray(proxy), 1.0, 0.0
    except (nibabel.spatialimages.HeaderDataError, OSError, EOFError, ValueError, zlib.error) as err:
        raise ValueError(f"{name}: cannot read NIfTI file ({err})") from err


def _from_spatial_image(image, name: str) -> CTVolume:
    shape = tuple(image.shape)
    if len(shape) == 4 and shape[3] > 1:
        raise ValueError(f"{name}: 4-D image with {shape[3]} volumes (shape {shape}); give one 3-D CT volume")
    _check_volume_shape(shape[:3] if len(shape) == 4 else shape, name)
    if math.prod(shape) > MAX_VOXELS:
        raise ValueError(f"{name}: shape {shape} is over {MAX_VOXELS} voxels")
    _check_nifti_geometry(image, name)
    data, slope, intercept = _nibabel_data(image, name)
    check_real(data, name)
    return _reoriented(data.reshape(shape[:3]), image.affine, name, slope, intercept)


def _check_nifti_geometry(image, name: str) -> None:
    """Refuse a NIfTI without qform/sform: nibabel would guess an affine, so the orientation would be a guess."""
    header = image.header
    if "qform_code" in header and int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise ValueError(
            f"{name}: the NIfTI header has neither qform nor sform, so the patient orientation is unknown"
        )


def _reoriented(data: np.ndarray, affine: np.ndarray, name: str, slope=1.0, intercept=0.0) -> CTVolume:
    """Voxel axes of a RAS ``affine`` flipped/transposed to CANONICAL_ORIENTATION (nearest axes for oblique scans).

    ``data * slope + intercept`` is computed after the reorientation, in place on its float32 copy.
    """
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    zooms = np.sqrt((axes**2).sum(axis=0))
    check_spacing(zooms, name)
    if abs(np.linalg.det(axes)) < 1e-6 * np.prod(zooms):
        raise ValueError(f"{name}: singular affine, its voxel axes {axes.T.round(4).tolist()} are not independent")
    start = import_nibabel().orientations.io_orientation(affine)
    hu, spacing = reorient(data, tuple(zooms), start, CANONICAL_ORIENTATION)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    if np.issubdtype(data.dtype, np.floating) or slope != 1.0:
        _check_finite(hu, name)
    return CTVolume(hu=hu, spacing=spacing, source=name)


def _check_finite(hu: np.ndarray, name: str) -> None:
    if not np.isfinite(hu).all():
        raise ValueError(f"{name}: {hu.size - int(np.isfinite(hu).sum())} voxels are NaN or infinite")


def reorient(data: np.ndarray, spacing, start_ornt: np.ndarray, target_codes: str) -> tuple[np.ndarray, tuple]:
    """Exact flips/transposes of ``data`` from nibabel orientation ``start_ornt`` to axis codes ``target_codes``.

    Returns a C-contiguous float32 copy (one pass) and the spacing permuted alongside.
    """
    orientations = import_nibabel().orientations
    transform = orientations.ornt_transform(start_ornt, orientations.axcodes2ornt(tuple(target_codes)))
    new_spacing = [0.0, 0.0, 0.0]
    for old_axis, (new_axis, _flip) in enumerate(transform):
        new_spacing[int(new_axis)] = float(spacing[old_axis])
    return np.ascontiguousarray(orientations.apply_orientation(data, transform), dtype=np.float32), tuple(new_spacing)


def _from_array(array, spacing) -> CTVolume:
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array
    check_real(data, "<array>")
    if data.ndim != 3:
        raise ValueError(f"<array>: a CT array must be 3-D (D, H, W), got shape {tuple(data.shape)}")
    if spacing is None:
        raise ValueError("<array>: spacing (mm along D, H, W) is required to read a CT from an array")
    _check_volume_shape(data.shape, "<array>")
    check_spacing(spacing, "<array>")
    hu = np.ascontiguousarray(data, dtype=np.float32)
    _check_finite(hu, "<array>")
    return CTVolume(hu=hu, spacing=tuple(float(s) for s in spacing), source="<array>")


def _check_volume_shape(shape: tuple, name: str) -> None:
    if len(shape) != 3:
        raise ValueError(f"{name}: a CT volume must be 3-D, got {len(shape)}-D data of shape {shape}")
    if min(shape) < 2:
        raise ValueError(f"{name}: shape {shape} has a single slice along an axis; that is a 2-D image, not a volume")


def check_spacing(spacing, name: str) -> None:
    values = np.asarray(spacing, dtype=np.float64)
    if values.shape != (3,) or not np.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"{name}: spacing must be three positive finite mm values, got {values.tolist()}")


def _load_dicom_series(folder: Path) -> CTVolume:
    apply_modality_lut = import_pydicom().pixels.apply_modality_lut
    datasets = _read_series_folder(folder)
    first = datasets[0][1]
    planes, positions = [], []
    for path, dataset in datasets:
        _check_same_plane(dataset, first, path)
        planes.append(apply_modality_lut(dicom_pixels(dataset, str(path)), dataset).astype(np.float32))
        positions.append(_tag(dataset, "ImagePositionPatient", path))
    return _assemble_volume(
        str(folder),
        planes,
        positions,
        _tag(first, "ImageOrientationPatient", folder),
        _tag(first, "PixelSpacing", folder),
    )


def _read_series_folder(folder: Path) -> list:
    """(path, dataset) of the DICOM slices directly in ``folder``, one series only.

    Files that are not DICOM are skipped, as is a DICOMDIR (a media index, not a slice); a file named ``.dcm`` that
    does not read, or a DICOM file without SeriesInstanceUID (usually truncated), is refused by name.
    """
    pydicom = import_pydicom()
    datasets, skipped = [], 0
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            dataset = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError as err:
            if path.suffix.lower() in DICOM_EXTENSIONS:
                raise ValueError(f"{path}: not a readable DICOM file ({err})") from err
            skipped += 1
            continue
        except (OSError, EOFError, ValueError) as err:
            raise ValueError(f"{path}: not a readable DICOM file ({err})") from err
        if dataset.file_meta.get("MediaStorageSOPClassUID") == MEDIA_DIRECTORY_SOP_CLASS:
            skipped += 1
            continue
        if "SeriesInstanceUID" not in dataset:
            raise ValueError(
                f"{path}: DICOM file without SeriesInstanceUID (truncated?); it is not a slice of a series"
            )
        datasets.append((path, dataset))
    if not datasets:
        raise ValueError(f"{folder}: no DICOM files in this folder ({skipped} other files skipped)")
    series: dict[str, list] = {}
    for path, dataset in datasets:
        series.setdefault(str(dataset.SeriesInstanceUID), []).append((path, dataset))
    if len(series) > 1:
        listing = "; ".join(
            f"{uid} ({members[0][1].get('SeriesDescription', '')!r}, {len(members)} files, e.g. {members[0][0].name})"
            for uid, members in series.items()
        )
        raise ValueError(f"{folder}: mixes {len(series)} DICOM series, give one series per folder: {listing}")
    return datasets


def _tag(dataset, keyword: str, name) -> list[float]:
    if keyword not in dataset:
        raise ValueError(f"{name}: DICOM lacks {keyword}, needed to place slices in space")
    return _finite_values(dataset[keyword].value, keyword, name)


def _finite_values(values, keyword: str, name) -> list[float]:
    floats = [float(v) for v in values]
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(f"{name}: DICOM {keyword} holds non-finite values {floats}")
    return floats


def _check_same_plane(dataset, first, path: Path) -> None:
    for keyword in ("ImageOrientationPatient", "PixelSpacing"):
        if not np.allclose(_tag(dataset, keyword, path), _tag(first, keyword, path), atol=1e-4):
            raise ValueError(f"{path}: {keyword} differs from the other slices of the series")


def _load_dicom_file(path: Path) -> CTVolume:
    dataset = read_dicom(path)
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames < 2:
        raise ValueError(
            f"{path}: a single-frame DICOM file is one slice, not a CT volume; give the folder holding the series"
        )
    if "PerFrameFunctionalGroupsSequence" not in dataset:
        raise ValueError(f"{path}: multi-frame DICOM without PerFrameFunctionalGroupsSequence (no frame positions)")
    pixels = dicom_pixels(dataset, str(path))
    planes, positions = [], []
    for index in range(frames):
        slope, intercept = _frame_rescale(dataset, index)
        planes.append(pixels[index].astype(np.float32) * np.float32(slope) + np.float32(intercept))
        positions.append(_frame_value(dataset, index, "PlanePositionSequence", "ImagePositionPatient", path))
    orientation = _frame_value(dataset, 0, "PlaneOrientationSequence", "ImageOrientationPatient", path)
    pixel_spacing = _frame_value(dataset, 0, "PixelMeasuresSequence", "PixelSpacing", path)
    return _assemble_volume(str(path), planes, positions, orientation, pixel_spacing)


def _frame_item(dataset, index: int, sequence: str):
    """The functional-group item ``sequence`` of frame ``index``: per-frame first, then shared."""
    for groups in (dataset.PerFrameFunctionalGroupsSequence[index], _shared_groups(dataset)):
        if groups is not None and sequence in groups:
            return groups[sequence][0]
    return None


def _shared_groups(dataset):
    return dataset.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in dataset else None


def _frame_value(dataset, index: int, sequence: str, keyword: str, path: Path) -> list[float]:
    item = _frame_item(dataset, index, sequence)
    if item is None or keyword not in item:
        raise ValueError(f"{path}: frame {index} lacks {sequence}/{keyword}, needed to place it in space")
    return _finite_values(item[keyword].value, keyword, path)


def _frame_rescale(dataset, index: int) -> tuple[float, float]:
    item = _frame_item(dataset, index, "PixelValueTransformationSequence") or dataset
    return float(item.get("RescaleSlope", 1.0)), float(item.get("RescaleIntercept", 0.0))


def _assemble_volume(name: str, planes: list, positions: list, orientation: list, pixel_spacing: list) -> CTVolume:
    """Stack DICOM planes ordered by their position along the slice normal and build the (RAS) affine.

    Voxel (k, i, j) = plane k, row i, column j sits at IPP_k + i * PixelSpacing[0] * column_cosines
    + j * PixelSpacing[1] * row_cosines, in LPS patient coordinates.
    """
    if len(planes) < 2:
        raise ValueError(f"{name}: a single DICOM slice is not a CT volume")
    if len({plane.shape for plane in planes}) != 1:
        raise ValueError(f"{name}: slices have different sizes {sorted({plane.shape for plane in planes})}")
    row_cosines, column_cosines = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    if len(orientation) != 6 or not (
        np.allclose(
            [row_cosines @ row_cosines, column_cosines @ column_cosines, row_cosines @ column_cosines],
            [1, 1, 0],
            atol=1e-2,
        )
    ):
        raise ValueError(f"{name}: ImageOrientationPatient {orientation} is not two orthogonal unit vectors")
    normal = np.cross(row_cosines, column_cosines)
    origins = np.asarray(positions, dtype=np.float64)
    order = np.argsort(origins @ normal, kind="stable")
    gaps = np.diff((origins @ normal)[order])
    if gaps.min() < 1e-3:
        raise ValueError(f"{name}: several slices share one position along the slice normal (duplicate slices?)")
    if gaps.max() - gaps.min() > MAX_SLICE_GAP_SPREAD * np.median(gaps):
        raise ValueError(
            f"{name}: uneven slice gaps ({gaps.min():.3f} to {gaps.max():.3f} mm); a slice may be missing"
        )
    step = (origins[order[-1]] - origins[order[0]]) / (len(order) - 1)
    shear = np.linalg.norm(step - (step @ normal) * normal)
    if shear > MAX_SLICE_SHEAR * abs(step @ normal):
        raise ValueError(
            f"{name}: each slice is shifted {shear:.3f} mm within its plane (gantry tilt of "
            f"{math.degrees(math.atan2(shear, abs(step @ normal))):.1f} degrees), so the volume is sheared; "
            "resample the series to an untilted grid first"
        )
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = step
    affine_lps[:3, 1] = column_cosines * float(pixel_spacing[0])
    affine_lps[:3, 2] = row_cosines * float(pixel_spacing[1])
    affine_lps[:3, 3] = origins[order[0]]
    volume = np.stack([planes[index] for index in order])
    return _reoriented(volume, LPS_TO_RAS @ affine_lps, name)
