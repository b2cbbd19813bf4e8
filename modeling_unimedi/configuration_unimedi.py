"""UniMedI configuration: a ViT shared by a 2D and a 3D tokenizer, a BERT-family text tower, and the common space."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# BioClinicalBERT (emilyalsentzer/Bio_ClinicalBERT) is a cased BERT-base: only the vocabulary differs from BERT's
# defaults. The weights are not bundled; `convert_unimedi.unimedi_from_pretrained_parts` loads them from the Hub or
# a folder.
BIO_CLINICAL_BERT = "emilyalsentzer/Bio_ClinicalBERT"
BIO_CLINICAL_BERT_TEXT_CONFIG = {"vocab_size": 28996, "_name_or_path": BIO_CLINICAL_BERT}


# The rows of the paper's Table 7 as UniMedIConfig fields, as its caption defines them: VL = L_vl with random slice
# selection; +SD adds L_icl and L_pcl with the attention-guided masking of §3.4; +Attn selects slices attentively
# (Eq. 1-2) instead of at random. "vl+sd(random-mask)" is an extra row, not in the paper: +SD with random masking.
ABLATION_SETTINGS = {
    "vl": dict(self_distillation=False, slice_selection="random", token_masking="none"),
    "vl+sd": dict(self_distillation=True, slice_selection="random", token_masking="attentive"),
    "vl+sd+attn": dict(self_distillation=True, slice_selection="attentive", token_masking="attentive"),
    "vl+sd(random-mask)": dict(self_distillation=True, slice_selection="random", token_masking="random"),
}


# Decoders of UniMedIForSemanticSegmentation: SETR-PUP for X-rays, UNETR for CT volumes.
SEGMENTATION_DECODERS = ("setr-pup", "unetr")
PATCH_EMBEDDINGS = ("linear", "conv_stem")


def _as_tuple(value, length: int, name: str) -> tuple[int, ...]:
    values = (value,) * length if isinstance(value, int) else tuple(value)
    if len(values) != length or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"`{name}` must be a positive int or {length} positive ints, got {value!r}")
    return values


@strict
class UniMedIVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`UniMedIVisionModel`]: one transformer backbone E_v fed by a 2D patch tokenizer T_2D (X-rays,
    pseudo-2D CT slices) and a 3D patch tokenizer T_3D (CT volumes). Defaults are ViT-B/16 with the paper's input
    sizes: a 224x224 image gives 14x14 = 196 tokens and a 32x128x128 volume with 4x16x16 patches gives 8x8x8 = 512.

    Args:
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the backbone's tokens.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of transformer blocks; Eq. 1 averages the [CLS] attention over all of them.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Attention heads per block; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 3072):
            Hidden width of each block's MLP.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            MLP activation (a key of `transformers.activations.ACT2FN`).
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            LayerNorm epsilon (timm's ViT value, so its weights map 1:1).
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the fused query/key/value projection has a bias.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities.
        hidden_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the residual branches (attention and MLP outputs).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated-normal initialisation of weights, [CLS] token and position tables.
        image_size (`int`, *optional*, defaults to 224):
            Side of the square 2D input (X-rays and pseudo-2D slices); other sizes interpolate the 2D positions.
        patch_size (`int`, *optional*, defaults to 16):
            Side of the square 2D patches of T_2D.
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the 2D input (grayscale replicated, as ImageNet-initialised ViTs expect).
        volume_size (`tuple[int, int, int]`, *optional*, defaults to `(32, 128, 128)`):
            (depth, height, width) of the CT input; other sizes interpolate the 3D positions.
        volume_patch_size (`tuple[int, int, int]`, *optional*, defaults to `(4, 16, 16)`):
            (depth, height, width) of the 3D patches of T_3D; the depth sets the slabs that Eq. 2 scores.
        volume_channels (`int`, *optional*, defaults to 1):
            Channels of the CT input.
        patch_embedding (`str`, *optional*, defaults to `"linear"`):
            How T_2D and T_3D turn pixels into tokens: `"linear"`, the paper's non-overlapping patch projection (the
            layout of timm's ViT weights), or `"conv_stem"`, stride-2 3x3 convolutions with BatchNorm and ReLU then a
            1x1 projection (Xiao et al., 2021, "Early convolutions help transformers see better"), which a ViT trained
            from scratch learns much faster with (README, "The demo"); needs power-of-two patch sides.

    Example:

    ```python
    >>> from modeling_unimedi import UniMedIVisionConfig, UniMedIVisionModel

    >>> # A ViT-B/16 vision encoder for 224x224 X-rays and 32x128x128 CT volumes
    >>> configuration = UniMedIVisionConfig()

    >>> # A model (with random weights) from that configuration
    >>> model = UniMedIVisionModel(configuration)

    >>> # Accessing the model configuration
    >>> configuration = model.config
    ```"""

    model_type = "unimedi_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    volume_size: list[int] | tuple[int, int, int] = (32, 128, 128)
    volume_patch_size: list[int] | tuple[int, int, int] = (4, 16, 16)
    volume_channels: int = 1
    patch_embedding: str = "linear"

    def __post_init__(self, **kwargs):
        self.volume_size = _as_tuple(self.volume_size, 3, "volume_size")
        self.volume_patch_size = _as_tuple(self.volume_patch_size, 3, "volume_patch_size")
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: shapes that cannot build a model fail at config time, not at forward."""
        sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size")
        for name in (*sizes, "patch_size", "num_channels", "volume_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if not 0 < self.layer_norm_eps < 1 or not 0 <= self.initializer_range < 1:
            raise ValueError("layer_norm_eps must be in (0, 1) and initializer_range in [0, 1)")
        if not (0 <= self.attention_dropout < 1 and 0 <= self.hidden_dropout < 1):
            raise ValueError("attention_dropout and hidden_dropout must be in [0, 1)")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads ({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) is not divisible by patch_size ({self.patch_size})")
        for axis, size, patch in zip("DHW", self.volume_size, self.volume_patch_size):
            if size % patch != 0:
                raise ValueError(f"volume_size {axis}={size} is not divisible by volume_patch_size {axis}={patch}")
        if self.patch_embedding not in PATCH_EMBEDDINGS:
            raise ValueError(f"patch_embedding must be one of {PATCH_EMBEDDINGS}, got {self.patch_embedding!r}")
        if self.patch_embedding == "conv_stem":
            for name, sides in (("patch_size", (self.patch_size,)), ("volume_patch_size", self.volume_patch_size)):
                if any(side & (side - 1) for side in sides):
                    raise ValueError(f"patch_embedding='conv_stem' needs power-of-two {name}, got {sides}")

    @property
    def num_image_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def volume_grid(self) -> tuple[int, int, int]:
        """Tokens along (D, H, W) of a configured-size volume; depth index = slab index of Eq. 2."""
        return tuple(s // p for s, p in zip(self.volume_size, self.volume_patch_size))

    @property
    def num_volume_patches(self) -> int:
        d, h, w = self.volume_grid
        return d * h * w


@strict
class UniMedIConfig(PreTrainedConfig):
    r"""
    Configuration of [`UniMedIModel`] and [`UniMedIForPreTraining`].

    The pretraining fields are read by [`UniMedIForPreTraining`] only. The paper gives no number for most of them;
    the defaults follow the cited sources (DINO, iBOT, Attentive Mask CLIP), as noted per field.

    Args:
        vision_config (`dict` or [`UniMedIVisionConfig`], *optional*):
            The shared 2D/3D vision encoder; defaults to [`UniMedIVisionConfig`]'s ViT-B/16.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Any BERT-family encoder config (`model_type` picks the architecture); defaults to BioClinicalBERT's
            architecture (a cased BERT-base).
        projection_dim (`int`, *optional*, defaults to 512):
            Size of the common image/volume/report space.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial log of the inverse CLIP temperature (log(1/0.07), as CLIP).
        num_selected_slices (`int`, *optional*, defaults to 2):
            k, how many depth slabs of each CT become pseudo-2D images (§3.2): 2 of 8 slabs (25%), close to the top
            20% the authors used in their slice-selection check. 0 turns the pseudo-pairs off.
        pseudo_image_source (`str`, *optional*, defaults to `"grid"`):
            Where a selected slab's pseudo-2D image comes from. `"native"`: the slab's image from the
            original-resolution CT at the 2D input size (the mean of its slices by default, the volume processor's
            `slab_image_reduction`; the batch's `slab_images`, stored by data preparation;
            §3.2 treats selected slices as 2D images). `"grid"`: the slab's central slice of the 32x128x128 model
            grid, upsampled (for data without native slices; the default until the benchmark has measured "native").
        volume_embedding (`str`, *optional*, defaults to `"volume"`):
            What an inference CT embedding (`get_volume_features`, `forward`) encodes: `"volume"`, the 3D tokens
            alone, or `"volume_with_slices"`, the 3D tokens followed by the pseudo-2D images of the CT's
            `num_selected_slices` highest-scoring slabs (Eq. 1-2 on this encoder), the sequence whose [CLS] pretraining
            trained.
        slice_selection (`str`, *optional*, defaults to `"attentive"`):
            `"attentive"` (Eq. 1-2 on the teacher's [CLS] attention) or `"random"` (Table 7's VL and VL+SD rows).
        self_distillation (`bool`, *optional*, defaults to `True`):
            Add L_icl and L_pcl with an EMA teacher (§3.4); `False` is the VL-only ablation (no teacher).
        token_masking (`str`, *optional*, defaults to `"attentive"`):
            Which tokens the student keeps: `"attentive"` (highest teacher attention, §3.4), `"random"`, or `"none"`
            (the student sees every token).
        mask_ratio (`float`, *optional*, defaults to 0.5):
            Share of patch tokens dropped from the student's input (Attentive Mask CLIP's 0.5), applied to each
            modality on its own: a CT keeps `1 - mask_ratio` of its 3D tokens and of its pseudo-2D slice tokens
            (§3.4 masks "both 2D and 3D image tokens"; one joint top-k could drop a modality entirely).
        patch_recovery (`str`, *optional*, defaults to `"predictor"`):
            How the student predicts the teacher's patch-head output at the masked positions for L_pcl (§3.4
            "masking and recovering", iBOT's masked-patch loss). `"predictor"`: the encoder sees only the kept
            tokens (the token-dropping saving stays) and a small transformer (`predictor_num_layers`) takes them plus
            positioned mask tokens. `"mask_token"`: iBOT's way, the encoder itself sees the full sequence with a
            learned mask token at the masked positions (no saving). The predictor is the default: at the
            CPU demo's size the mask-token step is even a little faster (1.65 s vs 1.90 s, 1 thread, idle 2-core
            machine, `python benchmarks/pretrain_step.py --size demo`: the demo's encoder is small next to its heads
            and text tower), but after 50 demo steps it scored higher on the ground-truth test split (mean
            zero-shot AUROC X-ray 50.6 vs 44.5, CT 64.7 vs 39.1; both runs still on the early plateau, so a weak
            signal), and at ViT-B size, where the encoder dominates a step, only the predictor keeps the saving of
            dropping half the tokens (expected, not yet measured at that size).
        pcl_on_kept_tokens (`bool`, *optional*, defaults to `False`):
            Also take L_pcl at the kept positions (iBOT takes it at the masked ones only).
        predictor_num_layers (`int`, *optional*, defaults to 2):
            Transformer blocks of the `"predictor"` (the backbone's width and block layout).
        dino_out_dim (`int`, *optional*, defaults to 8192):
            Prototypes of each DINO head (iBOT ViT-B).
        dino_hidden_dim (`int`, *optional*, defaults to 2048):
            Hidden width of the DINO heads' 3-layer MLP.
        dino_bottleneck_dim (`int`, *optional*, defaults to 256):
            L2-normalised bottleneck between the DINO MLP and the prototypes.
        student_temperature (`float`, *optional*, defaults to 0.1):
            Softmax temperature of the student's DINO outputs.
        teacher_temperature (`float`, *optional*, defaults to 0.07):
            Softmax temperature of the teacher's DINO outputs after warm-up; `forward`'s default when the training
            loop passes none.
        teacher_temperature_warmup (`float`, *optional*, defaults to 0.04):
            Teacher temperature at step 0, raised linearly to `teacher_temperature` (DINO).
        teacher_temperature_warmup_steps (`int`, *optional*, defaults to 2500):
            Optimizer steps of that warm-up; 0 = no warm-up. The schedule lives in `training/schedules.py`. DINO
            (Caron et al. 2021, `warmup_teacher_temp_epochs`) warms over its first epochs because a sharp teacher
            early makes training unstable; 2500 steps is about one epoch of MIMIC-CXR + BIMCV at batch 144.
        prototype_freeze_steps (`int`, *optional*, defaults to 2500):
            Steps at the start of training during which the DINO heads' last layer (the prototypes) gets no update;
            DINO's `freeze_last_layer` (first epoch), which it found to stabilise the start (same epoch estimate).
        max_logit_scale (`float`, *optional*, defaults to 100.0):
            Upper bound of exp(`logit_scale`), clamped at each pretraining forward as CLIP does (Radford et al.
            2021, §2.5: "clipped to prevent scaling the logits by more than 100").
        center_momentum (`float`, *optional*, defaults to 0.9):
            EMA momentum of the DINO centres.
        ema_momentum (`float`, *optional*, defaults to 0.996):
            The teacher's EMA momentum at step 0, raised to 1 on a cosine schedule over training (DINO).
        vl_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of L_vl in the total loss.
        icl_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of L_icl in the total loss.
        pcl_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of L_pcl in the total loss.

        Object detection ([`UniMedIForObjectDetection`]; ViTDet, Li et al. 2022, on torchvision's Faster R-CNN):
        detection_strides (`tuple[int, ...]`, *optional*, defaults to `(4, 8, 16, 32)`):
            Input pixels per cell of each level of the simple feature pyramid built from the last layer's patch grid
            (ViTDet's 1/4 ... 1/32); each must be the patch size times or divided by a power of two.
        detection_channels (`int`, *optional*, defaults to 256):
            Width of every pyramid level and of the box head's convolutions (ViTDet, FPN).
        detection_anchor_sizes (`tuple[int, ...]`, *optional*, defaults to `(32, 64, 128, 256)`):
            Anchor side in pixels at each pyramid level: 8 x the level's stride, as torchvision's and ViTDet's FPN
            anchors (32 at stride 4).
        detection_aspect_ratios (`tuple[float, ...]`, *optional*, defaults to `(0.5, 1.0, 2.0)`):
            Anchor height/width ratios at every level (ViTDet, torchvision).
        detection_box_head_num_convs (`int`, *optional*, defaults to 4):
            3x3 convolutions (with LayerNorm) before the box head's fully connected layer: ViTDet's "4conv1fc" head.
        detection_rois_per_image (`int`, *optional*, defaults to 512):
            Proposals sampled per image to train the box head (ViTDet, torchvision).
        detection_score_threshold (`float`, *optional*, defaults to 0.05):
            Detections scoring lower are dropped before non-maximum suppression (torchvision, detectron2).
        detection_max_detections (`int`, *optional*, defaults to 100):
            Detections kept per image (COCO's limit, which mAP is computed at).

        Segmentation fields, read by [`UniMedIForSemanticSegmentation`] only (`num_labels` counts the background:
        mask value i is class i; `num_labels=1` is one foreground class with a sigmoid output):

        segmentation_decoders (`list[str]`, *optional*, defaults to `["setr-pup", "unetr"]`):
            Decoders to build: `"setr-pup"` for X-rays (`pixel_values`), `"unetr"` for CT volumes (`volume_values`).
            A task on one modality builds one, so no decoder sits untrained in its checkpoint.
        setr_hidden_size (`int`, *optional*, defaults to 256):
            Channels of SETR-PUP's conv stages (Zheng et al. 2021, §3.3: 256).
        unetr_feature_size (`int`, *optional*, defaults to 16):
            F of UNETR (Hatamizadeh et al. 2022): the input-resolution stage has F channels, the skips 2F, 4F, 8F.
        segmentation_volume_size (`list[int]`, *optional*):
            (D, H, W) grid the CT decoder is trained and predicts on; `None` is `vision_config.volume_size`. Appendix
            §7.2 segments BCV at 48x224x224 (the 3D position table is interpolated).
        segmentation_loss (`str`, *optional*, defaults to `"dice+ce"`):
            `"dice+ce"`: soft Dice + cross-entropy (appendix §7.2, 3D; binary cross-entropy for `num_labels=1`), or
            `"focal+dice"`: `focal_loss_weight` x focal loss + soft Dice (appendix §7.2, 2D RSNA).
        focal_loss_weight (`float`, *optional*, defaults to 10.0):
            alpha of appendix §7.2's alpha x FocalLoss + DiceLoss (alpha = 10).
        focal_gamma (`float`, *optional*, defaults to 2.0):
            The focal loss's focusing exponent (Lin et al. 2017's default; the paper gives none).

    Example:

    ```python
    >>> from modeling_unimedi import UniMedIConfig, UniMedIForPreTraining, UniMedIModel

    >>> # ViT-B/16 + BioClinicalBERT architecture, the full method's pretraining settings
    >>> configuration = UniMedIConfig()

    >>> # The inference model (with random weights) from that configuration
    >>> model = UniMedIModel(configuration)

    >>> # A row of the paper's Table 7: the VL-only ablation, for pretraining
    >>> pretraining = UniMedIForPreTraining(UniMedIConfig.for_ablation("vl"))

    >>> # Accessing the model configuration
    >>> configuration = model.config
    ```"""

    model_type = "unimedi"
    sub_configs_defaults = {
        "vision_config": UniMedIVisionConfig,
        "text_config": SubConfigSpec(
            config_class=AutoConfig, model_type="bert", init_kwargs=BIO_CLINICAL_BERT_TEXT_CONFIG
        ),
    }

    vision_config: dict | UniMedIVisionConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    num_selected_slices: int = 2
    pseudo_image_source: Literal["native", "grid"] = "grid"
    volume_embedding: Literal["volume", "volume_with_slices"] = "volume"
    slice_selection: Literal["attentive", "random"] = "attentive"
    self_distillation: bool = True
    token_masking: Literal["attentive", "random", "none"] = "attentive"
    mask_ratio: float = 0.5
    patch_recovery: Literal["predictor", "mask_token"] = "predictor"
    pcl_on_kept_tokens: bool = False
    predictor_num_layers: int = 2
    dino_out_dim: int = 8192
    dino_hidden_dim: int = 2048
    dino_bottleneck_dim: int = 256
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07
    teacher_temperature_warmup: float = 0.04
    teacher_temperature_warmup_steps: int = 2500
    prototype_freeze_steps: int = 2500
    max_logit_scale: float = 100.0
    center_momentum: float = 0.9
    ema_momentum: float = 0.996
    vl_loss_weight: float = 1.0
    icl_loss_weight: float = 1.0
    pcl_loss_weight: float = 1.0

    # Object detection (UniMedIForObjectDetection)
    detection_strides: list[int] | tuple[int, ...] = (4, 8, 16, 32)
    detection_channels: int = 256
    detection_anchor_sizes: list[int] | tuple[int, ...] = (32, 64, 128, 256)
    detection_aspect_ratios: list[float] | tuple[float, ...] = (0.5, 1.0, 2.0)
    detection_box_head_num_convs: int = 4
    detection_rois_per_image: int = 512
    detection_score_threshold: float = 0.05
    detection_max_detections: int = 100

    # --- segmentation (UniMedIForSemanticSegmentation only; sources in the docstring) ---
    segmentation_decoders: list[str] | tuple[str, ...] = ("setr-pup", "unetr")
    setr_hidden_size: int = 256
    unetr_feature_size: int = 16
    segmentation_volume_size: list[int] | tuple[int, int, int] | None = None
    segmentation_loss: Literal["dice+ce", "focal+dice"] = "dice+ce"
    focal_loss_weight: float = 10.0
    focal_gamma: float = 2.0

    def validate_architecture(self):
        for name in ("projection_dim", "dino_out_dim", "dino_hidden_dim", "dino_bottleneck_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        temperatures = ("student_temperature", "teacher_temperature", "teacher_temperature_warmup")
        for name in temperatures:  # `not 0 < x` also refuses NaN
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"`{name}` must be positive and finite, got {getattr(self, name)}")
        for name in ("vl_loss_weight", "icl_loss_weight", "pcl_loss_weight", "logit_scale_init_value"):
            if not abs(getattr(self, name)) < float("inf"):  # also refuses NaN
                raise ValueError(f"`{name}` must be finite, got {getattr(self, name)}")
        for name in ("teacher_temperature_warmup_steps", "prototype_freeze_steps", "predictor_num_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.max_logit_scale < float("inf"):
            raise ValueError(f"max_logit_scale must be >= 1 and finite, got {self.max_logit_scale}")
        if not hasattr(self.text_config, "hidden_size"):
            raise ValueError(f"text_config of type {type(self.text_config).__name__} has no hidden_size")
        num_slabs = self.vision_config.volume_grid[0]
        if not 0 <= self.num_selected_slices <= num_slabs:
            raise ValueError(
                f"num_selected_slices must be in [0, {num_slabs}] (depth slabs), got {self.num_selected_slices}"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.ema_momentum <= 1.0 or not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError("ema_momentum and center_momentum must be in [0, 1]")
        self.validate_segmentation()

    def validate_segmentation(self):
        unknown = sorted(set(self.segmentation_decoders) - set(SEGMENTATION_DECODERS))
        if unknown or not self.segmentation_decoders:
            raise ValueError(
                f"segmentation_decoders must name some of {SEGMENTATION_DECODERS}, got {self.segmentation_decoders!r}"
            )
        for name in ("setr_hidden_size", "unetr_feature_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.segmentation_volume_size is not None:
            size = _as_tuple(self.segmentation_volume_size, 3, "segmentation_volume_size")
            for axis, length, patch in zip("DHW", size, self.vision_config.volume_patch_size):
                if length % patch != 0:
                    raise ValueError(
                        f"segmentation_volume_size {axis}={length} is not divisible by volume_patch_size {axis}={patch}"
                    )
        if not (0 <= self.focal_loss_weight < float("inf") and 0 <= self.focal_gamma < float("inf")):
            raise ValueError(
                f"focal_loss_weight and focal_gamma must be >= 0 and finite, got {self.focal_loss_weight} and "
                f"{self.focal_gamma}"
            )

    def validate_detection(self):
        """The detection fields: one anchor size per pyramid level, each level a power-of-two rescale of the patch
        grid (the pyramid is built from deconvolutions, identity and max-pooling)."""
        strides, patch = tuple(self.detection_strides), self.vision_config.patch_size
        if not strides or len(strides) != len(self.detection_anchor_sizes):
            raise ValueError(
                f"detection_anchor_sizes {self.detection_anchor_sizes} needs one size per pyramid level of "
                f"detection_strides {self.detection_strides}"
            )
        for stride in strides:
            big, small = max(stride, patch), min(stride, patch)
            if small <= 0 or big % small or (big // small) & (big // small - 1):
                raise ValueError(
                    f"detection_strides: {stride} is not the patch size ({patch}) times or divided by a power of two"
                )
        if any(size <= 0 for size in self.detection_anchor_sizes) or not all(
            0 < ratio < float("inf") for ratio in self.detection_aspect_ratios
        ):
            raise ValueError("detection_anchor_sizes and detection_aspect_ratios must be positive and finite")
        for name in ("detection_channels", "detection_rois_per_image", "detection_max_detections"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.detection_box_head_num_convs < 0 or not 0.0 <= self.detection_score_threshold < 1.0:
            raise ValueError("detection_box_head_num_convs must be >= 0 and detection_score_threshold in [0, 1)")

    @classmethod
    def for_ablation(
        cls, setting: Literal["vl", "vl+sd", "vl+sd+attn", "vl+sd(random-mask)"], **kwargs
    ) -> "UniMedIConfig":
        """The rows of the paper's Table 7 (`ABLATION_SETTINGS`): VL (L_vl, random slices), VL+SD (+ L_icl and L_pcl
        with attention-guided masking), VL+SD+Attn (+ attentive slice selection; the full method), and the extra
        row VL+SD with random masking."""
        if setting not in ABLATION_SETTINGS:
            raise ValueError(f"unknown ablation setting {setting!r}; choose one of {sorted(ABLATION_SETTINGS)}")
        return cls(**{**ABLATION_SETTINGS[setting], **kwargs})


__all__ = ["UniMedIConfig", "UniMedIVisionConfig"]
