"""The CT volume processor for UniMedI (reading CTs into a ``CTVolume`` is ``loading_unimedi.load_ct``).

``UniMedIVolumeProcessor`` puts a CT on the model grid ``volume_size`` (D, H, W) = (32, 128, 128) and windows it:

1. reorient (exact) from CANONICAL_ORIENTATION to the processor's ``orientation`` (the same by default);
2. ``fit_mode="resize"`` (the paper, appendix §7, resizes CT volumes to 32 x 128 x 128): resize the whole volume to
   ``volume_size``. ``fit_mode="crop_or_pad"``: resample to ``target_spacing`` when set, then centre-crop / pad with
   air (-1000 HU) to ``volume_size``. Resizing: axes that shrink are area-averaged (every voxel contributes, no
   aliasing of thin structures), axes that grow are linearly interpolated; so a volume smaller than the grid is
   upsampled. (``target_spacing`` is rejected with "resize": the whole-volume resize would undo it.)
3. HU window ``hu_window`` (default [-1000, 1000]) -> [0, 1], then (x - image_mean) / image_std (defaults 0.5 and
   0.5, so the output is in [-1, 1] like the X-ray processor's). A constant volume simply windows to a constant.

Steps 1-2 are ``resample_to_grid`` (float32 HU, what dataset preparation stores as int16); step 3, with random flips
along ``flip_axes`` when ``training=True``, is ``window_grid``, which the training collator calls on stored volumes.

Segmentation labels follow their CT: ``labels_to_grid`` applies steps 1-2 to an integer label map by nearest
neighbour, and ``labels_from_grid`` maps a label map on the grid (a prediction) back onto the original NIfTI's voxels
and affine.
"""

import gzip
import json
import math
import os
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import PROCESSOR_NAME, cached_file

from .image_processing_unimedi import processor_with_settings
from .loading_unimedi import (
    CANONICAL_ORIENTATION,
    MAX_VOXELS,
    CTVolume,
    check_real,
    check_spacing,
    checked_number,
    checked_numbers,
    import_nibabel,
    load_ct,
    reorient,
)

AIR_HU = -1000.0
FIT_MODES = ("resize", "crop_or_pad")
SLAB_IMAGE_REDUCTIONS = ("central", "mean")
AXIS_OF_CODE = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}


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
    slab_image_reduction: str


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
        slab_image_reduction (`str`, defaults to "mean"): how ``native_slab_images`` makes a depth slab's image from
            its native slices: their "mean", or the "central" one.
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
        slab_image_reduction: str = "mean",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.volume_size = checked_numbers("volume_size", volume_size, int, length=3)
        self.hu_window = checked_numbers("hu_window", hu_window, float, length=2)
        self.orientation = str(orientation).upper()
        self.target_spacing = None if target_spacing is None else checked_numbers("target_spacing", target_spacing)
        self.fit_mode = fit_mode
        self.image_mean = checked_number("image_mean", image_mean)
        self.image_std = checked_number("image_std", image_std)
        self.flip_axes = checked_numbers("flip_axes", flip_axes, int)
        self.flip_probability = checked_number("flip_probability", flip_probability)
        self.slab_image_reduction = slab_image_reduction
        self._validate_settings()

    def _validate_settings(self) -> None:
        if min(self.volume_size) < 1 or math.prod(self.volume_size) > MAX_VOXELS:
            raise ValueError(
                f"volume_size must be three positive sizes (D, H, W) of at most {MAX_VOXELS} voxels, "
                f"got {self.volume_size}"
            )
        if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if sorted(AXIS_OF_CODE.get(code, -1) for code in self.orientation) != [0, 1, 2]:
            raise ValueError(
                f"orientation must be three axis codes, one of L/R, A/P and S/I each, got {self.orientation!r}"
            )
        if not isinstance(self.fit_mode, str) or self.fit_mode not in FIT_MODES:
            raise ValueError(f"fit_mode must be one of {FIT_MODES}, got {self.fit_mode!r}")
        if not isinstance(self.slab_image_reduction, str) or self.slab_image_reduction not in SLAB_IMAGE_REDUCTIONS:
            raise ValueError(
                f"slab_image_reduction must be one of {SLAB_IMAGE_REDUCTIONS}, got {self.slab_image_reduction!r}"
            )
        if self.target_spacing is not None:
            if self.fit_mode == "resize":
                raise ValueError("target_spacing needs fit_mode='crop_or_pad': a whole-volume resize would undo it")
            check_spacing(self.target_spacing, "target_spacing")
        if self.image_std <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        if not set(self.flip_axes) <= {0, 1, 2} or not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(
                f"flip_axes must be within (0, 1, 2) and flip_probability in [0, 1], "
                f"got {self.flip_axes} and {self.flip_probability}"
            )

    def resample_to_grid(self, ct: CTVolume) -> np.ndarray:
        """Float32 HU on the processor grid (steps 1-2 of the module docstring), before windowing."""
        hu, spacing = self._reoriented(ct.hu, ct.spacing)
        volume = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
        if self.fit_mode == "resize":
            volume = resize_volume(volume, self.volume_size)
        else:
            if self.target_spacing is not None:
                volume = resize_volume(volume, self._fitted_shape(hu.shape, spacing, ct.source))
            volume = _center_crop_or_pad(volume, self.volume_size, AIR_HU)
        return volume[0, 0].numpy()

    def labels_to_grid(self, labels) -> np.ndarray:
        """An integer label map (a label NIfTI path or nibabel image with its CT's geometry, or a ``CTVolume`` of
        labels) as uint8 (D, H, W) on the processor grid, placed exactly as ``resample_to_grid`` places its CT: same
        reorientation and resampling geometry, but nearest-neighbour (voxel centres mapped as area/linear resizing
        maps them, so no label value is ever interpolated) and padded with background 0.

        Labels must be whole numbers in [0, 255]; nearest-neighbour shrinking can drop structures thinner than a grid
        voxel."""
        ct = labels if isinstance(labels, CTVolume) else load_ct(labels)
        _check_label_values(ct.hu, ct.source)
        data, spacing = self._reoriented(ct.hu, ct.spacing)
        volume = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
        grid = _resize_labels(volume, self._fitted_shape(data.shape, spacing, ct.source))
        return _center_crop_or_pad(grid, self.volume_size, 0)[0, 0].numpy().astype(np.uint8)

    def labels_from_grid(self, grid_labels, reference):
        """A label map on the processor grid (a model's prediction, (D, H, W) integers in [0, 255]) put back on the
        voxel grid of the ORIGINAL scan ``reference`` (a NIfTI path or nibabel image): the inverse of
        ``labels_to_grid`` (crop/pad undone, nearest-neighbour resampling to the scan's size, reorientation undone).
        Returns a uint8 ``nibabel.Nifti1Image`` with the reference's shape and affine."""
        nibabel = import_nibabel()
        image = reference if isinstance(reference, nibabel.spatialimages.SpatialImage) else nibabel.load(reference)
        name = str(reference) if isinstance(reference, (str, os.PathLike)) else "<reference image>"
        shape = tuple(image.shape)
        if len(shape) != 3:
            raise ValueError(f"{name}: the reference scan must be a 3-D volume, got shape {shape}")
        grid = grid_labels.detach().cpu().numpy() if isinstance(grid_labels, torch.Tensor) else np.asarray(grid_labels)
        if tuple(grid.shape) != self.volume_size:
            raise ValueError(
                f"grid labels of shape {tuple(grid.shape)} are not on the processor grid {self.volume_size}"
            )
        check_real(grid, "grid labels")
        _check_label_values(grid, "grid labels")
        start = nibabel.orientations.io_orientation(image.affine)
        zooms = np.sqrt((np.asarray(image.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
        canonical = nibabel.orientations.axcodes2ornt(tuple(CANONICAL_ORIENTATION))
        shape, spacing = _reoriented_geometry(shape, zooms, start, CANONICAL_ORIENTATION)
        shape, spacing = _reoriented_geometry(shape, spacing, canonical, self.orientation)
        tensor = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
        uncropped = _center_crop_or_pad(tensor, self._fitted_shape(shape, spacing, name), 0)
        oriented = _resize_labels(uncropped, shape)[0, 0].numpy()
        native_codes = "".join(nibabel.orientations.ornt2axcodes(start))
        grid_ornt = nibabel.orientations.axcodes2ornt(tuple(self.orientation))
        native, _ = reorient(oriented, spacing, grid_ornt, native_codes)
        result = nibabel.Nifti1Image(native.astype(np.uint8), image.affine)
        result.set_qform(image.affine, code=1)
        return result

    def _reoriented(self, data: np.ndarray, spacing) -> tuple[np.ndarray, tuple]:
        """``data`` (canonical orientation) and its spacing in the processor's ``orientation`` (exact)."""
        if self.orientation == CANONICAL_ORIENTATION:
            return data, spacing
        canonical = import_nibabel().orientations.axcodes2ornt(tuple(CANONICAL_ORIENTATION))
        return reorient(data, spacing, canonical, self.orientation)

    def _fitted_shape(self, shape, spacing, source: str) -> tuple[int, ...]:
        """The size a reoriented (``shape``, ``spacing``) volume is resampled to before the centre crop / pad."""
        if self.fit_mode == "resize":
            return self.volume_size
        if self.target_spacing is None:
            return tuple(shape)
        fitted = tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, self.target_spacing))
        if math.prod(fitted) > MAX_VOXELS:
            raise ValueError(
                f"{source}: target_spacing {self.target_spacing} would resample this {tuple(shape)} CT to "
                f"{fitted}, over {MAX_VOXELS} voxels; choose a coarser target_spacing"
            )
        return fitted

    def grid_spacing(self, ct: CTVolume) -> tuple[float, float, float]:
        """Voxel size in mm along (D, H, W) of ``resample_to_grid(ct)``: what a stored grid volume records."""
        canonical = import_nibabel().orientations.axcodes2ornt(tuple(CANONICAL_ORIENTATION))
        shape, spacing = _reoriented_geometry(ct.hu.shape, ct.spacing, canonical, self.orientation)
        if self.fit_mode == "resize":
            return tuple(float(s * n / g) for s, n, g in zip(spacing, shape, self.volume_size))
        return tuple(float(s) for s in (self.target_spacing or spacing))

    @classmethod
    def get_image_processor_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """The CT settings of a standalone save (``preprocessor_config.json``) or of a processor / model folder, where
        ``preprocessor_config.json`` holds the X-ray processor's and the CT settings are ``processor_config.json``'s
        "volume_processor"."""
        settings, kwargs = super().get_image_processor_dict(pretrained_model_name_or_path, **dict(kwargs))
        if settings.get("image_processor_type") == cls.__name__:
            return settings, kwargs
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "token", "revision", "subfolder") if k in kwargs}
        processor_file = cached_file(
            pretrained_model_name_or_path, PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if processor_file is not None:
            with open(processor_file, encoding="utf-8") as handle:
                volume_settings = json.load(handle).get("volume_processor")
            if isinstance(volume_settings, dict):
                return volume_settings, kwargs
        raise ValueError(
            f"{pretrained_model_name_or_path}: holds no {cls.__name__} settings (its preprocessor_config.json is a "
            f"{settings.get('image_processor_type')!r} and no {PROCESSOR_NAME} has a 'volume_processor' entry)"
        )

    def preprocess(
        self, volumes, return_tensors: str | None = "pt", training: bool = False, **settings
    ) -> BatchFeature:
        """``volumes``: one item or a list of items; see ``__call__``. ``settings``: this call's setting overrides."""
        if settings:
            return processor_with_settings(self, settings).preprocess(
                volumes, return_tensors=return_tensors, training=training
            )
        if isinstance(volumes, (np.ndarray, torch.Tensor)):
            return self.window_grid(volumes, return_tensors=return_tensors, training=training)
        items = list(volumes) if isinstance(volumes, (list, tuple)) else [volumes]
        grids = [item if isinstance(item, (np.ndarray, torch.Tensor)) else self._load_to_grid(item) for item in items]
        return self.window_grid(grids, return_tensors=return_tensors, training=training)

    def __call__(self, volumes, return_tensors: str | None = "pt", training: bool = False, **settings) -> BatchFeature:
        """CT volumes -> {"volume_values": (B, 1, D, H, W)}.

        ``volumes``: one item or a list; an item is anything ``load_ct`` reads from a path or nibabel image (e.g. the
        ``volume`` of a UniMedI dataset record, a NIfTI already on the grid: resampling it to the same grid changes
        nothing), an undecoded ``datasets.Nifti`` cell ({"bytes": ...}), or a ``CTVolume``; these are resampled to the
        grid. A numpy array or tensor carries no spacing, so it is taken as HU
        already on the grid and only windowed (``window_grid``): a (D, H, W) item, or a whole (B, D, H, W) or
        (B, 1, D, H, W) batch. Read any other array with ``load_ct(array, spacing=...)``. ``training=True`` enables the
        random flips; it is off by default. ``settings`` override the processor's settings for this call
        (``volume_size=(16, 96, 96)``, ``hu_window=(-160, 240)``, ...).
        """
        return self.preprocess(volumes, return_tensors=return_tensors, training=training, **settings)

    def window_grid(self, grids, return_tensors: str | None = "pt", training: bool = False) -> BatchFeature:
        """Step 3 (and the training flips) only, for HU already on the grid: what the training collator calls on stored
        int16 volumes.

        ``grids``: a list of (D, H, W) arrays/tensors, or one (D, H, W), (B, D, H, W) or (B, 1, D, H, W) array/tensor,
        each (D, H, W) equal to ``volume_size``; int16 or float.
        """
        tensors = [
            _grid_tensor(grid, self.volume_size, f"volume {index}") for index, grid in enumerate(_batch_items(grids))
        ]
        if not tensors:
            raise ValueError("no volumes given")
        if len({tensor.dtype for tensor in tensors}) > 1:
            tensors = [tensor.float() for tensor in tensors]
        # stored int16 HU (the training path) is stacked as int16 and converted once; it cannot hold NaN/inf
        batch = torch.stack(tensors)[:, None]
        if batch.is_floating_point() and not torch.isfinite(batch).all():
            raise ValueError("volumes on the processor grid hold NaN or infinite values")
        batch = batch.float()
        if training:
            self._random_flips_(batch)
        low, high = self.hu_window
        values = batch.sub_(low).div_(high - low).clamp_(0.0, 1.0).sub_(self.image_mean).div_(self.image_std)
        return BatchFeature({"volume_values": values}, tensor_type=return_tensors)

    def native_slab_images(self, ct: CTVolume, num_slabs: int, image_size: int = 224) -> np.ndarray:
        """Float32 HU (num_slabs, image_size, image_size): for each depth slab of the grid, one image of the
        original-resolution CT, resized in-plane to the 2D input size (the pseudo-2D images of §3.2 as real slices,
        not slices of the 32x128x128 grid).

        Slab i of the grid covers native slices [i n / S, (i + 1) n / S) (n native slices, S = ``num_slabs``), since
        ``fit_mode="resize"`` maps the whole depth onto the grid (``slab_native_slices``). ``slab_image_reduction``
        "mean" averages them, "central" takes the one at (i + 1/2) n / S. "mean" is the default: on the ground-truth
        generator's nodules and noise in the real CT (``python benchmarks/native_slices.py``: 200 nodule CTs, 287
        nodule slabs) the central slice misses the nodule in 55.7 % of the slabs that hold it; the mean's CNR is
        higher in 190 of 287 (Wilcoxon p = 5e-4) and against the noise 95.8 % reach the Rose criterion CNR >= 5
        against 44.3 % (exact McNemar p = 4e-42), while against the anatomy around the nodule neither is visible more
        often (19.9 % vs 18.5 %, p = 0.64).
        """
        if self.fit_mode != "resize":
            raise ValueError(f"native_slab_images needs fit_mode='resize' (got {self.fit_mode!r}): slab i is then "
                             "the i-th of num_slabs equal depth ranges of the CT")  # fmt: skip
        if not 1 <= num_slabs <= self.volume_size[0] or self.volume_size[0] % num_slabs:
            raise ValueError(f"num_slabs must divide the grid depth {self.volume_size[0]}, got {num_slabs}")
        hu, _ = self._reoriented(ct.hu, ct.spacing)
        if self.slab_image_reduction == "central":
            slabs = hu[slab_central_indices(hu.shape[0], num_slabs)].astype(np.float32)
        else:
            slices = slab_native_slices(hu.shape[0], num_slabs)
            slabs = np.stack([hu[native].mean(axis=0, dtype=np.float32) for native in slices])
        slabs = torch.from_numpy(np.ascontiguousarray(slabs))[None, None]
        return resize_volume(slabs, (num_slabs, image_size, image_size))[0, 0].numpy()

    def window_with_slab_images(self, grids, slab_images, training: bool = False) -> BatchFeature:
        """``window_grid`` for volumes together with their native slab images (a list of (S, H, W) HU arrays, one
        per volume, from ``native_slab_images``): both windowed alike, and each training flip applied to a volume and
        its images together (volume axes D, H, W = slab, row, column). Returns ``volume_values`` and ``slab_images``
        (B, S, 1, H, W)."""
        volumes = self.window_grid(grids, return_tensors="pt")["volume_values"]
        images = [torch.as_tensor(np.array(item, dtype=np.float32)) for item in slab_images]  # a writable copy
        if len(images) != volumes.shape[0] or len({tuple(image.shape) for image in images}) > 1:
            raise ValueError(
                f"slab_images: need one (S, H, W) array of one shape per volume, got {len(images)} arrays of shapes "
                f"{sorted({tuple(image.shape) for image in images})} for {volumes.shape[0]} volumes"
            )
        images = torch.stack(images)
        if images.ndim != 4 or not torch.isfinite(images).all():
            raise ValueError(f"slab_images: arrays must be (S, H, W) and finite, got shape {tuple(images.shape[1:])}")
        low, high = self.hu_window
        images = images.sub_(low).div_(high - low).clamp_(0.0, 1.0).sub_(self.image_mean).div_(self.image_std)
        images = images[:, :, None]
        if training:
            image_axis = {0: 0, 1: 2, 2: 3}  # volume (D, H, W) -> images (S, 1, H, W)
            for index in range(volumes.shape[0]):
                axes = [axis for axis in self.flip_axes if torch.rand(()) < self.flip_probability]
                if axes:
                    volumes[index] = volumes[index].flip([axis + 1 for axis in axes])
                    images[index] = images[index].flip([image_axis[axis] for axis in axes])
        return BatchFeature({"volume_values": volumes, "slab_images": images})

    def _load_to_grid(self, item) -> np.ndarray:
        if isinstance(item, dict):
            item = _nifti_cell(item)
        return self.resample_to_grid(item if isinstance(item, CTVolume) else load_ct(item))

    def _random_flips_(self, batch: torch.Tensor) -> None:
        """Flip each (1, D, H, W) volume of the batch in place along each of ``flip_axes`` with ``flip_probability``."""
        for index in range(batch.shape[0]):
            axes = [axis + 1 for axis in self.flip_axes if torch.rand(()) < self.flip_probability]
            if axes:
                batch[index] = batch[index].flip(axes)


def _nifti_cell(cell: dict):
    """A ``datasets.Nifti`` cell left undecoded ({"bytes": ..., "path": ...}, e.g. a streamed record read with
    ``Nifti(decode=False)``) as what ``load_ct`` reads: its NIfTI bytes as a nibabel image, or else its path."""
    if cell.get("bytes") is not None:
        data = cell["bytes"]
        data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        return import_nibabel().Nifti1Image.from_bytes(data)
    if cell.get("path") is not None:
        return cell["path"]
    raise ValueError(f"a NIfTI cell needs 'bytes' or 'path', got keys {sorted(cell)} without either")


def slab_central_indices(depth: int, num_slabs: int) -> list[int]:
    """The native slice at the centre of each of ``num_slabs`` equal depth ranges of a ``depth``-slice CT."""
    return [min(depth - 1, int((index + 0.5) * depth / num_slabs)) for index in range(num_slabs)]


def slab_native_slices(depth: int, num_slabs: int) -> list[slice]:
    """The native slices of each of ``num_slabs`` equal depth ranges [i n / S, (i + 1) n / S) of an n = ``depth``-slice
    CT: those whose centre lies in the range (each slice in one slab), or the central slice alone for a range thinner
    than a slice."""
    slices = []
    for index, central in enumerate(slab_central_indices(depth, num_slabs)):
        start, stop = (-((num_slabs - 2 * edge * depth) // (2 * num_slabs)) for edge in (index, index + 1))
        slices.append(slice(start, stop) if stop > start else slice(central, central + 1))
    return slices


def resize_volume(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """(1, 1, D, H, W) resized to ``size``: shrinking axes area-averaged, growing axes linearly interpolated."""
    shrunk = tuple(min(have, want) for have, want in zip(volume.shape[-3:], size))
    if shrunk != tuple(volume.shape[-3:]):
        volume = F.interpolate(volume, size=shrunk, mode="area")
    if shrunk != tuple(size):
        volume = F.interpolate(volume, size=size, mode="trilinear", align_corners=False)
    return volume


def _resize_labels(labels: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(1, 1, D, H, W) labels resized to ``size`` by nearest neighbour, output voxel centre (i + 1/2) n / m reading
    input voxel floor of it: the centre mapping ``resize_volume`` uses, without mixing label values."""
    if tuple(labels.shape[-3:]) == tuple(size):
        return labels
    return F.interpolate(labels, size=tuple(size), mode="nearest-exact")


def _check_label_values(labels: np.ndarray, name: str) -> None:
    """Refuse label maps that a uint8 label volume cannot hold exactly (fractions, negatives, over 255)."""
    whole = labels.dtype.kind in "biu" or np.array_equal(labels, np.rint(labels))
    if labels.size and (labels.min() < 0 or labels.max() > 255 or not whole):
        raise ValueError(
            f"{name}: a label map must hold whole numbers in [0, 255], got values from {labels.min()} to "
            f"{labels.max()}{'' if whole else ' with fractions'}"
        )


def _reoriented_geometry(shape, spacing, start_ornt, target_codes: str) -> tuple[tuple[int, ...], tuple]:
    """Shape and spacing of a ``shape`` volume in orientation ``start_ornt`` after ``reorient`` to ``target_codes``,
    without touching voxels."""
    orientations = import_nibabel().orientations
    transform = orientations.ornt_transform(start_ornt, orientations.axcodes2ornt(tuple(target_codes)))
    new_shape, new_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for old_axis, (new_axis, _flip) in enumerate(transform):
        new_shape[int(new_axis)], new_spacing[int(new_axis)] = int(shape[old_axis]), float(spacing[old_axis])
    return tuple(new_shape), tuple(new_spacing)


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


def _batch_items(grids) -> list:
    """The (D, H, W) items of a list, of one (D, H, W) array, or of a (B, D, H, W) / (B, 1, D, H, W) batch."""
    if not isinstance(grids, (np.ndarray, torch.Tensor)):
        return list(grids)
    if grids.ndim == 3:
        return [grids]
    if grids.ndim == 4:
        return list(grids)
    if grids.ndim == 5 and grids.shape[1] == 1:
        return list(grids[:, 0])
    raise ValueError(
        f"<array>: volumes on the grid must be (D, H, W), (B, D, H, W) or (B, 1, D, H, W), got shape "
        f"{tuple(grids.shape)}"
    )


def _grid_tensor(grid, volume_size: tuple[int, int, int], name: str) -> torch.Tensor:
    """One volume on the grid as an int16 or float32 tensor; a ValueError when it is not on the grid."""
    if not isinstance(grid, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name}: a volume on the grid is a numpy array or tensor, got {type(grid).__name__}")
    if isinstance(grid, np.ndarray):
        check_real(grid, name)
    elif grid.is_complex():
        raise ValueError(f"{name}: tensor of dtype {grid.dtype} is not real-valued image data")
    if tuple(grid.shape) != volume_size:
        raise ValueError(
            f"<array>: shape {tuple(grid.shape)} is not the processor grid {volume_size}; "
            "give its spacing with load_ct(array, spacing=...) and pass the CTVolume"
        )
    tensor = torch.from_numpy(np.array(grid)) if isinstance(grid, np.ndarray) else grid.detach().cpu()
    return tensor if tensor.dtype in (torch.int16, torch.float32) else tensor.float()
