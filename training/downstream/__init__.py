"""Downstream tasks run by `training.finetune`: each module gives its `TASK` and the `DATASETS` it knows."""

from . import classification, segmentation
from .base import DatasetSpec, DownstreamTask

TASKS: dict[str, DownstreamTask] = {module.TASK.name: module.TASK for module in (classification, segmentation)}
DATASETS: dict[str, DatasetSpec] = {**classification.DATASETS, **segmentation.DATASETS}

__all__ = ["DATASETS", "TASKS", "DatasetSpec", "DownstreamTask"]
