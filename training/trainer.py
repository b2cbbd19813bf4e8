"""Pretraining UniMedI with transformers' `Trainer` instead of `training.pretrain`'s loop:

    trainer = PreTrainingTrainer(
        model=UniMedIForPreTraining(config),
        args=TrainingArguments(..., remove_unused_columns=False),
        train_dataset=records,                      # rows of processing.schema (X-ray and CT records, mixed)
        data_collator=TrainerCollator(processor),
    )

`Trainer` optimises the student only and passes no per-step forward arguments. `PreTrainingTrainer` adds the two
self-distillation schedules `training.pretrain` applies (`training.schedules`): each forward gets the teacher
temperature of DINO's warm-up, and `EMATeacherCallback` (which a plain `Trainer` can take too) moves the EMA teacher
after every optimizer step; without it the teacher, no parameter of the optimizer, would never move.
"""

from transformers import Trainer, TrainerCallback

from training.data import PretrainCollator
from training.schedules import ema_momentum, teacher_temperature


class EMATeacherCallback(TrainerCallback):
    """After every optimizer step: teacher <- EMA of the student, with DINO's cosine momentum schedule over the run's
    `max_steps` (`training.schedules.ema_momentum`), at the model's own update count so a resumed run continues it."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = getattr(model, "module", model)  # DistributedDataParallel wraps the model
        model.update_teacher(ema_momentum(model.config, int(model.num_teacher_updates), state.max_steps))


class PreTrainingTrainer(Trainer):
    """`Trainer` for `UniMedIForPreTraining` with `training.pretrain`'s schedules: the forward of every micro-batch
    gets `teacher_temperature` at the teacher's update count (the optimizer steps so far, saved with the model, as
    `training.engine` passes it), and `EMATeacherCallback` is added unless given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(callback, EMATeacherCallback) for callback in self.callback_handler.callbacks):
            self.add_callback(EMATeacherCallback())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pretraining = self.accelerator.unwrap_model(model)
        temperature = teacher_temperature(pretraining.config, int(pretraining.num_teacher_updates))
        inputs = {**inputs, "teacher_temperature": temperature}
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


class TrainerCollator:
    """`Trainer`'s `data_collator`: one list of dataset rows (X-ray and CT records in any order) -> model inputs,
    the X-rays first with their reports, then the CTs, as `PretrainCollator` makes them."""

    def __init__(self, processor, training: bool = True):
        self.collate = PretrainCollator(processor, training=training)

    def __call__(self, rows: list[dict]):
        xrays = [row for row in rows if row.get("image") is not None]
        cts = [row for row in rows if row.get("image") is None]
        return self.collate(xrays, cts)
