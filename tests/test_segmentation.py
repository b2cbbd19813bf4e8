"""UniMedIForSemanticSegmentation (SETR-PUP for X-rays, UNETR for CTs: shapes, losses, freezing, loading, Auto and
remote code) and the segmentation task of training.finetune."""

import json

import pytest
import torch
from huggingface_hub.dataclasses import StrictDataclassClassValidationError
from test_hub_and_conversion import run_without_package
from tiny_configs import tiny_config

from modeling_unimedi import UniMedIForPreTraining, UniMedIForSemanticSegmentation, UniMedIModel
from modeling_unimedi.segmentation_unimedi import segmentation_loss, stage_factors, unetr_skip_layers

XRAYS = torch.rand(2, 3, 32, 32)
VOLUMES = torch.rand(2, 1, 8, 32, 32)


def tiny_segmenter(num_labels=3, **overrides) -> UniMedIForSemanticSegmentation:
    torch.manual_seed(0)
    return UniMedIForSemanticSegmentation(tiny_config(num_labels=num_labels, **overrides))


def vision_state(vision_model) -> dict:
    return {key: value.clone() for key, value in vision_model.state_dict().items()}


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """An inference save and a pretraining save of tiny models, with their encoder weights."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    inference = UniMedIModel(tiny_config())
    inference.save_pretrained(root / "inference")
    pretraining = UniMedIForPreTraining(tiny_config(dino_out_dim=32, dino_hidden_dim=32, dino_bottleneck_dim=16))
    pretraining.save_pretrained(root / "pretraining")
    return {
        "inference": (root / "inference", vision_state(inference.vision_model)),
        "pretraining": (root / "pretraining", vision_state(pretraining.unimedi.vision_model)),
    }


def test_stage_factors_split_each_patch_side_over_four_stages_coarse_first():
    assert stage_factors(16) == [2, 2, 2, 2]
    assert stage_factors(4) == [2, 2, 1, 1]  # the paper's 4x16x16 CT patch: depth doubles in the coarse stages only
    assert stage_factors(32) == [4, 2, 2, 2]  # the demo's 8x32x32 patch
    assert stage_factors(14) == [7, 2, 1, 1] and stage_factors(1) == [1, 1, 1, 1]
    assert unetr_skip_layers(12) == [3, 6, 9] and unetr_skip_layers(2) == [1, 1, 1]


@pytest.mark.parametrize("num_labels", [1, 4])
@pytest.mark.parametrize("loss", ["dice+ce", "focal+dice"])
def test_xray_and_ct_logits_at_input_resolution_and_a_trainable_loss(num_labels, loss):
    model = tiny_segmenter(num_labels, segmentation_loss=loss)
    highest = max(1, num_labels - 1)
    for inputs, key in ((XRAYS, "pixel_values"), (VOLUMES, "volume_values")):
        labels = torch.randint(0, highest + 1, (inputs.shape[0], *inputs.shape[2:]))
        out = model(**{key: inputs}, labels=labels)
        assert out.logits.shape == (inputs.shape[0], num_labels, *inputs.shape[2:])
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        out.loss.backward()
        decoder = model.image_decoder if key == "pixel_values" else model.volume_decoder
        assert all(p.grad is not None for p in decoder.parameters())
        model.zero_grad()


@pytest.mark.parametrize(
    ("patch", "volume"),
    [((4, 16, 16), (12, 48, 64)), ((8, 32, 32), (16, 64, 96)), ((2, 8, 8), (6, 24, 16))],
)
def test_unetr_returns_the_input_size_for_anisotropic_patches_and_other_volume_sizes(patch, volume):
    vision = dict(
        tiny_config().vision_config.to_dict(), volume_patch_size=patch, volume_size=tuple(2 * p for p in patch)
    )
    model = UniMedIForSemanticSegmentation(tiny_config(num_labels=2, vision_config=vision)).eval()
    with torch.no_grad():
        logits = model(volume_values=torch.rand(1, 1, *volume)).logits
    assert logits.shape == (1, 2, *volume)


def test_setr_pup_returns_the_input_size_for_other_image_sizes():
    model = tiny_segmenter(2).eval()
    with torch.no_grad():
        assert model(pixel_values=torch.rand(1, 3, 64, 48)).logits.shape == (1, 2, 64, 48)


def test_a_perfect_prediction_has_a_near_zero_loss_and_a_wrong_one_a_large_loss():
    config = tiny_config(num_labels=3)
    labels = torch.randint(0, 3, (2, 8, 8))
    perfect = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 40 - 20
    assert segmentation_loss(perfect, labels, config) < 1e-3
    assert segmentation_loss(perfect, (labels + 1) % 3, config) > 1.0
    focal = tiny_config(num_labels=1, segmentation_loss="focal+dice", focal_loss_weight=10.0)
    binary = torch.randint(0, 2, (2, 8, 8))
    wrong_logits = (1 - 2 * binary[:, None].float()) * 3
    assert segmentation_loss(wrong_logits, binary, focal) > segmentation_loss(-wrong_logits, binary, focal) + 1


def test_bad_inputs_raise_clear_errors():
    model = tiny_segmenter(3)
    with pytest.raises(ValueError, match="either `pixel_values`"):
        model(pixel_values=XRAYS, volume_values=VOLUMES)
    with pytest.raises(ValueError, match="`labels` must be integer masks of shape"):
        model(pixel_values=XRAYS, labels=torch.zeros(2, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values must be in \[0, 2\]"):
        model(pixel_values=XRAYS, labels=torch.full((2, 32, 32), 3))
    with pytest.raises(ValueError, match="integer class values"):
        model(pixel_values=XRAYS, labels=torch.zeros(2, 32, 32))
    xray_only = tiny_segmenter(3, segmentation_decoders=["setr-pup"])
    assert xray_only.volume_decoder is None
    with pytest.raises(ValueError, match="no 'unetr' decoder"):
        xray_only(volume_values=VOLUMES)
    with pytest.raises(StrictDataclassClassValidationError, match="segmentation_decoders"):
        tiny_config(segmentation_decoders=["unet"])


@pytest.mark.parametrize("kind", ["inference", "pretraining"])
def test_loads_the_encoder_from_any_unimedi_folder(saved_folders, kind):
    folder, expected = saved_folders[kind]
    model, info = UniMedIForSemanticSegmentation.from_pretrained(folder, num_labels=3, output_loading_info=True)
    assert info["missing_keys"] and all(key.split(".")[0] in ("image_decoder", "volume_decoder")
                                        for key in info["missing_keys"])  # fmt: skip
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.vision_model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    # the decoders start from the init (every layer type covered), not from uninitialised memory
    assert all(p.abs().max() <= 1 for name, p in model.named_parameters() if not name.startswith("vision_model"))


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval_mode(saved_folders):
    model = UniMedIForSemanticSegmentation.from_pretrained(saved_folders["pretraining"][0], num_labels=2,
                                                           freeze_encoder=True)  # fmt: skip
    before = vision_state(model.vision_model)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_decoder", "volume_decoder"}
    optimizer = torch.optim.AdamW(model.decoder_parameters(), lr=1e-2)
    model.train()
    assert not model.vision_model.training and model.image_decoder.training
    for inputs, key in ((XRAYS, "pixel_values"), (VOLUMES, "volume_values")):
        out = model(**{key: inputs}, labels=torch.randint(0, 2, (inputs.shape[0], *inputs.shape[2:])))
        out.loss.backward()
        assert all(p.grad is None for p in model.vision_model.parameters())
        optimizer.step()
        optimizer.zero_grad()
    after = model.vision_model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_whole_model_trains_when_not_frozen():
    model = tiny_segmenter(2)
    out = model(volume_values=VOLUMES, labels=torch.randint(0, 2, (2, 8, 32, 32)))
    out.loss.backward()
    assert model.vision_model.encoder.layers[0].attention.qkv.weight.grad is not None


def test_auto_class_finds_it_and_saved_model_round_trips(tmp_path):
    from transformers import AutoModelForSemanticSegmentation

    model = tiny_segmenter(3, id2label={0: "background", 1: "lung", 2: "lesion"}).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == (
        "segmentation_unimedi.UniMedIForSemanticSegmentation"
    )
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, UniMedIForSemanticSegmentation)
    assert loaded.config.id2label == {0: "background", 1: "lung", 2: "lesion"}
    with torch.inference_mode():
        assert torch.equal(model(pixel_values=XRAYS).logits, loaded(pixel_values=XRAYS).logits)
        assert torch.equal(model(volume_values=VOLUMES).logits, loaded(volume_values=VOLUMES).logits)


def test_remote_code_loads_the_segmenter_from_a_pretrained_folder_without_the_package(tmp_path, saved_folders):
    model = UniMedIForSemanticSegmentation.from_pretrained(saved_folders["inference"][0], num_labels=2).eval()
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    torch.save(VOLUMES, tmp_path / "volumes.pt")
    with torch.inference_mode():
        torch.save(model(volume_values=VOLUMES).logits, tmp_path / "expected.pt")
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForSemanticSegmentation
        model = AutoModelForSemanticSegmentation.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.inference_mode():
            logits = model(volume_values=torch.load({str(tmp_path / "volumes.pt")!r})).logits
        print(type(model).__name__, type(model).__module__)
        print(float((logits - torch.load({str(tmp_path / "expected.pt")!r})).abs().max()))
        """,
        cwd=tmp_path,
        HF_HUB_OFFLINE="1",
    )
    name, module = out.splitlines()[0].split()
    assert name == "UniMedIForSemanticSegmentation" and not module.startswith("modeling_unimedi")
    assert float(out.splitlines()[1]) < 1e-5, out
