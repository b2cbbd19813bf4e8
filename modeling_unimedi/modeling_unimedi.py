"""UniMedI models: one ViT backbone shared by 2D (X-ray) and 3D (CT) tokenizers, a BERT-family report encoder, and
projections into one common space trained with a CLIP loss (paper §3.1, §3.3)."""

import copy
import inspect
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_unimedi import UniMedIConfig, UniMedIVisionConfig
from .loss_unimedi import contrastive_loss
from .slices_unimedi import pseudo_images, top_k_indices

# Auto* factories a full UniMedI checkpoint serves as Hub remote code (`save_pretrained` writes them to `auto_map`).
REMOTE_AUTO_MAP = {
    "AutoModel": "modeling_unimedi.UniMedIModel",
    "AutoModelForZeroShotImageClassification": "modeling_unimedi.UniMedIModel",
    "AutoModelForPreTraining": "pretraining_unimedi.UniMedIForPreTraining",
    "AutoModelForSemanticSegmentation": "segmentation_unimedi.UniMedIForSemanticSegmentation",
}
# The CT pipelines (transformers has no CT task), as `pipeline(task, model=..., trust_remote_code=True)` finds them.
CUSTOM_PIPELINES = {
    "zero-shot-volume-classification": {
        "impl": "pipelines_unimedi.ZeroShotVolumeClassificationPipeline",
        "pt": ["AutoModel"],
        "type": "multimodal",
    },
    "volume-feature-extraction": {
        "impl": "pipelines_unimedi.VolumeFeatureExtractionPipeline",
        "pt": ["AutoModel"],
        "type": "multimodal",
    },
}


@dataclass
class UniMedIVisionModelOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + num_tokens, hidden_size)`):
        Final-normed tokens: [CLS], then the 3D tokens (if a volume was given), then the 2D tokens.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): the [CLS] token.
    cls_attention (`torch.FloatTensor` of shape `(batch_size, num_tokens)`, *optional*):
        Eq. 1 of the paper: the [CLS] query's attention probabilities over the patch tokens, averaged over all layers
        and heads (softmax over the patch keys only). Returned when `output_cls_attention=True`.
    """

    cls_attention: torch.FloatTensor | None = None


@dataclass
class UniMedIOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*): symmetric CLIP loss L_vl over all samples of the batch.
    logits_per_image (`torch.FloatTensor` of shape `(num_images + num_volumes, num_texts)`):
        Scaled cosine similarities; rows are the X-rays first, then the CT volumes, matching the report order.
    logits_per_text (`torch.FloatTensor` of shape `(num_texts, num_images + num_volumes)`): the transpose.
    image_embeds (`torch.FloatTensor` of shape `(num_images, projection_dim)`, *optional*): normalised X-ray embeddings.
    volume_embeds (`torch.FloatTensor` of shape `(num_volumes, projection_dim)`, *optional*): normalised CT embeddings.
    text_embeds (`torch.FloatTensor` of shape `(num_texts, projection_dim)`): normalised report embeddings.
    image_model_output, volume_model_output (`UniMedIVisionModelOutput`, *optional*): the vision tower's outputs
        for the X-rays and the CTs (pooler_output = the [CLS] state before projection, as CLIP's
        `vision_model_output`).
    text_model_output (`BaseModelOutputWithPooling`): the report tower's output (pooler_output = projection).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    volume_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_model_output: BaseModelOutputWithPooling | None = None
    volume_model_output: BaseModelOutputWithPooling | None = None
    text_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self):
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class UniMedICommonSpace(ModelOutput):
    r"""
    The mixed batch in the common space, as both UniMedI forwards compute it.

    vision_embeds (`torch.FloatTensor` of shape `(num_images + num_volumes, projection_dim)`):
        Normalised projections of the vision [CLS] states, X-rays first.
    text_embeds (`torch.FloatTensor` of shape `(num_texts, projection_dim)`): normalised report embeddings.
    logit_scale (`torch.FloatTensor` of shape `()`): the inverse temperature exp(`logit_scale`) scaling similarities.
    logits_per_image (`torch.FloatTensor` of shape `(num_images + num_volumes, num_texts)`):
        Scaled cosine similarities.
    text_model_output (`BaseModelOutputWithPooling`): the report tower's output (pooler_output = projection).
    """

    vision_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None


def interpolate_position_embedding(
    position_embedding: torch.Tensor, source_grid: tuple[int, ...], target_grid: tuple[int, ...]
) -> torch.Tensor:
    """Resize a learned (1, prod(source_grid), dim) position table to another token grid (bicubic 2D, trilinear 3D)."""
    if tuple(source_grid) == tuple(target_grid):
        return position_embedding
    dim = position_embedding.shape[-1]
    table = position_embedding.reshape(1, *source_grid, dim).movedim(-1, 1).float()
    mode = "bicubic" if len(source_grid) == 2 else "trilinear"
    table = F.interpolate(table, size=tuple(target_grid), mode=mode, align_corners=False)
    return table.movedim(1, -1).reshape(1, -1, dim).to(position_embedding.dtype)


def _check_input(tensor: torch.Tensor, name: str, rank: int, channels: int, patch: tuple[int, ...]) -> None:
    if tensor.ndim != rank:
        layout = "(batch, channels, height, width)" if rank == 4 else "(batch, channels, depth, height, width)"
        raise ValueError(f"`{name}` must have rank {rank} {layout}, got shape {tuple(tensor.shape)}")
    if tensor.shape[1] != channels:
        raise ValueError(f"`{name}` must have {channels} channel(s) as configured, got {tensor.shape[1]}")
    for size, step in zip(tensor.shape[2:], patch):
        if size % step != 0:
            raise ValueError(
                f"`{name}` spatial size {tuple(tensor.shape[2:])} is not divisible by the patch size {tuple(patch)}"
            )


class UniMedIConvStem(nn.Sequential):
    """Early convolutions in place of a linear patchify (Xiao et al., 2021): 3x3 convolutions of stride 2 along each
    axis until that axis has shrunk by its patch side (stride 1 after), each with BatchNorm and ReLU and twice the
    width of the one before, then a 1x1 projection to the backbone width. Same token grid as the linear patchify.

    Along a volume's depth a kernel spans only its stride, so a token still sees exactly its own depth slab, as
    Eq. 2's per-slab average of attention assumes; in-plane the 3x3 kernels overlap."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: tuple[int, ...]):
        convolution, norm = {2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[len(patch_size)]
        num_layers = max(side.bit_length() - 1 for side in patch_size)
        layers, channels = [], in_channels
        for index in range(num_layers):
            stride = tuple(2 if side >> index > 1 else 1 for side in patch_size)
            kernel = tuple(step if len(patch_size) == 3 and axis == 0 else 3 for axis, step in enumerate(stride))
            padding = tuple((size - 1) // 2 for size in kernel)
            width = max(hidden_size >> (num_layers - 1 - index), 8)
            layers += [
                convolution(channels, width, kernel, stride, padding, bias=False),
                norm(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        super().__init__(*layers, convolution(channels, hidden_size, 1))


def patch_projection(config: UniMedIVisionConfig, in_channels: int, patch_size: tuple[int, ...]) -> nn.Module:
    """Pixels -> one token per patch: the config's `patch_embedding` (linear patchify or convolutional stem)."""
    if config.patch_embedding == "conv_stem":
        return UniMedIConvStem(in_channels, config.hidden_size, patch_size)
    convolution = nn.Conv2d if len(patch_size) == 2 else nn.Conv3d
    return convolution(in_channels, config.hidden_size, kernel_size=patch_size, stride=patch_size)


class UniMedIImagePatchEmbeddings(nn.Module):
    """T_2D: 2D patches -> tokens (`patch_embedding`), plus learned 2D positions (resized for other image sizes)."""

    def __init__(self, config: UniMedIVisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = (config.patch_size, config.patch_size)
        self.grid = (config.image_size // config.patch_size,) * 2
        self.projection = patch_projection(config, config.num_channels, self.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _check_input(pixel_values, "pixel_values", 4, self.config.num_channels, self.patch_size)
        pixel_values = pixel_values.to(self.position_embedding.dtype)
        tokens = self.projection(pixel_values).flatten(2).transpose(1, 2)
        grid = tuple(s // p for s, p in zip(pixel_values.shape[2:], self.patch_size))
        return tokens + interpolate_position_embedding(self.position_embedding, self.grid, grid)


class UniMedIVolumePatchEmbeddings(nn.Module):
    """T_3D: 3D patches -> tokens (`patch_embedding`) in (depth, height, width) order, plus learned 3D positions.

    Token j of depth slab i sits at index i * (grid_h * grid_w) + j, which is what Eq. 2's per-slice average uses.
    """

    def __init__(self, config: UniMedIVisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = tuple(config.volume_patch_size)
        self.grid = tuple(config.volume_grid)
        self.projection = patch_projection(config, config.volume_channels, self.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_volume_patches, config.hidden_size))

    def forward(self, volume_values: torch.Tensor) -> torch.Tensor:
        _check_input(volume_values, "volume_values", 5, self.config.volume_channels, self.patch_size)
        volume_values = volume_values.to(self.position_embedding.dtype)
        tokens = self.projection(volume_values).flatten(2).transpose(1, 2)
        grid = tuple(s // p for s, p in zip(volume_values.shape[2:], self.patch_size))
        return tokens + interpolate_position_embedding(self.position_embedding, self.grid, grid)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def cls_attention_row(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Eq. 1 for one layer: softmax(q_cls . K[Patch]^T / sqrt(d)) over the patch keys only, averaged over heads.

    The [CLS] key is left out of the softmax as the equation writes it (the backbone's own attention includes it, so
    this row differs from its [CLS] row by a per-sample factor). Costs O(N) per head instead of the O(N^2) attention
    matrix, so the main attention can stay in SDPA/flash kernels.
    """
    patch_keys = key[:, :, 1:].float()
    scores = torch.matmul(query[:, :, :1].float(), patch_keys.transpose(-1, -2)) * scaling  # (B, heads, 1, N)
    return scores.softmax(dim=-1)[:, :, 0].mean(dim=1)


class UniMedIAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (the layout of timm's ViT, so its weights map 1:1)."""

    def __init__(self, config: UniMedIVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, output_cls_attention: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        attn_output = self.proj(attn_output.reshape(batch, length, -1))
        cls_attention = cls_attention_row(query, key, self.scaling) if output_cls_attention else None
        return attn_output, attn_weights, cls_attention


class UniMedIMLP(nn.Module):
    def __init__(self, config: UniMedIVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class UniMedIEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block of the shared backbone E_v."""

    def __init__(self, config: UniMedIVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = UniMedIAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = UniMedIMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self, hidden_states: torch.Tensor, output_cls_attention: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, _, cls_attention = self.attention(
            self.norm1(hidden_states), output_cls_attention=output_cls_attention, **kwargs
        )
        hidden_states = hidden_states + self.dropout(attn_output)
        hidden_states = hidden_states + self.dropout(self.mlp(self.norm2(hidden_states)))
        return hidden_states, cls_attention


class UniMedIEncoder(nn.Module):
    def __init__(self, config: UniMedIVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([UniMedIEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self, hidden_states: torch.Tensor, output_cls_attention: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run all layers; with `output_cls_attention`, also return Eq. 1 (the layer average of the [CLS] rows)."""
        summed = None
        for layer in self.layers:
            hidden_states, cls_attention = layer(hidden_states, output_cls_attention=output_cls_attention, **kwargs)
            if cls_attention is not None:
                summed = cls_attention if summed is None else summed + cls_attention
        return hidden_states, None if summed is None else summed / len(self.layers)


class UniMedIPreTrainedModel(PreTrainedModel):
    config: UniMedIConfig
    base_model_prefix = "unimedi"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["UniMedIEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": UniMedIEncoderLayer,
        "attentions": OutputRecorder(UniMedIAttention, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (UniMedIImagePatchEmbeddings, UniMedIVolumePatchEmbeddings)):
            init.trunc_normal_(module.position_embedding, std=module.config.initializer_range)
        elif isinstance(module, UniMedIVisionModel):
            init.trunc_normal_(module.cls_token, std=module.config.initializer_range)
        elif isinstance(module, (UniMedIModel, UniMedIVisionModelWithProjection, UniMedITextModelWithProjection)):
            for projection in (getattr(module, "visual_projection", None), getattr(module, "text_projection", None)):
                if projection is not None:
                    init.normal_(projection.weight, std=projection.in_features**-0.5)
            if isinstance(module, UniMedIModel):
                init.constant_(module.logit_scale, module.config.logit_scale_init_value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; when exporting remote code (a class marked by
        `register_for_auto_class`, as importing `modeling_unimedi` does), the folder gets all of UniMedI's classes,
        not only the saved one: `auto_map` names every Auto* factory UniMedI serves (a class is marked for one),
        `custom_pipelines` names the CT pipelines, and every flat module file is copied (transformers copies only
        the saved class's imports), so the processor, zero-shot helpers, pipelines and pretraining load from it."""
        export = self._auto_class is not None and isinstance(self.config, UniMedIConfig)
        if export:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **REMOTE_AUTO_MAP}
            self.config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)  # pipeline() rewrites what it reads
        super().save_pretrained(save_directory, *args, **kwargs)
        if export:
            for source in Path(__file__).parent.glob("*_unimedi.py"):
                shutil.copyfile(source, Path(save_directory) / source.name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but a checkpoint that does not fit raises instead of leaving random
        weights, and an unreadable safetensors file raises an error naming it.

        "Does not fit": some of this model's weights are missing from the checkpoint while some of the checkpoint's
        fit nowhere in it (another layout), or none of this model's weights are in it. Weights that are only missing
        (a new parameter, e.g. a teacher to copy from the student) are initialised as usual; weights of other parts
        (the text tower when loading the vision tower) are ignored, as in CLIP.
        """
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            raise OSError(
                f"{pretrained_model_name_or_path}: cannot read its safetensors weights ({error}); the file is truncated "
                "or damaged: download or save it again"
            ) from error
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if (missing and unexpected) or (missing and len(missing) == len(model.state_dict())):
            raise ValueError(
                f"{pretrained_model_name_or_path}: its weights do not fit {cls.__name__}: {len(missing)} of the model's "
                f"weights are not in the checkpoint (e.g. {missing[:3]}) and {len(unexpected)} of the checkpoint's fit "
                f"nowhere (e.g. {unexpected[:3]}); loading it would leave random weights. Load it with the class it "
                f"was saved from ({getattr(model.config, 'architectures', None)}) or one of its parts' classes"
            )
        return (model, info) if want_info else model


class UniMedIVisionModel(UniMedIPreTrainedModel):
    """The vision encoder: T_2D and T_3D feed one shared backbone E_v that starts with a [CLS] token.

    Accepts X-rays alone, volumes alone, or a volume together with 2D images of the same sample (the pseudo-pair pass
    of §3.3), whose tokens are concatenated after the 3D tokens in one sequence.
    """

    config: UniMedIVisionConfig
    # the full model's attribute: `from_pretrained` on a full UniMedIModel checkpoint loads its `vision_model.*`
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")

    def __init__(self, config: UniMedIVisionConfig):
        super().__init__(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.image_embeddings = UniMedIImagePatchEmbeddings(config)
        self.volume_embeddings = UniMedIVolumePatchEmbeddings(config)
        self.encoder = UniMedIEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.image_embeddings.projection

    def embed_patches(
        self, pixel_values: torch.Tensor | None = None, volume_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch tokens (no [CLS]) of a volume, of 2D images, or of a volume followed by its 2D images.

        `pixel_values` is (B, C, H, W), or (B, k, C, H, W) for k images per sample (e.g. k selected CT slices).
        """
        parts = []
        if volume_values is not None:
            parts.append(self.volume_embeddings(volume_values))
        if pixel_values is not None:
            if pixel_values.ndim == 5:
                batch, num_images = pixel_values.shape[:2]
                tokens = self.image_embeddings(pixel_values.flatten(0, 1))
                parts.append(tokens.unflatten(0, (batch, num_images)).flatten(1, 2))
            else:
                parts.append(self.image_embeddings(pixel_values))
        if not parts:
            raise ValueError("You have to specify `pixel_values`, `volume_values` or both")
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(
                f"A combined 3D+2D sequence needs one volume per sample: got {parts[0].shape[0]} volumes and "
                f"{parts[1].shape[0]} samples of 2D images"
            )
        return torch.cat(parts, dim=1)

    def num_patch_tokens(
        self, pixel_values: torch.Tensor | None = None, volume_values: torch.Tensor | None = None
    ) -> int:
        """Length of the patch-token sequence (no [CLS]) that `embed_patches` makes for inputs of these shapes."""
        count = 0
        if volume_values is not None:
            count += math.prod(s // p for s, p in zip(volume_values.shape[2:], self.volume_embeddings.patch_size))
        if pixel_values is not None:
            images_per_sample = pixel_values.shape[1] if pixel_values.ndim == 5 else 1
            count += images_per_sample * math.prod(
                s // p for s, p in zip(pixel_values.shape[-2:], self.image_embeddings.patch_size)
            )
        return count

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        volume_values: torch.Tensor | None = None,
        keep_token_indices: torch.LongTensor | None = None,
        output_cls_attention: bool = False,
        **kwargs,
    ) -> UniMedIVisionModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)` or `(batch, k, channels, height, width)`):
            X-rays, or k 2D images per sample to append after the sample's 3D tokens.
        volume_values (`torch.FloatTensor` of shape `(batch, volume_channels, depth, height, width)`): CT volumes.
        keep_token_indices (`torch.LongTensor` of shape `(batch, num_kept)`, *optional*):
            Indices into the patch tokens (before [CLS] is prepended) that the backbone sees; the rest are dropped, so a
            masked student pass is also a cheaper pass (§3.4).
        output_cls_attention (`bool`): also return Eq. 1's [CLS]->patch attention averaged over layers and heads.
        """
        tokens = self.embed_patches(pixel_values, volume_values)
        if keep_token_indices is not None:
            tokens = tokens.gather(1, keep_token_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        hidden_states = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        hidden_states, cls_attention = self.encoder(hidden_states, output_cls_attention=output_cls_attention, **kwargs)
        hidden_states = self.post_layernorm(hidden_states)
        return UniMedIVisionModelOutput(
            last_hidden_state=hidden_states, pooler_output=hidden_states[:, 0], cls_attention=cls_attention
        )

    def slab_scores(self, volume_values: torch.Tensor) -> torch.FloatTensor:
        r"""Relevance of each depth slab of each CT for attentive slice selection (§3.2).

        Eq. 1: the [CLS] query's attention over the patch tokens, averaged over layers and heads; Eq. 2: its mean over
        the tokens of each depth slab. Returns `(batch, num_depth_slabs)`. Gradients follow the caller's mode.
        """
        cls_attention = self(volume_values=volume_values, output_cls_attention=True).cls_attention
        num_slabs = volume_values.shape[2] // self.volume_embeddings.patch_size[0]
        return cls_attention.unflatten(1, (num_slabs, -1)).mean(dim=-1)


def text_encoder_kwargs(text_config) -> dict:
    """Init kwargs that drop the text encoder's pooler head where the architecture has one.

    UniMedI pools the [CLS] hidden state itself; a BERT pooler would be parameters without gradients, which
    DistributedDataParallel reports as unused.
    """
    model_class = MODEL_MAPPING[type(text_config)]
    return (
        {"add_pooling_layer": False}
        if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
        else {}
    )


def encode_text(
    text_model: nn.Module,
    text_projection: nn.Linear,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    **kwargs,
) -> BaseModelOutputWithPooling:
    """The report tower: the text encoder, its [CLS] hidden state projected into the common space as `pooler_output`."""
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    outputs = text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
    return BaseModelOutputWithPooling(
        last_hidden_state=outputs.last_hidden_state,
        pooler_output=text_projection(outputs.last_hidden_state[:, 0]),
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


def encode_volumes(
    vision_model: UniMedIVisionModel,
    config: UniMedIConfig,
    volume_values: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    slab_images: torch.Tensor | None = None,
    **kwargs,
) -> UniMedIVisionModelOutput:
    """The vision pass of CTs: the 3D tokens, followed by `pixel_values` (batch, k, C, H, W) when given, else by the
    selected slabs' pseudo-2D images when `config.volume_embedding` is "volume_with_slices" (the slabs scored by Eq.
    1-2 on this encoder; native `slab_images` with `pseudo_image_source="native"`)."""
    if pixel_values is None and config.volume_embedding == "volume_with_slices":
        if config.num_selected_slices == 0:
            raise ValueError("volume_embedding='volume_with_slices' needs num_selected_slices > 0")
        slabs = top_k_indices(vision_model.slab_scores(volume_values), config.num_selected_slices)
        pixel_values = pseudo_images(config, volume_values, slabs, slab_images)
    return vision_model(volume_values=volume_values, pixel_values=pixel_values, return_dict=True, **kwargs)


class UniMedIModel(UniMedIPreTrainedModel):
    """Vision encoder + report encoder + projections into the common space; `forward` takes a mixed 2D/3D batch."""

    config: UniMedIConfig

    def __init__(self, config: UniMedIConfig):
        super().__init__(config)
        self.vision_model = UniMedIVisionModel._from_config(config.vision_config)
        self.text_model = AutoModel.from_config(config.text_config, **text_encoder_kwargs(config.text_config))
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def _project_vision(self, outputs: UniMedIVisionModelOutput) -> UniMedIVisionModelOutput:
        outputs.pooler_output = self.visual_projection(outputs.pooler_output)
        return outputs

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> UniMedIVisionModelOutput:
        r"""X-ray embeddings: `pooler_output` is the projected [CLS] (not normalised), shape (batch, projection_dim)."""
        return self._project_vision(self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs))

    @can_return_tuple
    def get_volume_features(
        self,
        volume_values: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        slab_images: torch.Tensor | None = None,
        **kwargs,
    ) -> UniMedIVisionModelOutput:
        r"""CT embeddings: `pooler_output` is the projected [CLS] of the CT's sequence (`encode_volumes`: the 3D tokens,
        with the selected slices' tokens under `config.volume_embedding="volume_with_slices"`), shape
        (batch, projection_dim)."""
        outputs = encode_volumes(self.vision_model, self.config, volume_values, pixel_values, slab_images, **kwargs)
        return self._project_vision(outputs)

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""Report embeddings: `pooler_output` is the projected [CLS] hidden state, shape (batch, projection_dim)."""
        return encode_text(self.text_model, self.text_projection, input_ids, attention_mask, token_type_ids, **kwargs)

    def embed_batch(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        image_states: torch.Tensor | None = None,
        volume_states: torch.Tensor | None = None,
        **kwargs,
    ) -> UniMedICommonSpace:
        r"""The common-space tail of both UniMedI forwards (this model's and [`UniMedIForPreTraining`]'s).

        Projects the vision [CLS] states `image_states` (num_images, hidden_size) and `volume_states`
        (num_volumes, hidden_size) and the texts into the common space, normalises them and scores every sample
        (X-rays first) against every text. Any numbers of samples and texts; only the losses need one report per sample.
        """
        states = [s for s in (image_states, volume_states) if s is not None]
        if not states:
            raise ValueError("You have to specify `pixel_values`, `volume_values` or both")
        text_outputs = self.get_text_features(input_ids, attention_mask, token_type_ids, **kwargs)
        vision_embeds = F.normalize(self.visual_projection(torch.cat(states)), dim=-1)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        logit_scale = self.logit_scale.exp()
        return UniMedICommonSpace(
            vision_embeds=vision_embeds,
            text_embeds=text_embeds,
            logit_scale=logit_scale,
            logits_per_image=logit_scale * vision_embeds @ text_embeds.t(),
            text_model_output=text_outputs,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        volume_values: torch.Tensor | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> UniMedIOutput:
        r"""
        As CLIP: `pixel_values` (num_images, C, H, W) X-rays and/or `volume_values` (num_volumes, 1, D, H, W) CTs are
        scored against every text of `input_ids`, any number of each: `logits_per_image` is
        (num_images + num_volumes, num_texts), X-rays first (`logits_per_image.softmax(dim=1)` gives zero-shot
        probabilities).
        return_loss (`bool`, *optional*): also return the symmetric CLIP loss L_vl, which pairs sample i with text i:
            it needs one report per sample, the X-rays' reports first, then the volumes'.
        """
        if input_ids is None:
            raise ValueError("`input_ids` (the texts to score the X-rays/volumes against) are required")
        image_outputs = volume_outputs = None
        if pixel_values is not None:
            image_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        if volume_values is not None:
            volume_outputs = encode_volumes(self.vision_model, self.config, volume_values, **kwargs)
        space = self.embed_batch(
            input_ids,
            attention_mask,
            token_type_ids,
            image_states=None if image_outputs is None else image_outputs.pooler_output,
            volume_states=None if volume_outputs is None else volume_outputs.pooler_output,
            **kwargs,
        )
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        return UniMedIOutput(
            loss=contrastive_loss(space.logits_per_image) if return_loss else None,
            logits_per_image=space.logits_per_image,
            logits_per_text=space.logits_per_image.t(),
            image_embeds=space.vision_embeds[:num_images] if image_outputs is not None else None,
            volume_embeds=space.vision_embeds[num_images:] if volume_outputs is not None else None,
            text_embeds=space.text_embeds,
            image_model_output=image_outputs,
            volume_model_output=volume_outputs,
            text_model_output=space.text_model_output,
        )


@dataclass
class UniMedIVisionModelWithProjectionOutput(ModelOutput):
    r"""
    image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        The projected [CLS] state of the X-rays or CT volumes (not normalised), as `UniMedIModel.get_*_features`.
    last_hidden_state, hidden_states, attentions: the vision tower's outputs.
    """

    image_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class UniMedITextModelWithProjectionOutput(ModelOutput):
    r"""
    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): the projected [CLS] (not normalised).
    last_hidden_state, hidden_states, attentions: the text encoder's outputs.
    """

    text_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class UniMedIVisionModelWithProjection(UniMedIPreTrainedModel):
    """The vision tower and its projection, alone (as `CLIPVisionModelWithProjection`): loads its part of a full
    `UniMedIModel` checkpoint, for embedding X-rays and CTs without the report encoder."""

    config: UniMedIConfig
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")

    def __init__(self, config: UniMedIConfig):
        super().__init__(config)
        self.vision_model = UniMedIVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.get_input_embeddings()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, volume_values: torch.Tensor | None = None, **kwargs
    ) -> UniMedIVisionModelWithProjectionOutput:
        r"""`pixel_values` (X-rays), `volume_values` (CTs; with their selected slices under
        `config.volume_embedding="volume_with_slices"`), or a CT with its 2D images, as [`UniMedIVisionModel`]."""
        if volume_values is None:
            outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        else:
            outputs = encode_volumes(self.vision_model, self.config, volume_values, pixel_values, **kwargs)
        return UniMedIVisionModelWithProjectionOutput(
            image_embeds=self.visual_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class UniMedITextModelWithProjection(UniMedIPreTrainedModel):
    """The report encoder and its projection, alone (as `CLIPTextModelWithProjection`): loads its part of a full
    `UniMedIModel` checkpoint, for embedding texts and prompts without the vision tower."""

    config: UniMedIConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)

    def __init__(self, config: UniMedIConfig):
        super().__init__(config)
        self.text_model = AutoModel.from_config(config.text_config, **text_encoder_kwargs(config.text_config))
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> UniMedITextModelWithProjectionOutput:
        outputs = encode_text(
            self.text_model, self.text_projection, input_ids, attention_mask, token_type_ids, **kwargs
        )
        return UniMedITextModelWithProjectionOutput(
            text_embeds=outputs.pooler_output,
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "UniMedIModel",
    "UniMedIPreTrainedModel",
    "UniMedITextModelWithProjection",
    "UniMedIVisionModel",
    "UniMedIVisionModelWithProjection",
]
