"""Pretraining UniMedI with transformers' `Trainer` instead of `training.pretrain`'s loop:

    trainer = Trainer(
        model=UniMedIForPreTraining(config),
        args=TrainingArguments(..., remove_unused_columns=False),
        train_dataset=records,                      # rows of processing.schema (X-ray and CT records, mixed)
        data_collator=TrainerCollator(processor),
        callbacks=[EMATeacherCallback()],
    )

`Trainer` optimises the student only: the EMA teacher is no parameter of the optimizer and would never move without
`EMATeacherCallback`. The DINO teacher temperature stays at `config.teacher_temperature` (Trainer passes no per-step
forward arguments; `training.pretrain` applies the warm-up).
"""

from transformers import TrainerCallback

from training.data import PretrainCollator
from training.schedules import ema_momentum


class EMATeacherCallback(TrainerCallback):
    """After every optimizer step: teacher <- EMA of the student, with DINO's cosine momentum schedule over the run's
    `max_steps` (`training.schedules.ema_momentum`), at the model's own update count so a resumed run continues it."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = getattr(model, "module", model)  # DistributedDataParallel wraps the model
        model.update_teacher(ema_momentum(model.config, int(model.num_teacher_updates), state.max_steps))


class TrainerCollator:
    """`Trainer`'s `data_collator`: one list of dataset rows (X-ray and CT records in any order) -> model inputs,
    the X-rays first with their reports, then the CTs, as `PretrainCollator` makes them."""

    def __init__(self, processor, training: bool = True):
        self.collate = PretrainCollator(processor, training=training)

    def __call__(self, rows: list[dict]):
        xrays = [row for row in rows if row.get("image") is not None]
        cts = [row for row in rows if row.get("image") is None]
        return self.collate(xrays, cts)
