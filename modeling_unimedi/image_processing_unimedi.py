"""X-ray image processor for UniMedI.

Paper pipeline (appendix §7, 2D classification): resize the longer side to 256, zero-pad to a square, crop 224
(centre crop at inference, random crop when ``training=True``), scale to [0, 1] and normalise with
``image_mean``/``image_std``. The defaults (mean 0.5, std 0.5) map [0, 1] to [-1, 1]: the input range of timm's
ImageNet ViT-B/16 (augreg) and of MGCA's pipeline, and a zero-centred input that a ViT trained from scratch learns
from far faster than from [0, 1] (see README, ground-truth benchmark). The CT processor uses the same defaults, because
the model turns CT slices into pseudo-2D images and both must agree. Grayscale is replicated to
``num_channels`` (3 by default: the 2D patch embedding is ImageNet-initialised).

Intensity rule (``load_xray``): 8-bit images are divided by 255; every other input (16-bit PNG/TIFF, DICOM after its
modality LUT and VOI LUT/window, integer or float arrays) is min-max scaled by its own value range, except float
arrays already inside [0, 1], which are kept. Colour and alpha are reduced to luminance (alpha dropped). DICOM
MONOCHROME1 images are inverted so that bone is bright, as in MONOCHROME2.
"""

import os
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
# ITU-R 601-2 luma weights, the ones PIL uses for mode "L".
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
PIL_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


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
    """Decoded stored pixel values of a DICOM dataset, with errors that name the file."""
    if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ValueError(f"{name}: DICOM file holds no pixel data (no PixelData element)")
    try:
        return dataset.pixel_array
    except Exception as err:  # pydicom raises many types for undecodable or truncated pixel data
        raise ValueError(f"{name}: cannot decode DICOM pixel data ({err})") from err


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
            image.load()
            return _pil_to_unit_gray(image, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL reports truncated/corrupt data as these
        raise ValueError(f"{path}: not a readable image ({err})") from err


def _pil_to_unit_gray(image: Image.Image, name: str) -> np.ndarray:
    if image.mode in PIL_HIGH_DEPTH_MODES:
        return _scale_to_unit(np.asarray(image), name)
    return _scale_to_unit(np.asarray(image.convert("L")), name)


def _array_to_unit_gray(array, name: str) -> np.ndarray:
    values = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
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
    if pixels.ndim == 3:  # colour: pydicom already converted YBR to RGB
        return _scale_to_unit(_luminance(pixels), str(path))
    values = dicom_pixel_tools.apply_modality_lut(pixels, dataset)
    if apply_voi_lut:
        values = dicom_pixel_tools.apply_voi_lut(values, dataset)
    unit = _min_max(np.asarray(values), str(path))  # DICOM values have no fixed range
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are bright: invert
        unit = 1.0 - unit
    return unit


class UniMedIImageProcessorKwargs(TypedDict, total=False):
    """The saved settings of ``UniMedIImageProcessor`` (``from_pretrained`` accepts them as overrides)."""

    longest_edge: int
    crop_size: int
    num_channels: int
    image_mean: float | list[float]
    image_std: float | list[float]
    apply_voi_lut: bool


class UniMedIImageProcessor(BaseImageProcessor):
    r"""Chest X-rays -> ``BatchFeature({"pixel_values": (B, num_channels, crop_size, crop_size) float32})``.

    Args:
        longest_edge (`int`, defaults to 256): the longer image side is resized to this (bilinear, antialiased), the
            image is then zero-padded (centred) to a ``longest_edge`` square.
        crop_size (`int`, defaults to 224): side of the square crop taken from the padded image: centred, or random
            when called with ``training=True``.
        num_channels (`int`, defaults to 3): grayscale is replicated to this many channels.
        image_mean, image_std (`float` or per-channel list, defaults 0.5 and 0.5): output = (x - mean) / std, x in
            [0, 1].
        apply_voi_lut (`bool`, defaults to True): apply a DICOM's VOI LUT or window (after its modality LUT / rescale).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = UniMedIImageProcessorKwargs

    def __init__(
        self,
        longest_edge: int = 256,
        crop_size: int = 224,
        num_channels: int = 3,
        image_mean: float | list[float] = 0.5,
        image_std: float | list[float] = 0.5,
        apply_voi_lut: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0 < crop_size <= longest_edge:
            raise ValueError(f"crop_size must be in (0, longest_edge={longest_edge}], got {crop_size}")
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.longest_edge = int(longest_edge)
        self.crop_size = int(crop_size)
        self.num_channels = int(num_channels)
        self.image_mean = _per_channel(image_mean, num_channels, "image_mean")
        self.image_std = _per_channel(image_std, num_channels, "image_std")
        if any(std <= 0 for std in self.image_std):
            raise ValueError(f"image_std must be positive, got {image_std}")
        self.apply_voi_lut = bool(apply_voi_lut)

    def preprocess(self, images, return_tensors: str | None = "pt", training: bool = False) -> BatchFeature:
        """``images``: one image or a list (paths, PIL images, arrays; see ``load_xray``), or a 4-D batch array."""
        crops = [self._square_crop(load_xray(image, self.apply_voi_lut), training) for image in _as_list(images)]
        if not crops:
            raise ValueError("no images given")
        batch = torch.stack(crops).expand(-1, self.num_channels, -1, -1)
        mean = torch.tensor(self.image_mean).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std).view(1, -1, 1, 1)
        return BatchFeature({"pixel_values": (batch - mean) / std}, tensor_type=return_tensors)

    def _square_crop(self, gray: np.ndarray, training: bool) -> torch.Tensor:
        """(1, crop, crop) from (H, W): longer side -> longest_edge, centred zero pad to a square, then crop."""
        height, width = gray.shape
        scale = self.longest_edge / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = torch.from_numpy(np.ascontiguousarray(gray))[None, None]
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        pad_h, pad_w = self.longest_edge - size[0], self.longest_edge - size[1]
        image = F.pad(image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        slack = self.longest_edge - self.crop_size
        top, left = torch.randint(0, slack + 1, (2,)).tolist() if training else (slack // 2, slack // 2)
        return image[0, :, top : top + self.crop_size, left : left + self.crop_size].clamp(0.0, 1.0)


def _per_channel(value: float | list[float], num_channels: int, name: str) -> list[float]:
    """A per-channel list from a scalar or a list of ``num_channels`` values (saved to JSON as a list)."""
    values = [float(value)] * num_channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != num_channels:
        raise ValueError(f"{name} needs 1 or {num_channels} values, got {len(values)}")
    return values


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]
