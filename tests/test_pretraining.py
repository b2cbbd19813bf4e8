"""UniMedIForPreTraining on tiny configs: slice selection, masking, EMA teacher, losses, ablations, DDP, saving."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
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
    cls_rows = torch.stack(attentions)[:, :, :, 0, 1:]  # [CLS] query over the patch keys
    cls_row = (cls_rows / cls_rows.sum(dim=-1, keepdim=True)).mean(dim=(0, 2))  # (B, 16 tokens): 4 slabs x 2x2
    expected = cls_row.reshape(2, 4, 4).mean(dim=-1)
    assert torch.allclose(out.slab_scores, expected, atol=1e-5)
    assert torch.equal(out.selected_slabs, expected.topk(2).indices)
    with torch.no_grad():  # the public Eq. 1-2 method that selection (and evaluation) call
        assert torch.allclose(teacher.slab_scores(inputs["volume_values"]), expected, atol=1e-5)


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
    inference, info = UniMedIModel.from_pretrained(tmp_path, output_loading_info=True)
    inference.eval()
    assert info["missing_keys"] == set()
    left_out = ("student.", "teacher.", "cls_center", "patch_center", "volume_", "num_teacher_updates")
    assert info["unexpected_keys"] and all(key.startswith(left_out) for key in info["unexpected_keys"])
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


def test_state_dict_holds_the_student_backbone_once(model):
    state = model.state_dict()
    prefixes = {
        key.split(".")[0] + "." + key.split(".")[1] for key in state if key.startswith(("student.", "teacher."))
    }
    assert prefixes == {
        "student.cls_head",
        "student.patch_head",
        "student.patch_predictor",
        "teacher.backbone",
        "teacher.cls_head",
        "teacher.patch_head",
    }
    assert len({tensor.data_ptr() for tensor in state.values()}) == len(state)  # no module registered twice


def _legacy_layout(state: dict) -> dict:
    """The state dict as checkpoints saved it before `student`/`teacher` (three `teacher_*` attributes)."""
    renames = {"teacher.backbone.": "teacher_vision_model.", "teacher.": "teacher_", "student.": ""}
    old = {}
    for key, value in state.items():
        if key.startswith("student.patch_predictor."):  # added with patch recovery, after that layout
            continue
        new_prefix = next((prefix for prefix in renames if key.startswith(prefix)), None)
        if new_prefix is not None:
            key = renames[new_prefix] + key[len(new_prefix) :]
        old[key] = value.clone()
    return old


def test_checkpoints_in_the_old_layout_still_load(model, tmp_path):
    from safetensors.torch import save_file

    with torch.no_grad():  # a teacher and centres that differ from a fresh copy of the student
        for param in model.teacher.parameters():
            param.add_(torch.randn_like(param))
        model.cls_center.normal_()
    model.num_teacher_updates.fill_(7)
    expected = model.state_dict()
    old = _legacy_layout(expected)
    assert {"teacher_vision_model", "teacher_cls_head", "teacher_patch_head", "cls_head", "patch_head"} <= {
        key.split(".")[0] for key in old
    }
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = UniMedIForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    predictor_keys = {key for key in expected if key.startswith("student.patch_predictor.")}
    assert predictor_keys and info["missing_keys"] == predictor_keys and info["unexpected_keys"] == set()
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in expected.items() if key in old_keys(old))
    # resuming a training checkpoint goes through `load_state_dict` (accelerate), not `from_pretrained`
    resumed = UniMedIForPreTraining(model.config)
    result = resumed.load_state_dict(old, strict=False)
    assert set(result.missing_keys) == predictor_keys and result.unexpected_keys == []
    assert all(torch.equal(value, resumed.state_dict()[key]) for key, value in expected.items() if key in old_keys(old))


def old_keys(old: dict) -> set[str]:
    """The new-layout names of a legacy state dict's keys."""
    from modeling_unimedi.pretraining_unimedi import rename_legacy_key

    return {rename_legacy_key(key) for key in old}


def test_teacher_temperature_comes_from_the_caller(model):
    model.eval()  # no centre update between the calls
    inputs = mixed_batch(seed=2)
    default = model(**inputs)
    explicit = model(**inputs, teacher_temperature=model.config.teacher_temperature)
    sharper = model(**inputs, teacher_temperature=0.01)
    assert torch.equal(default.icl_loss, explicit.icl_loss) and torch.equal(default.pcl_loss, explicit.pcl_loss)
    assert not torch.isclose(sharper.icl_loss, default.icl_loss)
    assert torch.equal(sharper.vl_loss, default.vl_loss)


def test_schedules_follow_dino():
    config = pretraining_config(
        ema_momentum=0.99,
        teacher_temperature=0.07,
        teacher_temperature_warmup=0.04,
        teacher_temperature_warmup_steps=10,
    )
    momenta = [schedules.ema_momentum(config, step, 100) for step in (0, 50, 100, 150)]
    assert momenta == pytest.approx([0.99, 0.995, 1.0, 1.0])
    temperatures = [schedules.teacher_temperature(config, step) for step in (0, 5, 10, 20)]
    assert temperatures == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert schedules.teacher_temperature(pretraining_config(teacher_temperature_warmup_steps=0), 0) == 0.07


def test_report_count_is_checked_as_in_the_inference_model(model):
    inputs = mixed_batch(2, 1)
    with pytest.raises(ValueError, match=r"one report per sample .* got 3 X-ray\(s\)/volume\(s\) and 2 report\(s\)"):
        model(**{**inputs, "input_ids": inputs["input_ids"][:2]})
    with pytest.raises(ValueError, match="`pixel_values`, `volume_values` or both"):
        model(input_ids=inputs["input_ids"])


def test_centres_update_as_an_explicit_training_step(model):
    inputs = mixed_batch()
    model.eval()
    model(**inputs)
    assert not model.cls_center.any() and not model.patch_center.any()  # evaluation leaves the centres alone
    model.train()
    model(**inputs)
    assert model.cls_center.any() and model.patch_center.any()


def test_each_modality_has_its_own_dino_centres(model):
    """`cls_center` follows the X-rays' teacher outputs, `volume_cls_center` the CTs': a CT-only batch moves only the
    CT centres."""
    model.train()
    model(**mixed_batch(0, 2))
    assert not model.cls_center.any() and not model.patch_center.any()
    assert model.volume_cls_center.any() and model.volume_patch_center.any()
    ct_center = model.volume_cls_center.clone()
    model(**mixed_batch(2, 0))
    assert model.cls_center.any() and torch.equal(model.volume_cls_center, ct_center)


def test_a_shared_centre_of_older_checkpoints_loads(model, tmp_path):
    """Older runs had one centre for both modalities: resuming (`load_state_dict`) starts the CT centres from it,
    `from_pretrained` loads it by name and starts the missing CT centres from zero."""
    state = model.state_dict()
    old = torch.randn_like(state["cls_center"])
    state["cls_center"] = old
    del state["volume_cls_center"], state["volume_patch_center"]
    model.load_state_dict(state)
    assert torch.equal(model.cls_center, old) and torch.equal(model.volume_cls_center, old)
    model.save_pretrained(tmp_path)
    save_file(
        {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if not k.startswith("volume_")},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    loaded = UniMedIForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(loaded.cls_center, old) and not loaded.volume_cls_center.any()


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
