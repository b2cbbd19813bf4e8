"""UniMedI pretraining with Accelerate (one process, multi-GPU DDP; FSDP/DeepSpeed through `accelerate config`).

    python -m training.pretrain                        # CPU demo on the embedded ground-truth data (a few minutes)
    accelerate launch -m training.pretrain --config training/configs/paper.yaml train_data=/data/unimedi
    python -m training.pretrain --resume               # continue from the last complete checkpoint

Writes `checkpoints/step-*` (atomic, verified on resume), `train_log.jsonl`, tracker logs, and `final/` with the
model (`UniMedIModel.from_pretrained("…/final")` loads it), the processor and a filled-in model card.
"""

import dataclasses
import importlib.util
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

from modeling_unimedi import UniMedIForPreTraining
from modeling_unimedi.configuration_unimedi import ABLATION_SETTINGS
from modeling_unimedi.convert_unimedi import unimedi_from_pretrained_parts
from modeling_unimedi.image_processing_unimedi import UniMedIImageProcessor
from modeling_unimedi.processing_unimedi import UniMedIProcessor
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
from processing.samples import resolve
from training import checkpointing, schedules
from training.config import PretrainConfig, parse_args, to_json
from training.data import MixedBatches, PretrainCollator, shard_files
from training.model_card import write_model_card

logger = logging.getLogger("unimedi.pretrain")
LOSS_KEYS = ("loss", "vl_loss", "icl_loss", "pcl_loss")


def ensure_default_data(config: PretrainConfig) -> None:
    """Generate the ground-truth benchmark data when the configured default folder is missing."""
    if not isinstance(config.train_data, str) or Path(config.train_data).exists() or not config.generate_default_data:
        return
    from processing.groundtruth import GroundTruthConfig, generate

    logger.info("generating the ground-truth benchmark data into %s", config.train_data)
    generate(GroundTruthConfig(), config.train_data)


def build_model(config: PretrainConfig) -> UniMedIForPreTraining:
    """A new pretraining model: the ablation's switches, config overrides, and pretrained parts if given."""
    model_kwargs = {**ABLATION_SETTINGS[config.ablation], **config.model_config}
    parts = unimedi_from_pretrained_parts(
        resolve(config.vision_checkpoint), resolve(config.text_checkpoint), **model_kwargs
    )
    model = UniMedIForPreTraining(parts.config)
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
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def optimizer_groups(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, text_learning_rate: float | None = None
) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, tokens, position tables and the logit scale; the text encoder
    at its own learning rate when one is given (a pretrained BERT next to a vision tower trained from scratch)."""
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or name.endswith(("cls_token", "position_embedding", "logit_scale"))
        is_text = name.startswith("unimedi.text_model.") and text_learning_rate is not None
        key = (text_learning_rate if is_text else learning_rate, 0.0 if skip else weight_decay)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def trackers(report_to: str) -> list[str]:
    if report_to == "none":
        return []
    if report_to == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    return [report_to]


def train(config: PretrainConfig) -> Path:
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers(config.report_to) or None,
        project_dir=str(output_dir),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(message)s")
    set_seed(config.seed)
    if accelerator.is_main_process:
        ensure_default_data(config)
    accelerator.wait_for_everyone()

    world = accelerator.num_processes
    per_device = config.batch_size // (world * config.gradient_accumulation_steps)
    if per_device < 1 or per_device * world * config.gradient_accumulation_steps != config.batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} must split evenly over {world} process(es) x "
            f"{config.gradient_accumulation_steps} accumulation step(s)"
        )
    if config.max_steps is not None:
        total_steps = config.max_steps
        steps_per_epoch = total_steps / max(config.num_epochs, 1e-9)
    else:
        steps_per_epoch = math.ceil(count_records(config.train_data, config.train_split) / config.batch_size)
        total_steps = math.ceil(config.num_epochs * steps_per_epoch)
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)

    model = build_model(config)
    frozen = freeze_text_layers(model.unimedi.text_model, config.freeze_text_layers)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    processor = build_processor(config, model.config)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, config.learning_rate, config.weight_decay, config.text_learning_rate)
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped once per optimizer step, by us
    pretraining_model: UniMedIForPreTraining = accelerator.unwrap_model(model)
    model_config = pretraining_model.config

    batches = MixedBatches(
        config.train_data,
        config.train_split,
        per_device,
        config.ct_fraction,
        rank=accelerator.process_index,
        world_size=world,
        seed=config.seed,
        buffer=config.shuffle_buffer,
    )
    collate = PretrainCollator(processor, training=True)
    checkpoints = output_dir / "checkpoints"
    log_file = output_dir / "train_log.jsonl"
    start_step = resume(accelerator, checkpoints, batches) if config.resume else 0
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, config, start_step)
    accelerator.wait_for_everyone()

    accelerator.init_trackers("unimedi-pretrain", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    model.train()
    for module in frozen:
        module.eval()
    progress = tqdm(
        range(start_step, total_steps), initial=start_step, total=total_steps, disable=not accelerator.is_main_process
    )
    samples_seen = 0
    started = time.perf_counter()
    for step in range(start_step, total_steps):
        totals = dict.fromkeys(LOSS_KEYS, 0.0)
        teacher_step = int(pretraining_model.num_teacher_updates)  # saved with the model: resume is exact
        for _ in range(config.gradient_accumulation_steps):
            inputs = collate(*batches.next_batch()).to(accelerator.device)
            with accelerator.accumulate(model):
                out = model(**inputs, teacher_temperature=schedules.teacher_temperature(model_config, teacher_step))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            for key in LOSS_KEYS:
                if getattr(out, key) is not None:
                    totals[key] += getattr(out, key).detach().float().item() / config.gradient_accumulation_steps
            samples_seen += inputs["input_ids"].shape[0] * world
        scheduler.step()
        momentum = schedules.ema_momentum(model_config, teacher_step, total_steps)
        pretraining_model.update_teacher(momentum)
        record = {
            "step": step + 1,
            **{k: round(v, 6) for k, v in totals.items() if v},
            "lr": scheduler.get_last_lr()[0],
            "ema_momentum": momentum,
            "samples_per_s": round(samples_seen / (time.perf_counter() - started), 3),
        }
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        if (step + 1) % config.log_every_steps == 0 or step + 1 == total_steps:
            accelerator.log(record, step=step + 1)
            logger.info(json.dumps(record))
        if accelerator.is_main_process:
            with open(log_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if (step + 1) % config.save_every_steps == 0 or step + 1 == total_steps:
            save_checkpoint(accelerator, checkpoints, step + 1, batches, config.keep_checkpoints)
        if config.stop_after_step is not None and step + 1 >= config.stop_after_step and step + 1 < total_steps:
            logger.info("stopping after step %d as requested; resume with --resume", step + 1)
            batches.close()
            accelerator.end_training()
            return checkpointing.checkpoint_dir(checkpoints, step + 1)
    progress.close()
    batches.close()

    final = output_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pretraining_model.unimedi.save_pretrained(final)  # the inference model; checkpoints/ keep teacher and heads
        processor.save_pretrained(final)
        write_model_card(final / "README.md", config, total_steps=total_steps, log_file=log_file)
        logger.info("saved %s (load with UniMedIModel.from_pretrained)", final)
    accelerator.end_training()
    return final


def prepare_output_dir(output_dir: Path, config: PretrainConfig, start_step: int) -> None:
    """A fresh run must not mix with an earlier run's checkpoints (a later --resume would pick those up) or log; a
    resumed run keeps the log up to the step it resumes from."""
    checkpoints, log_file = output_dir / "checkpoints", output_dir / "train_log.jsonl"
    if not config.resume and (checkpoints.exists() or log_file.exists()):
        if not config.overwrite_output_dir:
            raise FileExistsError(
                f"{output_dir} holds an earlier run: pass --resume to continue it, or overwrite_output_dir=true"
            )
        shutil.rmtree(checkpoints, ignore_errors=True)
        log_file.unlink(missing_ok=True)
    if config.resume and log_file.exists():
        kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        log_file.write_text("".join(line + "\n" for line in kept))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "pretrain_config.json").write_text(to_json(config))


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, batches: MixedBatches, keep: int) -> None:
    """Model, optimizer, scheduler, RNG states, EMA teacher and DINO centres (model buffers) and each rank's data
    position, sealed atomically by the main process once every rank has written its part."""
    tmp, final = checkpointing.temporary_dir(root, step), checkpointing.checkpoint_dir(root, step)
    accelerator.save_state(str(tmp))
    tmp.mkdir(parents=True, exist_ok=True)
    checkpointing.write_json_atomic(
        tmp / f"data_state_rank{accelerator.process_index}.json", {"step": step, **batches.state_dict()}
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpointing.finalize(tmp, final, step)
        checkpointing.prune(root, keep)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, root: Path, batches: MixedBatches) -> int:
    folder = checkpointing.latest_complete(root)
    if folder is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {root}")
    accelerator.load_state(str(folder))
    data_state = json.loads((folder / f"data_state_rank{accelerator.process_index}.json").read_text())
    batches.load_state_dict(data_state)
    logger.info("resumed from %s (step %d)", folder, data_state["step"])
    return int(data_state["step"])


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
