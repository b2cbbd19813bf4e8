"""Segmentation (paper §4.2, appendix §7.2 and §8.1): SETR-PUP on X-rays, UNETR on CT volumes, Dice per class.

Records carry their masks (`processing.schema`: `mask_image` for X-rays, `mask_volume` on the CT grid, values named
by `mask_labels`). Metric: Dice of each foreground class per case, averaged over the cases of the split, then over the
classes (`mean_dice`). A class absent from both the prediction and the truth of a case is skipped for that case (its
Dice is undefined, not perfect); a class predicted where the truth has none counts as 0 for that case, so false
positives on empty images cost. A class skipped in every case has no Dice and is left out of the mean.
"""

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from modeling_unimedi import UniMedIForSemanticSegmentation
from modeling_unimedi.loading_unimedi import load_xray
from modeling_unimedi.segmentation_unimedi import predicted_labels
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
from processing import amos, bcv, rsna
from processing.groundtruth.generator import CT_MASK_LABELS, XRAY_MASK_LABELS
from processing.schema import CT, XRAY, decode_mask_image, decode_mask_volume, decode_volume
from training.pretrain import xray_processor

from .base import DatasetSpec, DownstreamTask, label_config

TASK_NAME = "segmentation"
MEAN_DICE = "mean_dice"


def _spec(modality: str, labels: tuple[str, ...]) -> DatasetSpec:
    return DatasetSpec(TASK_NAME, modality, tuple(labels), MEAN_DICE)


DATASETS = {
    "rsna-seg": _spec(XRAY, rsna.CLASSES),  # boxes -> masks (§4.2)
    "bcv": _spec(CT, bcv.CLASSES),
    "amos": _spec(CT, amos.CLASSES),
    # offline stand-ins: the ground-truth benchmark's lesion masks on the DRR X-rays, lobes + lesions on the CTs
    "groundtruth-seg-xray": _spec(XRAY, XRAY_MASK_LABELS),
    "groundtruth-seg-ct": _spec(CT, CT_MASK_LABELS),
}

# --- augmentation ----------------------------------------------------------------------------------------------------

# Appendix §7.2 names the 2D augmentation (ShiftScaleRotate) but not its limits: albumentations' defaults.
SHIFT_SCALE_ROTATE = {"degrees": 45.0, "translate": (0.0625, 0.0625), "scale": (0.9, 1.1), "probability": 0.5}
# Appendix §7.2's 3D list (rotation, scaling, flips, noise, blur, brightness/contrast, low resolution, gamma) is
# nnU-Net's default augmentation (Isensee et al. 2021); its magnitudes and probabilities are nnU-Net's.
VOLUME_AUGMENTATIONS = (
    "rotation",
    "scaling",
    "flips",
    "noise",
    "blur",
    "brightness_contrast",
    "low_resolution",
    "gamma",
)
XRAY_AUGMENTATIONS = ("shift_scale_rotate",)


def augmentation_switches(settings: dict, modality: str) -> dict[str, bool]:
    """`FinetuneConfig.augmentation` for this modality: every augmentation of the paper on unless set false."""
    known = XRAY_AUGMENTATIONS if modality == XRAY else VOLUME_AUGMENTATIONS
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"augmentation: unknown switch(es) {unknown} for {modality} segmentation; known: {known}")
    return {name: bool(settings.get(name, True)) for name in known}


def xray_augmentation(switches: dict[str, bool]):
    """ShiftScaleRotate as torchvision's RandomAffine, applied to the image and its mask together (nearest for the
    mask); None when off."""
    if not switches["shift_scale_rotate"]:
        return None
    from torchvision.transforms import v2

    limits = SHIFT_SCALE_ROTATE
    affine = v2.RandomAffine(degrees=limits["degrees"], translate=limits["translate"], scale=limits["scale"])
    return v2.RandomApply([affine], p=limits["probability"])


def volume_augmentation(switches: dict[str, bool], seed: int):
    """The switched-on 3D augmentations as one seeded MONAI transform on {"image": (1, D, H, W), "label": (1, D, H,
    W)}; spatial ones move the label too (nearest), intensity ones touch the image only. None when all are off."""
    if not any(switches.values()):
        return None
    try:
        from monai import transforms as mt
    except ImportError as error:
        raise ImportError("3D segmentation augmentation needs MONAI: pip install 'unimedi[train]'") from error
    both, image = ("image", "label"), "image"
    steps = []
    if switches["rotation"]:  # in-plane only (about the depth axis), as nnU-Net does for anisotropic volumes
        steps.append(mt.RandRotated(both, range_x=math.radians(30), prob=0.2, mode=("bilinear", "nearest")))
    if switches["scaling"]:
        steps.append(mt.RandZoomd(both, min_zoom=0.7, max_zoom=1.4, prob=0.2, mode=("trilinear", "nearest")))
    if switches["noise"]:
        steps.append(mt.RandGaussianNoised(image, std=0.1, prob=0.1))
    if switches["blur"]:
        sigma = (0.5, 1.0)
        steps.append(mt.RandGaussianSmoothd(image, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=0.2))
    if switches["brightness_contrast"]:
        steps.append(mt.RandScaleIntensityd(image, factors=0.25, prob=0.15))  # brightness: x * U(0.75, 1.25)
        steps.append(mt.RandScaleIntensityFixedMeand(image, factors=0.25, preserve_range=True, prob=0.15))  # contrast
    if switches["low_resolution"]:
        steps.append(mt.RandSimulateLowResolutiond(image, zoom_range=(0.5, 1.0), prob=0.25))
    if switches["gamma"]:
        steps.append(mt.RandAdjustContrastd(image, gamma=(0.7, 1.5), prob=0.3))
    if switches["flips"]:
        steps.extend(mt.RandFlipd(both, spatial_axis=axis, prob=0.5) for axis in range(3))
    return mt.Compose(steps).set_random_state(seed=seed)


# --- records -> model inputs -----------------------------------------------------------------------------------------


def record_mask(record: dict, modality: str) -> np.ndarray:
    """A record's uint8 label map; a record without one is an error naming it."""
    mask = decode_mask_image(record) if modality == XRAY else decode_mask_volume(record)
    if mask is None:
        column = "mask_image" if modality == XRAY else "mask_volume"
        raise ValueError(f"record {record['sample_id']!r} has no {column}: segmentation needs a mask for every record")
    return mask


def check_mask_labels(record: dict, spec: DatasetSpec) -> None:
    """The record's mask values must mean what the dataset's classes say (value i + 1 = spec.labels[i])."""
    names = tuple(record["mask_labels"])
    if names != spec.labels[: len(names)]:
        raise ValueError(
            f"record {record['sample_id']!r}: mask_labels {list(names)} do not match the dataset's classes "
            f"{list(spec.labels)} (mask value i + 1 must be class i)"
        )


class SegmentationCollator:
    """Records -> `pixel_values` (X-ray and mask resized together to the encoder's image size, ShiftScaleRotate when
    training) or `volume_values` (the stored CT grid windowed as the CT processor does, the 3D augmentations when
    training), plus `labels` (B, *spatial) masks."""

    def __init__(self, config, spec: DatasetSpec, vision_config, training: bool):
        self.spec, self.training = spec, training
        switches = augmentation_switches(config.augmentation, spec.modality)
        self.image_processor = xray_processor(vision_config)
        self.image_size = vision_config.image_size
        grid = config.head_config.get("segmentation_volume_size") or vision_config.volume_size
        self.volume_processor = UniMedIVolumeProcessor(volume_size=tuple(grid), flip_probability=0.0)
        self.xray_augment = xray_augmentation(switches) if training and spec.modality == XRAY else None
        self.volume_augment = volume_augmentation(switches, config.seed) if training and spec.modality == CT else None

    def __call__(self, records: list[dict]) -> dict:
        for record in records:
            check_mask_labels(record, self.spec)
        pairs = [self.xray_pair(r) if self.spec.modality == XRAY else self.volume_pair(r) for r in records]
        key = "pixel_values" if self.spec.modality == XRAY else "volume_values"
        return {key: torch.stack([values for values, _ in pairs]), "labels": torch.stack([mask for _, mask in pairs])}

    def xray_pair(self, record: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, S, S) normalised X-ray and its (S, S) mask, both resized to S = the encoder's image size."""
        gray = load_xray(PILImage.open(io.BytesIO(record["image"]["bytes"])))
        mask = record_mask(record, XRAY)
        if mask.shape != gray.shape:
            raise ValueError(
                f"record {record['sample_id']!r}: mask_image {mask.shape} is not the image's size {gray.shape}"
            )
        size = (self.image_size, self.image_size)
        image = F.interpolate(torch.from_numpy(gray)[None, None], size=size, mode="bilinear", antialias=True)[0]
        labels = F.interpolate(torch.from_numpy(np.array(mask))[None, None].float(), size=size, mode="nearest")[
            0, 0
        ].long()
        if self.xray_augment is not None:
            from torchvision import tv_tensors

            image, labels = self.xray_augment(tv_tensors.Image(image), tv_tensors.Mask(labels))
        processor = self.image_processor
        mean = torch.tensor(processor.image_mean).view(-1, 1, 1)
        std = torch.tensor(processor.image_std).view(-1, 1, 1)
        return (image.clamp(0, 1).expand(processor.num_channels, -1, -1) - mean) / std, labels.as_subclass(
            torch.Tensor
        )

    def volume_pair(self, record: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, D, H, W) windowed CT on its stored grid and its (D, H, W) mask on the same grid."""
        values = self.volume_processor.window_grid([decode_volume(record)])["volume_values"][0]
        labels = torch.from_numpy(record_mask(record, CT).astype(np.int64))
        if self.volume_augment is not None:
            augmented = self.volume_augment({"image": values, "label": labels[None]})
            values, labels = torch.as_tensor(augmented["image"]), torch.as_tensor(augmented["label"])[0].long()
        return values, labels


# --- metric ----------------------------------------------------------------------------------------------------------


def dice_counts(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K, 3) per case and foreground class 1..K: overlap, predicted voxels, true voxels."""
    classes = torch.arange(1, num_classes + 1, device=labels.device).view(1, -1, *([1] * (labels.ndim - 1)))
    predicted, true = predictions.unsqueeze(1) == classes, labels.unsqueeze(1) == classes
    dims = tuple(range(2, predicted.ndim))
    return torch.stack([(predicted & true).sum(dims), predicted.sum(dims), true.sum(dims)], dim=-1)


def dice_scores(counts: torch.Tensor, names: tuple[str, ...]) -> dict:
    """Per-class Dice (mean over the cases where the class is predicted or present) and their mean (module rule)."""
    overlap, predicted, true = counts.double().unbind(-1)
    defined = (predicted + true) > 0
    per_case = 2 * overlap / (predicted + true).clamp(min=1)
    per_class = {name: float(per_case[defined[:, k], k].mean()) for k, name in enumerate(names) if defined[:, k].any()}
    return {MEAN_DICE: float(np.mean(list(per_class.values()))) if per_class else None, "dice_per_class": per_class}


# --- task ------------------------------------------------------------------------------------------------------------


class SegmentationTask(DownstreamTask):
    name = TASK_NAME
    model_class = UniMedIForSemanticSegmentation

    def head_config(self, config, spec: DatasetSpec) -> dict:
        """One foreground class: one sigmoid channel; K classes: K + 1 softmax channels, 0 = background. Only the
        modality's decoder is built."""
        if len(spec.labels) == 1:
            id2label = {0: spec.labels[0]}
        else:
            id2label = {0: "background", **{i + 1: name for i, name in enumerate(spec.labels)}}
        return {**label_config(id2label), "segmentation_decoders": ["setr-pup" if spec.modality == XRAY else "unetr"]}

    def strata(self, dataset, spec: DatasetSpec) -> list[str]:
        """Which foreground classes each training record's mask holds (e.g. "0,3"), so a fraction keeps the share of
        cases with each combination, empty ones included."""
        column = "mask_image" if spec.modality == XRAY else "mask_volume"
        strata = []
        for record in dataset.select_columns(["sample_id", column]):
            present = np.unique(record_mask(record, spec.modality))
            strata.append(",".join(str(int(value)) for value in present if value > 0))
        return strata

    def collator(self, config, spec: DatasetSpec, vision_config, training: bool) -> SegmentationCollator:
        return SegmentationCollator(config, spec, vision_config, training)

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator, spec: DatasetSpec) -> dict:
        """Loss (mean over cases of the per-batch loss) and Dice per class over a whole split (module rule), every
        process's cases gathered."""
        model.eval()
        losses, counts = [], []
        for batch in loader:
            out = model(**batch)
            predictions = predicted_labels(out.logits)
            case_counts = dice_counts(predictions, batch["labels"].to(predictions.device), len(spec.labels))
            batch_loss = out.loss.detach().float().expand(case_counts.shape[0])
            gathered_loss, gathered_counts = accelerator.gather_for_metrics((batch_loss, case_counts))
            losses.append(gathered_loss.cpu())
            counts.append(gathered_counts.cpu())
        return {"loss": float(torch.cat(losses).mean()), **dice_scores(torch.cat(counts), spec.labels)}


TASK = SegmentationTask()
