"""The pretraining loop: optimizer steps over mixed X-ray/CT batches, the EMA teacher, logs and checkpoints.

`training.pretrain.train` builds the parts (model, optimizer, schedules, data) and hands them over as a `TrainingRun`;
`train_loop` runs the steps, `train_one_step` one optimizer step with gradient accumulation.
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from training import checkpointing, schedules
from training.config import PretrainConfig
from training.data import MixedBatches, PretrainCollator

logger = logging.getLogger("unimedi.pretrain")
LOSS_KEYS = ("loss", "vl_loss", "icl_loss", "pcl_loss")


@dataclass
class TrainingRun:
    """What the loop needs: the prepared model and optimizer, the learning-rate schedule, the data and the plan."""

    config: PretrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: MixedBatches
    collate: PretrainCollator
    frozen: list[torch.nn.Module]  # modules kept in eval mode (frozen text layers)
    total_steps: int
    output_dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def log_file(self) -> Path:
        return self.output_dir / "train_log.jsonl"


def train_loop(run: TrainingRun, start_step: int) -> int | None:
    """Optimizer steps `start_step` .. `total_steps`, each logged and checkpointed as configured. Returns the step
    after which `stop_after_step` ended the run early (its checkpoint is written), or None when it ran to the end."""
    config = run.config
    run.model.train()
    for module in run.frozen:
        module.eval()
    progress = tqdm(initial=start_step, total=run.total_steps, disable=not run.accelerator.is_main_process)
    samples_seen = 0
    started = time.perf_counter()
    for step in range(start_step, run.total_steps):
        learning_rate = run.scheduler.get_last_lr()[0]  # the rate this step's optimizer update uses
        totals, samples = train_one_step(run)
        samples_seen += samples
        run.scheduler.step()
        record = {
            "step": step + 1,
            **{k: round(v, 6) for k, v in totals.items() if v is not None},
            "lr": learning_rate,
            **update_teacher(run),
            "samples_per_s": round(samples_seen / (time.perf_counter() - started), 3),
        }
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        log_step(run, record)
        if (step + 1) % config.save_every_steps == 0 or step + 1 == run.total_steps:
            checkpointing.save(
                run.accelerator, run.checkpoints, step + 1, run.batches, run.scheduler, config, config.keep_checkpoints
            )
        if config.stop_after_step is not None and step + 1 >= config.stop_after_step and step + 1 < run.total_steps:
            logger.info("stopping after step %d as requested; resume with --resume", step + 1)
            return step + 1
    progress.close()
    return None


def train_one_step(run: TrainingRun) -> tuple[dict[str, float | None], int]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean of each loss term over
    them and over all processes (None for a term the objective lacks), and the number of samples seen by all
    processes."""
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    accumulation = run.config.gradient_accumulation_steps
    totals, samples = torch.zeros(len(LOSS_KEYS), dtype=torch.float64), 0
    present = [False] * len(LOSS_KEYS)
    temperature = schedules.teacher_temperature(pretraining_config(run), teacher_step(run))
    for _ in range(accumulation):
        inputs = run.collate(*run.batches.next_batch()).to(accelerator.device)
        with accelerator.accumulate(model):
            out = model(**inputs, teacher_temperature=temperature)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and run.config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), run.config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        for index, key in enumerate(LOSS_KEYS):
            if getattr(out, key) is not None:
                totals[index] += getattr(out, key).detach().double().item() / accumulation
                present[index] = True
        samples += inputs["input_ids"].shape[0] * accelerator.num_processes
    totals = accelerator.reduce(totals.to(accelerator.device), reduction="mean").cpu()  # one collective per step
    return {key: totals[i].item() if present[i] else None for i, key in enumerate(LOSS_KEYS)}, samples


def pretraining_config(run: TrainingRun):
    return run.accelerator.unwrap_model(run.model).config


def teacher_step(run: TrainingRun) -> int:
    """The schedules' step: the teacher updates so far, saved with the model, so a resumed run continues exactly."""
    return int(run.accelerator.unwrap_model(run.model).num_teacher_updates)


def update_teacher(run: TrainingRun) -> dict[str, float]:
    """The EMA teacher follows the student after every optimizer step; returns the schedule values to log."""
    momentum = schedules.ema_momentum(pretraining_config(run), teacher_step(run), run.total_steps)
    run.accelerator.unwrap_model(run.model).update_teacher(momentum)
    return {"ema_momentum": momentum}


def log_step(run: TrainingRun, record: dict) -> None:
    """Every step to `train_log.jsonl` (main process); every `log_every_steps` and the last to the trackers and log."""
    step = record["step"]
    if step % run.config.log_every_steps == 0 or step == run.total_steps:
        run.accelerator.log(record, step=step)
        logger.info(json.dumps(record))
    if run.accelerator.is_main_process:
        with open(run.log_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
