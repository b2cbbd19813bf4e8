"""CT volume loading and the CT volume processor for UniMedI.

``load_ct`` reads NIfTI files, DICOM series folders (or one multi-frame DICOM), nibabel images and arrays into a
``CTVolume`` in CANONICAL_ORIENTATION using exact flips/transposes only (no interpolation: label masks survive).

``UniMedIVolumeProcessor`` puts a CT on the model grid ``volume_size`` (D, H, W) = (32, 128, 128) and windows it:

1. reorient (exact) from CANONICAL_ORIENTATION to the processor's ``orientation`` (the same by default);
2. ``fit_mode="resize"`` (the paper, appendix §7, resizes CT volumes to 32 x 128 x 128): resize the whole volume to
   ``volume_size``. ``fit_mode="crop_or_pad"``: resample to ``target_spacing`` when set, then centre-crop / pad with
   air (-1000 HU) to ``volume_size``. Resizing: axes that shrink are area-averaged (every voxel contributes, no
   aliasing of thin structures), axes that grow are linearly interpolated; so a volume smaller than the grid is
   upsampled. (``target_spacing`` is rejected with "resize": the whole-volume resize would undo it.)
3. HU window ``hu_window`` (default [-1000, 1000]) -> [0, 1], then (x - image_mean) / image_std (defaults 0.5 and
   0.5, so the output is in [-1, 1] like the X-ray processor's). A constant volume simply windows to a constant.

Steps 1-2 are ``resample_to_grid`` (float32 HU, what dataset preparation stores as int16); ``__call__`` adds step 3 and,
with ``training=True`` only, random flips along ``flip_axes``.
"""

import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .image_processing_unimedi import dicom_pixels, existing_path, import_pydicom, is_dicom_file, read_dicom

# Array axes (D, H, W) of a processed CT: D runs inferior->superior, H anterior->posterior, W patient right->left,
# i.e. nibabel axis codes ("S", "P", "L"). An axial slice volume[d] then displays in radiological convention
# (anterior at the top, the patient's right on the viewer's left), the same way a frontal X-ray is shown.
CANONICAL_ORIENTATION = "SPL"

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
AIR_HU = -1000.0
FIT_MODES = ("resize", "crop_or_pad")
AXIS_OF_CODE = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}
# DICOM patient coordinates are LPS; nibabel affines are RAS: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Largest relative spread of slice gaps accepted in a DICOM series (a larger one usually means a missing slice).
MAX_SLICE_GAP_SPREAD = 0.1


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
        return _from_spatial_image(source, _nibabel_data(source), source.get_filename())
    raise TypeError(f"cannot read a CT from {type(source).__name__}; give a path, nibabel image or array")


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def _load_path(path: Path) -> CTVolume:
    if path.is_dir():
        return _load_dicom_series(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return _load_nifti(path)
    if path.name.lower().endswith(DICOM_SUFFIXES) or is_dicom_file(path):
        return _load_dicom_file(path)
    raise ValueError(
        f"{path}: unknown CT file type; expected a NIfTI file {NIFTI_SUFFIXES}, a DICOM file or a DICOM series folder"
    )


def _import_nibabel():
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
    nibabel = _import_nibabel()
    try:
        image = nibabel.load(path)
        stored = _nibabel_data(image)
    except (nibabel.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as err:
        raise ValueError(f"{path}: cannot read NIfTI file ({err})") from err
    return _from_spatial_image(image, stored, str(path))


def _nibabel_data(image) -> tuple[np.ndarray, float, float]:
    """Stored values and the file's (slope, intercept), applied later in float32 (nibabel's path is float64)."""
    proxy = image.dataobj
    if hasattr(proxy, "get_unscaled"):
        return proxy.get_unscaled(), float(proxy.slope), float(proxy.inter)
    return np.asarray(proxy), 1.0, 0.0


def _from_spatial_image(image, stored: tuple[np.ndarray, float, float], name: str | None) -> CTVolume:
    data, slope, intercept = stored
    name = name or "<nibabel image>"
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    elif data.ndim == 4:
        raise ValueError(
            f"{name}: 4-D image with {data.shape[3]} volumes (shape {data.shape}); give one 3-D CT volume"
        )
    _check_volume_shape(data.shape, name)
    _check_nifti_geometry(image, name)
    return _reoriented(data, image.affine, name, slope, intercept)


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
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    _check_spacing(zooms, name)
    start = _import_nibabel().orientations.io_orientation(affine)
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
    orientations = _import_nibabel().orientations
    transform = orientations.ornt_transform(start_ornt, orientations.axcodes2ornt(tuple(target_codes)))
    new_spacing = [0.0, 0.0, 0.0]
    for old_axis, (new_axis, _flip) in enumerate(transform):
        new_spacing[int(new_axis)] = float(spacing[old_axis])
    return np.ascontiguousarray(orientations.apply_orientation(data, transform), dtype=np.float32), tuple(new_spacing)


def _from_array(array, spacing) -> CTVolume:
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array
    if data.ndim != 3:
        raise ValueError(f"<array>: a CT array must be 3-D (D, H, W), got shape {tuple(data.shape)}")
    if spacing is None:
        raise ValueError("<array>: spacing (mm along D, H, W) is required to read a CT from an array")
    _check_volume_shape(data.shape, "<array>")
    _check_spacing(spacing, "<array>")
    hu = np.ascontiguousarray(data, dtype=np.float32)
    _check_finite(hu, "<array>")
    return CTVolume(hu=hu, spacing=tuple(float(s) for s in spacing), source="<array>")


def _check_volume_shape(shape: tuple, name: str) -> None:
    if len(shape) != 3:
        raise ValueError(f"{name}: a CT volume must be 3-D, got {len(shape)}-D data of shape {shape}")
    if min(shape) < 2:
        raise ValueError(f"{name}: shape {shape} has a single slice along an axis; that is a 2-D image, not a volume")


def _check_spacing(spacing, name: str) -> None:
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
    """(path, dataset) of the DICOM files directly in ``folder``; other files are skipped; one series only."""
    pydicom = import_pydicom()
    datasets, skipped = [], 0
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            datasets.append((path, pydicom.dcmread(path)))
        except pydicom.errors.InvalidDicomError:
            skipped += 1
    if not datasets:
        raise ValueError(f"{folder}: no DICOM files in this folder ({skipped} other files skipped)")
    series: dict[str, list] = {}
    for path, dataset in datasets:
        series.setdefault(str(dataset.get("SeriesInstanceUID", "<no SeriesInstanceUID>")), []).append((path, dataset))
    if len(series) > 1:
        listing = "; ".join(
            f"{uid} ({members[0][1].get('SeriesDescription', '')!r}, {len(members)} files)"
            for uid, members in series.items()
        )
        raise ValueError(f"{folder}: mixes {len(series)} DICOM series, give one series per folder: {listing}")
    return datasets


def _tag(dataset, keyword: str, name) -> list[float]:
    if keyword not in dataset:
        raise ValueError(f"{name}: DICOM lacks {keyword}, needed to place slices in space")
    return [float(v) for v in dataset[keyword].value]


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
    return [float(v) for v in item[keyword].value]


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
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = step
    affine_lps[:3, 1] = column_cosines * float(pixel_spacing[0])
    affine_lps[:3, 2] = row_cosines * float(pixel_spacing[1])
    affine_lps[:3, 3] = origins[order[0]]
    volume = np.stack([planes[index] for index in order])
    return _reoriented(volume, LPS_TO_RAS @ affine_lps, name)


class UniMedIVolumeProcessorKwargs(TypedDict, total=False):
    """The saved settings of ``UniMedIVolumeProcessor`` (``from_pretrained`` accepts them as overrides)."""

    volume_size: list[int]
    hu_window: list[float]
    orientation: str
    target_spacing: list[float] | None
    fit_mode: str
    image_mean: float
    image_std: float
    flip_axes: list[int]
    flip_probability: float


class UniMedIVolumeProcessor(BaseImageProcessor):
    r"""CT volumes -> ``BatchFeature({"volume_values": (B, 1, D, H, W) float32})`` (see the module docstring).

    Args:
        volume_size (`(D, H, W)`, defaults to (32, 128, 128)): the model grid.
        hu_window (`(low, high)`, defaults to (-1000, 1000)): HU mapped linearly to [0, 1], clipped outside.
        orientation (`str`, defaults to CANONICAL_ORIENTATION): nibabel axis codes of the output (D, H, W) axes.
        target_spacing (`(D, H, W)` mm, optional): resample to this spacing first; only with fit_mode "crop_or_pad".
        fit_mode (`str`, defaults to "resize"): "resize" the whole volume, or "crop_or_pad" it to ``volume_size``.
        image_mean, image_std (`float`, defaults 0.5 and 0.5): output = (windowed - mean) / std.
        flip_axes (`list[int]`, defaults to [2]): axes (0=D, 1=H, 2=W) randomly flipped when ``training=True``.
        flip_probability (`float`, defaults to 0.5): chance of flipping each of ``flip_axes`` when training.
    """

    model_input_names = ["volume_values"]
    valid_kwargs = UniMedIVolumeProcessorKwargs

    def __init__(
        self,
        volume_size: tuple[int, int, int] = (32, 128, 128),
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        orientation: str = CANONICAL_ORIENTATION,
        target_spacing: tuple[float, float, float] | None = None,
        fit_mode: str = "resize",
        image_mean: float = 0.5,
        image_std: float = 0.5,
        flip_axes: tuple[int, ...] = (2,),
        flip_probability: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.volume_size = tuple(int(s) for s in volume_size)
        self.hu_window = tuple(float(v) for v in hu_window)
        self.orientation = str(orientation).upper()
        self.target_spacing = None if target_spacing is None else tuple(float(s) for s in target_spacing)
        self.fit_mode = fit_mode
        self.image_mean = float(image_mean)
        self.image_std = float(image_std)
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.flip_probability = float(flip_probability)
        self._validate_settings()

    def _validate_settings(self) -> None:
        if len(self.volume_size) != 3 or min(self.volume_size) < 1:
            raise ValueError(f"volume_size must be three positive sizes (D, H, W), got {self.volume_size}")
        if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if sorted(AXIS_OF_CODE.get(code, -1) for code in self.orientation) != [0, 1, 2]:
            raise ValueError(
                f"orientation must be three axis codes, one of L/R, A/P and S/I each, got {self.orientation!r}"
            )
        if self.fit_mode not in FIT_MODES:
            raise ValueError(f"fit_mode must be one of {FIT_MODES}, got {self.fit_mode!r}")
        if self.target_spacing is not None:
            if self.fit_mode == "resize":
                raise ValueError("target_spacing needs fit_mode='crop_or_pad': a whole-volume resize would undo it")
            _check_spacing(self.target_spacing, "target_spacing")
        if self.image_std <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        if not set(self.flip_axes) <= {0, 1, 2} or not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(
                f"flip_axes must be within (0, 1, 2) and flip_probability in [0, 1], "
                f"got {self.flip_axes} and {self.flip_probability}"
            )

    def resample_to_grid(self, ct: CTVolume) -> np.ndarray:
        """Float32 HU on the processor grid (steps 1-2 of the module docstring), before windowing."""
        hu, spacing = ct.hu, ct.spacing
        if self.orientation != CANONICAL_ORIENTATION:
            canonical = _import_nibabel().orientations.axcodes2ornt(tuple(CANONICAL_ORIENTATION))
            hu, spacing = reorient(hu, spacing, canonical, self.orientation)
        volume = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
        if self.fit_mode == "resize":
            volume = resize_volume(volume, self.volume_size)
        else:
            if self.target_spacing is not None:
                shape = [max(1, round(n * s / t)) for n, s, t in zip(hu.shape, spacing, self.target_spacing)]
                volume = resize_volume(volume, tuple(shape))
            volume = _center_crop_or_pad(volume, self.volume_size, AIR_HU)
        return volume[0, 0].numpy()

    def grid_spacing(self, ct: CTVolume) -> tuple[float, float, float]:
        """Voxel size in mm along (D, H, W) of ``resample_to_grid(ct)``: what a stored grid volume records."""
        shape, spacing = ct.hu.shape, ct.spacing
        if self.orientation != CANONICAL_ORIENTATION:
            canonical = _import_nibabel().orientations.axcodes2ornt(tuple(CANONICAL_ORIENTATION))
            shape_only = np.broadcast_to(np.float32(0), shape)  # reorient the geometry, not the voxels
            reoriented, spacing = reorient(shape_only, spacing, canonical, self.orientation)
            shape = reoriented.shape
        if self.fit_mode == "resize":
            return tuple(float(s * n / g) for s, n, g in zip(spacing, shape, self.volume_size))
        return tuple(float(s) for s in (self.target_spacing or spacing))

    def preprocess(self, volumes, return_tensors: str | None = "pt", training: bool = False) -> BatchFeature:
        """``volumes``: one item or a list of items; see ``__call__``."""
        grids = [self._grid_hu(item) for item in _as_volume_list(volumes, self.volume_size)]
        if not grids:
            raise ValueError("no volumes given")
        if len({grid.dtype for grid in grids}) > 1:
            grids = [grid.float() for grid in grids]
        # stored int16 HU (the training path) is stacked as int16 and converted once; it cannot hold NaN/inf
        batch = torch.stack(grids)[:, None]
        if batch.is_floating_point() and not torch.isfinite(batch).all():
            raise ValueError("volumes on the processor grid hold NaN or infinite values")
        batch = batch.float()
        if training:
            self._random_flips_(batch)
        low, high = self.hu_window
        values = batch.sub_(low).div_(high - low).clamp_(0.0, 1.0).sub_(self.image_mean).div_(self.image_std)
        return BatchFeature({"volume_values": values}, tensor_type=return_tensors)

    def __call__(self, volumes, return_tensors: str | None = "pt", training: bool = False) -> BatchFeature:
        """CT volumes -> {"volume_values": (B, 1, D, H, W)}.

        ``volumes`` items: anything ``load_ct`` takes, a ``CTVolume``, or an array already on the grid (shape ==
        ``volume_size``, e.g. stored int16 HU), which is only windowed. A (B, D, H, W) or (B, 1, D, H, W) array on the
        grid is read as a batch. ``training=True`` enables the random flips; it is off by default.
        """
        return self.preprocess(volumes, return_tensors=return_tensors, training=training)

    def _grid_hu(self, item) -> torch.Tensor:
        if isinstance(item, (np.ndarray, torch.Tensor)):
            if tuple(item.shape) != self.volume_size:
                raise ValueError(
                    f"<array>: shape {tuple(item.shape)} is not the processor grid {self.volume_size}; "
                    "give its spacing with load_ct(array, spacing=...) and pass the CTVolume"
                )
            tensor = torch.from_numpy(np.array(item)) if isinstance(item, np.ndarray) else item.detach().cpu()
            return tensor if tensor.dtype in (torch.int16, torch.float32) else tensor.float()
        ct = item if isinstance(item, CTVolume) else load_ct(item)
        return torch.from_numpy(self.resample_to_grid(ct))

    def _random_flips_(self, batch: torch.Tensor) -> None:
        """Flip each (1, D, H, W) volume of the batch in place along each of ``flip_axes`` with ``flip_probability``."""
        for index in range(batch.shape[0]):
            axes = [axis + 1 for axis in self.flip_axes if torch.rand(()) < self.flip_probability]
            if axes:
                batch[index] = batch[index].flip(axes)


def resize_volume(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """(1, 1, D, H, W) resized to ``size``: shrinking axes area-averaged, growing axes linearly interpolated."""
    shrunk = tuple(min(have, want) for have, want in zip(volume.shape[-3:], size))
    if shrunk != tuple(volume.shape[-3:]):
        volume = F.interpolate(volume, size=shrunk, mode="area")
    if shrunk != tuple(size):
        volume = F.interpolate(volume, size=size, mode="trilinear", align_corners=False)
    return volume


def _center_crop_or_pad(volume: torch.Tensor, size: tuple[int, int, int], fill: float) -> torch.Tensor:
    for axis, want in zip((2, 3, 4), size):
        have = volume.shape[axis]
        if have > want:
            volume = volume.narrow(axis, (have - want) // 2, want)
        elif have < want:
            before = (want - have) // 2
            pad = [0, 0] * (4 - axis) + [before, want - have - before]
            volume = F.pad(volume, pad, value=fill)
    return volume


def _as_volume_list(volumes, volume_size: tuple[int, int, int]) -> list:
    if isinstance(volumes, (list, tuple)):
        return list(volumes)
    if isinstance(volumes, (np.ndarray, torch.Tensor)):
        if volumes.ndim == 4 and tuple(volumes.shape[1:]) == volume_size:
            return list(volumes)
        if volumes.ndim == 5 and volumes.shape[1] == 1 and tuple(volumes.shape[2:]) == volume_size:
            return list(volumes[:, 0])
    return [volumes]
