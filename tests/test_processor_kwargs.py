"""transformers' processor kwargs on UniMedIProcessor and per-call settings on its X-ray and CT processors, called as
CLIPProcessor / CLIPImageProcessor are documented (`padding=`, `text_kwargs=`, `size=`, `do_normalize=`, ...)."""

import json

import pytest
import torch

from modeling_unimedi.image_processing_unimedi import UniMedIImageProcessor
from modeling_unimedi.processing_unimedi import UniMedIProcessor
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

TEXTS = ["pleural effusion", "no acute cardiopulmonary process, the lungs are clear"]


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    return UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer, max_length=32)


def test_tokenizer_kwargs_flat_and_as_text_kwargs(processor, text_tokenizer):
    longest = processor(text=TEXTS)["input_ids"]
    reference = text_tokenizer(TEXTS, padding="longest", return_tensors="pt")["input_ids"]
    assert torch.equal(longest, reference)
    padded = processor(text=TEXTS, padding="max_length", max_length=20, return_tensors="pt")["input_ids"]
    assert padded.shape == (2, 20) and torch.equal(padded[:, : longest.shape[1]], longest)
    assert torch.equal(
        processor(text=TEXTS, text_kwargs={"padding": "max_length", "max_length": 20})["input_ids"], padded
    )
    truncated = processor(text=TEXTS, truncation=True, max_length=4)["input_ids"]
    assert truncated.shape == (2, 4) and truncated[1, -1] == text_tokenizer.sep_token_id
    as_lists = processor(text=TEXTS, padding=False, return_tensors=None)["input_ids"]
    assert [len(ids) for ids in as_lists] == [int(n) for n in (longest != 0).sum(dim=1)]


def test_image_settings_per_call_flat_and_as_images_kwargs(processor, xray_jpeg_paths):
    path = xray_jpeg_paths[0]
    unnormalised = processor(images=path, do_normalize=False)["pixel_values"]
    default = processor(images=path)["pixel_values"]
    assert torch.allclose(default, (unnormalised - 0.5) / 0.5, atol=1e-6)
    assert 0.0 <= unnormalised.min() and unnormalised.max() <= 1.0
    small = processor(
        images=path, images_kwargs={"size": {"longest_edge": 160}, "crop_size": {"height": 128, "width": 128}}
    )
    assert small["pixel_values"].shape == (1, 3, 128, 128)
    reference = UniMedIImageProcessor(longest_edge=160, crop_size=128)(path)["pixel_values"]
    assert torch.equal(small["pixel_values"], reference)
    whole_square = processor(images=path, do_center_crop=False)["pixel_values"]
    assert whole_square.shape == (1, 3, 256, 256)


def test_image_processor_without_resizing_pads_or_crops_the_pixels(xray_jpeg_paths):
    image = torch.rand(40, 60).numpy()
    out = UniMedIImageProcessor()(image, do_resize=False, do_normalize=False, size=64, crop_size=64)["pixel_values"]
    # the 40 x 60 pixels keep their size, centred in the 64 square (rows 12..51, columns 2..61)
    assert torch.allclose(out[0, 0, 12:52, 2:62], torch.from_numpy(image), atol=1e-6)
    assert out[0, 0, :12].abs().sum() == 0 and out[0, 0, :, :2].abs().sum() == 0
    big = torch.rand(100, 80).numpy()
    cropped = UniMedIImageProcessor()(big, do_resize=False, do_normalize=False, size=64, crop_size=64)["pixel_values"]
    assert torch.allclose(cropped[0, 0], torch.from_numpy(big[18:82, 8:72]), atol=1e-6)


def test_unsupported_or_bad_per_call_settings_raise(processor, xray_jpeg_paths):
    with pytest.raises(ValueError, match="UniMedIImageProcessor has no setting 'do_rescale'"):
        processor(images=xray_jpeg_paths[0], do_rescale=False)
    with pytest.raises(ValueError, match="`size` must be n, .*square"):
        processor(images=xray_jpeg_paths[0], size={"height": 200, "width": 100})
    with pytest.raises(ValueError, match="crop_size must be in"):
        processor(images=xray_jpeg_paths[0], crop_size=512)
    with pytest.raises(ValueError, match="UniMedIVolumeProcessor has no setting 'size'"):
        processor(volumes=[torch.zeros(32, 128, 128)], volumes_kwargs={"size": 3})


def test_volume_settings_per_call(processor):
    grid = torch.linspace(-1000, 1000, 16 * 48 * 48).reshape(16, 48, 48)
    flat = processor(volumes=[grid], volume_size=(16, 48, 48), hu_window=(-500.0, 500.0))["volume_values"]
    nested = processor(volumes=[grid], volumes_kwargs={"volume_size": (16, 48, 48), "hu_window": (-500.0, 500.0)})
    reference = UniMedIVolumeProcessor(volume_size=(16, 48, 48), hu_window=(-500.0, 500.0))([grid])["volume_values"]
    assert torch.equal(flat, reference) and torch.equal(nested["volume_values"], reference)


def test_volume_processor_from_a_processor_folder(processor, tmp_path):
    """The CT processor loads alone from a processor (or model) folder, whose preprocessor_config.json is the
    X-ray processor's, and from its own save."""
    custom = UniMedIProcessor(
        UniMedIImageProcessor(image_mean=[0.4, 0.5, 0.6]),
        processor.tokenizer,
        volume_processor=UniMedIVolumeProcessor(
            volume_size=(16, 64, 64), hu_window=(-1200.0, 400.0), slab_image_reduction="central"
        ),
    )
    custom.save_pretrained(tmp_path / "processor")
    saved = json.loads((tmp_path / "processor" / "processor_config.json").read_text())["volume_processor"]
    assert saved["slab_image_reduction"] == "central"
    loaded = UniMedIVolumeProcessor.from_pretrained(tmp_path / "processor")
    assert loaded.volume_size == (16, 64, 64) and loaded.hu_window == (-1200.0, 400.0)
    assert loaded.slab_image_reduction == "central"
    loaded.save_pretrained(tmp_path / "alone")
    assert UniMedIVolumeProcessor.from_pretrained(tmp_path / "alone").volume_size == (16, 64, 64)
    UniMedIImageProcessor().save_pretrained(tmp_path / "xray_only")
    with pytest.raises(ValueError, match="holds no UniMedIVolumeProcessor settings"):
        UniMedIVolumeProcessor.from_pretrained(tmp_path / "xray_only")
