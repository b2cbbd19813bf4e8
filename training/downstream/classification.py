"""Classification (paper §4.2, appendix §7.1): a linear head on the encoder's [CLS], linear probe or fine-tuning.

Metrics as the paper reports them: mean AUROC for CheXpert and RSNA, accuracy for COVIDx, CC-CCII and LUNA16.
"""

import io

import numpy as np
import torch
from PIL import Image as PILImage
from sklearn.metrics import accuracy_score, roc_auc_score

from modeling_unimedi import UniMedIForImageClassification
from modeling_unimedi.classification_unimedi import classification_loss
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
from processing import cc_ccii, chexpert, covidx, luna16, rsna
from processing.groundtruth.reports import FINDING_NAMES as GROUNDTRUTH_FINDINGS
from processing.schema import CT, XRAY, decode_volume
from training.pretrain import xray_processor

from .base import DatasetSpec, DownstreamTask, label_config

MULTI_LABEL, SINGLE_LABEL = "multi_label_classification", "single_label_classification"
MEAN_AUROC, ACCURACY = "mean_auroc", "accuracy"
TASK_NAME = "classification"


def _spec(modality: str, labels: tuple[str, ...], problem_type: str, metric: str) -> DatasetSpec:
    return DatasetSpec(TASK_NAME, modality, labels, metric, problem_type)


DATASETS = {
    "chexpert": _spec(XRAY, chexpert.CLASSES, MULTI_LABEL, MEAN_AUROC),
    "rsna": _spec(XRAY, rsna.CLASSES, MULTI_LABEL, MEAN_AUROC),
    "covidx": _spec(XRAY, covidx.CLASSES, SINGLE_LABEL, ACCURACY),
    "cc-ccii": _spec(CT, cc_ccii.CLASSES, SINGLE_LABEL, ACCURACY),
    "luna16": _spec(CT, luna16.CLASSES, SINGLE_LABEL, ACCURACY),
    # offline stand-ins: the ground-truth benchmark's findings ("normal" = none of them)
    "groundtruth-xray": _spec(XRAY, GROUNDTRUTH_FINDINGS, MULTI_LABEL, MEAN_AUROC),
    "groundtruth-ct": _spec(CT, GROUNDTRUTH_FINDINGS, MULTI_LABEL, MEAN_AUROC),
}


def targets(labels_per_record: list[list[str]], spec: DatasetSpec, where: str) -> np.ndarray:
    """The records' `labels` as model targets: (N, L) 0/1 for multi-label, (N,) class indices for single-label."""
    index = {name: i for i, name in enumerate(spec.labels)}
    if spec.problem_type == MULTI_LABEL:
        matrix = np.zeros((len(labels_per_record), len(spec.labels)), dtype=np.float32)
        for row, names in enumerate(labels_per_record):
            for name in names:
                if name in index:
                    matrix[row, index[name]] = 1.0
        return matrix
    classes = []
    for row, names in enumerate(labels_per_record):
        known = [name for name in names if name in index]
        if len(known) != 1:
            raise ValueError(f"{where}: record {row} has labels {names}; expected exactly one of {spec.labels}")
        classes.append(index[known[0]])
    return np.asarray(classes, dtype=np.int64)


def strata_of(target: np.ndarray) -> list[str]:
    """Stratum of each record: its class, or its combination of positive labels (multi-label)."""
    return [str(row) if np.ndim(row) == 0 else "".join("1" if v else "0" for v in row) for row in target]


def metrics(spec: DatasetSpec, logits: np.ndarray, labels: np.ndarray) -> dict:
    """Mean AUROC over labels (labels with one class in the split are left out) or accuracy, via scikit-learn."""
    if spec.metric == ACCURACY:
        result = {ACCURACY: float(accuracy_score(labels, logits.argmax(-1)))}
        if len(spec.labels) == 2 and len(np.unique(labels)) == 2:  # LUNA16 is also reported as AUROC (Table 3)
            probabilities = torch.from_numpy(logits).softmax(-1)[:, 1].numpy()
            result["auroc"] = float(roc_auc_score(labels, probabilities))
        return result
    per_label = {
        name: float(roc_auc_score(labels[:, i], logits[:, i]))
        for i, name in enumerate(spec.labels)
        if len(np.unique(labels[:, i])) == 2
    }
    mean = float(np.mean(list(per_label.values()))) if per_label else None
    return {MEAN_AUROC: mean, "auroc_per_label": per_label}


class ClassificationCollator:
    """Records -> `pixel_values` or `volume_values` (the pretraining processors: random crop or flips when training)
    plus `labels`."""

    def __init__(self, spec: DatasetSpec, vision_config, flip_axes, training: bool):
        self.spec, self.training = spec, training
        self.image_processor = xray_processor(vision_config)
        self.volume_processor = UniMedIVolumeProcessor(
            volume_size=tuple(vision_config.volume_size), flip_axes=tuple(flip_axes) or (2,),
            flip_probability=0.5 if flip_axes else 0.0,
        )  # fmt: skip

    def __call__(self, records: list[dict]) -> dict:
        if self.spec.modality == XRAY:
            images = [PILImage.open(io.BytesIO(record["image"]["bytes"])) for record in records]
            inputs = dict(self.image_processor(images, training=self.training))
        else:
            inputs = dict(self.volume_processor([decode_volume(r) for r in records], training=self.training))
        inputs["labels"] = torch.from_numpy(np.stack([record["target"] for record in records]))
        return inputs


class ClassificationTask(DownstreamTask):
    name = TASK_NAME
    model_class = UniMedIForImageClassification

    def head_config(self, config, spec: DatasetSpec) -> dict:
        return {**label_config(dict(enumerate(spec.labels))), "problem_type": spec.problem_type}

    def prepare_split(self, dataset, spec: DatasetSpec, where: str):
        return dataset.add_column("target", list(targets(dataset["labels"], spec, where)))

    def strata(self, dataset, spec: DatasetSpec) -> list[str]:
        return strata_of(np.asarray(dataset["target"]))

    def collator(self, config, spec: DatasetSpec, vision_config, training: bool) -> ClassificationCollator:
        return ClassificationCollator(spec, vision_config, config.volume_flip_axes, training)

    def protocol(self, config) -> str:
        return "linear probe" if config.freeze_encoder else "fine-tune"

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator, spec: DatasetSpec) -> dict:
        """Loss and the dataset's metric over a whole split (every process's samples gathered, padding dropped)."""
        model.eval()
        all_logits, all_labels = [], []
        for batch in loader:
            logits, labels = accelerator.gather_for_metrics((model(**batch).logits, batch["labels"]))
            all_logits.append(logits.float().cpu())
            all_labels.append(labels.cpu())
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        loss = classification_loss(logits, labels, spec.problem_type)
        return {"loss": float(loss), **metrics(spec, logits.numpy(), labels.numpy())}


TASK = ClassificationTask()
