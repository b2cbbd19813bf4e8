"""What every downstream task shares: the dataset description and the task interface `training.finetune` drives.

A task (classification, segmentation, detection) says how records become model inputs, how its model is built from a
UniMedI folder and which metric it reports; the loop in `training.finetune` (settings, epochs, early stopping on the
validation loss, `best/`, atomic checkpoints, resume, results) is the same for all of them.
"""

from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset
from torch.utils.data import DataLoader

from modeling_unimedi import UniMedIConfig

from .common import SPLITS, load_split, stratified_subset


@dataclass(frozen=True)
class DatasetSpec:
    """What a downstream dataset asks: its task, input modality, class names, headline metric (a key of the task's
    `evaluate` result) and, for classification, the loss."""

    task: str
    modality: str
    labels: tuple[str, ...]  # segmentation: foreground classes, mask value i + 1 = labels[i], 0 = background
    metric: str
    problem_type: str | None = None


def label_config(id2label: dict[int, str]) -> dict:
    """`num_labels`, `id2label` and `label2id` of a head whose output i means `id2label[i]`."""
    return {"num_labels": len(id2label), "id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}


class DownstreamTask:
    """One downstream task. Subclasses set `name` and `model_class` and implement the hooks `head_config`,
    `strata`, `collator` and `evaluate`; `prepare_split` is optional."""

    name: str
    model_class: type

    # --- hooks ---------------------------------------------------------------------------------------------------

    def head_config(self, config, spec: DatasetSpec) -> dict:
        """Config fields of the task's head (e.g. `num_labels`, `id2label`), merged with `config.head_config`."""
        raise NotImplementedError

    def prepare_split(self, dataset: Dataset, spec: DatasetSpec, where: str) -> Dataset:
        """A split's records made ready for the collator (e.g. targets added as a column)."""
        return dataset

    def strata(self, dataset: Dataset, spec: DatasetSpec) -> list[str]:
        """Each training record's stratum, kept in proportion when a label fraction is drawn."""
        raise NotImplementedError

    def collator(self, config, spec: DatasetSpec, vision_config, training: bool) -> Callable[[list[dict]], dict]:
        """Records -> the model's keyword arguments (with `labels`)."""
        raise NotImplementedError

    def evaluate(self, model, loader, accelerator, spec: DatasetSpec) -> dict:
        """Loss ("loss") and metrics (among them `spec.metric`) over a whole split, gathered across processes."""
        raise NotImplementedError

    def protocol(self, config) -> str:
        return "frozen encoder" if config.freeze_encoder else "fine-tune"

    # --- shared steps ----------------------------------------------------------------------------------------------

    def build_model(self, config, spec: DatasetSpec):
        """A random-init model (`config.model_config` for the encoder) or one whose encoder comes from
        `config.model`; an encoder weight missing from that folder is an error, never a silent random weight."""
        head = {**self.head_config(config, spec), **config.head_config, "freeze_encoder": config.freeze_encoder}
        if config.model is None:
            return self.model_class(UniMedIConfig(**config.model_config, **head))
        model, info = self.model_class.from_pretrained(config.model, output_loading_info=True, **head)
        missing = [key for key in info["missing_keys"] if key.startswith("vision_model.")]
        if missing:
            raise ValueError(f"{config.model}: encoder weights missing from the checkpoint: {sorted(missing)[:5]} ...")
        return model

    def build_loaders(self, config, spec: DatasetSpec, vision_config) -> tuple[dict, dict]:
        """DataLoaders of the three splits (train: the stratified label subset; test: the `test_split` setting's
        records) and what the subset was."""
        loaders, subset = {}, {}
        for split in SPLITS:
            stored = config.test_split if split == "test" else split
            dataset = self.prepare_split(
                load_split(config.data, spec.modality, stored), spec, f"{config.data} ({stored})"
            )
            if split == "train":
                keep = stratified_subset(self.strata(dataset, spec), config.label_fraction, config.seed)
                subset = {"size": len(keep), "of": len(dataset), "sample_ids": [dataset["sample_id"][i] for i in keep]}
                dataset = dataset.select(keep)
            loaders[split] = DataLoader(
                dataset,
                batch_size=config.batch_size,
                shuffle=split == "train",
                collate_fn=self.collator(config, spec, vision_config, training=split == "train"),
                num_workers=config.num_workers,
            )
        return loaders, subset

    def optimizer_groups(self, model, config) -> list[dict]:
        """Everything outside the encoder at `head_learning_rate`; the encoder at `encoder_learning_rate` unless
        it is frozen (AdamW, appendix §7)."""
        encoder = [p for name, p in model.named_parameters() if name.startswith("vision_model.")]
        head = [p for name, p in model.named_parameters() if not name.startswith("vision_model.")]
        groups = [{"params": head, "lr": config.head_learning_rate}]
        if not config.freeze_encoder:
            groups.append({"params": encoder, "lr": config.encoder_learning_rate})
        return groups
