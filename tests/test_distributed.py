"""Two gloo processes on CPU (torchrun): exact resume, the CLIP loss's gradient, no DDP deadlock, per-rank randomness.

Each test starts `torchrun --nproc_per_node 2` on this file (the `check_*` functions below run on every rank and write
`rank{r}.json`), or on `training.pretrain`, and asserts on what the ranks wrote.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_check(name: str, out: Path, timeout: int = 120) -> list[dict]:
    """Run `check_<name>` on two processes; a deadlock shows as the timeout."""
    out.mkdir(parents=True, exist_ok=True)
    command = TORCHRUN + [__file__, name, str(out)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"check_{name} did not finish within {timeout} s (deadlock)")
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


# ---------------------------------------------------------------- tests


def test_two_process_resume_is_exact_with_shards_not_divisible_by_the_world_size(tmp_path):
    """3 X-ray and 3 CT shards over 2 ranks: stopped after step 2 and resumed, the run logs the same losses."""
    from test_training import fabricated_shards, losses, run_training, tiny_run_args

    data = fabricated_shards(tmp_path / "data", num_xrays=24, num_cts=24)
    assert len(list(data.glob("train-ct-*.parquet"))) == 3
    launcher = TORCHRUN + ["-m"]
    settings = {"max_steps": 4, "save_every_steps": 2, "ct_fraction": 0.5}
    run_training(tiny_run_args(data, tmp_path / "straight", **settings), launcher=launcher, env_extra=ENV)
    run_training(tiny_run_args(data, tmp_path / "resumed", stop_after_step=2, **settings), launcher, ENV)
    run_training(tiny_run_args(data, tmp_path / "resumed", **settings) + ["--resume"], launcher, ENV)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    for step in range(1, 5):
        for key in ("loss", "vl_loss", "icl_loss", "pcl_loss"):
            assert resumed[step][key] == pytest.approx(straight[step][key], abs=1e-5), (step, key)


def test_clip_loss_gradient_equals_the_full_batch_gradient(tmp_path):
    ranks = run_check("gradient", tmp_path)
    for result in ranks:
        assert result["loss"] == pytest.approx(result["full_batch_loss"], abs=1e-6)
        assert result["max_gradient_error"] < 1e-6, result
        assert result["gradient_norm"] > 1e-3  # the comparison is not between zeros


def test_ranks_with_different_modality_mixes_train_without_deadlock(tmp_path):
    """Rank 0 sees only X-rays, rank 1 only CTs, for several DDP steps (no `find_unused_parameters`)."""
    ranks = run_check("different_mixes", tmp_path, timeout=150)
    assert len(ranks[0]["losses"]) == 6 and all(math.isfinite(loss) for loss in ranks[0]["losses"])
    assert ranks[0]["parameter_checksum"] == pytest.approx(ranks[1]["parameter_checksum"], rel=1e-6)


def test_ranks_draw_different_but_reproducible_augmentations(tmp_path):
    ranks = run_check("augmentations", tmp_path)
    for key in ("crop", "flips", "mask"):
        assert ranks[0][key] != ranks[1][key], key
        for result in ranks:
            assert result[key] == result[f"{key}_again"], key


def test_logged_losses_are_the_mean_over_ranks(tmp_path):
    ranks = run_check("mean_loss", tmp_path)
    assert [r["loss"] for r in ranks] == [1.5, 1.5]  # rank r's own loss is r + 1
    assert [r["icl_loss"] for r in ranks] == [None, None]


# ---------------------------------------------------------------- what every rank runs


def check_gradient() -> dict:
    """Each rank embeds its half of a batch with shared weights; DDP's mean of the ranks' gradients must equal the
    gradient of the single-process loss on the whole batch."""
    from modeling_unimedi.loss_unimedi import contrastive_loss, gathered_contrastive_loss

    torch.manual_seed(0)  # the same weights and data on both ranks
    images, texts = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    image_weights = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    text_weights = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    logit_scale = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    parameters = [image_weights, text_weights, logit_scale]

    def embed(x, weights):
        return torch.nn.functional.normalize(x @ weights, dim=-1)

    full = contrastive_loss(logit_scale.exp() * embed(images, image_weights) @ embed(texts, text_weights).t())
    expected = torch.autograd.grad(full, parameters)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = slice(rank * 4, rank * 4 + 4)
    loss = gathered_contrastive_loss(
        embed(images[local], image_weights), embed(texts[local], text_weights), logit_scale.exp()
    )
    gradients = torch.autograd.grad(loss, parameters)
    for gradient in gradients:  # what DistributedDataParallel does
        dist.all_reduce(gradient)
        gradient /= world
    error = max((g - e).abs().max().item() for g, e in zip(gradients, expected))
    norm = sum(e.norm() ** 2 for e in expected).sqrt().item()
    return {"loss": loss.item(), "full_batch_loss": full.item(), "max_gradient_error": error, "gradient_norm": norm}


def check_different_mixes() -> dict:
    from tiny_configs import TINY_VISION, tiny_config

    from modeling_unimedi import UniMedIForPreTraining

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = UniMedIForPreTraining(tiny_config(num_selected_slices=1, dino_out_dim=32, dino_hidden_dim=32))
    model.reset_teacher()
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)  # many buckets, as at full size
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    torch.manual_seed(1 + rank)
    losses = []
    for _ in range(6):
        inputs = {"input_ids": torch.randint(1, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
        if rank == 0:
            inputs["pixel_values"] = torch.randn(2, 3, TINY_VISION["image_size"], TINY_VISION["image_size"])
        else:
            inputs["volume_values"] = torch.randn(2, 1, *TINY_VISION["volume_size"])
        loss = ddp(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    checksum = sum(p.double().sum().item() for p in model.parameters())
    return {"losses": losses, "parameter_checksum": checksum}


def check_augmentations() -> dict:
    """X-ray crops, CT flips and random token masks after the training's seeding, drawn twice from the same seed."""
    import numpy as np
    from accelerate import Accelerator
    from PIL import Image
    from tiny_configs import tiny_config

    from modeling_unimedi import UniMedIForPreTraining
    from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
    from training.pretrain import seed_this_rank, xray_processor

    Accelerator(cpu=True)
    config = tiny_config(token_masking="random", mask_ratio=0.5)
    image_processor = xray_processor(config.vision_config)
    volume_processor = UniMedIVolumeProcessor(volume_size=(8, 32, 32), flip_axes=[0, 1, 2])
    model = UniMedIForPreTraining(config)
    image = Image.fromarray(np.arange(60 * 50, dtype=np.uint8).reshape(60, 50) % 251)
    volume = np.arange(8 * 32 * 32, dtype=np.float32).reshape(8, 32, 32)

    def draw() -> dict:
        seed_this_rank(seed=7)
        crops = [
            image_processor(image, training=True, return_tensors="pt")["pixel_values"].sum().item() for _ in "1234"
        ]
        flips = [
            volume_processor(volume, training=True, return_tensors="pt")["volume_values"][0, 0, 0, 0, :2]
            for _ in "1234"
        ]
        mask = model.tokens_to_keep(None, [16], 4, "cpu")
        return {"crop": crops, "flips": torch.cat(flips).tolist(), "mask": mask.tolist()}

    first, second = draw(), draw()
    return {**first, **{f"{key}_again": value for key, value in second.items()}}


def check_mean_loss() -> dict:
    """`train_one_step` on a model whose loss is rank + 1: every rank must report the mean, 1.5."""
    from accelerate import Accelerator
    from transformers import BatchFeature

    from training.engine import train_one_step

    class RankLoss(torch.nn.Module):
        config = SimpleNamespace(teacher_temperature=0.04, teacher_temperature_warmup=0.04)
        config.teacher_temperature_warmup_steps = 0
        num_teacher_updates = 0

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, teacher_temperature):
            loss = self.weight * (dist.get_rank() + 1)
            return SimpleNamespace(loss=loss, vl_loss=loss, icl_loss=None, pcl_loss=None)

    accelerator = Accelerator(cpu=True)
    module = RankLoss()
    model, optimizer = accelerator.prepare(module, torch.optim.SGD(module.parameters(), lr=0.0))
    run = SimpleNamespace(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        config=SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=None),
        batches=SimpleNamespace(next_batch=lambda: ((), ())),
        collate=lambda xrays, cts: BatchFeature({"input_ids": torch.zeros(2, 3, dtype=torch.long)}),
    )
    totals, _ = train_one_step(run)
    return totals


if __name__ == "__main__":
    check, out = sys.argv[1], Path(sys.argv[2])
    if not dist.is_initialized() and check in ("gradient", "different_mixes"):
        dist.init_process_group("gloo")
    result = globals()[f"check_{check}"]()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    # Under load a rank could abort in C++ teardown after all of the above ("terminate called without an active
    # exception", no Python frame left): its result is written, so leave without running the static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
