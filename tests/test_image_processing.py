"""The X-ray image processor on real chest X-ray JPEGs and pydicom's DICOM test files."""

import copy

import numpy as np
import pydicom
import torch
from PIL import Image

from modeling_unimedi.image_processing_unimedi import UniMedIImageProcessor
from modeling_unimedi.loading_unimedi import load_xray


def reference_pipeline(image: Image.Image) -> np.ndarray:
    """The paper pipeline written with PIL only: longer side -> 256, centred zero pad, centre crop 224, / 255."""
    scale = 256 / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("L", (256, 256), 0)
    canvas.paste(image.convert("L").resize((width, height), Image.BILINEAR), ((256 - width) // 2, (256 - height) // 2))
    return np.asarray(canvas.crop((16, 16, 240, 240)), dtype=np.float32) / 255


def test_real_xray_jpegs_batch(xray_jpeg_paths):
    pixel_values = UniMedIImageProcessor()(xray_jpeg_paths)["pixel_values"]
    assert pixel_values.shape == (16, 3, 224, 224) and pixel_values.dtype == torch.float32
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0  # [0, 1] normalised with mean 0.5, std 0.5
    assert torch.equal(pixel_values[:, 0], pixel_values[:, 1]) and torch.equal(pixel_values[:, 0], pixel_values[:, 2])
    assert (pixel_values.flatten(1).std(dim=1) > 0.1).all()  # real content in every image


def test_matches_a_pil_reference_of_the_paper_pipeline(xray_jpeg_paths):
    processor = UniMedIImageProcessor(num_channels=1)
    for path in xray_jpeg_paths[::5]:
        with Image.open(path) as image:
            expected = reference_pipeline(image)
        got = processor(path)["pixel_values"][0, 0].numpy()
        assert np.abs(got - (expected - 0.5) / 0.5).mean() < 0.02, path.name


def test_landscape_image_is_zero_padded_top_and_bottom(xray_jpeg_paths):
    path = next(p for p in xray_jpeg_paths if p.name == "NORMAL2-IM-1427-0001.jpeg")  # 1776 x 1416 (W x H)
    image = UniMedIImageProcessor()(path)["pixel_values"][0, 0]
    # H: 1416 * 256 / 1776 = 204 rows, padded 26 above; the 224 centre crop starts 16 rows into the pad.
    assert torch.all(image[:10] == -1) and torch.all(image[-10:] == -1)  # zero padding, normalised
    assert image[10:-10].amax(dim=1).min() > -1


def test_every_input_type_gives_the_same_tensor(xray_jpeg_paths):
    path = xray_jpeg_paths[8]
    with Image.open(path) as opened:
        pil = opened.copy()
    gray = np.array(pil)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    inputs = [str(path), path, pil, pil.convert("RGB"), gray, rgb, torch.from_numpy(gray)[None], torch.from_numpy(rgb)]
    outputs = UniMedIImageProcessor()(inputs)["pixel_values"]
    for index in range(1, len(inputs)):
        torch.testing.assert_close(outputs[index], outputs[0], atol=1 / 255, rtol=0)


def test_float_arrays_in_unit_range_are_kept_and_others_rescaled():
    unit = np.random.default_rng(0).uniform(0.2, 0.7, size=(64, 48)).astype(np.float32)
    np.testing.assert_array_equal(load_xray(unit), unit)
    np.testing.assert_allclose(
        load_xray(unit * 4000 - 1000), (unit - unit.min()) / (unit.max() - unit.min()), atol=1e-5
    )
    np.testing.assert_array_equal(load_xray(np.full((8, 8), 300, dtype=np.uint16)), np.zeros((8, 8)))


def test_mean_std_and_channels_are_configurable(xray_jpeg_paths):
    plain = UniMedIImageProcessor(image_mean=0.0, image_std=1.0)(xray_jpeg_paths[:2])["pixel_values"]
    assert plain.min() >= 0 and plain.max() <= 1
    torch.testing.assert_close(UniMedIImageProcessor()(xray_jpeg_paths[:2])["pixel_values"], (plain - 0.5) / 0.5)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normalised = UniMedIImageProcessor(image_mean=mean, image_std=std)(xray_jpeg_paths[:2])["pixel_values"]
    expected = (plain - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised, expected)
    single = UniMedIImageProcessor(num_channels=1, crop_size=192)(xray_jpeg_paths[0], return_tensors="np")
    assert single["pixel_values"].shape == (1, 1, 192, 192) and isinstance(single["pixel_values"], np.ndarray)


def test_random_crop_only_when_training(xray_jpeg_paths):
    processor = UniMedIImageProcessor(num_channels=1)
    padded = UniMedIImageProcessor(num_channels=1, crop_size=256)(xray_jpeg_paths[0])["pixel_values"][0, 0]
    centre = processor(xray_jpeg_paths[0])["pixel_values"][0, 0]
    assert torch.equal(centre, padded[16:240, 16:240])
    torch.manual_seed(0)
    offsets = set()
    for _ in range(4):
        crop = processor(xray_jpeg_paths[0], training=True)["pixel_values"][0, 0]
        windows = padded.unfold(1, 224, 1)[112:145]  # [t, l] = row t + 112 of the window at offset (t, l)
        candidates = torch.nonzero((windows == crop[112]).all(dim=-1)).tolist()
        matches = [(t, l) for t, l in candidates if torch.equal(crop, padded[t : t + 224, l : l + 224])]
        assert matches, "a training crop must be a 224 window of the padded 256 image"
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_settings_round_trip_through_save_and_load(tmp_path):
    processor = UniMedIImageProcessor(
        longest_edge=320, crop_size=288, num_channels=1, image_mean=0.5, image_std=0.25, apply_voi_lut=False
    )
    processor.save_pretrained(tmp_path)
    reloaded = UniMedIImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    assert (reloaded.longest_edge, reloaded.crop_size, reloaded.num_channels) == (320, 288, 1)
    assert (reloaded.image_mean, reloaded.image_std, reloaded.apply_voi_lut) == ([0.5], [0.25], False)
    assert UniMedIImageProcessor.from_pretrained(tmp_path, crop_size=256).crop_size == 256


def test_dicom_ct_slice_keeps_its_polarity(dicom_ct_slice_path):
    raw = pydicom.dcmread(dicom_ct_slice_path).pixel_array.astype(np.float64)
    np.testing.assert_allclose(load_xray(dicom_ct_slice_path), (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    pixel_values = UniMedIImageProcessor(crop_size=256)(dicom_ct_slice_path)["pixel_values"]
    assert pixel_values.shape == (1, 3, 256, 256) and -1 <= pixel_values.min() and pixel_values.max() <= 1
    pooled = torch.nn.functional.avg_pool2d(pixel_values[:, :1], 2)[0, 0].numpy()  # back to 128 x 128
    assert np.corrcoef(pooled.ravel(), raw.ravel())[0, 1] > 0.95


def test_monochrome1_is_inverted(dicom_monochrome1_path):
    dataset = pydicom.dcmread(dicom_monochrome1_path)
    assert dataset.PhotometricInterpretation == "MONOCHROME1"
    raw = dataset.pixel_array.astype(np.float64)
    # Its rescale (0.684 x + 200) and window (1600 +- 1400) are linear over the stored range: inversion is all left.
    np.testing.assert_allclose(
        load_xray(dicom_monochrome1_path), 1 - (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6
    )
    pixel_values = UniMedIImageProcessor(crop_size=256)(dicom_monochrome1_path)["pixel_values"]
    pooled = torch.nn.functional.avg_pool2d(pixel_values[:, :1], 16)[0, 0].numpy()  # back to 16 x 16
    assert np.corrcoef(pooled.ravel(), raw.ravel())[0, 1] < -0.95


def test_dicom_window_is_applied_after_the_rescale(tmp_path, dicom_ct_slice_path):
    dataset = pydicom.dcmread(dicom_ct_slice_path)
    hu = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    windowed = copy.deepcopy(dataset)
    windowed.WindowCenter, windowed.WindowWidth = 40, 400  # soft-tissue window in HU
    windowed.save_as(tmp_path / "windowed.dcm")
    expected = np.clip((hu - 39.5) / 399 + 0.5, 0, 1)  # DICOM linear window, both ends saturated in this slice
    assert expected.min() == 0 and expected.max() == 1
    np.testing.assert_allclose(load_xray(tmp_path / "windowed.dcm"), expected, atol=1e-5)
    unwindowed = load_xray(tmp_path / "windowed.dcm", apply_voi_lut=False)
    np.testing.assert_allclose(unwindowed, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
