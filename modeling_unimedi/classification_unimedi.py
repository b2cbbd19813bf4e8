"""UniMedIForImageClassification: the UniMedI vision encoder with a linear head, for X-rays and CT volumes (§4.2).

Pooled feature: the [CLS] token after the encoder's final LayerNorm (`UniMedIVisionModel.pooler_output`, hidden_size
wide), not the CLIP projection and not the mean of the patch tokens. The paper keeps "the pre-trained ViT vision
encoder fixed" and trains a linear head on it (§4.2): the projection belongs to the image-text alignment, not to the
encoder, and is a linear map of this same token, so a linear head on the projection can only see less. [CLS] is the
token both pretraining losses shape for 2D and 3D alike (L_vl through the projection, L_icl through the DINO head),
while the patch tokens are trained by L_pcl only, token by token, so their mean was never a pretraining target.
"""

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils.generic import can_return_tuple

from .configuration_unimedi import UniMedIConfig
from .modeling_unimedi import UniMedIPreTrainedModel, UniMedIVisionModel

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """ViTForImageClassification's rule: one output is regression, integer targets are single-label, else multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """MSE for regression, cross-entropy for single-label, BCE-with-logits for multi-label targets."""
    if problem_type == "regression":
        if logits.shape[-1] == 1:  # one output: (batch,) or (batch, 1) targets
            return nn.functional.mse_loss(logits.view(-1), labels.float().view(-1))
        return nn.functional.mse_loss(logits, labels.float())
    if problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    if problem_type == "multi_label_classification":
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"unknown problem_type {problem_type!r}; expected one of {PROBLEM_TYPES}")


class FrozenEncoderMixin:
    """The `freeze_encoder` switch shared by the heads on the UniMedI encoder (classification, segmentation).

    Frozen (`freeze_encoder=True` in the constructor or `from_pretrained`, kept in the saved config, or
    `freeze_encoder()`): `vision_model` gets no gradients and stays in eval mode even under `model.train()`, so dropout
    never touches the features; only the head learns. A subclass calls `_init_frozen_encoder(flag)` after `post_init`.
    """

    def _init_frozen_encoder(self, freeze_encoder: bool | None) -> None:
        if freeze_encoder is not None:
            self.config.freeze_encoder = freeze_encoder
        if self.encoder_frozen:
            self.freeze_encoder()

    @property
    def encoder_frozen(self) -> bool:
        return bool(getattr(self.config, "freeze_encoder", False))

    def freeze_encoder(self) -> None:
        """The encoder gets no gradients and stays in eval mode; recorded in the config."""
        self.config.freeze_encoder = True
        self.train(self.training)

    def train(self, mode: bool = True):
        """As `nn.Module.train`, except that a frozen encoder stays frozen and in eval mode. `from_pretrained` ends
        with `eval()`, so this also re-freezes the parameters that loading the weights replaced."""
        super().train(mode)
        if self.encoder_frozen:
            self.vision_model.requires_grad_(False)
            self.vision_model.eval()
        return self

    def encode(self, **inputs):
        """`vision_model(**inputs)`, without building a graph through a frozen encoder."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            return self.vision_model(**inputs)


class UniMedIForImageClassification(FrozenEncoderMixin, UniMedIPreTrainedModel):
    """The shared 2D/3D vision encoder and a linear head on its [CLS] token; takes X-rays or CT volumes.

    `from_pretrained` accepts any UniMedI folder: an inference save (`UniMedIModel`, keys `vision_model.*`) or a
    pretraining save (`UniMedIForPreTraining`, keys `unimedi.vision_model.*`, whose `unimedi.` base-model prefix
    transformers strips). Everything else in such a folder (text tower, projections, teacher, DINO heads) is
    expected to be unused and is not reported; a missing encoder weight still is. The head starts at random.

    Linear probe (§4.2): `freeze_encoder=True` (constructor or `from_pretrained(folder, freeze_encoder=True)`; kept
    in the saved config) or `freeze_encoder()` takes the encoder out of training: no gradients, and eval mode even under `model.train()`, so
    dropout never touches the features. Only `classifier` learns.
    """

    config: UniMedIConfig
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")
    # Everything that is not this model's own module is part of the CLIP model or of pretraining.
    _keys_to_ignore_on_load_unexpected = (r"^(?!vision_model\.|classifier\.)",)

    def __init__(self, config: UniMedIConfig, freeze_encoder: bool | None = None):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_model = UniMedIVisionModel._from_config(config.vision_config)
        hidden_size = config.vision_config.hidden_size
        self.classifier = nn.Linear(hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()
        self._init_frozen_encoder(freeze_encoder)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        volume_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): X-rays, or
        volume_values (`torch.FloatTensor` of shape `(batch, volume_channels, depth, height, width)`): CT volumes.
        labels (`torch.Tensor`, *optional*): `(batch,)` class indices (single-label), `(batch, num_labels)` 0/1
            floats (multi-label), or `(batch,)`/`(batch, num_labels)` floats (regression). `config.problem_type` is
            inferred from them when unset, as in `ViTForImageClassification`.
        """
        if (pixel_values is None) == (volume_values is None):
            raise ValueError(
                "Give either `pixel_values` (X-rays) or `volume_values` (CT volumes), not both or neither"
            )
        outputs = self.encode(pixel_values=pixel_values, volume_values=volume_values, **kwargs)
        logits = self.classifier(outputs.pooler_output)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.problem_type is None:
                self.config.problem_type = infer_problem_type(self.num_labels, labels)
            loss = classification_loss(logits, labels, self.config.problem_type)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = ["FrozenEncoderMixin", "UniMedIForImageClassification"]
