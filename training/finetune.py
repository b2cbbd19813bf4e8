"""Downstream tasks (paper §4.2, appendix §7): one entry point for classification, segmentation and detection.

    python -m training.finetune                         # ground-truth X-rays, linear probe, random-init demo encoder
    python -m training.finetune --config training/configs/finetune/groundtruth_ct.yaml model=outputs/demo/final
    accelerate launch -m training.finetune --config training/configs/finetune/chexpert.yaml \
        data=data/chexpert model=outputs/pretrain/final label_fraction=0.01
    python -m training.finetune --config ... --resume   # continue from the last complete epoch checkpoint

Protocol, the same for every task: a seeded, stratified `label_fraction` of the training split; model selection on the
validation loss (the lowest-loss epoch is kept, training stops after `early_stopping_patience` epochs without a lower
one); that model is tested once. What differs per task (inputs, head, metric) lives in `training/downstream/`; the
dataset picks the task. Writes `results.json` (test metrics, settings, the training subset's size and ids), `results.md` (one
table row), `history.jsonl`, `best/` (the selected model, `from_pretrained`-ready), `checkpoints/step-<epoch>`.
"""

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from training import checkpointing
from training.downstream import DATASETS, TASKS
from training.downstream.common import batch_size
from training.pretrain import ensure_default_data, trackers

logger = logging.getLogger("unimedi.finetune")
CONFIG_DIR = Path(__file__).parent / "configs" / "finetune"
DEFAULT_CONFIG = CONFIG_DIR / "groundtruth_xray.yaml"


@dataclass
class FinetuneConfig:
    dataset: str = "groundtruth-xray"  # a key of training.downstream.DATASETS; it decides the task
    task: str | None = None  # optional check: "classification" | ... ; None: the dataset's task
    data: str = "data/groundtruth"  # folder of `{train,validation,test}-*.parquet` shards (processing/ readers)
    generate_default_data: bool = True  # build the ground-truth benchmark when `data` is its missing default folder
    model: str | None = None  # any UniMedI folder (inference or pretraining save) or Hub id; None: random init
    model_config: dict = field(default_factory=dict)  # UniMedIConfig fields for a random-init encoder
    head_config: dict = field(default_factory=dict)  # config fields of the task's head (decoder widths, loss weights)
    label_fraction: float = 1.0  # share of the training split used: 0.01 / 0.1 / 1.0 in the paper
    test_split: str = "test"  # the stored split tested once at the end (BCV/AMOS: "validation", see their configs)
    freeze_encoder: bool = True  # only the head trains: linear probe (§4.2), decoder-only segmentation (§7.2)
    batch_size: int = 48  # appendix §7.1: 48 for linear classification (96 for full-data CheXpert fine-tuning)
    head_learning_rate: float = 5e-4  # appendix §7.1: AdamW lr 5e-4 (COVIDx 5e-3)
    encoder_learning_rate: float = 5e-5  # fine-tuning only; the paper gives none: a tenth of the head's
    weight_decay: float = 1e-6  # appendix §7.1
    num_epochs: int = 50  # appendix §7.1 (LUNA16: 100)
    early_stopping_patience: int = 10  # appendix §7.1: stop after 10 epochs without a lower validation loss
    volume_flip_axes: list[int] = field(default_factory=lambda: [2])  # CTs: random flips when training (§7.1)
    augmentation: dict = field(default_factory=dict)  # task-specific training augmentations (see the task's collator)
    num_workers: int = 0
    mixed_precision: str = "no"
    seed: int = 0
    output_dir: str | None = None  # default: outputs/finetune/<dataset>-<probe|finetune>-<fraction>
    resume: bool = False
    overwrite_output_dir: bool = False
    report_to: str = "auto"  # "auto" (tensorboard if installed), "none", or an Accelerate tracker name

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        dataset_task = DATASETS[self.dataset].task
        if self.task not in (None, dataset_task):
            known = sorted(name for name, spec in DATASETS.items() if spec.task == self.task)
            raise ValueError(
                f"dataset {self.dataset!r} is for {dataset_task}, not {self.task}: {self.task} has {known}"
            )
        self.task = dataset_task
        if not 0.0 < float(self.label_fraction) <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        for name in ("batch_size", "num_epochs", "early_stopping_patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.output_dir is None:
            protocol = "probe" if self.freeze_encoder else "finetune"
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
    spec, task = DATASETS[config.dataset], TASKS[config.task]
    if accelerator.is_main_process and config.dataset.startswith("groundtruth"):
        # pretrain's generator check reads only these two settings
        ensure_default_data(
            SimpleNamespace(train_data=config.data, generate_default_data=config.generate_default_data)
        )
    accelerator.wait_for_everyone()

    model = task.build_model(config, spec)
    loaders, subset = task.build_loaders(config, spec, model.config.vision_config)
    optimizer = torch.optim.AdamW(task.optimizer_groups(model, config), weight_decay=config.weight_decay)
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

    state = run_epochs(config, accelerator, model, optimizer, (train_loader, validation_loader), state)
    accelerator.wait_for_everyone()
    results = test_selected(config, accelerator, model, test_loader, state, subset)
    accelerator.end_training()
    return results


def run_epochs(config: FinetuneConfig, accelerator, model, optimizer, loaders, state: dict) -> dict:
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
        validation = TASKS[config.task].evaluate(model, validation_loader, accelerator, DATASETS[config.dataset])
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


def test_selected(config: FinetuneConfig, accelerator, model, test_loader, state: dict, subset: dict) -> dict:
    """The selected (`best/`) model's test metrics, written as `results.json`, `results.md` and the subset's ids."""
    output_dir, spec, task = Path(config.output_dir), DATASETS[config.dataset], TASKS[config.task]
    best = task.model_class.from_pretrained(output_dir / "best")
    accelerator.unwrap_model(model).load_state_dict(best.state_dict())
    test = task.evaluate(model, test_loader, accelerator, spec)
    results = {
        "dataset": config.dataset,
        "task": config.task,
        "protocol": task.protocol(config),
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
        size = batch_size(batch)
        total += out.loss.detach().float().item() * size
        count += size
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


def save_best(model, folder: Path) -> None:
    """The selected model, replaced atomically (a crash never leaves a half-written `best/`)."""
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
        description="UniMedI downstream tasks (classification, segmentation, detection; paper §4.2, appendix §7).",
        epilog="Overrides: key=value, e.g. dataset=groundtruth-ct label_fraction=0.1 freeze_encoder=false",
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
