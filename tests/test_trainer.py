"""UniMedIForPreTraining under transformers' Trainer: TrainerCollator takes Trainer's list of dataset rows,
EMATeacherCallback moves the EMA teacher (Trainer alone never does) and PreTrainingTrainer warms the teacher
temperature up as training.schedules says."""

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_configs import TINY_TEXT, TINY_VISION
from transformers import Trainer, TrainingArguments

from modeling_unimedi import (
    UniMedIConfig,
    UniMedIForPreTraining,
    UniMedIImageProcessor,
    UniMedIProcessor,
    UniMedIVolumeProcessor,
)
from processing.schema import ct_record, xray_record
from training.schedules import teacher_temperature
from training.trainer import EMATeacherCallback, PreTrainingTrainer, TrainerCollator

VISION = dict(TINY_VISION, volume_size=(16, 32, 32))


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    size = VISION["image_size"]
    return UniMedIProcessor(
        UniMedIImageProcessor(longest_edge=size, crop_size=size),
        text_tokenizer,
        volume_processor=UniMedIVolumeProcessor(volume_size=VISION["volume_size"]),
        max_length=TINY_TEXT["max_position_embeddings"],
    )


@pytest.fixture(scope="module")
def rows(xray_jpeg_paths):
    """Two X-ray and two CT records of processing.schema, interleaved."""
    generator = np.random.default_rng(0)
    xrays = [
        xray_record(sample_id=f"x{i}", source="test", split="train", report=f"X-ray report {i}", image=str(path))
        for i, path in enumerate(xray_jpeg_paths[:2])
    ]
    cts = [
        ct_record(
            sample_id=f"c{i}",
            source="test",
            split="train",
            report=f"CT report {i}",
            volume=generator.integers(-1000, 1000, VISION["volume_size"]).astype(np.int16),
            spacing=(2.0, 1.0, 1.0),
        )
        for i in range(2)
    ]
    for record in xrays:  # stored records hold the encoded image, as the shards do
        record["image"] = {"bytes": Path(record["image"]).read_bytes(), "path": None}
    return [xrays[0], cts[0], xrays[1], cts[1]]


def new_model(vocab_size: int) -> UniMedIForPreTraining:
    torch.manual_seed(0)
    config = UniMedIConfig.for_ablation(
        "vl+sd+attn",
        vision_config=VISION,
        text_config=dict(TINY_TEXT, vocab_size=vocab_size),
        projection_dim=16,
        num_selected_slices=2,
        dino_out_dim=64,
        dino_hidden_dim=32,
        dino_bottleneck_dim=16,
    )
    return UniMedIForPreTraining(config)


def training_arguments(output_dir: Path, max_steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        dataloader_num_workers=0,
    )


def test_collator_takes_a_list_of_rows_xrays_first(processor, rows):
    batch = TrainerCollator(processor, training=False)(rows)
    assert batch["pixel_values"].shape[0] == 2 and batch["volume_values"].shape[0] == 2
    reports = processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert reports == ["x - ray report 0", "x - ray report 1", "ct report 0", "ct report 1"]


@pytest.mark.parametrize("with_callback", [True, False])
def test_two_trainer_steps_move_the_teacher_only_with_the_callback(processor, rows, tmp_path, with_callback):
    model = new_model(len(processor.tokenizer))
    teacher_before = [p.detach().clone() for p in model.teacher.parameters()]
    trainer = Trainer(
        model=model,
        args=training_arguments(tmp_path, max_steps=2),
        train_dataset=rows,
        data_collator=TrainerCollator(processor),
        callbacks=[EMATeacherCallback()] if with_callback else [],
    )
    trainer.train()
    moved = max((p - q).abs().max().item() for p, q in zip(model.teacher.parameters(), teacher_before))
    if with_callback:
        assert int(model.num_teacher_updates) == 2 and moved > 0
    else:
        assert int(model.num_teacher_updates) == 0 and moved == 0


def test_pretraining_trainer_warms_the_teacher_temperature_up_as_the_schedule_says(processor, rows, tmp_path):
    model = new_model(len(processor.tokenizer))
    model.config.teacher_temperature_warmup_steps = 2  # 0.04 at step 0 -> 0.07 from step 2 on
    passed = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: passed.append(kwargs["teacher_temperature"]), with_kwargs=True
    )
    trainer = PreTrainingTrainer(
        model=model,
        args=training_arguments(tmp_path, max_steps=3),
        train_dataset=rows,
        data_collator=TrainerCollator(processor),
    )
    trainer.train()
    expected = [teacher_temperature(model.config, step) for step in range(3)]
    assert expected == pytest.approx([0.04, 0.055, 0.07])
    assert passed == pytest.approx(expected)
    assert int(model.num_teacher_updates) == 3  # the trainer brought its EMATeacherCallback
