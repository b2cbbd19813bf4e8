"""Attentive slice selection's tensor steps (§3.2-3.3), shared by pretraining and by inference.

Pretraining feeds each CT with the pseudo-2D images of its k most relevant depth slabs; inference can embed a CT the
same way (`UniMedIConfig.volume_embedding="volume_with_slices"`), so that its [CLS] sees what training's [CLS] saw.
"""

import torch
import torch.nn.functional as F

from .configuration_unimedi import UniMedIConfig


def top_k_indices(scores: torch.Tensor, k: int) -> torch.LongTensor:
    """Indices of the k highest scores per row, highest first."""
    return scores.topk(k, dim=-1).indices


def slab_central_slices(volume_values: torch.Tensor, slabs: torch.LongTensor, patch_depth: int) -> torch.Tensor:
    """The central axial slice of each selected slab: (B, C, D, H, W), (B, k) -> (B, k, C, H, W)."""
    depth_index = slabs * patch_depth + patch_depth // 2
    batch, channels, _, height, width = volume_values.shape
    index = depth_index[:, None, :, None, None].expand(batch, channels, -1, height, width)
    return volume_values.gather(2, index).transpose(1, 2)


def slices_to_images(slices: torch.Tensor, image_size: int, num_channels: int) -> torch.Tensor:
    """Pseudo-2D images for T_2D: resize each (grayscale) slice to the 2D input size and replicate to the 2D channels.

    CT volumes and X-rays share the processors' intensity convention ([0, 1] normalised to [-1, 1] by default), so no
    renormalisation is needed.
    """
    batch, k = slices.shape[:2]
    flat = slices.flatten(0, 1).mean(dim=1, keepdim=True)
    images = F.interpolate(flat, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.expand(-1, num_channels, -1, -1).unflatten(0, (batch, k))


def selected_slab_slices(
    config: UniMedIConfig, volume_values: torch.Tensor, slabs: torch.LongTensor, slab_images: torch.Tensor | None
) -> torch.Tensor:
    """(B, k, C, H, W) slices of the selected slabs: their native images (`pseudo_image_source="native"`) or the
    central slices of the model grid (`"grid"`, for data without native slices)."""
    patch_depth = config.vision_config.volume_patch_size[0]
    if config.pseudo_image_source == "grid":
        return slab_central_slices(volume_values, slabs, patch_depth)
    num_slabs = volume_values.shape[2] // patch_depth
    if slab_images is None:
        raise ValueError(
            "pseudo_image_source='native' needs `slab_images` (the data's native slab images); set "
            "pseudo_image_source='grid' for data without native slices"
        )
    if slab_images.ndim != 5 or slab_images.shape[:2] != (volume_values.shape[0], num_slabs):
        raise ValueError(
            f"`slab_images` must be (num_volumes={volume_values.shape[0]}, num_slabs={num_slabs}, C, H, W), got "
            f"shape {tuple(slab_images.shape)}"
        )
    index = slabs[:, :, None, None, None].expand(-1, -1, *slab_images.shape[2:])
    return slab_images.gather(1, index)


def pseudo_images(
    config: UniMedIConfig, volume_values: torch.Tensor, slabs: torch.LongTensor, slab_images: torch.Tensor | None
) -> torch.Tensor:
    """(B, k, C, image_size, image_size) pseudo-2D images of the selected slabs, ready for T_2D."""
    vision_config = config.vision_config
    slices = selected_slab_slices(config, volume_values, slabs, slab_images)
    return slices_to_images(slices, vision_config.image_size, vision_config.num_channels)
