"""X-ray detection (paper §4.2, Table 5): ViTDet on the frozen UniMedI encoder, mAP on held-out boxes.

Records carry `boxes` ([x0, y0, x1, y1] pixels of the stored image) named by `box_labels`. The collator puts each
X-ray through the UniMedI image processor's geometry and moves its boxes with it (`SquareFrame`): when training, the
pretraining crop (longer side to 256/224 of the input size, a random input-size crop; boxes clipped to the crop, boxes
left with less than a pixel of width or height dropped); when evaluating, the whole X-ray (longer side to the input
size, centred padding), so every box of the split is scored.

Metric: mean average precision from torchmetrics' `MeanAveragePrecision` (COCO's evaluation, pycocotools backend).
`map_40_75` (mean over IoU 0.40, 0.45, ..., 0.75) is the headline: Table 5 reprints MGCA's baselines (its Table 3, same
numbers), and MGCA computes its RSNA detection mAP with torchmetrics over exactly these thresholds
(github.com/HKU-MedAI/MGCA, `mgca/models/ssl_detector.py`, `iou_thres`), RSNA's challenge metric range. COCO's
`map` (IoU 0.50:0.95) and `map_50` are reported with it. Unlike MGCA, images without boxes and detections under 0.5
confidence are kept: their false positives count, as COCO's evaluation counts them.
"""

import io

import torch
from PIL import Image as PILImage

from modeling_unimedi import UniMedIForObjectDetection
from modeling_unimedi.detection_unimedi import SquareFrame
from modeling_unimedi.image_processing_unimedi import processor_with_settings
from processing import rsna
from processing.groundtruth.reports import FINDING_NAMES as GROUNDTRUTH_FINDINGS
from processing.schema import XRAY
from training.pretrain import xray_processor

from .base import DatasetSpec, DownstreamTask, label_config

TASK_NAME = "detection"
MAP_40_75, MAP, MAP_50 = "map_40_75", "map", "map_50"
RSNA_IOU_THRESHOLDS = [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75]
# the crop ratio of the X-ray processor in pretraining and classification (appendix §7: 256 -> 224)
TRAINING_RESIZE_RATIO = 256 / 224

DATASETS = {
    "rsna-detection": DatasetSpec(TASK_NAME, XRAY, rsna.CLASSES, MAP_40_75),
    # offline stand-in: the lesions the ground-truth generator projected into its DRR X-rays
    "groundtruth-detection": DatasetSpec(TASK_NAME, XRAY, GROUNDTRUTH_FINDINGS, MAP_40_75),
}


def box_map(predictions: list[dict], targets: list[dict]) -> dict:
    """COCO-style mAP of `predictions` ({"boxes", "scores", "labels"} per image) against `targets` ({"boxes",
    "labels"}), xyxy pixels: `map` (IoU 0.50:0.95), `map_50` and `map_40_75` (IoU 0.40:0.75, step 0.05). None when
    the images hold no box at all (average precision is undefined then)."""
    from torchmetrics.detection import MeanAveragePrecision

    results = {}
    for name, thresholds in ((MAP, None), (MAP_40_75, RSNA_IOU_THRESHOLDS)):
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=thresholds)
        metric.update(predictions, targets)
        computed = metric.compute()
        results[name] = float(computed["map"])
        if thresholds is None:
            results[MAP_50] = float(computed["map_50"])
    return {name: (value if value >= 0 else None) for name, value in results.items()}  # torchmetrics: -1 = undefined


class DetectionCollator:
    """Records -> `pixel_values` (the X-ray processor's output) and `labels` (per image {"boxes", "class_labels"} in
    pixels of `pixel_values`); see the module docstring for the geometry. `augmentation={"random_crop": False}`
    trains on whole X-rays as evaluation sees them."""

    def __init__(self, spec: DatasetSpec, vision_config, augmentation: dict, training: bool):
        unknown = sorted(set(augmentation) - {"random_crop"})
        if unknown:
            raise ValueError(f"augmentation: detection knows only 'random_crop', got {unknown}")
        self.side = vision_config.image_size
        self.random_crop = training and bool(augmentation.get("random_crop", True))
        self.square = round(self.side * TRAINING_RESIZE_RATIO) if self.random_crop else self.side
        # the whole `square` (crop_size = longest_edge), cropped here so that the crop offset is known for the boxes
        self.processor = processor_with_settings(
            xray_processor(vision_config), {"longest_edge": self.square, "crop_size": self.square}
        )
        self.class_index = {name: i for i, name in enumerate(spec.labels)}

    def __call__(self, records: list[dict]) -> dict:
        images = [PILImage.open(io.BytesIO(record["image"]["bytes"])) for record in records]
        squares = self.processor(images)["pixel_values"]
        pixel_values, labels = [], []
        for record, image, square in zip(records, images, squares):
            top, left = torch.randint(0, self.square - self.side + 1, (2,)).tolist() if self.random_crop else (0, 0)
            pixel_values.append(square[:, top : top + self.side, left : left + self.side])
            frame = SquareFrame(image.height, image.width, self.square, top, left)
            boxes = frame.to_input(torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4))
            boxes = boxes.clamp(0, self.side)
            visible = ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(dim=1)
            classes = torch.tensor(self.classes_of(record), dtype=torch.int64)
            labels.append({"boxes": boxes[visible], "class_labels": classes[visible]})
        return {"pixel_values": torch.stack(pixel_values), "labels": labels}

    def classes_of(self, record: dict) -> list[int]:
        names = record["box_labels"]
        unknown = sorted(set(names) - set(self.class_index))
        if unknown or len(names) != len(record["boxes"]):
            raise ValueError(
                f"record {record['sample_id']!r}: {len(record['boxes'])} boxes named {names}; each box needs one "
                f"name of {sorted(self.class_index)}"
            )
        return [self.class_index[name] for name in names]


class DetectionTask(DownstreamTask):
    name = TASK_NAME
    model_class = UniMedIForObjectDetection

    def head_config(self, config, spec: DatasetSpec) -> dict:
        return label_config(dict(enumerate(spec.labels)))

    def strata(self, dataset, spec: DatasetSpec) -> list[str]:
        """With boxes or without: a label fraction keeps the share of X-rays that show a finding."""
        return ["boxes" if boxes else "none" for boxes in dataset["boxes"]]

    def collator(self, config, spec: DatasetSpec, vision_config, training: bool) -> DetectionCollator:
        return DetectionCollator(spec, vision_config, config.augmentation, training)

    def protocol(self, config) -> str:
        return "frozen encoder (ViTDet)" if config.freeze_encoder else "fine-tune (ViTDet)"

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator, spec: DatasetSpec) -> dict:
        """Mean loss (the model's fixed-stream validation loss, weighted by batch size) and mAP over a whole split,
        every process's images gathered (the padding of an uneven last batch dropped from the mAP)."""
        model.eval()
        loss_sum, count, predictions, targets = 0.0, 0, [], []
        for batch in loader:
            out = model(**batch)
            loss_sum += float(out.loss) * len(batch["pixel_values"])
            count += len(batch["pixel_values"])
            pairs = [
                ({key: value.cpu() for key, value in found.items()},
                 {"boxes": target["boxes"].cpu(), "labels": target["class_labels"].cpu()})
                for found, target in zip(out.detections, batch["labels"])
            ]  # fmt: skip
            for found, target in accelerator.gather_for_metrics(pairs, use_gather_object=True):
                predictions.append(found)
                targets.append(target)
        totals = accelerator.reduce(torch.tensor([loss_sum, count], device=accelerator.device), reduction="sum")
        return {"loss": float(totals[0] / totals[1].clamp(min=1)), **box_map(predictions, targets)}


TASK = DetectionTask()
