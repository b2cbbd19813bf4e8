"""Initialise UniMedI from pretrained parts: a timm ViT (the paper's ImageNet init) and a BERT-family text encoder.

Conversion sits above the model, as transformers' `convert_*` scripts do: this module imports `modeling_unimedi`, never
the reverse.
"""

import os
import re

import torch
import torch.nn.functional as F

from .configuration_unimedi import UniMedIConfig, UniMedIVisionConfig
from .modeling_unimedi import UniMedIModel, text_encoder_kwargs

_TIMM_BLOCK_KEYS = {
    "norm1": "norm1",
    "attn.qkv": "attention.qkv",
    "attn.proj": "attention.proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TIMM_DROPPED = ("head.", "fc_norm.")


def _grid_table(position_embedding: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """(1, prod(grid), dim) -> (1, dim, *grid) for interpolation."""
    return position_embedding.reshape(1, *grid, -1).movedim(-1, 1).float()


def inflate_patch_kernel(
    weight_2d: torch.Tensor, patch_size_3d: tuple[int, int, int], in_channels: int
) -> torch.Tensor:
    """A Conv3d kernel from a Conv2d one (I3D inflation).

    RGB input channels are summed (a grayscale image replicated to RGB gives the same response through the 2D kernel
    as a 1-channel input through the summed kernel), the kernel is resized to the 3D patch's height/width if needed, and
    repeated over depth divided by the depth, so a volume constant along depth yields the 2D response.
    """
    depth, height, width = patch_size_3d
    weight = weight_2d.float()
    if weight.shape[1] != in_channels:
        weight = weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels
    if tuple(weight.shape[-2:]) != (height, width):
        weight = F.interpolate(weight, size=(height, width), mode="bicubic", align_corners=False)
    return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


def vision_state_dict_from_timm(timm_state: dict[str, torch.Tensor], config: UniMedIVisionConfig) -> dict:
    """Map a timm `VisionTransformer` state dict (class token, no register tokens) onto `UniMedIVisionModel`.

    The 2D tokenizer takes timm's patch embedding and positions (resized to the configured image grid); the 3D
    tokenizer gets the inflated kernel and the 2D position grid resized to the volume's height/width grid and shared
    by every depth slab, which training then refines. timm's [CLS] position is folded into the [CLS] token.
    """
    unknown = [k for k in timm_state if k.startswith(("reg_token", "attn_pool", "pos_embed_"))]
    if unknown:
        raise ValueError(f"Unsupported timm ViT variant: keys {unknown[:3]} (register tokens / attention pooling)")
    if config.patch_embedding != "linear":
        raise ValueError(
            "timm ViT weights hold a linear patch embedding; vision_config.patch_embedding is "
            f"{config.patch_embedding!r}"
        )
    hidden = config.hidden_size
    if timm_state["cls_token"].shape[-1] != hidden:
        raise ValueError(f"timm width {timm_state['cls_token'].shape[-1]} != vision_config.hidden_size {hidden}")

    positions = timm_state["pos_embed"]
    cls_position, patch_positions = positions[:, :1], positions[:, 1:]
    side = int(round(patch_positions.shape[1] ** 0.5))
    table_2d = _grid_table(patch_positions, (side, side))
    image_grid = (config.image_size // config.patch_size,) * 2
    volume_grid = config.volume_grid
    image_positions = F.interpolate(table_2d, size=image_grid, mode="bicubic", align_corners=False)
    volume_positions = F.interpolate(table_2d, size=volume_grid[1:], mode="bicubic", align_corners=False)
    volume_positions = volume_positions.unsqueeze(2).expand(-1, -1, volume_grid[0], -1, -1)

    patch_weight = timm_state["patch_embed.proj.weight"]
    if patch_weight.shape[-1] != config.patch_size or patch_weight.shape[1] != config.num_channels:
        raise ValueError(
            f"timm patch embedding {tuple(patch_weight.shape)} does not match patch_size={config.patch_size}, "
            f"num_channels={config.num_channels}"
        )
    state = {
        "cls_token": timm_state["cls_token"] + cls_position,
        "image_embeddings.projection.weight": patch_weight,
        "image_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
        "image_embeddings.position_embedding": image_positions.flatten(2).transpose(1, 2),
        "volume_embeddings.projection.weight": inflate_patch_kernel(
            patch_weight, tuple(config.volume_patch_size), config.volume_channels
        ),
        "volume_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
        "volume_embeddings.position_embedding": volume_positions.flatten(2).transpose(1, 2),
        "post_layernorm.weight": timm_state["norm.weight"],
        "post_layernorm.bias": timm_state["norm.bias"],
    }
    block_pattern = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
    num_blocks = 0
    for key, value in timm_state.items():
        match = block_pattern.match(key)
        if match is None:
            continue
        index, part, kind = match.groups()
        if part not in _TIMM_BLOCK_KEYS:
            raise ValueError(f"Unsupported timm ViT block parameter {key!r}")
        state[f"encoder.layers.{index}.{_TIMM_BLOCK_KEYS[part]}.{kind}"] = value
        num_blocks = max(num_blocks, int(index) + 1)
    if num_blocks != config.num_hidden_layers:
        raise ValueError(
            f"timm checkpoint has {num_blocks} blocks, vision_config.num_hidden_layers is {config.num_hidden_layers}"
        )
    return {k: v.contiguous() for k, v in state.items()}


def load_timm_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """A timm ViT state dict from a timm model, a `.safetensors`/`.pth`/`.bin` file, or a timm model name (downloads)."""
    if isinstance(checkpoint, torch.nn.Module):
        return checkpoint.state_dict()
    if isinstance(checkpoint, (str, os.PathLike)) and os.path.isfile(checkpoint):
        if str(checkpoint).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(checkpoint))
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        return state.get("model", state.get("state_dict", state))
    if isinstance(checkpoint, str):
        import timm

        return timm.create_model(checkpoint, pretrained=True, num_classes=0).state_dict()
    raise TypeError(f"Cannot load a timm checkpoint from {type(checkpoint).__name__}")


def load_text_encoder(name_or_path: str, **kwargs):
    """A pretrained BERT-family encoder (local folder or Hub id) without its unused pooler."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    return AutoModel.from_pretrained(name_or_path, config=config, **text_encoder_kwargs(config), **kwargs)


def unimedi_from_pretrained_parts(
    vision_checkpoint=None, text_checkpoint: str | None = None, **config_kwargs
) -> UniMedIModel:
    """A new `UniMedIModel` whose vision encoder starts from a timm ViT and/or whose text encoder is a pretrained BERT.

    `vision_checkpoint`: a timm model, a timm state-dict file (.safetensors/.pth), or a timm model name (downloads);
    both tokenizers are initialised from its patch embedding (the 3D one by inflation). `text_checkpoint`: a local
    folder or Hub id of any BERT-family encoder; its config becomes `text_config`. Other kwargs go to `UniMedIConfig`.
    """
    text_encoder = load_text_encoder(text_checkpoint) if text_checkpoint is not None else None
    if text_encoder is not None:
        config_kwargs["text_config"] = text_encoder.config
    model = UniMedIModel(UniMedIConfig(**config_kwargs))
    if vision_checkpoint is not None:
        timm_state = load_timm_state_dict(vision_checkpoint)
        model.vision_model.load_state_dict(vision_state_dict_from_timm(timm_state, model.config.vision_config))
    if text_encoder is not None:
        model.text_model.load_state_dict(text_encoder.state_dict())
    return model
