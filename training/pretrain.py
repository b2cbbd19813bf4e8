"""UniMedI pretraining with Accelerate (one process, multi-GPU DDP; FSDP/DeepSpeed through `accelerate config`).

    python -m training.pretrain                        # CPU demo on the embedded ground-truth data (a few minutes)
    accelerate launch -m training.pretrain --config training/configs/paper.yaml train_data=/data/unimedi
    python -m training.pretrain --resume               # continue from the last complete checkpoint
    accelerate launch training/pretrain.py ...         # the file path works too, without installing the package

Writes `checkpoints/step-*` (atomic, verified on resume), `train_log.jsonl`, tracker logs, and `final/` with the
model (`UniMedIModel.from_pretrained("…/final")` loads it), the processor and a filled-in model card. This module builds
the parts (model, processor, optimizer, schedules, data); the loop over optimizer steps is `training.engine`.
"""

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

if not __package__:  # run by file path: import this checkout's packages, never an installed or other checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

from modeling_unimedi import UniMedIConfig, UniMedIForPreTraining
from modeling_unimedi.convert_unimedi import unimedi_from_pretrained_parts
from modeling_unimedi.image_processing_unimedi import UniMedIImageProcessor
from modeling_unimedi.processing_unimedi import UniMedIProcessor
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
from processing.samples import resolve
from training import checkpointing
from training.config import PretrainConfig, parse_args, to_json
from training.data import MixedBatches, PretrainCollator, shard_files, shard_sizes
from training.engine import TrainingRun, train_loop
from training.model_card import write_model_card
from training.text_cache import install_text_cache
from training.text_projection import mean_text_direction, remove_direction, training_reports

logger = logging.getLogger("unimedi.pretrain")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps the run takes, and how many samples each process loads per micro-batch."""

    per_device_batch_size: int
    total_steps: int
    warmup_steps: int


def ensure_default_data(config: PretrainConfig) -> None:
    """Generate the ground-truth benchmark data when the configured default folder is missing."""
    if not isinstance(config.train_data, str) or Path(config.train_data).exists() or not config.generate_default_data:
        return
    from processing.groundtruth import GroundTruthConfig, generate

    logger.info("generating the ground-truth benchmark data into %s", config.train_data)
    generate(GroundTruthConfig(), config.train_data, num_proc=min(2, os.cpu_count() or 1))


def build_model(config: PretrainConfig) -> UniMedIForPreTraining:
    """A new pretraining model: the ablation's switches, config overrides, and pretrained parts if given."""
    parts = unimedi_from_pretrained_parts(
        resolve(config.vision_checkpoint), resolve(config.text_checkpoint), **config.model_config
    )
    # The ablation switches are pretraining-only fields: the parts' weights fit every row of Table 7.
    model_config = UniMedIConfig.for_ablation(
        config.ablation, **{**config.model_config, "text_config": parts.config.text_config}
    )
    model = UniMedIForPreTraining(model_config)
    model.unimedi.load_state_dict(parts.state_dict())
    model.reset_teacher()
    return model


def freeze_text_layers(text_model: torch.nn.Module, num_layers: int | str) -> list[torch.nn.Module]:
    """Freeze a BERT-family encoder's embeddings and its `num_layers` bottom layers (no gradients, no optimizer
    state): the pretrained language knowledge stays, and the backward pass skips the frozen part. Returns the frozen
    modules, which training keeps in eval mode: dropout in a frozen encoder only adds noise to the report targets.
    `num_layers="all"` freezes the whole encoder."""
    if num_layers == 0:
        return []
    layers = getattr(getattr(text_model, "encoder", None), "layer", None)
    if layers is None or not hasattr(text_model, "embeddings"):
        raise ValueError(f"freeze_text_layers needs a BERT-family text encoder, got {type(text_model).__name__}")
    num_layers = len(layers) if num_layers == "all" else num_layers
    if not isinstance(num_layers, int) or not 0 <= num_layers <= len(layers):
        raise ValueError(f"freeze_text_layers must be 'all' or in [0, {len(layers)}], got {num_layers!r}")
    frozen = [text_model.embeddings, *layers[:num_layers]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def xray_processor(vision_config, **kwargs) -> UniMedIImageProcessor:
    """X-ray processor for the model's input size, with the paper's 256 -> 224 resize/crop ratio."""
    return UniMedIImageProcessor(
        longest_edge=round(vision_config.image_size * 256 / 224),
        crop_size=vision_config.image_size,
        num_channels=vision_config.num_channels,
        **kwargs,
    )


def build_processor(config: PretrainConfig, model_config) -> UniMedIProcessor:
    """Processor matching the model's input sizes."""
    vision = model_config.vision_config
    return UniMedIProcessor(
        image_processor=xray_processor(vision),
        tokenizer=AutoTokenizer.from_pretrained(resolve(config.tokenizer or config.text_checkpoint)),
        volume_processor=UniMedIVolumeProcessor(volume_size=tuple(vision.volume_size)),
        max_length=config.max_length,
    )


def count_records(data: str | list[str], split: str) -> int:
    """Records in the local shards (parquet metadata only); needed to turn epochs into steps."""
    files = shard_files(data, split)
    if files is None:
        raise ValueError(f"{data} is not a local folder: set max_steps for a Hub dataset")
    return sum(shard_sizes(files))


def center_text_projection(model: UniMedIForPreTraining, processor: UniMedIProcessor, config: PretrainConfig) -> None:
    """Project the report encoder's mean [CLS] direction over 256 training reports out of the text projection."""
    reports = training_reports(config.train_data, config.train_split, limit=256)
    direction = mean_text_direction(model.unimedi.text_model, processor.tokenizer, reports, config.max_length)
    remove_direction(model.unimedi.text_projection, direction)


def optimizer_groups(
    model: torch.nn.Module,
    learning_rate: float,
    weight_decay: float,
    text_learning_rate: float | None = None,
    text_projection_learning_rate: float | None = None,
) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, tokens, position tables and the logit scale; the text encoder
    at its own learning rate when one is given (a pretrained BERT next to a vision tower trained from scratch), and
    the text projection at its own (0 keeps a frozen encoder's report embeddings fixed targets, as LiT locks a tower).
    """
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or name.endswith(("cls_token", "position_embedding", "logit_scale"))
        rate = learning_rate
        if name.startswith("unimedi.text_model.") and text_learning_rate is not None:
            rate = text_learning_rate
        if name.startswith("unimedi.text_projection.") and text_projection_learning_rate is not None:
            rate = text_projection_learning_rate
        key = (rate, 0.0 if skip else weight_decay)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def trackers(report_to: str) -> list[str]:
    if report_to == "none":
        return []
    if report_to == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    return [report_to]


def plan_steps(config: PretrainConfig, num_processes: int) -> StepPlan:
    """The per-process batch size (the global batch split over processes and accumulation steps) and the step counts:
    `max_steps`, or `num_epochs` over the local shards' record count."""
    accumulation = config.gradient_accumulation_steps
    per_device = config.batch_size // (num_processes * accumulation)
    if per_device < 1 or per_device * num_processes * accumulation != config.batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} must split evenly over {num_processes} process(es) x "
            f"{accumulation} accumulation step(s)"
        )
    if config.max_steps is not None:
        total_steps = config.max_steps
        steps_per_epoch = total_steps / max(config.num_epochs, 1e-9)
    else:
        steps_per_epoch = math.ceil(count_records(config.train_data, config.train_split) / config.batch_size)
        total_steps = math.ceil(config.num_epochs * steps_per_epoch)
    return StepPlan(per_device, total_steps, round(config.warmup_epochs * steps_per_epoch))


def build_schedulers(optimizer: torch.optim.Optimizer, plan: StepPlan) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay of every group's learning rate, stepped once per optimizer step."""
    return get_cosine_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)


def build_accelerator(config: PretrainConfig) -> Accelerator:
    """The Accelerator of the run (precision, accumulation, trackers), with logging and seeds set up on every rank."""
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers(config.report_to) or None,
        project_dir=str(Path(config.output_dir)),
    )
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError(
            "mixed_precision=fp16 needs a GPU: on CPU it would silently run in float32; use bf16 or no on CPU"
        )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(message)s")
    set_seed(config.seed)  # the same initial weights on every rank
    return accelerator


def seed_this_rank(seed: int) -> None:
    """Seed Python, NumPy and torch with seed + rank: X-ray crops, CT flips, random slabs and token masks differ across
    ranks and repeat from run to run (a resumed run restores each rank's own random state)."""
    set_seed(seed, device_specific=True)


def build_batches(config: PretrainConfig, plan: StepPlan, accelerator: Accelerator) -> MixedBatches:
    """This rank's share of the mixed X-ray/CT batches."""
    return MixedBatches(
        config.train_data,
        config.train_split,
        plan.per_device_batch_size,
        config.ct_fraction,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=config.seed,
        buffer=config.shuffle_buffer,
    )


def train(config: PretrainConfig) -> Path:
    """Build the run's parts, run `training.engine.train_loop`, and save `final/`; returns the folder written last."""
    output_dir = Path(config.output_dir)
    accelerator = build_accelerator(config)
    if accelerator.is_main_process:
        ensure_default_data(config)
    accelerator.wait_for_everyone()
    plan = plan_steps(config, accelerator.num_processes)

    model = build_model(config)
    frozen = freeze_text_layers(model.unimedi.text_model, config.freeze_text_layers)
    install_text_cache(model.unimedi.text_model)  # serves repeated reports while the encoder is fully frozen
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    processor = build_processor(config, model.config)
    if config.center_text_projection:
        center_text_projection(model, processor, config)
    optimizer = torch.optim.AdamW(
        optimizer_groups(
            model,
            config.learning_rate,
            config.weight_decay,
            config.text_learning_rate,
            config.text_projection_learning_rate,
        )
    )
    scheduler = build_schedulers(optimizer, plan)
    model, optimizer = accelerator.prepare(model, optimizer)
    seed_this_rank(config.seed)
    batches = build_batches(config, plan, accelerator)
    collate = PretrainCollator(processor, training=True)
    run = TrainingRun(
        config, accelerator, model, optimizer, scheduler, batches, collate, frozen, plan.total_steps, output_dir
    )
    if accelerator.is_main_process:
        checkpointing.remove_leftovers(run.checkpoints)
    accelerator.wait_for_everyone()
    start_step = 0
    if config.resume:
        source = run.checkpoints if config.resume is True else Path(config.resume)
        start_step = checkpointing.resume(accelerator, source, batches, scheduler, config)
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, config, start_step)
    accelerator.wait_for_everyone()

    accelerator.init_trackers("unimedi-pretrain", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    stopped_after = train_loop(run, start_step)
    batches.close()
    if stopped_after is not None:
        accelerator.end_training()
        return checkpointing.checkpoint_dir(run.checkpoints, stopped_after)
    final = save_final(run, processor)
    accelerator.end_training()
    return final


def save_final(run: TrainingRun, processor: UniMedIProcessor) -> Path:
    """`final/`: the inference model (checkpoints/ keep the teacher and heads), its processor and the model card."""
    final = run.output_dir / "final"
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        run.accelerator.unwrap_model(run.model).unimedi.save_pretrained(final)
        processor.save_pretrained(final)
        write_model_card(final / "README.md", run.config, total_steps=run.total_steps, log_file=run.log_file)
        logger.info("saved %s (load with UniMedIModel.from_pretrained)", final)
    return final


def prepare_output_dir(output_dir: Path, config: PretrainConfig, start_step: int) -> None:
    """A fresh run must not mix with an earlier run's checkpoints (a later --resume would pick those up) or log; a
    resumed run keeps the log and the checkpoints up to the step it resumes from (the log rewritten atomically)."""
    checkpoints, log_file = output_dir / "checkpoints", output_dir / "train_log.jsonl"
    if not config.resume and (checkpoints.exists() or log_file.exists()):
        if not config.overwrite_output_dir:
            raise FileExistsError(
                f"{output_dir} holds an earlier run: pass --resume to continue it, or overwrite_output_dir=true"
            )
        shutil.rmtree(checkpoints, ignore_errors=True)
        log_file.unlink(missing_ok=True)
    if config.resume:
        checkpointing.drop_after(checkpoints, start_step)
    if config.resume and log_file.exists():
        kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        checkpointing.write_text_atomic(log_file, "".join(line + "\n" for line in kept))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "pretrain_config.json").write_text(to_json(config))


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
