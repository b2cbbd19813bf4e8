"""Downstream tasks run by `training.finetune`: each module gives its `TASK` and the `DATASETS` it knows."""

from . import classification, detection, segmentation
from .base import DatasetSpec, DownstreamTask

TASKS: dict[str, DownstreamTask] = {
    module.TASK.name: module.TASK for module in (classification, segmentation, detection)
}
DATASETS: dict[str, DatasetSpec] = {**classification.DATASETS, **segmentation.DATASETS, **detection.DATASETS}

__all__ = ["DATASETS", "TASKS", "DatasetSpec", "DownstreamTask"]
