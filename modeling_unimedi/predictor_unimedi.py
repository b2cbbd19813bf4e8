"""Patch recovery for L_pcl (§3.4 "masking and recovering"): the student's states at the masked positions, either from
a light predictor after a token-dropping encoder pass or from iBOT's mask token inside the encoder."""

import torch
from torch import nn

from .configuration_unimedi import UniMedIConfig
from .modeling_unimedi import UniMedIEncoderLayer, UniMedIVisionModel, interpolate_position_embedding


def patch_positions(
    vision: UniMedIVisionModel, pixel_values: torch.Tensor | None, volume_values: torch.Tensor | None
) -> torch.Tensor:
    """(1, num_patch_tokens, hidden) position embeddings of the sequence `vision.embed_patches` makes for these
    inputs: the 3D table, then the 2D table once per image of a sample."""
    parts = []
    if volume_values is not None:
        embeddings = vision.volume_embeddings
        grid = tuple(s // p for s, p in zip(volume_values.shape[2:], embeddings.patch_size))
        parts.append(interpolate_position_embedding(embeddings.position_embedding, embeddings.grid, grid))
    if pixel_values is not None:
        embeddings = vision.image_embeddings
        grid = tuple(s // p for s, p in zip(pixel_values.shape[-2:], embeddings.patch_size))
        table = interpolate_position_embedding(embeddings.position_embedding, embeddings.grid, grid)
        parts.append(table.repeat(1, pixel_values.shape[1] if pixel_values.ndim == 5 else 1, 1))
    return torch.cat(parts, dim=1)


class UniMedIMaskToken(nn.Module):
    """iBOT's learned mask token: what the student's encoder sees at a masked position (plus that position)."""

    def __init__(self, config: UniMedIConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(1, 1, config.vision_config.hidden_size))

    def forward(self, tokens: torch.Tensor, keep_mask: torch.BoolTensor, positions: torch.Tensor) -> torch.Tensor:
        """Embedded patch tokens (batch, N, hidden) with the mask token plus position wherever `keep_mask` is False."""
        return torch.where(keep_mask.unsqueeze(-1), tokens, (self.embedding + positions).to(tokens.dtype))


class UniMedIPatchPredictor(nn.Module):
    """A light transformer after the token-dropping student (MAE's decoder layout at the encoder's width): the kept
    output tokens plus a positioned mask token at every dropped position -> a state for every patch position.

    The encoder keeps its saving (it sees `1 - mask_ratio` of the tokens); the predictor's `predictor_num_layers`
    full-length blocks are the price of recovering the rest.
    """

    def __init__(self, config: UniMedIConfig):
        super().__init__()
        vision_config = config.vision_config
        self.mask_token = UniMedIMaskToken(config)
        self.layers = nn.ModuleList([UniMedIEncoderLayer(vision_config) for _ in range(config.predictor_num_layers)])
        self.norm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)

    def forward(
        self, student_states: torch.Tensor, kept_tokens: torch.LongTensor, keep_mask: torch.BoolTensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """student_states (batch, 1 + num_kept, hidden): the student's output, [CLS] first, its patch tokens at the
        sorted `kept_tokens`. Returns predicted states (batch, num_tokens, hidden) for every patch position."""
        kept = student_states[:, 1:]
        scattered = torch.zeros(*keep_mask.shape, kept.shape[-1], dtype=kept.dtype, device=kept.device)
        scattered = scattered.scatter(1, kept_tokens.unsqueeze(-1).expand(-1, -1, kept.shape[-1]), kept)
        patches = self.mask_token(scattered + positions, keep_mask, positions)
        hidden_states = torch.cat([student_states[:, :1], patches], dim=1)
        for layer in self.layers:
            hidden_states, _ = layer(hidden_states)
        return self.norm(hidden_states)[:, 1:]


__all__ = ["UniMedIPatchPredictor", "UniMedIMaskToken"]
