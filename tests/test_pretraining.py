"""UniMedIForPreTraining on tiny configs: slice selection, masking, EMA teacher, losses, ablations, DDP, saving."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_configs import TINY_TEXT, TINY_VISION

from modeling_unimedi import UniMedIConfig, UniMedIForPreTraining, UniMedIModel
from training import schedules

VISION = dict(TINY_VISION, volume_size=(16, 32, 32))  # 4 depth slabs of 4 slices, 2x2 tokens each
HEADS = dict(dino_out_dim=64, dino_hidden_dim=32, dino_bottleneck_dim=16)


def pretraining_config(setting="vl+sd+attn", **overrides):
    kwargs = dict(vision_config=dict(VISION), text_config=dict(TINY_TEXT), projection_dim=16, num_selected_slices=2)
    return UniMedIConfig.for_ablation(setting, **{**kwargs, **HEADS, **overrides})


def mixed_batch(num_images=2, num_volumes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = num_images + num_volumes
    inputs = {
        "input_ids": torch.randint(1, 120, (n, 9), generator=g),
        "attention_mask": torch.ones(n, 9, dtype=torch.long),
    }
    if num_images:
        inputs["pixel_values"] = torch.rand(num_images, 3, 32, 32, generator=g)
    if num_volumes:
        inputs["volume_values"] = torch.rand(num_volumes, 1, 16, 32, 32, generator=g)
    return inputs


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UniMedIForPreTraining(pretraining_config()).train()


def test_slab_scores_equal_eager_attention_average(model):
    inputs = mixed_batch(0, 2)
    out = model(**inputs)
    teacher = model.teacher["backbone"]
    teacher.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = teacher(volume_values=inputs["volume_values"], output_attentions=True).attentions
    cls_row = torch.stack(attentions).mean(dim=(0, 2))[:, 0, 1:]  # (B, 16 tokens): 4 slabs x 2x2
    expected = cls_row.reshape(2, 4, 4).mean(dim=-1)
    assert torch.allclose(out.slab_scores, expected, atol=1e-5)
    assert torch.equal(out.selected_slabs, expected.topk(2).indices)


def test_planted_slab_is_selected_and_becomes_the_pseudo_image(model, monkeypatch):
    teacher = model.teacher["backbone"]
    original_forward = teacher.forward
    planted = torch.tensor([3, 1])

    def forward_with_planted_attention(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        if kwargs.get("output_cls_attention") and kwargs.get("pixel_values") is None:
            attention = torch.full_like(out.cls_attention, 0.01)
            for b, slab in enumerate(planted):
                attention[b, slab * 4 : (slab + 1) * 4] = 1.0
            out.cls_attention = attention
        return out

    monkeypatch.setattr(teacher, "forward", forward_with_planted_attention)
    inputs = mixed_batch(0, 2)
    captured = {}
    student = model.unimedi.vision_model
    student_embed = student.embed_patches

    def capture(pixel_values=None, volume_values=None):
        captured["pixel_values"] = pixel_values
        return student_embed(pixel_values, volume_values)

    monkeypatch.setattr(student, "embed_patches", capture)
    out = model(**inputs)
    assert torch.equal(out.selected_slabs[:, 0], planted)
    # the pseudo-2D image of the top slab is that slab's central slice (depth index slab*4 + 2), replicated to RGB
    central = inputs["volume_values"][torch.arange(2), 0, planted * 4 + 2]
    assert captured["pixel_values"].shape == (2, 2, 3, 32, 32)
    assert torch.allclose(captured["pixel_values"][:, 0, 1], central, atol=1e-6)


def test_keep_mask_holds_exactly_the_highest_attention_tokens(model):
    inputs = mixed_batch(2, 0)
    out = model(**inputs)
    with torch.no_grad():
        scores = model.teacher["backbone"](
            pixel_values=inputs["pixel_values"], output_cls_attention=True
        ).cls_attention
    num_keep = round(scores.shape[1] * (1 - model.config.mask_ratio))
    assert out.image_keep_mask.sum(dim=1).tolist() == [num_keep, num_keep]
    for b in range(2):
        kept_scores = scores[b][out.image_keep_mask[b]]
        dropped_scores = scores[b][~out.image_keep_mask[b]]
        assert kept_scores.min() >= dropped_scores.max()


def test_volume_keep_mask_covers_ct_and_slice_tokens(model):
    out = model(**mixed_batch(0, 2))
    assert out.volume_keep_mask.shape == (2, 16 + 2 * 4)  # 3D tokens + k=2 pseudo-images of 2x2 tokens
    assert out.volume_keep_mask.sum(dim=1).tolist() == [12, 12]


def test_teacher_has_no_gradients_and_follows_the_ema_rule(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**mixed_batch()).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher["backbone"].parameters())
    assert all(p.grad is None for p in model.teacher["cls_head"].parameters())
    optimizer.step()
    before = {n: p.clone() for n, p in model.teacher["backbone"].named_parameters()}
    student = dict(model.unimedi.vision_model.named_parameters())
    assert any(not torch.equal(before[n], student[n]) for n in before)  # the optimizer moved the student
    model.update_teacher(0.9)
    assert int(model.num_teacher_updates) == 1
    for name, param in model.teacher["backbone"].named_parameters():
        assert torch.allclose(param, 0.9 * before[name] + 0.1 * student[name], atol=1e-7), name


def _train(model, inputs, lr, steps):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        out = model(**inputs)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.update_teacher(schedules.ema_momentum(model.config, int(model.num_teacher_updates), 1000))
        history.append(
            {
                k: getattr(out, k).item()
                for k in ("loss", "vl_loss", "icl_loss", "pcl_loss")
                if getattr(out, k) is not None
            }
        )
    return history


def test_full_objective_is_finite_and_vl_loss_decreases():
    torch.manual_seed(0)
    history = _train(UniMedIForPreTraining(pretraining_config()).train(), mixed_batch(3, 3, seed=1), lr=2e-3, steps=20)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert history[-1]["vl_loss"] < 0.5 * history[0]["vl_loss"]


@pytest.mark.parametrize("component", ["icl_loss", "pcl_loss"])
def test_self_distillation_losses_decrease_towards_a_fixed_teacher(component):
    """With the teacher and centres frozen (momentum 1), minimising L_icl or L_pcl alone must pull the masked
    student towards the full-view teacher. (Under the real EMA/centering dynamics on a 6-sample batch the DINO losses
    drift towards log(K) as the centre absorbs the batch mean, which is DINO's anti-collapse mechanism, not a bug.)"""
    weights = {"vl_loss_weight": 0.0, "icl_loss_weight": 0.0, "pcl_loss_weight": 0.0, component + "_weight": 1.0}
    config = pretraining_config(ema_momentum=1.0, center_momentum=1.0, **weights)
    torch.manual_seed(0)
    history = _train(UniMedIForPreTraining(config).train(), mixed_batch(3, 2, seed=1), lr=1e-4, steps=20)
    assert history[-1][component] < history[0][component] - 0.02, [round(h[component], 3) for h in history]


@pytest.mark.parametrize("setting", ["vl", "vl+sd", "vl+sd+attn"])
def test_ablation_settings_run(setting):
    torch.manual_seed(0)
    model = UniMedIForPreTraining(pretraining_config(setting)).train()
    out = model(**mixed_batch())
    out.loss.backward()
    has_teacher = "backbone" in model.teacher
    assert has_teacher == (setting != "vl")
    assert (out.icl_loss is None) == (setting == "vl")
    assert (out.slab_scores is None) == (setting != "vl+sd+attn")
    assert out.selected_slabs.shape == (2, 2)
    assert (out.image_keep_mask is None) == (setting == "vl")
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("num_images, num_volumes", [(3, 0), (0, 3)])
def test_single_modality_batches_give_every_parameter_a_gradient(model, num_images, num_volumes):
    out = model(**mixed_batch(num_images, num_volumes))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_save_pretraining_then_load_inference_model(model, tmp_path):
    model.save_pretrained(tmp_path)
    inference = UniMedIModel.from_pretrained(tmp_path).eval()
    assert not any(k.startswith(("teacher", "cls_head", "patch_head")) for k in inference.state_dict())
    student = model.unimedi.state_dict()
    assert all(torch.equal(v, student[k]) for k, v in inference.state_dict().items())  # the same weights, bit for bit
    model.eval()
    pixels, volumes = torch.rand(2, 3, 32, 32), torch.rand(1, 1, 16, 32, 32)
    with torch.inference_mode():  # oneDNN may pick other kernels for other allocations: equal to float rounding
        for get, inputs in (("get_image_features", pixels), ("get_volume_features", volumes)):
            ours = getattr(model.unimedi, get)(inputs).pooler_output
            assert torch.allclose(ours, getattr(inference, get)(inputs).pooler_output, atol=1e-6)
    resumed = UniMedIForPreTraining.from_pretrained(tmp_path)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, dict(resumed.named_buffers())[name]), name


def test_pretraining_from_an_inference_checkpoint_copies_student_into_teacher(tmp_path):
    torch.manual_seed(0)
    UniMedIModel(pretraining_config()).save_pretrained(tmp_path)
    model = UniMedIForPreTraining.from_pretrained(tmp_path)
    student = model.unimedi.vision_model.state_dict()
    assert all(torch.equal(v, student[k]) for k, v in model.teacher["backbone"].state_dict().items())


# ---------------------------------------------------------------- two processes, one modality each


def _ddp_worker(rank, world_size, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = UniMedIForPreTraining(pretraining_config())
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
    inputs = mixed_batch(2, 0, seed=rank) if rank == 0 else mixed_batch(0, 2, seed=rank)
    for _ in range(3):
        out = ddp(**inputs)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.update_teacher(schedules.ema_momentum(model.config, int(model.num_teacher_updates), 10))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_with_one_modality_per_rank(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for name in rank0:  # gradients were all-reduced, DINO centres all-reduced: replicas stay identical
        assert torch.allclose(rank0[name].float(), rank1[name].float(), atol=1e-6), name
