"""X-ray image processor for UniMedI.

Paper pipeline (appendix §7, 2D classification): resize the longer side to 256, zero-pad to a square, crop 224
(centre crop at inference, random crop when ``training=True``), scale to [0, 1] and normalise with
``image_mean``/``image_std``. The defaults (mean 0.5, std 0.5) map [0, 1] to [-1, 1]: the input range of timm's
ImageNet ViT-B/16 (augreg) and of MGCA's pipeline, and a zero-centred input that a ViT trained from scratch learns
from far faster than from [0, 1] (see README, ground-truth benchmark). The CT processor uses the same defaults, because
the model turns CT slices into pseudo-2D images and both must agree. Grayscale is replicated to
``num_channels`` (3 by default: the 2D patch embedding is ImageNet-initialised).

Reading files and arrays into [0, 1] grayscale (and its intensity rule) is ``loading_unimedi.load_xray``.
"""

import math
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .loading_unimedi import MAX_VOXELS, checked_bool, checked_number, checked_numbers, load_xray


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
        self.longest_edge = checked_number("longest_edge", longest_edge, int)
        self.crop_size = checked_number("crop_size", crop_size, int)
        self.num_channels = checked_number("num_channels", num_channels, int)
        if not 0 < self.crop_size <= self.longest_edge or self.longest_edge**2 > MAX_VOXELS:
            raise ValueError(
                f"crop_size must be in (0, longest_edge={longest_edge}] and longest_edge at most "
                f"{math.isqrt(MAX_VOXELS)}, got crop_size={crop_size}, longest_edge={longest_edge}"
            )
        if not 1 <= self.num_channels * self.crop_size**2 <= MAX_VOXELS:
            raise ValueError(
                f"num_channels must be >= 1 and num_channels x crop_size^2 at most {MAX_VOXELS}, got {num_channels}"
            )
        self.image_mean = _per_channel(image_mean, self.num_channels, "image_mean")
        self.image_std = _per_channel(image_std, self.num_channels, "image_std")
        if any(std <= 0 for std in self.image_std):
            raise ValueError(f"image_std must be positive, got {image_std}")
        self.apply_voi_lut = checked_bool("apply_voi_lut", apply_voi_lut)

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
    if isinstance(value, (list, tuple)):
        values = list(checked_numbers(name, value))
    else:
        values = [checked_number(name, value)] * num_channels
    if len(values) != num_channels:
        raise ValueError(f"{name} needs 1 or {num_channels} values, got {len(values)}")
    return values


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]
