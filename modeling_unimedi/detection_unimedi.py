"""UniMedIForObjectDetection: X-ray detection as the paper does it (§4.2, Table 5): ViTDet on the frozen encoder.

ViTDet (Li, Mao, Girshick, He 2022, "Exploring Plain Vision Transformer Backbones for Object Detection") turns a
plain ViT's last feature map into a *simple feature pyramid* (strides 4, 8, 16, 32 from the one patch grid, by
deconvolutions, identity and max-pooling, each level then a 1x1 and a 3x3 convolution with LayerNorm; no FPN
top-down path) and puts a Faster R-CNN (Ren, He, Girshick, Sun 2015, "Faster R-CNN: Towards Real-Time Object
Detection with Region Proposal Networks") on it: a region proposal network over every level and a RoIAlign box head
("4conv1fc" with LayerNorm). The proposal network, RoIAlign and box head here are torchvision's; the UniMedI encoder
stays frozen and only the pyramid and the detector train, as the paper states for its detection results.

Images come in as `UniMedIImageProcessor` made them (`pixel_values`, already resized, padded and normalised), so
torchvision's `GeneralizedRCNNTransform` is not used: resizing again would change the grid the encoder's position
table was made for, and normalising again would shift the intensities it was pretrained on. Boxes are `(x0, y0, x1,
y1)` pixels of `pixel_values`; `SquareFrame` maps boxes between an X-ray and the processor's square.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .classification_unimedi import FrozenEncoderMixin
from .configuration_unimedi import UniMedIConfig
from .modeling_unimedi import UniMedIPreTrainedModel, UniMedIVisionModel

# ViTDet's box head: 4 convolutions, then one fully connected layer of this width
BOX_HEAD_FC_DIM = 1024
# ViTDet's region proposal head: two 3x3 convolutions before the objectness and box-delta outputs
RPN_NUM_CONVS = 2
ROI_OUTPUT_SIZE = 7  # RoIAlign output, Faster R-CNN / ViTDet


@dataclass(frozen=True)
class SquareFrame:
    """Where an X-ray of `height` x `width` pixels lands in `UniMedIImageProcessor`'s square of side `side`: the longer
    side resized to `side` (sizes rounded as the processor rounds them), centred zero padding; `top`/`left` is the
    offset of a crop taken from that square (0 when the whole square is the input)."""

    height: int
    width: int
    side: int
    top: int = 0
    left: int = 0

    def _scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.side / max(self.height, self.width)
        resized_h, resized_w = max(1, round(self.height * scale)), max(1, round(self.width * scale))
        pad_top, pad_left = (self.side - resized_h) // 2, (self.side - resized_w) // 2
        factors = torch.tensor([resized_w / self.width, resized_h / self.height] * 2)
        shift = torch.tensor([pad_left - self.left, pad_top - self.top] * 2, dtype=torch.float32)
        return factors, shift

    def to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        """`(N, 4)` xyxy boxes in the X-ray's pixels -> the same boxes in the processed image's pixels (unclipped)."""
        factors, shift = self._scale_and_shift()
        return boxes.float() * factors + shift

    def to_image(self, boxes: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_input`, clipped to the X-ray."""
        factors, shift = self._scale_and_shift()
        boxes = (boxes.float() - shift.to(boxes.device)) / factors.to(boxes.device)
        limits = torch.tensor([self.width, self.height] * 2, dtype=boxes.dtype, device=boxes.device)
        return torch.minimum(boxes.clamp(min=0), limits)


def pyramid_level_name(stride: int) -> str:
    """`p<k>` for stride 2^k, the FPN/ViTDet names of the levels (p2 = stride 4 ... p5 = stride 32)."""
    return f"p{int(math.log2(stride))}"


class UniMedISimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one level per `config.detection_strides` from the last layer's patch grid.

    A level finer than the patch grid upsamples it by 2x2 stride-2 deconvolutions (channels halved by each, LayerNorm
    and GELU between them), a coarser one max-pools it, the grid's own stride keeps it; then every level gets a 1x1 and
    a 3x3 convolution, each followed by LayerNorm, to `detection_channels`. How many deconvolutions or how much pooling
    follows from the patch size, so the strides are right for 16- and 32-pixel patches alike.
    """

    def __init__(self, config: UniMedIConfig):
        super().__init__()
        from torchvision.models.convnext import LayerNorm2d

        patch, width = config.vision_config.patch_size, config.vision_config.hidden_size
        self.out_channels = config.detection_channels  # read by torchvision's detection heads
        self.levels = nn.ModuleDict()
        for stride in config.detection_strides:
            layers, channels = [], width
            if stride < patch:
                num_deconvs = int(math.log2(patch // stride))
                for step in range(num_deconvs):
                    layers.append(nn.ConvTranspose2d(channels, max(channels // 2, 1), kernel_size=2, stride=2))
                    channels = max(channels // 2, 1)
                    if step < num_deconvs - 1:
                        layers += [LayerNorm2d(channels), nn.GELU()]
            elif stride > patch:
                layers.append(nn.MaxPool2d(kernel_size=stride // patch, stride=stride // patch))
            layers += [
                nn.Conv2d(channels, self.out_channels, kernel_size=1, bias=False),
                LayerNorm2d(self.out_channels),
                nn.Conv2d(self.out_channels, self.out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(self.out_channels),
            ]
            self.levels[pyramid_level_name(stride)] = nn.Sequential(*layers)

    def forward(self, feature_map: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """`(batch, hidden_size, grid, grid)` -> {level name: `(batch, detection_channels, H / stride, W / stride)`}."""
        return OrderedDict((name, level(feature_map)) for name, level in self.levels.items())


@dataclass
class UniMedIObjectDetectionOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*, returned when `labels` are given):
        Sum of Faster R-CNN's four losses (proposal objectness and box regression, box-head classification and box
        regression), each in `loss_dict`.
    loss_dict (`dict[str, torch.FloatTensor]`, *optional*): torchvision's losses by name.
    detections (`list[dict[str, torch.Tensor]]`, *optional*, returned in eval mode):
        Per image `{"scores": (N,), "labels": (N,) class indices into id2label, "boxes": (N, 4) xyxy}` in pixels of
        `pixel_values`, best first; `post_process_object_detection` filters them and maps them onto the X-rays.
    feature_maps (`dict[str, torch.FloatTensor]`): the pyramid's levels, by name (`p2` ... `p5`).
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None
    detections: list[dict[str, torch.Tensor]] | None = None
    feature_maps: dict[str, torch.FloatTensor] | None = None


class UniMedIForObjectDetection(FrozenEncoderMixin, UniMedIPreTrainedModel):
    """The UniMedI X-ray encoder (frozen by default), ViTDet's simple feature pyramid and torchvision's Faster R-CNN
    heads; the classes are `config.id2label` (torchvision's background class is added internally).

    Loads from any UniMedI folder as `UniMedIForImageClassification` does (an inference or a pretraining save; the
    text tower, projections and teacher are ignored, a missing encoder weight is reported); the detection layers start
    at random. `freeze_encoder` defaults to True here (the paper trains only the non-backbone layers); pass
    `freeze_encoder=False` to fine-tune the encoder too.
    """

    config: UniMedIConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _keys_to_ignore_on_load_unexpected = (r"^(?!vision_model\.|feature_pyramid\.|rpn\.|roi_heads\.)",)

    def __init__(self, config: UniMedIConfig, freeze_encoder: bool | None = None):
        super().__init__(config)
        from torchvision.models.convnext import LayerNorm2d
        from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNConvFCHead, FastRCNNPredictor
        from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
        from torchvision.ops import MultiScaleRoIAlign

        self.vision_model = UniMedIVisionModel._from_config(config.vision_config)
        self.feature_pyramid = UniMedISimpleFeaturePyramid(config)
        channels, levels = config.detection_channels, list(self.feature_pyramid.levels)
        anchors = AnchorGenerator(
            sizes=tuple((size,) for size in config.detection_anchor_sizes),
            aspect_ratios=(tuple(config.detection_aspect_ratios),) * len(levels),
        )
        box_head_convs = [channels] * config.detection_box_head_num_convs
        # torchvision's FasterRCNN wires its proposal network and RoI heads with its default sampling, matching and
        # NMS settings; only those two parts are kept (the image transform is not wanted, see the module docstring,
        # and the pyramid is this model's own attribute so that the encoder's weights keep their `vision_model.` keys)
        detector = FasterRCNN(
            self.feature_pyramid,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=RPN_NUM_CONVS),
            box_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=ROI_OUTPUT_SIZE, sampling_ratio=0),
            box_head=FastRCNNConvFCHead(
                (channels, ROI_OUTPUT_SIZE, ROI_OUTPUT_SIZE), box_head_convs, [BOX_HEAD_FC_DIM], norm_layer=LayerNorm2d
            ),
            box_predictor=FastRCNNPredictor(BOX_HEAD_FC_DIM, config.num_labels + 1),
            box_score_thresh=config.detection_score_threshold,
            box_detections_per_img=config.detection_max_detections,
            box_batch_size_per_image=config.detection_rois_per_image,
        )
        self.rpn, self.roi_heads = detector.rpn, detector.roi_heads
        self.post_init()
        if freeze_encoder is None and not hasattr(config, "freeze_encoder"):
            freeze_encoder = True  # the paper's protocol unless the config or the caller says otherwise
        self._init_frozen_encoder(freeze_encoder)

    @torch.no_grad()
    def _init_weights(self, module):
        """UniMedI's initialisation, except for the detector's output layers: Faster R-CNN's normal(0.01) for the
        proposal head and the box classifier, normal(0.001) for the box regressor (small first deltas)."""
        super()._init_weights(module)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            return
        predictor = self.roi_heads.box_predictor
        if module is predictor.bbox_pred:
            init.normal_(module.weight, std=0.001)
        elif module is predictor.cls_score or any(module is conv for conv in self.rpn.head.modules()):
            init.normal_(module.weight, std=0.01)

    def feature_maps(self, pixel_values: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """The pyramid's levels from the encoder's last layer (its final-normed patch tokens as a grid)."""
        tokens = self.encode(pixel_values=pixel_values).last_hidden_state[:, 1:]
        grid_h, grid_w = (side // self.config.vision_config.patch_size for side in pixel_values.shape[-2:])
        return self.feature_pyramid(tokens.transpose(1, 2).unflatten(2, (grid_h, grid_w)))

    def forward(
        self, pixel_values: torch.Tensor, labels: list[dict[str, torch.Tensor]] | None = None
    ) -> UniMedIObjectDetectionOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): X-rays from
            `UniMedIImageProcessor`.
        labels (`list[dict]`, *optional*): one dict per image, `{"boxes": (N, 4) xyxy pixels of pixel_values,
            "class_labels" (transformers' name) or "labels" (torchvision's): (N,) class indices}`; N may be 0
            (an image without findings). Required in train mode.

        Train mode returns the loss only (as torchvision); eval mode returns the detections, and with `labels` also
        the loss, computed as in training on a fixed random stream (the proposal and RoI sampling draw random
        subsets) so that a validation loss does not change from call to call.
        """
        from torchvision.models.detection.image_list import ImageList

        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be (batch, channels, height, width) X-rays, got {tuple(pixel_values.shape)}"
            )
        targets = None if labels is None else self._torchvision_targets(labels, pixel_values)
        if self.training and targets is None:
            raise ValueError("labels (boxes and classes per image) are required in train mode")
        features = self.feature_maps(pixel_values)
        images = ImageList(pixel_values, [tuple(pixel_values.shape[-2:])] * len(pixel_values))

        loss_dict = detections = None
        if self.training:
            loss_dict = self._losses(images, features, targets)
        else:
            proposals, _ = self.rpn(images, features)
            found, _ = self.roi_heads(features, proposals, images.image_sizes)
            detections = [{**found_i, "labels": found_i["labels"] - 1} for found_i in found]
            if targets is not None:
                with torch.random.fork_rng(devices=[pixel_values.device] if pixel_values.is_cuda else []):
                    torch.manual_seed(0)
                    loss_dict = self._losses(images, features, targets)
        loss = None if loss_dict is None else sum(loss_dict.values())
        return UniMedIObjectDetectionOutput(
            loss=loss, loss_dict=loss_dict, detections=detections, feature_maps=dict(features)
        )

    def _losses(self, images, features, targets) -> dict[str, torch.Tensor]:
        """Faster R-CNN's training losses; the heads' train mode only switches proposal sampling and loss
        computation on (they hold no dropout or batch norm), so it is set for this call alone."""
        modes = self.rpn.training, self.roi_heads.training
        self.rpn.train(), self.roi_heads.train()
        try:
            proposals, rpn_losses = self.rpn(images, features, targets)
            _, box_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        finally:
            self.rpn.train(modes[0]), self.roi_heads.train(modes[1])
        return {**rpn_losses, **box_losses}

    def _torchvision_targets(self, labels: list[dict], pixel_values: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """`labels` checked and as torchvision takes them: float boxes, int64 classes shifted by one (0 = background)."""
        if len(labels) != len(pixel_values):
            raise ValueError(f"labels has {len(labels)} entries for a batch of {len(pixel_values)} images")
        targets = []
        for index, target in enumerate(labels):
            classes = target.get("class_labels", target.get("labels"))
            if "boxes" not in target or classes is None:
                raise ValueError(
                    f"labels[{index}] needs 'boxes' and 'class_labels' (or 'labels'), got {sorted(target)}"
                )
            boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=pixel_values.device).reshape(-1, 4)
            classes = torch.as_tensor(classes, dtype=torch.int64, device=pixel_values.device).reshape(-1)
            if len(classes) != len(boxes):
                raise ValueError(f"labels[{index}]: {len(boxes)} boxes but {len(classes)} class labels")
            if len(boxes) and not bool((boxes[:, 2:] > boxes[:, :2]).all()):
                raise ValueError(f"labels[{index}]: boxes must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
            if len(classes) and not bool(((classes >= 0) & (classes < self.config.num_labels)).all()):
                raise ValueError(
                    f"labels[{index}]: class labels must be in [0, {self.config.num_labels}), got {classes.tolist()}"
                )
            targets.append({"boxes": boxes, "labels": classes + 1})
        return targets

    def post_process_object_detection(
        self,
        outputs: UniMedIObjectDetectionOutput,
        threshold: float = 0.5,
        target_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Per image `{"scores", "labels", "boxes"}` scoring above `threshold`, as transformers' detection processors
        return them. `target_sizes` (per image `(height, width)` of the original X-ray) maps the boxes back onto the
        X-rays, for inputs made by the image processor with `size=config.vision_config.image_size` and
        `do_center_crop=False` (the whole X-ray, as the detection evaluation sees it); without it boxes stay in pixels
        of `pixel_values`."""
        if outputs.detections is None:
            raise ValueError("outputs hold no detections: run the model in eval mode (model.eval())")
        if target_sizes is not None and len(target_sizes) != len(outputs.detections):
            raise ValueError(f"target_sizes has {len(target_sizes)} sizes for {len(outputs.detections)} images")
        results = []
        for index, found in enumerate(outputs.detections):
            keep = found["scores"] > threshold
            boxes = found["boxes"][keep]
            if target_sizes is not None:
                height, width = (int(side) for side in target_sizes[index])
                boxes = SquareFrame(height, width, self.config.vision_config.image_size).to_image(boxes)
            results.append({"scores": found["scores"][keep], "labels": found["labels"][keep], "boxes": boxes})
        return results


__all__ = ["SquareFrame", "UniMedIForObjectDetection", "UniMedIObjectDetectionOutput", "UniMedISimpleFeaturePyramid"]
