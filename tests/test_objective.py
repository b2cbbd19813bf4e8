"""The objective as the paper states it (issue 11): L_pcl at the masked positions, Table 7's rows, per-modality masking,
Eq. 1 over the patch keys, DINO/CLIP stabilisers."""

import math

import numpy as np
import pytest
import torch
from test_pretraining import mixed_batch, pretraining_config
from tiny_configs import TINY_VISION

from modeling_unimedi import UniMedIConfig, UniMedIForPreTraining, UniMedIVisionConfig, UniMedIVisionModel
from modeling_unimedi.configuration_unimedi import ABLATION_SETTINGS


def build(**overrides) -> UniMedIForPreTraining:
    torch.manual_seed(0)
    return UniMedIForPreTraining(pretraining_config(**overrides)).train()


# ---------------------------------------------------------------- Eq. 1


def test_eq1_is_softmax_over_patch_keys_of_the_eager_logits_averaged():
    torch.manual_seed(0)
    model = UniMedIVisionModel(UniMedIVisionConfig(**TINY_VISION)).eval()
    volume, slices = torch.rand(2, 1, 8, 32, 32), torch.rand(2, 2, 3, 32, 32)
    fast = model(volume_values=volume, pixel_values=slices, output_cls_attention=True).cls_attention
    logits = []  # the eager attention's own q.k^T / sqrt(d), captured from each layer's input
    hooks = [
        layer.attention.register_forward_hook(
            lambda module, args, kwargs, out: logits.append(cls_logits(module, args[0])), with_kwargs=True
        )
        for layer in model.encoder.layers
    ]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        model(volume_values=volume, pixel_values=slices)
    for hook in hooks:
        hook.remove()
    expected = torch.stack([row[..., 1:].softmax(dim=-1) for row in logits]).mean(dim=(0, 2))  # layers, heads
    assert torch.allclose(fast, expected, atol=1e-6)
    including_cls = torch.stack([row.softmax(dim=-1)[..., 1:] for row in logits]).mean(dim=(0, 2))
    assert not torch.allclose(fast, including_cls, atol=1e-4)  # the old definition differs


def cls_logits(attention, hidden_states):
    batch, length, _ = hidden_states.shape
    qkv = attention.qkv(hidden_states).view(batch, length, 3, attention.num_heads, attention.head_dim)
    query, key = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    return (query[:, :, 0:1] @ key.transpose(-1, -2))[:, :, 0] * attention.scaling  # (B, heads, 1 + N)


# ---------------------------------------------------------------- Table 7


def test_table7_rows_switch_what_the_caption_says():
    assert ABLATION_SETTINGS["vl"] == dict(self_distillation=False, slice_selection="random", token_masking="none")
    assert ABLATION_SETTINGS["vl+sd"] == dict(
        self_distillation=True, slice_selection="random", token_masking="attentive"
    )
    assert ABLATION_SETTINGS["vl+sd+attn"] == dict(
        self_distillation=True, slice_selection="attentive", token_masking="attentive"
    )
    assert ABLATION_SETTINGS["vl+sd(random-mask)"]["token_masking"] == "random"
    with pytest.raises(ValueError, match="unknown ablation setting"):
        UniMedIConfig.for_ablation("vl+attn")


@pytest.mark.parametrize("setting", sorted(ABLATION_SETTINGS))
def test_each_row_runs_with_its_switches(setting, monkeypatch):
    model = UniMedIForPreTraining(pretraining_config(setting)).train()
    inputs, random_draws = mixed_batch(), []
    original_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: random_draws.append(a) or original_rand(*a, **k))
    out = model(**inputs)
    assert (out.slab_scores is None) == (setting != "vl+sd+attn")  # attentive selection only in the full method
    assert (out.icl_loss is None) == (setting == "vl")
    assert (out.image_keep_mask is None) == (setting == "vl")
    random_masking = setting == "vl+sd(random-mask)"
    random_selection = setting != "vl+sd+attn"
    # torch.rand draws (batch, num_slabs) for random selection and (batch, num_tokens) per branch for random masking
    assert len(random_draws) == random_selection + 2 * random_masking


# ---------------------------------------------------------------- masking per modality


@pytest.mark.parametrize("masking", ["attentive", "random"])
def test_both_modalities_keep_their_share(masking):
    model = build(token_masking=masking, mask_ratio=0.75)
    out = model(**mixed_batch(1, 2))
    num_3d, num_2d = 16, 2 * 4  # 4 slabs x 2x2 tokens; k=2 pseudo-images of 2x2 tokens
    mask = out.volume_keep_mask
    assert mask.shape == (2, num_3d + num_2d)
    assert mask[:, :num_3d].sum(dim=1).tolist() == [4, 4]  # 25% of the 3D tokens
    assert mask[:, num_3d:].sum(dim=1).tolist() == [2, 2]  # 25% of the slice tokens
    assert out.image_keep_mask.sum(dim=1).tolist() == [1]


def test_slice_tokens_survive_when_the_3d_tokens_draw_all_attention():
    model = build()
    scores = torch.cat([torch.ones(2, 16), torch.zeros(2, 8)], dim=1)  # a joint top-k would keep no slice token
    kept = model.tokens_to_keep(scores, [16, 8], 2, "cpu")
    assert ((kept >= 16).sum(dim=1) == 4).all()
    assert torch.equal(kept[:, :8], scores[:, :16].topk(8).indices.sort(dim=-1).values)


# ---------------------------------------------------------------- L_pcl recovers the masked tokens


@pytest.mark.parametrize("recovery", ["predictor", "mask_token"])
def test_pcl_is_taken_at_the_masked_positions(recovery):
    model = build(patch_recovery=recovery)
    inputs = mixed_batch(0, 2)
    branch, _, _ = model.forward_volumes(inputs["volume_values"])
    keep = branch.keep_mask()
    assert branch.pcl_positions.shape == (2, int((~keep[0]).sum()))
    for b in range(2):
        assert set(branch.pcl_positions[b].tolist()) == set((~keep[b]).nonzero().flatten().tolist())
    teacher_tokens = branch.teacher.last_hidden_state[:, 1:]
    expected = torch.stack([teacher_tokens[b, ~keep[b]] for b in range(2)])
    assert torch.equal(branch.teacher_patch_tokens(), expected)
    assert branch.student_patch_states().shape == expected.shape
    encoder_length = branch.student.last_hidden_state.shape[1] - 1
    assert encoder_length == (keep.shape[1] if recovery == "mask_token" else int(keep[0].sum()))


def test_pcl_on_kept_tokens_takes_every_position():
    model = build(pcl_on_kept_tokens=True)
    branch = model.forward_branch(pixel_values=mixed_batch(2, 0)["pixel_values"])
    assert branch.pcl_positions is None
    assert branch.student_patch_states().shape[1] == branch.num_tokens


@pytest.mark.parametrize("recovery", ["predictor", "mask_token"])
def test_masked_predictions_depend_on_the_kept_tokens_only(recovery):
    """The student's prediction for a masked position must not see that position's pixels (it is recovered)."""
    model = build(patch_recovery=recovery, token_masking="random").eval()
    pixels = mixed_batch(1, 0)["pixel_values"]
    torch.manual_seed(1)
    branch = model.forward_branch(pixel_values=pixels)
    masked = (~branch.keep_mask()[0]).nonzero().flatten()
    row, col = divmod(int(masked[0]), 2)  # 2x2 tokens of 16x16 pixels
    changed = pixels.clone()
    changed[..., row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] += 5.0
    torch.manual_seed(1)
    again = model.forward_branch(pixel_values=changed)
    assert torch.equal(again.kept_tokens, branch.kept_tokens)
    assert torch.allclose(again.student_patch_states(), branch.student_patch_states(), atol=1e-6)


@pytest.mark.parametrize("recovery", ["predictor", "mask_token"])
def test_every_parameter_gets_a_gradient_with_each_recovery(recovery):
    model = build(patch_recovery=recovery)
    model(**mixed_batch()).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    recovery_module = model.student["patch_predictor" if recovery == "predictor" else "mask_token"]
    assert any(p.grad.abs().sum() > 0 for p in recovery_module.parameters())


# ---------------------------------------------------------------- stabilisers


def test_prototypes_get_no_update_during_the_freeze_and_do_after():
    model = build(prototype_freeze_steps=1)
    model(**mixed_batch()).loss.backward()
    for head in ("cls_head", "patch_head"):
        assert model.student[head].prototypes.weight.grad.abs().max() == 0
        assert model.student[head].mlp[0].weight.grad.abs().max() > 0
    model.zero_grad()
    model.update_teacher(0.99)  # one optimizer step done: the freeze is over
    model(**mixed_batch()).loss.backward()
    assert model.student["patch_head"].prototypes.weight.grad.abs().max() > 0


def test_logit_scale_is_clamped_at_100():
    model = build()
    with torch.no_grad():
        model.unimedi.logit_scale.fill_(math.log(1000.0))
    model(**mixed_batch())
    assert math.isclose(model.unimedi.logit_scale.exp().item(), 100.0, rel_tol=1e-5)


def test_stabilisers_are_on_by_default():
    config = UniMedIConfig()
    assert config.teacher_temperature_warmup_steps > 0 and config.prototype_freeze_steps > 0
    assert config.max_logit_scale == 100.0


# ---------------------------------------------------------------- slices are slices


def test_native_slab_image_is_the_mean_of_the_slabs_native_slices_of_the_real_ct(ct_nifti_path):
    from modeling_unimedi.loading_unimedi import load_ct
    from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

    ct = load_ct(ct_nifti_path)
    depth = ct.hu.shape[0]  # 133 slices: 16 or 17 per slab
    images = UniMedIVolumeProcessor().native_slab_images(ct, num_slabs=8, image_size=224)  # "mean", the default
    assert images.shape == (8, 224, 224)
    centres = np.arange(depth) + 0.5
    members = [(slab * depth / 8 <= centres) & (centres < (slab + 1) * depth / 8) for slab in range(8)]
    assert np.array_equal(np.sum(members, axis=0), np.ones(depth))  # every native slice in exactly one slab
    for slab, member in enumerate(members):
        assert member.sum() in (16, 17)
        mean = torch.from_numpy(ct.hu[member].astype("float64").mean(axis=0).astype("float32"))[None, None]
        expected = torch.nn.functional.adaptive_avg_pool2d(mean, 224)[0, 0]  # 512 -> 224, every pixel counts
        assert torch.allclose(torch.from_numpy(images[slab]), expected, atol=1e-2)
    central = UniMedIVolumeProcessor(slab_image_reduction="central").native_slab_images(ct, 8, 224)
    assert np.abs(images - central).mean() > 10  # 16 slices of 2.5 mm average out what one slice shows


def test_native_slab_image_is_the_central_native_slice_of_the_real_ct(ct_nifti_path):
    from modeling_unimedi.loading_unimedi import load_ct
    from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

    ct = load_ct(ct_nifti_path)
    depth = ct.hu.shape[0]
    images = UniMedIVolumeProcessor(slab_image_reduction="central").native_slab_images(ct, num_slabs=8, image_size=224)
    assert images.shape == (8, 224, 224)
    for slab in (0, 3, 7):
        central = int((slab + 0.5) * depth / 8)
        assert slab * depth / 8 <= central < (slab + 1) * depth / 8  # inside the slab's native range
        native = torch.from_numpy(ct.hu[central].astype("float32"))[None, None]
        expected = torch.nn.functional.adaptive_avg_pool2d(native, 224)[0, 0]  # 512 -> 224, every pixel counts
        assert torch.allclose(torch.from_numpy(images[slab]), expected, atol=1e-2)


def test_pretraining_feeds_the_selected_slabs_native_images(ct_nifti_path, monkeypatch):
    from modeling_unimedi.loading_unimedi import load_ct
    from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

    processor = UniMedIVolumeProcessor(volume_size=(16, 32, 32))
    ct = load_ct(ct_nifti_path)
    native = processor.native_slab_images(ct, num_slabs=4, image_size=224)
    batch = processor.window_with_slab_images([processor.resample_to_grid(ct)] * 2, [native] * 2)
    model = build(pseudo_image_source="native", vision_config=dict(TINY_VISION, volume_size=(16, 32, 32), image_size=224))
    seen = []
    forward_branch = model.forward_branch
    monkeypatch.setattr(model, "forward_branch", lambda **kw: seen.append(kw["pixel_values"]) or forward_branch(**kw))
    inputs = mixed_batch(0, 2)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **batch)
    low, high = processor.hu_window
    for b in range(2):
        for j, slab in enumerate(out.selected_slabs[b].tolist()):
            expected = (torch.from_numpy(native[slab]) - low) / (high - low)
            assert torch.allclose(seen[0][b, j, 0], expected.clamp(0, 1) * 2 - 1, atol=1e-5)
    with pytest.raises(ValueError, match="pseudo_image_source='native' needs `slab_images`"):
        model(**inputs)


def test_training_flips_move_a_volume_and_its_slab_images_together():
    from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

    processor = UniMedIVolumeProcessor(volume_size=(4, 8, 8), flip_axes=(0, 2), flip_probability=1.0)
    grid = torch.arange(4 * 8 * 8, dtype=torch.float32).reshape(4, 8, 8) - 100
    images = torch.arange(4 * 6 * 6, dtype=torch.float32).reshape(4, 6, 6) * 5 - 300
    plain = processor.window_with_slab_images([grid], [images.numpy()])
    flipped = processor.window_with_slab_images([grid], [images.numpy()], training=True)
    assert torch.equal(flipped["volume_values"], plain["volume_values"].flip([2, 4]))
    assert torch.equal(flipped["slab_images"], plain["slab_images"].flip([1, 4]))  # slab order and columns
    with pytest.raises(ValueError, match="slab_images: need one"):
        processor.window_with_slab_images([grid, grid], [images.numpy()])


def test_generated_slab_images_are_the_means_of_the_scanned_slabs_native_slices():
    """Identity pose and a plain look over the case's scan range: a stored slab image is the mean of the scanned
    working CT's native slices whose centres lie in that slab's depth range, resized in-plane to the 2D input size."""
    import dataclasses

    from processing.groundtruth.drr import Pose
    from processing.groundtruth.generator import CTLook, GroundTruthConfig, GroundTruthGenerator
    from processing.groundtruth.lesions import insert_lesions
    from processing.schema import decode_slab_images

    generator = GroundTruthGenerator(GroundTruthConfig(num_xrays=0, num_cts=4))
    case = generator.case("ct", 0)
    look = CTLook(scan_start=case.look.scan_start, scan_stop=case.look.scan_stop)
    plain = dataclasses.replace(case, pose=Pose(), look=look)
    scanned = np.rint(insert_lesions(generator.anatomy.hu, case.lesions)[look.scan_slices]).astype("float64")
    depth = scanned.shape[0]
    assert depth < generator.anatomy.shape[0]  # a partial scan range: its slabs are not the whole anatomy's
    images = generator.render_slab_images(plain, image_size=224)
    num_slabs = generator.config.volume_size[0] // generator.config.slab_depth
    assert images.shape == (num_slabs, 224, 224) and images.dtype == np.int16
    centres = np.arange(depth) + 0.5
    for slab in range(num_slabs):
        member = (slab * depth / num_slabs <= centres) & (centres < (slab + 1) * depth / num_slabs)
        assert member.sum() >= 2
        mean = torch.from_numpy(scanned[member].mean(axis=0).astype("float32"))[None, None]
        expected = torch.nn.functional.interpolate(mean, size=(224, 224), mode="bilinear")[0, 0].numpy()
        assert np.abs(images[slab] - expected).max() <= 1, slab
    record = generator.record(case)
    assert decode_slab_images(record).shape == (num_slabs, 224, 224)


def test_collator_passes_stored_slab_images_with_their_volumes():
    from tiny_configs import minilm_path
    from transformers import AutoTokenizer

    from modeling_unimedi import UniMedIImageProcessor, UniMedIProcessor, UniMedIVolumeProcessor
    from processing.schema import ct_record
    from training.data import PretrainCollator

    volume = np.full(TINY_VISION["volume_size"], -1000, dtype=np.int16)
    images = np.stack([np.full((6, 6), 200.0 * slab) for slab in range(2)])
    common = dict(source="test", split="train", report="clear lungs", volume=volume, spacing=(1.0, 1.0, 1.0))
    records = [ct_record(sample_id=f"ct{i}", **common, slab_images=images) for i in range(2)]
    processor = UniMedIProcessor(
        UniMedIImageProcessor(),
        AutoTokenizer.from_pretrained(minilm_path()),
        UniMedIVolumeProcessor(volume_size=TINY_VISION["volume_size"]),
    )
    inputs = PretrainCollator(processor, training=False)([], records)
    assert inputs["volume_values"].shape == (2, 1, *TINY_VISION["volume_size"])
    assert inputs["slab_images"].shape == (2, 2, 1, 6, 6)
    assert torch.allclose(inputs["slab_images"][:, 1], torch.full((2, 1, 6, 6), 0.2))  # 200 HU windowed to [-1, 1]
    without = PretrainCollator(processor, training=False)([], [ct_record(sample_id="plain", **common)])
    assert "slab_images" not in without


def test_volume_embedding_with_slices_feeds_the_top_slabs_pseudo_images():
    from tiny_configs import tiny_config

    from modeling_unimedi import UniMedIModel, UniMedIVisionModelWithProjection
    from modeling_unimedi.slices_unimedi import pseudo_images, top_k_indices

    torch.manual_seed(0)
    volumes, texts = torch.rand(2, 1, 8, 32, 32), torch.randint(0, 100, (2, 6))
    model = UniMedIModel(tiny_config(num_selected_slices=1, volume_embedding="volume_with_slices")).eval()
    with torch.no_grad():
        embedded = model.get_volume_features(volume_values=volumes).pooler_output
        slabs = top_k_indices(model.vision_model.slab_scores(volumes), 1)
        images = pseudo_images(model.config, volumes, slabs, None)
        expected = model.visual_projection(model.vision_model(volume_values=volumes, pixel_values=images).pooler_output)
        clip_volume_embeds = model(input_ids=texts, volume_values=volumes).volume_embeds
        tower = UniMedIVisionModelWithProjection(model.config).eval()
        tower.load_state_dict(model.state_dict(), strict=False)
        tower_embeds = tower(volume_values=volumes).image_embeds
        model.config.volume_embedding = "volume"
        volume_only = model.get_volume_features(volume_values=volumes).pooler_output
    assert images.shape == (2, 1, 3, 32, 32)
    torch.testing.assert_close(embedded, expected)
    torch.testing.assert_close(clip_volume_embeds, torch.nn.functional.normalize(expected, dim=-1))
    torch.testing.assert_close(tower_embeds, expected)
    assert not torch.allclose(volume_only, expected)
    with pytest.raises(ValueError, match="num_selected_slices > 0"):
        UniMedIModel(tiny_config(num_selected_slices=0, volume_embedding="volume_with_slices")).get_volume_features(
            volume_values=volumes
        )
