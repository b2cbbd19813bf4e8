"""UniMedIConfig / UniMedIVisionModel / UniMedIModel on tiny configs (and one full-size forward)."""

import re

import pytest
import torch
from huggingface_hub.dataclasses import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from tiny_configs import TINY_VISION, tiny_config

from modeling_unimedi import (
    UniMedIConfig,
    UniMedIModel,
    UniMedITextModelWithProjection,
    UniMedIVisionConfig,
    UniMedIVisionModel,
    UniMedIVisionModelWithProjection,
)
from modeling_unimedi.modeling_unimedi import interpolate_position_embedding


def batch(num_images=2, num_volumes=3, seq_len=10, seed=0, config=None):
    config = config or tiny_config()
    vision = config.vision_config
    g = torch.Generator().manual_seed(seed)
    n = num_images + num_volumes
    inputs = {
        "input_ids": torch.randint(1, config.text_config.vocab_size, (n, seq_len), generator=g),
        "attention_mask": torch.ones(n, seq_len, dtype=torch.long),
    }
    if num_images:
        inputs["pixel_values"] = torch.rand(
            num_images, vision.num_channels, vision.image_size, vision.image_size, generator=g
        )
    if num_volumes:
        inputs["volume_values"] = torch.rand(num_volumes, vision.volume_channels, *vision.volume_size, generator=g)
    return inputs


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UniMedIModel(tiny_config()).eval()


# ---------------------------------------------------------------- config


def test_config_defaults_are_vit_b16_and_bioclinicalbert():
    config = UniMedIConfig()
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert vision.num_image_patches == 196
    assert vision.num_volume_patches == 512  # 32x128x128 with 4x16x16 patches, as the authors' rebuttal states
    assert config.text_config.model_type == "bert" and config.text_config.vocab_size == 28996


def test_config_round_trip(tmp_path):
    config = tiny_config(projection_dim=24, logit_scale_init_value=1.5)
    config.save_pretrained(tmp_path)
    loaded = UniMedIConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.vision_config.volume_size == (8, 32, 32)
    assert type(loaded.text_config).__name__ == "BertConfig"


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(volume_size=(30, 128, 128)), "volume_size D=30 is not divisible"),
        (dict(image_size=100), "image_size \\(100\\) is not divisible"),
        (dict(hidden_size=100), "not a multiple of num_attention_heads"),
        (dict(volume_size=(32, 128)), "volume_size"),
        (dict(patch_embedding="conv"), "patch_embedding must be one of"),
        (dict(patch_embedding="conv_stem", patch_size=14, image_size=224), "power-of-two patch_size"),
        (dict(patch_embedding="conv_stem", volume_patch_size=(3, 16, 16), volume_size=(30, 128, 128)), "power-of-two"),
    ],
)
def test_vision_config_validation(bad, message):
    with pytest.raises((StrictDataclassClassValidationError, StrictDataclassFieldValidationError), match=message):
        UniMedIVisionConfig(**bad)


def test_config_type_validation():
    with pytest.raises(StrictDataclassFieldValidationError):
        UniMedIVisionConfig(hidden_size="768")


# ---------------------------------------------------------------- forward


def test_mixed_batch_forward(model):
    inputs = batch(2, 3)
    out = model(**inputs, return_loss=True)
    assert out.logits_per_image.shape == (5, 5) and out.logits_per_text.shape == (5, 5)
    assert (
        out.image_embeds.shape == (2, 16) and out.volume_embeds.shape == (3, 16) and out.text_embeds.shape == (5, 16)
    )
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.logits_per_image.dtype == torch.float32
    # rows are X-rays then volumes: the volume rows equal the volume-only features' similarities
    volume_only = model.get_volume_features(inputs["volume_values"]).pooler_output
    assert torch.allclose(torch.nn.functional.normalize(volume_only, dim=-1), out.volume_embeds, atol=1e-5)


@pytest.mark.parametrize("num_images, num_volumes", [(3, 0), (0, 3)])
def test_single_modality_batches(model, num_images, num_volumes):
    out = model(**batch(num_images, num_volumes), return_loss=True)
    assert out.logits_per_image.shape == (3, 3)
    assert (out.image_embeds is None) == (num_images == 0)
    assert (out.volume_embeds is None) == (num_volumes == 0)


def test_vision_token_layout(model):
    vision = model.vision_model
    volume = torch.rand(2, 1, 8, 32, 32)
    slices = torch.rand(2, 3, 3, 32, 32)  # 3 pseudo-2D images per CT
    assert vision(pixel_values=slices[:, 0]).last_hidden_state.shape == (2, 1 + 4, 32)
    assert vision(volume_values=volume).last_hidden_state.shape == (2, 1 + 8, 32)
    combined = vision(volume_values=volume, pixel_values=slices).last_hidden_state
    assert combined.shape == (2, 1 + 8 + 3 * 4, 32)
    # the 2D tokens of one sample change the [CLS] of that sample only
    other = slices.clone()
    other[1] = torch.rand(3, 3, 32, 32)
    changed = vision(volume_values=volume, pixel_values=other).pooler_output
    assert torch.allclose(changed[0], combined[0, 0], atol=1e-5)
    assert not torch.allclose(changed[1], combined[1, 0], atol=1e-3)


def test_keep_token_indices_drops_tokens(model):
    vision = model.vision_model
    volume = torch.rand(2, 1, 8, 32, 32)
    keep = torch.tensor([[0, 3, 5], [1, 2, 7]])
    kept = vision(volume_values=volume, keep_token_indices=keep)
    assert kept.last_hidden_state.shape == (2, 4, 32)
    # same as feeding only those tokens (positions included) by hand
    tokens = vision.embed_patches(volume_values=volume)
    picked = torch.stack([tokens[i, keep[i]] for i in range(2)])
    hidden = torch.cat([vision.cls_token.expand(2, -1, -1), picked], dim=1)
    hidden, _ = vision.encoder(hidden)
    assert torch.allclose(vision.post_layernorm(hidden), kept.last_hidden_state, atol=1e-5)


def test_loss_decreases_on_a_fixed_tiny_batch():
    torch.manual_seed(0)
    model = UniMedIModel(tiny_config()).train()
    inputs = batch(3, 3, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = model(**inputs, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_every_parameter_gets_a_gradient_from_a_mixed_batch(model):
    model.train()
    model(**batch(2, 2), return_loss=True).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = UniMedIModel(tiny_config()).train()
    inputs = batch(2, 2)
    model(**inputs, return_loss=True).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.vision_model.encoder.layers[0].gradient_checkpointing
    model(**inputs, return_loss=True).loss.backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, reference[name], atol=1e-6), name


# ---------------------------------------------------------------- attention


def test_sdpa_matches_eager():
    torch.manual_seed(0)
    sdpa = UniMedIModel(tiny_config()).eval()
    eager = UniMedIModel(tiny_config()).eval()
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_implementation("eager")
    assert sdpa.config.vision_config._attn_implementation == "sdpa"
    assert eager.config.vision_config._attn_implementation == "eager"
    inputs = batch(2, 2)
    assert torch.allclose(sdpa(**inputs).logits_per_image, eager(**inputs).logits_per_image, atol=1e-5)


def test_eq1_cls_attention_equals_eager_attention_cls_row():
    torch.manual_seed(0)
    model = UniMedIVisionModel(UniMedIVisionConfig(**TINY_VISION)).eval()
    volume, slices = torch.rand(2, 1, 8, 32, 32), torch.rand(2, 2, 3, 32, 32)
    fast = model(volume_values=volume, pixel_values=slices, output_cls_attention=True).cls_attention
    model.set_attn_implementation("eager")
    eager = model(volume_values=volume, pixel_values=slices, output_attentions=True)
    cls_rows = torch.stack(eager.attentions)[:, :, :, 0, 1:]  # (layers, B, heads, patches): [CLS] query, patch keys
    reference = (cls_rows / cls_rows.sum(dim=-1, keepdim=True)).mean(dim=(0, 2))  # Eq. 1: softmax over patch keys
    assert fast.shape == (2, 8 + 2 * 4)
    assert torch.allclose(fast, reference, atol=1e-5)


# ---------------------------------------------------------------- positions and errors


def test_position_embedding_interpolation_for_16x96x96_volume(model):
    vision = model.vision_model
    out = vision(volume_values=torch.rand(1, 1, 16, 96, 96))
    assert out.last_hidden_state.shape == (1, 1 + 4 * 6 * 6, 32)
    # trilinear resizing reproduces a table that is linear in (d, h, w) exactly at the new token centres
    d, h, w = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), torch.arange(8.0), indexing="ij")
    table = torch.stack([d, h, w], dim=-1).reshape(1, 512, 3)
    resized = interpolate_position_embedding(table, (8, 8, 8), (4, 4, 4)).reshape(4, 4, 4, 3)
    assert torch.allclose(resized[1, 2, 3], torch.tensor([2.5, 4.5, 6.5]))


def test_clear_input_errors(model):
    with pytest.raises(ValueError, match="rank 4"):
        model.get_image_features(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="rank 5"):
        model.get_volume_features(torch.rand(1, 8, 32, 32))
    with pytest.raises(ValueError, match="3 channel"):
        model.get_image_features(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model.get_volume_features(torch.rand(1, 1, 10, 32, 32))
    with pytest.raises(ValueError, match="one volume per sample"):
        model.vision_model(volume_values=torch.rand(2, 1, 8, 32, 32), pixel_values=torch.rand(3, 1, 3, 32, 32))


def test_scores_any_numbers_of_samples_and_texts_as_clip(model):
    """Without `return_loss`, 2 X-rays + 2 CTs against 3 texts: a (4, 3) score matrix equal to the embeddings'."""
    inputs = batch(2, 2)
    inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:3], inputs["attention_mask"][:3]
    with torch.no_grad():
        output = model(**inputs)
        images = model.get_image_features(inputs["pixel_values"]).pooler_output
        volumes = model.get_volume_features(inputs["volume_values"]).pooler_output
        texts = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
    vision = torch.nn.functional.normalize(torch.cat([images, volumes]), dim=-1)
    expected = model.logit_scale.exp() * vision @ torch.nn.functional.normalize(texts, dim=-1).t()
    assert output.logits_per_image.shape == (4, 3) and output.logits_per_text.shape == (3, 4)
    assert torch.allclose(output.logits_per_image, expected, atol=1e-5)
    assert torch.allclose(output.logits_per_image.softmax(dim=1).sum(dim=1), torch.ones(4))


def test_loss_needs_one_report_per_sample(model):
    inputs = batch(2, 2)
    inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:3], inputs["attention_mask"][:3]
    with pytest.raises(ValueError, match=r"one report per sample .* got 4 X-ray\(s\)/volume\(s\) and 3 report"):
        model(**inputs, return_loss=True)


# ---------------------------------------------------------------- weights


def test_init_weights_covers_custom_parameters():
    config = tiny_config(logit_scale_init_value=1.25)
    model = UniMedIModel(config)
    vision = model.vision_model
    for param in (
        vision.cls_token,
        vision.image_embeddings.position_embedding,
        vision.volume_embeddings.position_embedding,
    ):
        assert 0.01 < param.std().item() < 0.03  # trunc-normal(0.02), not the zeros the module was built with
    assert model.logit_scale.item() == pytest.approx(1.25)


def test_missing_custom_parameter_is_initialised_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    UniMedIModel(tiny_config()).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["vision_model.cls_token"], state["logit_scale"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = UniMedIModel.from_pretrained(tmp_path)
    assert 0.01 < loaded.vision_model.cls_token.std().item() < 0.03
    assert loaded.logit_scale.item() == pytest.approx(loaded.config.logit_scale_init_value)


def test_towers_load_their_part_of_a_full_checkpoint(model, tmp_path):
    """As CLIPVisionModelWithProjection / CLIPTextModelWithProjection: same embeddings as the full model's."""
    model.save_pretrained(tmp_path)
    inputs = batch(2, 1)
    vision = UniMedIVisionModelWithProjection.from_pretrained(tmp_path).eval()
    text = UniMedITextModelWithProjection.from_pretrained(tmp_path).eval()
    encoder = UniMedIVisionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(
            vision(pixel_values=inputs["pixel_values"]).image_embeds,
            model.get_image_features(inputs["pixel_values"]).pooler_output,
            atol=1e-6,
        )
        assert torch.allclose(
            vision(volume_values=inputs["volume_values"]).image_embeds,
            model.get_volume_features(inputs["volume_values"]).pooler_output,
            atol=1e-6,
        )
        assert torch.allclose(
            text(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).text_embeds,
            model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output,
            atol=1e-6,
        )
        assert torch.allclose(
            encoder(pixel_values=inputs["pixel_values"]).pooler_output,
            model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output,
            atol=1e-6,
        )


def test_checkpoint_that_does_not_fit_raises(model, tmp_path):
    UniMedITextModelWithProjection(model.config).save_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match=r"its weights do not fit UniMedIVisionModelWithProjection: \d+ of the model"):
        UniMedIVisionModelWithProjection.from_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match="do not fit UniMedIVisionModel: 33 of the model's weights"):
        UniMedIVisionModel.from_pretrained(tmp_path / "text")


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_safetensors_raise_naming_the_folder(model, tmp_path, damage):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(
        OSError, match=f"{re.escape(str(tmp_path))}: cannot read its safetensors weights .*truncated or damaged"
    ):
        UniMedIModel.from_pretrained(tmp_path)


def test_save_and_load_gives_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = UniMedIModel.from_pretrained(tmp_path).eval()
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    inputs = batch(1, 2)
    assert torch.allclose(model(**inputs).logits_per_image, loaded(**inputs).logits_per_image, atol=1e-6)


def test_full_size_model_runs_one_mixed_forward():
    """ViT-B/16 + BERT-base (BioClinicalBERT architecture), random weights: one X-ray, one CT, two reports."""
    config = UniMedIConfig()
    model = UniMedIModel(config).eval()
    num_params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.vision_model.parameters())
    text = sum(p.numel() for p in model.text_model.parameters())
    assert num_params == vision + text + (768 + 768) * 512 + 1
    with torch.inference_mode():
        out = model(
            input_ids=torch.randint(1000, 2000, (2, 64)),
            attention_mask=torch.ones(2, 64, dtype=torch.long),
            pixel_values=torch.rand(1, 3, 224, 224),
            volume_values=torch.rand(1, 1, 32, 128, 128),
        )
    assert out.logits_per_image.shape == (2, 2)
    print(f"full-size UniMedIModel parameters: {num_params:,} (vision {vision:,}, text {text:,})")


# ---------------------------------------------------------------- convolutional stem


@pytest.fixture
def conv_stem_model():
    torch.manual_seed(0)
    config = tiny_config(vision_config=dict(TINY_VISION, patch_embedding="conv_stem", volume_patch_size=(2, 16, 16)))
    return UniMedIModel(config)


def test_conv_stem_makes_the_linear_patchify_token_grid(conv_stem_model):
    vision = conv_stem_model.vision_model
    stem = vision.volume_embeddings.projection
    strides = [layer.stride for layer in stem if isinstance(layer, torch.nn.Conv3d)]
    assert strides == [(2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2), (1, 1, 1)]  # 2x16x16 patches, then the 1x1
    # each volume token sees its own depth slab only (Eq. 2 averages attention per slab): change slab 0, slab 1 stays
    volume = torch.rand(1, 1, 8, 32, 32)
    vision.eval()
    before = vision.volume_embeddings(volume)
    volume[:, :, :2] += 1
    after = vision.volume_embeddings(volume).unflatten(1, (4, 4))
    assert not torch.allclose(before.unflatten(1, (4, 4))[:, 0], after[:, 0])
    assert torch.allclose(before.unflatten(1, (4, 4))[:, 1:], after[:, 1:])
    assert vision(pixel_values=torch.rand(2, 3, 32, 32)).last_hidden_state.shape == (2, 1 + 4, 32)
    assert vision(volume_values=torch.rand(2, 1, 8, 32, 32)).last_hidden_state.shape == (2, 1 + 16, 32)
    # a token sees its patch's neighbourhood only (receptive field 31 pixels): the corner pixel is outside the far one's
    image = torch.rand(1, 3, 32, 32)
    before = vision.image_embeddings(image)
    image[..., 0, 0] += 1
    after = vision.image_embeddings(image)
    assert not torch.allclose(before[:, 0], after[:, 0]) and torch.allclose(before[:, 3], after[:, 3])


def test_conv_stem_trains_and_round_trips_with_its_batch_statistics(conv_stem_model, tmp_path):
    optimizer = torch.optim.AdamW(conv_stem_model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = conv_stem_model(**batch(2, 2), return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    norm = conv_stem_model.vision_model.image_embeddings.projection[1]
    assert norm.num_batches_tracked.item() == 2 and norm.running_mean.abs().sum() > 0
    conv_stem_model.eval().save_pretrained(tmp_path)
    loaded = UniMedIModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.vision_model.image_embeddings.projection[1].running_var, norm.running_var)
    inputs = batch(1, 2)
    assert torch.allclose(conv_stem_model(**inputs).logits_per_image, loaded(**inputs).logits_per_image, atol=1e-6)
