"""UniMedIForSemanticSegmentation: the UniMedI vision encoder with a SETR-PUP decoder for X-rays and a UNETR decoder
for CT volumes (paper §4.2, appendix §7.2), the decoders kept out of the backbone (as DINOv2 keeps its heads).

Both decoders go from the patch-token grid back to the input resolution in four upsampling stages, as the papers do
for 16-pixel patches. UniMedI's 3D patch is anisotropic (4x16x16 at paper size, 8x32x32 in the demo), so each axis
has its own factors: `stage_scales` splits every patch side into four stage factors, the coarse stages taking the
larger ones, so a thick-slice axis is upsampled in the coarse stages and kept at full resolution in the fine ones
(as nnU-Net pools only in-plane first on anisotropic data).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils.generic import can_return_tuple

from .classification_unimedi import FrozenEncoderMixin
from .configuration_unimedi import UniMedIConfig
from .modeling_unimedi import UniMedIPreTrainedModel, UniMedIVisionModel
from .volume_processing_unimedi import UniMedIVolumeProcessor

NUM_STAGES = 4  # SETR-PUP and UNETR both upsample a 1/16 token grid in four 2x stages
DICE_SMOOTHING = 1e-5  # keeps a class absent from both prediction and mask at Dice 1 instead of 0/0


def stage_factors(patch: int, num_stages: int = NUM_STAGES) -> list[int]:
    """Upsampling factors of the `num_stages` stages (coarsest first) whose product is `patch`.

    The prime factors of `patch`, largest first, one per stage; surplus factors are merged into the coarsest stage
    and missing ones are 1 at the finest stages: 16 -> [2, 2, 2, 2], 4 -> [2, 2, 1, 1], 32 -> [4, 2, 2, 2].
    """
    primes, rest, divisor = [], patch, 2
    while rest > 1:
        while rest % divisor == 0:
            primes.append(divisor)
            rest //= divisor
        divisor += 1
    primes.sort(reverse=True)
    while len(primes) > num_stages:
        primes[0:2] = [primes[0] * primes[1]]
    return primes + [1] * (num_stages - len(primes))


def stage_scales(patch_size: tuple[int, ...], num_stages: int = NUM_STAGES) -> list[tuple[int, ...]]:
    """Per-stage, per-axis upsampling factors (coarsest stage first) whose products per axis are `patch_size`."""
    return list(zip(*(stage_factors(side, num_stages) for side in patch_size)))


def token_grid(hidden_states: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """(B, 1 + N, C) encoder states -> (B, C, *grid) feature map of the patch tokens ([CLS] dropped)."""
    patches = hidden_states[:, 1:]
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)


def conv_norm_relu(in_channels: int, out_channels: int, dims: int) -> nn.Sequential:
    """3x3(x3) convolution, normalisation, ReLU. 2D: BatchNorm, as SETR; 3D: InstanceNorm, since appendix §7.2 trains
    UNETR at batch 2, where batch statistics are noise (MONAI's UNETR also defaults to instance norm)."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d(out_channels) if dims == 2 else nn.InstanceNorm3d(out_channels, affine=True)
    return nn.Sequential(conv(in_channels, out_channels, 3, padding=1, bias=False), norm, nn.ReLU(inplace=True))


class UniMedISETRPUPDecoder(nn.Module):
    """SETR-PUP, progressive upsampling (Zheng et al. 2021, "Rethinking Semantic Segmentation from a
    Sequence-to-Sequence Perspective with Transformers", §3.3): the last layer's patch tokens as a 2D feature map, then
    four stages of conv + upsampling (2x each for 16-pixel patches: upsampling restricted to 2x to limit the noise it
    adds), and a 1x1 classifier at the input resolution."""

    def __init__(self, config: UniMedIConfig):
        super().__init__()
        vision = config.vision_config
        self.patch_size = (vision.patch_size, vision.patch_size)
        width = config.setr_hidden_size
        self.stages = nn.ModuleList(
            nn.Sequential(
                conv_norm_relu(vision.hidden_size if index == 0 else width, width, dims=2),
                nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False),
            )
            for index, scale in enumerate(stage_scales(self.patch_size))
        )
        self.classifier = nn.Conv2d(width, config.num_labels, kernel_size=1)

    def forward(self, last_hidden_state: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        features = token_grid(last_hidden_state, tuple(s // p for s, p in zip(input_size, self.patch_size)))
        for stage in self.stages:
            features = stage(features)
        return self.classifier(features)


class UNETRUpsamplingPath(nn.Module):
    """UNETR's skip path (blue blocks of its Fig. 2): an intermediate token grid upsampled by deconvolution, each step
    followed by a conv block, to the resolution of the decoder stage it joins."""

    def __init__(self, in_channels: int, out_channels: int, scales: list[tuple[int, ...]]):
        super().__init__()
        self.steps = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose3d(in_channels if index == 0 else out_channels, out_channels, scale, stride=scale),
                conv_norm_relu(out_channels, out_channels, dims=3),
            )
            for index, scale in enumerate(scales)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            features = step(features)
        return features


class UNETRDecoderStage(nn.Module):
    """UNETR's decoder step (green + yellow blocks): deconvolve, concatenate the skip features, two conv blocks."""

    def __init__(self, in_channels: int, out_channels: int, scale: tuple[int, ...]):
        super().__init__()
        self.upsample = nn.ConvTranspose3d(in_channels, out_channels, scale, stride=scale)
        self.fuse = nn.Sequential(
            conv_norm_relu(2 * out_channels, out_channels, dims=3), conv_norm_relu(out_channels, out_channels, dims=3)
        )

    def forward(self, features: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.upsample(features), skip], dim=1))


def unetr_skip_layers(num_hidden_layers: int) -> list[int]:
    """Encoder layers (1-based) whose outputs feed UNETR's skips, shallow to deep: L/4, L/2, 3L/4 (3, 6, 9 for 12
    layers); the last layer, L, is the bottleneck."""
    return [max(1, num_hidden_layers * quarter // 4) for quarter in (1, 2, 3)]


class UniMedIUNETRDecoder(nn.Module):
    """UNETR (Hatamizadeh et al. 2022, "UNETR: Transformers for 3D Medical Image Segmentation", §3.2 and Fig. 2).

    Skip features from four encoder depths (layers L/4, L/2, 3L/4 and the final normed L) as 3D token grids: the
    last is the bottleneck, decoded in four stages (deconvolution, concatenation with the skip of that resolution, conv
    blocks); the three others reach their stage's resolution through deconvolution paths of 3, 2 and 1 steps; a conv
    path on the input volume gives the full-resolution skip. Channels F, 2F, 4F, 8F from fine to coarse
    (F = `unetr_feature_size`); a 1x1x1 classifier at the input resolution.
    """

    def __init__(self, config: UniMedIConfig):
        super().__init__()
        vision = config.vision_config
        self.patch_size = tuple(vision.volume_patch_size)
        self.skip_layers = unetr_skip_layers(vision.num_hidden_layers)
        scales = stage_scales(self.patch_size)  # coarsest stage first
        width = config.unetr_feature_size
        self.input_path = nn.Sequential(
            conv_norm_relu(vision.volume_channels, width, dims=3), conv_norm_relu(width, width, dims=3)
        )
        # skip path k (k = 1, 2, 3; layers L/4, L/2, 3L/4) joins at 1/2^k of the input: the first 4 - k stages
        self.skip_paths = nn.ModuleList(
            UNETRUpsamplingPath(vision.hidden_size, width * 2**level, scales[: NUM_STAGES - level])
            for level in (1, 2, 3)
        )
        self.stages = nn.ModuleList(
            UNETRDecoderStage(vision.hidden_size if index == 0 else width * 2 ** (4 - index), width * 2**level, scale)
            for index, (level, scale) in enumerate(zip((3, 2, 1, 0), scales))
        )
        self.classifier = nn.Conv3d(width, config.num_labels, kernel_size=1)

    def forward(self, volume_values: torch.Tensor, hidden_states: tuple, last_hidden_state: torch.Tensor):
        grid = tuple(s // p for s, p in zip(volume_values.shape[2:], self.patch_size))
        skips = [self.input_path(volume_values)]
        for path, layer in zip(self.skip_paths, self.skip_layers):
            skips.append(path(token_grid(hidden_states[layer], grid)))
        features = token_grid(last_hidden_state, grid)
        for stage, skip in zip(self.stages, reversed(skips)):
            features = stage(features, skip)
        return self.classifier(features)


def soft_dice_loss(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice (Milletari et al. 2016), averaged over samples and channels; (B, C, *spatial) both."""
    dims = tuple(range(2, probabilities.ndim))
    overlap = (probabilities * targets).sum(dims)
    total = probabilities.sum(dims) + targets.sum(dims)
    return 1 - ((2 * overlap + DICE_SMOOTHING) / (total + DICE_SMOOTHING)).mean()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, config: UniMedIConfig) -> torch.Tensor:
    """`config.segmentation_loss` on (B, C, *spatial) logits and (B, *spatial) integer masks.

    C > 1 classes (0 = background): cross-entropy, or the focal loss (Lin et al. 2017) times `focal_loss_weight`,
    plus soft Dice of the foreground classes. C = 1 (one foreground class): the same with a sigmoid, binary
    cross-entropy or binary focal loss, plus Dice of the foreground.
    """
    logits = logits.float()
    focal = config.segmentation_loss == "focal+dice"
    if logits.shape[1] == 1:
        targets = labels[:, None].float()
        probabilities = logits.sigmoid()
        per_voxel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        if focal:
            true_class_probability = probabilities * targets + (1 - probabilities) * (1 - targets)
            per_voxel = config.focal_loss_weight * (1 - true_class_probability) ** config.focal_gamma * per_voxel
        return per_voxel.mean() + soft_dice_loss(probabilities, targets)
    log_probabilities = logits.log_softmax(dim=1)
    if focal:
        log_true = log_probabilities.gather(1, labels[:, None])
        pixel_loss = -config.focal_loss_weight * ((1 - log_true.exp()) ** config.focal_gamma * log_true).mean()
    else:
        pixel_loss = F.nll_loss(log_probabilities, labels)
    one_hot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).float()
    return pixel_loss + soft_dice_loss(log_probabilities.exp()[:, 1:], one_hot[:, 1:])


def predicted_labels(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) logits -> (B, *spatial) predicted mask values: the most likely class, or for one foreground
    channel (C = 1) 1 where its probability exceeds 0.5."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def check_labels(labels: torch.Tensor, inputs: torch.Tensor, num_labels: int) -> torch.Tensor:
    """`labels` as a long tensor of the inputs' (B, *spatial) shape with values the model can predict."""
    expected = (inputs.shape[0], *inputs.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"`labels` must be integer masks of shape {expected} (batch, *spatial), got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"`labels` must hold integer class values, got dtype {labels.dtype}")
    highest = max(1, num_labels - 1)  # num_labels == 1: one foreground class, values 0/1
    if labels.numel() and (labels.min() < 0 or labels.max() > highest):
        raise ValueError(
            f"`labels` values must be in [0, {highest}] for num_labels={num_labels} (0 = background), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.long()


class UniMedIForSemanticSegmentation(FrozenEncoderMixin, UniMedIPreTrainedModel):
    """The shared 2D/3D vision encoder with SETR-PUP (X-rays) and UNETR (CT volumes) decoders; logits at the input
    resolution.

    `num_labels` counts the background: mask value i is class i (`id2label[0]` = "background"); `num_labels=1` is a
    single foreground class with one sigmoid channel. `config.segmentation_decoders` picks the decoders built.

    `from_pretrained` accepts any UniMedI folder, as [`UniMedIForImageClassification`]: an inference or a
    pretraining save; the rest of such a folder is ignored and the decoders start at random. `freeze_encoder=True`
    (appendix §7.2's 2D protocol: decoder only) keeps the encoder without gradients and in eval mode; the 3D protocol
    trains the whole model.
    """

    config: UniMedIConfig
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")
    _keys_to_ignore_on_load_unexpected = (r"^(?!vision_model\.|image_decoder\.|volume_decoder\.)",)

    def __init__(self, config: UniMedIConfig, freeze_encoder: bool | None = None):
        super().__init__(config)
        self.vision_model = UniMedIVisionModel._from_config(config.vision_config)
        decoders = set(config.segmentation_decoders)
        self.image_decoder = UniMedISETRPUPDecoder(config) if "setr-pup" in decoders else None
        self.volume_decoder = UniMedIUNETRDecoder(config) if "unetr" in decoders else None
        self.post_init()
        self._init_frozen_encoder(freeze_encoder)

    @torch.no_grad()
    def _init_weights(self, module):
        """The base init, plus the layers it leaves out: 3D deconvolutions as the encoder's layers (normal with
        `vision_config.initializer_range`, zero bias), instance norms as its other norms (identity)."""
        super()._init_weights(module)
        if isinstance(module, nn.ConvTranspose3d):
            init.normal_(module.weight, std=self.config.vision_config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, nn.InstanceNorm3d) and module.affine:
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @property
    def segmentation_grid(self) -> tuple[int, int, int]:
        """The (D, H, W) grid CTs are segmented on: `config.segmentation_volume_size`, else the encoder's."""
        return tuple(self.config.segmentation_volume_size or self.config.vision_config.volume_size)

    @torch.no_grad()
    def predict_volume(self, scan, processor: UniMedIVolumeProcessor | None = None):
        """Segment one CT and return the mask on the scan's own voxels: a uint8 `nibabel.Nifti1Image` with the
        scan's shape and affine (mask value i = `id2label[i]`; 1 = the foreground when `num_labels == 1`).

        `scan`: a NIfTI path or nibabel image. `processor`: the CT processor the decoder was trained with (default:
        the paper's resize to `segmentation_grid`). The volume goes through it onto the grid, the prediction comes
        back with its `labels_from_grid` (nearest-neighbour, reorientation undone)."""
        processor = processor or UniMedIVolumeProcessor(volume_size=self.segmentation_grid)
        volume_values = processor(scan)["volume_values"].to(self.device, self.dtype)
        was_training = self.training
        self.eval()
        try:
            logits = self(volume_values=volume_values).logits
        finally:
            self.train(was_training)
        return processor.labels_from_grid(predicted_labels(logits)[0].to(torch.uint8), scan)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        volume_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): X-rays, or
        volume_values (`torch.FloatTensor` of shape `(batch, volume_channels, depth, height, width)`): CT volumes, of
            any size divisible by the patch size (the position tables are interpolated).
        labels (`torch.LongTensor` of shape `(batch, height, width)` or `(batch, depth, height, width)`, *optional*):
            Integer masks, 0 = background; the loss is `config.segmentation_loss`.

        Returns `logits` of shape `(batch, num_labels, *spatial)`, at the input resolution.
        """
        if (pixel_values is None) == (volume_values is None):
            raise ValueError(
                "Give either `pixel_values` (X-rays) or `volume_values` (CT volumes), not both or neither"
            )
        inputs = pixel_values if volume_values is None else volume_values
        decoder_name, decoder = (
            ("setr-pup", self.image_decoder) if volume_values is None else ("unetr", self.volume_decoder)
        )
        if decoder is None:
            raise ValueError(
                f"this model has no {decoder_name!r} decoder for {'X-rays' if volume_values is None else 'CT volumes'}"
                f" (config.segmentation_decoders={list(self.config.segmentation_decoders)})"
            )
        if pixel_values is not None and pixel_values.ndim != 4:
            raise ValueError(
                f"`pixel_values` must be (batch, channels, height, width), got {tuple(pixel_values.shape)}"
            )
        return_hidden_states = bool(kwargs.pop("output_hidden_states", False))
        outputs = self.encode(
            pixel_values=pixel_values,
            volume_values=volume_values,
            output_hidden_states=return_hidden_states or volume_values is not None,
            return_dict=True,
            **kwargs,
        )
        if volume_values is None:
            logits = decoder(outputs.last_hidden_state, tuple(pixel_values.shape[2:]))
        else:
            logits = decoder(
                volume_values.to(outputs.last_hidden_state.dtype), outputs.hidden_states, outputs.last_hidden_state
            )

        loss = None
        if labels is not None:
            labels = check_labels(labels.to(logits.device), inputs, self.config.num_labels)
            loss = segmentation_loss(logits, labels, self.config)
        return SemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states if return_hidden_states else None,
            attentions=outputs.attentions,
        )


__all__ = ["UniMedIForSemanticSegmentation"]
