"""Downstream classification (paper §4.2, appendix §7.1): linear probe or fine-tuning of a UniMedI encoder.

    python -m training.finetune                         # ground-truth X-rays, linear probe, random-init demo encoder
    python -m training.finetune --config training/configs/finetune/groundtruth_ct.yaml model=outputs/demo/final
    accelerate launch -m training.finetune --config training/configs/finetune/chexpert.yaml \
        data=data/chexpert model=outputs/pretrain/final label_fraction=0.01
    python -m training.finetune --config ... --resume   # continue from the last complete epoch checkpoint

Protocol: a seeded, stratified `label_fraction` of the training split; model selection on the validation loss (the
lowest-loss epoch is kept, training stops after `early_stopping_patience` epochs without a lower one); that model is
tested once. Writes `results.json` (test metrics, settings, the training subset's size and ids), `results.md` (one
table row), `history.jsonl`, `best/` (the selected classifier, `from_pretrained`-ready), `checkpoints/step-<epoch>`.
"""

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from datasets import Image, load_dataset
from PIL import Image as PILImage
from sklearn.metrics import accuracy_score, roc_auc_score
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_unimedi import UniMedIConfig, UniMedIForImageClassification
from modeling_unimedi.classification_unimedi import classification_loss
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
from processing import cc_ccii, chexpert, covidx, luna16, rsna
from processing.groundtruth.reports import FINDING_NAMES as GROUNDTRUTH_FINDINGS
from processing.schema import CT, FEATURES, XRAY, decode_volume
from processing.shards import modality_shards
from training import checkpointing
from training.data import shard_files
from training.pretrain import ensure_default_data, trackers, xray_processor

logger = logging.getLogger("unimedi.finetune")
CONFIG_DIR = Path(__file__).parent / "configs" / "finetune"
DEFAULT_CONFIG = CONFIG_DIR / "groundtruth_xray.yaml"
SPLITS = ("train", "validation", "test")
MULTI_LABEL, SINGLE_LABEL = "multi_label_classification", "single_label_classification"
MEAN_AUROC, ACCURACY = "mean_auroc", "accuracy"


@dataclass(frozen=True)
class DatasetSpec:
    """What a downstream dataset asks: input modality, label names (the records' `labels` column), loss, metric."""

    modality: str
    labels: tuple[str, ...]
    problem_type: str
    metric: str


# Metrics as the paper reports them: mean AUROC for CheXpert and RSNA, accuracy for COVIDx, CC-CCII, LUNA16 (§4.2).
DATASETS = {
    "chexpert": DatasetSpec(XRAY, chexpert.CLASSES, MULTI_LABEL, MEAN_AUROC),
    "rsna": DatasetSpec(XRAY, rsna.CLASSES, MULTI_LABEL, MEAN_AUROC),
    "covidx": DatasetSpec(XRAY, covidx.CLASSES, SINGLE_LABEL, ACCURACY),
    "cc-ccii": DatasetSpec(CT, cc_ccii.CLASSES, SINGLE_LABEL, ACCURACY),
    "luna16": DatasetSpec(CT, luna16.CLASSES, SINGLE_LABEL, ACCURACY),
    # offline stand-ins: the ground-truth benchmark's findings ("normal" = none of them)
    "groundtruth-xray": DatasetSpec(XRAY, GROUNDTRUTH_FINDINGS, MULTI_LABEL, MEAN_AUROC),
    "groundtruth-ct": DatasetSpec(CT, GROUNDTRUTH_FINDINGS, MULTI_LABEL, MEAN_AUROC),
}


@dataclass
class FinetuneConfig:
    task: str = "classification"  # the only task so far (segmentation/detection: not built)
    dataset: str = "groundtruth-xray"  # a key of DATASETS
    data: str = "data/groundtruth"  # folder of `{train,validation,test}-*.parquet` shards (processing/ readers)
    generate_default_data: bool = True  # build the ground-truth benchmark when `data` is its missing default folder
    model: str | None = None  # any UniMedI folder (inference or pretraining save) or Hub id; None: random init
    model_config: dict = field(default_factory=dict)  # UniMedIConfig fields for a random-init encoder
    label_fraction: float = 1.0  # share of the training split used: 0.01 / 0.1 / 1.0 in the paper
    linear_probe: bool = True  # frozen encoder + linear head (§4.2); false: fine-tune the whole network
    batch_size: int = 48  # appendix §7.1: 48 for linear classification (96 for full-data CheXpert fine-tuning)
    head_learning_rate: float = 5e-4  # appendix §7.1: AdamW lr 5e-4 (COVIDx 5e-3)
    encoder_learning_rate: float = 5e-5  # fine-tuning only; the paper gives none: a tenth of the head's
    weight_decay: float = 1e-6  # appendix §7.1
    num_epochs: int = 50  # appendix §7.1 (LUNA16: 100)
    early_stopping_patience: int = 10  # appendix §7.1: stop after 10 epochs without a lower validation loss
    volume_flip_axes: list[int] = field(default_factory=lambda: [2])  # CTs: random flips when training (§7.1)
    num_workers: int = 0
    mixed_precision: str = "no"
    seed: int = 0
    output_dir: str | None = None  # default: outputs/finetune/<dataset>-<probe|finetune>-<fraction>
    resume: bool = False
    overwrite_output_dir: bool = False
    report_to: str = "auto"  # "auto" (tensorboard if installed), "none", or an Accelerate tracker name

    def __post_init__(self):
        if self.task != "classification":
            raise ValueError(f"task {self.task!r} is not supported; only 'classification'")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
        if not 0.0 < float(self.label_fraction) <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        for name in ("batch_size", "num_epochs", "early_stopping_patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.output_dir is None:
            protocol = "probe" if self.linear_probe else "finetune"
            self.output_dir = f"outputs/finetune/{self.dataset}-{protocol}-{self.label_fraction:g}"


def load_settings(path: str | Path | None, overrides: list[str]) -> FinetuneConfig:
    """A YAML file (default: ground-truth X-rays), then `key=value` overrides read as YAML; typed by the dataclass."""
    path = DEFAULT_CONFIG if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        values[key.lstrip("-").replace("-", "_")] = yaml.safe_load(raw)
    fields = {spec.name: spec for spec in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} ({path} or overrides); known: {', '.join(sorted(fields))}")
    for name, value in values.items():  # YAML reads "5e-4" as a string
        if isinstance(value, str) and fields[name].type in (float, int, "float", "int"):
            values[name] = float(value)
    return FinetuneConfig(**values)


# --- data ------------------------------------------------------------------------------------------------------------


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


def stratified_subset(strata: list[str], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of round(fraction * N) items (at least 1) with each stratum's share kept.

    Quotas by largest remainder, so tiny fractions of rare strata still add up to the exact size (scikit-learn's
    stratified split refuses strata of one item and subsets smaller than the number of strata, both common at 1 %).
    """
    if fraction >= 1.0:
        return np.arange(len(strata))
    rng = np.random.default_rng(seed)
    names, inverse = np.unique(np.asarray(strata), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(names))
    total = max(1, round(fraction * len(strata)))
    exact = counts * total / len(strata)
    quotas = np.floor(exact).astype(int)
    remainder_order = np.lexsort((rng.random(len(names)), -(exact - quotas)))
    quotas[remainder_order[: total - quotas.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(inverse == i), size=q, replace=False) for i, q in enumerate(quotas) if q]
    return np.sort(np.concatenate(chosen))


def strata_of(target: np.ndarray) -> list[str]:
    """Stratum of each record: its class, or its combination of positive labels (multi-label)."""
    return [str(row) if np.ndim(row) == 0 else "".join("1" if v else "0" for v in row) for row in target]


def load_split(config: FinetuneConfig, split: str):
    """A split's records of the dataset's modality, images/volumes left undecoded (decoded per batch)."""
    spec = DATASETS[config.dataset]
    files = shard_files(config.data, split)
    if files is None:
        raise FileNotFoundError(f"data folder {config.data} does not exist (write it with a processing/ reader)")
    own = modality_shards(files, spec.modality)
    dataset = load_dataset("parquet", data_files={split: own or files}, split=split, features=FEATURES)
    if not own:
        dataset = dataset.filter(lambda modality: modality == spec.modality, input_columns="modality")
    if len(dataset) == 0:
        raise ValueError(f"{config.data}: the {split!r} split holds no {spec.modality} records")
    return dataset.cast_column("image", Image(decode=False))


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


def build_loaders(config: FinetuneConfig, vision_config) -> tuple[dict, dict]:
    """DataLoaders of the three splits (train: the stratified label subset) and what the subset was."""
    spec = DATASETS[config.dataset]
    loaders, subset = {}, {}
    for split in SPLITS:
        dataset = load_split(config, split)
        target = targets(dataset["labels"], spec, f"{config.data} ({split})")
        if split == "train":
            keep = stratified_subset(strata_of(target), config.label_fraction, config.seed)
            subset = {"size": len(keep), "of": len(dataset), "sample_ids": [dataset["sample_id"][i] for i in keep]}
            dataset, target = dataset.select(keep), target[keep]
        dataset = dataset.add_column("target", list(target))
        collate = ClassificationCollator(spec, vision_config, config.volume_flip_axes, training=split == "train")
        loaders[split] = DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=split == "train",
            collate_fn=collate,
            num_workers=config.num_workers,
        )
    return loaders, subset


# --- model, metrics --------------------------------------------------------------------------------------------------


def build_model(config: FinetuneConfig) -> UniMedIForImageClassification:
    spec = DATASETS[config.dataset]
    head = {
        "num_labels": len(spec.labels),
        "id2label": dict(enumerate(spec.labels)),
        "label2id": {name: i for i, name in enumerate(spec.labels)},
        "problem_type": spec.problem_type,
        "freeze_encoder": config.linear_probe,
    }
    if config.model is None:
        return UniMedIForImageClassification(UniMedIConfig(**config.model_config, **head))
    model, info = UniMedIForImageClassification.from_pretrained(config.model, output_loading_info=True, **head)
    missing = [key for key in info["missing_keys"] if not key.startswith("classifier.")]
    if missing:
        raise ValueError(f"{config.model}: encoder weights missing from the checkpoint: {sorted(missing)[:5]} ...")
    return model


def optimizer_groups(model: UniMedIForImageClassification, config: FinetuneConfig) -> list[dict]:
    """The head at its own rate; when fine-tuning, the encoder at `encoder_learning_rate` (AdamW, §7.1)."""
    groups = [{"params": list(model.classifier.parameters()), "lr": config.head_learning_rate}]
    if not config.linear_probe:
        groups.append({"params": list(model.vision_model.parameters()), "lr": config.encoder_learning_rate})
    return groups


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


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, spec: DatasetSpec) -> dict:
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


# --- training --------------------------------------------------------------------------------------------------------


def train(config: FinetuneConfig) -> dict:
    """Run the protocol; returns the results written to `results.json`."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=trackers(config.report_to) or None,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # shuffle order = f(seed, epoch)
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(message)s")
    set_seed(config.seed)
    spec = DATASETS[config.dataset]
    if accelerator.is_main_process and config.dataset.startswith("groundtruth"):
        # pretrain's generator check reads only these two settings
        ensure_default_data(
            SimpleNamespace(train_data=config.data, generate_default_data=config.generate_default_data)
        )
    accelerator.wait_for_everyone()

    model = build_model(config)
    loaders, subset = build_loaders(config, model.config.vision_config)
    optimizer = torch.optim.AdamW(optimizer_groups(model, config), weight_decay=config.weight_decay)
    model, optimizer, train_loader, validation_loader, test_loader = accelerator.prepare(
        model, optimizer, loaders["train"], loaders["validation"], loaders["test"]
    )
    state = {"epoch": 0, "best_validation_loss": math.inf, "epochs_without_improvement": 0}
    if config.resume:
        state = resume(accelerator, output_dir / "checkpoints")
    elif accelerator.is_main_process:
        prepare_output_dir(output_dir, config)
    accelerator.wait_for_everyone()
    accelerator.init_trackers("unimedi-finetune", config={k: str(v) for k, v in dataclasses.asdict(config).items()})

    state = run_epochs(config, accelerator, model, optimizer, (train_loader, validation_loader), spec, state)
    accelerator.wait_for_everyone()
    results = test_selected(config, accelerator, model, test_loader, spec, state, subset)
    accelerator.end_training()
    return results


def run_epochs(config: FinetuneConfig, accelerator, model, optimizer, loaders, spec, state: dict) -> dict:
    """Epochs from `state` on: train, validate, keep the lowest-validation-loss model in `best/`, checkpoint, stop
    early after `early_stopping_patience` epochs without improvement; returns the final early-stopping state."""
    output_dir, (train_loader, validation_loader) = Path(config.output_dir), loaders
    progress = tqdm(
        total=config.num_epochs * len(train_loader),
        initial=state["epoch"] * len(train_loader),
        disable=not accelerator.is_main_process,
    )
    for epoch in range(state["epoch"], config.num_epochs):
        if state["epochs_without_improvement"] >= config.early_stopping_patience:
            break
        train_loss = train_one_epoch(model, optimizer, train_loader, accelerator, epoch, progress)
        validation = evaluate(model, validation_loader, accelerator, spec)
        improved = validation["loss"] < state["best_validation_loss"]
        state = {
            "epoch": epoch + 1,
            "best_validation_loss": validation["loss"] if improved else state["best_validation_loss"],
            "epochs_without_improvement": 0 if improved else state["epochs_without_improvement"] + 1,
        }
        record = {"epoch": epoch + 1, "train_loss": train_loss, **flat("validation", validation)}
        accelerator.log(record, step=epoch + 1)
        progress.set_postfix(train_loss=f"{train_loss:.4f}", validation_loss=f"{validation['loss']:.4f}")
        if accelerator.is_main_process:
            with open(output_dir / "history.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if improved:
                save_best(accelerator.unwrap_model(model), output_dir / "best")
        save_checkpoint(accelerator, output_dir / "checkpoints", state)
    progress.close()
    return state


def test_selected(config: FinetuneConfig, accelerator, model, test_loader, spec, state: dict, subset: dict) -> dict:
    """The selected (`best/`) model's test metrics, written as `results.json`, `results.md` and the subset's ids."""
    output_dir = Path(config.output_dir)
    best = UniMedIForImageClassification.from_pretrained(output_dir / "best")
    accelerator.unwrap_model(model).load_state_dict(best.state_dict())
    test = evaluate(model, test_loader, accelerator, spec)
    results = {
        "dataset": config.dataset,
        "protocol": "linear probe" if config.linear_probe else "fine-tune",
        "model": config.model or "random init",
        "label_fraction": config.label_fraction,
        "train_subset": {"size": subset["size"], "of": subset["of"], "seed": config.seed},
        "epochs_run": state["epoch"],
        "best_validation_loss": state["best_validation_loss"],
        "metric": spec.metric,
        "test": test,
        "settings": dataclasses.asdict(config),
    }
    if accelerator.is_main_process:
        checkpointing.write_json_atomic(output_dir / "results.json", results)
        checkpointing.write_json_atomic(output_dir / "train_subset.json", {"sample_ids": subset["sample_ids"]})
        (output_dir / "results.md").write_text(markdown_row(results) + "\n")
        logger.info("test %s = %s (results in %s)", spec.metric, test[spec.metric], output_dir / "results.json")
    return results


def train_one_epoch(model, optimizer, loader, accelerator: Accelerator, epoch: int, progress) -> float:
    """One pass over the training subset (a frozen encoder stays in eval mode: see the model's `train`)."""
    model.train()
    loader.set_epoch(epoch)  # the shuffle order depends on (seed, epoch) only, so a resumed run repeats it
    total, count = 0.0, 0
    for batch in loader:
        out = model(**batch)
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad()
        total += out.loss.detach().float().item() * len(batch["labels"])
        count += len(batch["labels"])
        progress.update(1)
    return total / max(count, 1)


def flat(prefix: str, values: dict) -> dict:
    """Scalars of a metrics dict as `prefix/name` (per-label AUROCs included) for the log and the trackers."""
    out = {}
    for name, value in values.items():
        if isinstance(value, dict):
            out.update(flat(f"{prefix}/{name}", value))
        elif value is not None:
            out[f"{prefix}/{name}"] = value
    return out


def save_best(model: UniMedIForImageClassification, folder: Path) -> None:
    """The selected classifier, replaced atomically (a crash never leaves a half-written `best/`)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, root: Path, state: dict) -> None:
    """Model, optimizer and RNG states plus the early-stopping state after an epoch, sealed atomically; the newest
    two are kept."""
    epoch = state["epoch"]
    tmp, final = checkpointing.temporary_dir(root, epoch), checkpointing.checkpoint_dir(root, epoch)
    rank = accelerator.process_index
    accelerator.save_state(str(tmp))
    (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)  # Accelerate's pickle: replaced by safetensors/JSON
    checkpointing.write_json_atomic(tmp / f"rng_state_rank{rank}.json", checkpointing.save_rng_state(tmp, rank))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpointing.write_json_atomic(tmp / "train_state.json", state)
        checkpointing.finalize(tmp, final, epoch)
        checkpointing.prune(root, keep=2)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, root: Path) -> dict:
    """The newest complete checkpoint's model, optimizer and random states; never unpickles (as pretraining)."""
    folder = checkpointing.find(root)
    pickles = sorted(p.name for p in folder.rglob("*.pkl"))
    if pickles:
        raise ValueError(f"--resume {folder}: refusing a checkpoint that holds pickle files {pickles}")
    accelerator.load_state(str(folder))
    rank = accelerator.process_index
    checkpointing.load_rng_state(folder, rank, json.loads((folder / f"rng_state_rank{rank}.json").read_text()))
    state = json.loads((folder / "train_state.json").read_text())
    logger.info("resumed from %s (epoch %d)", folder, state["epoch"])
    return state


def prepare_output_dir(output_dir: Path, config: FinetuneConfig) -> None:
    """A fresh run must not mix with an earlier run's checkpoints, history or selected model."""
    earlier = [output_dir / name for name in ("checkpoints", "history.jsonl", "best") if (output_dir / name).exists()]
    if earlier and not config.overwrite_output_dir:
        raise FileExistsError(
            f"{output_dir} holds an earlier run: pass --resume to continue it, or overwrite_output_dir=true"
        )
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True))


def markdown_row(results: dict) -> str:
    """`| dataset | protocol | model | labels | metric | value |`, the value in percent."""
    value = results["test"][results["metric"]]
    shown = "n/a" if value is None else f"{100 * value:.1f}"
    fraction = f"{100 * results['label_fraction']:g} %"
    return (
        f"| {results['dataset']} | {results['protocol']} | {results['model']} | {fraction} "
        f"| {results['metric']} | {shown} |"
    )


def parse_args(argv=None) -> FinetuneConfig:
    parser = argparse.ArgumentParser(
        description="UniMedI downstream classification (linear probe / fine-tuning, paper §4.2).",
        epilog="Overrides: key=value, e.g. dataset=groundtruth-ct label_fraction=0.1 linear_probe=false",
    )
    parser.add_argument("--config", help=f"YAML settings file (default {DEFAULT_CONFIG}; see {CONFIG_DIR})")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete epoch checkpoint")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = load_settings(args.config, args.overrides)
    config.resume = config.resume or args.resume
    return config


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
