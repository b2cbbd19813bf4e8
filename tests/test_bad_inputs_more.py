"""Hostile inputs (issue #13): no unsafe allocation, no silent wrong answer, and errors that name the file/field."""

import copy
import gzip
import json
import struct
import tracemalloc

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from huggingface_hub.dataclasses import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from PIL import Image
from pydicom.data import get_testdata_file

from modeling_unimedi import UniMedIConfig, UniMedIVisionConfig
from modeling_unimedi.image_processing_unimedi import UniMedIImageProcessor
from modeling_unimedi.loading_unimedi import MAX_VOXELS, load_ct, load_xray
from modeling_unimedi.processing_unimedi import UniMedIProcessor
from modeling_unimedi.report_processing_unimedi import clean_report, prepare_reports, report_text
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

# NIfTI-1 header fields: (struct format, byte offset)
DIM, DATATYPE, PIXDIM, SCL = ("<8h", 40), ("<hh", 70), ("<4f", 76), ("<ff", 112)
QFORM_SFORM_CODES, SROW = ("<hh", 252), ("<12f", 280)


def nifti_bytes(**fields) -> bytes:
    """A valid 4x5x6 int16 NIfTI-1 file (2 mm voxels, sform) with raw header ``fields`` overwritten as stored."""
    image = nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6), np.diag([2.0, 2.0, 2.0, 1.0]))
    raw = bytearray(image.to_bytes())
    for (fmt, offset), values in fields.values():
        struct.pack_into(fmt, raw, offset, *values)
    return bytes(raw)


def write_nifti(path, **fields):
    raw = nifti_bytes(**{name: (globals()[name.upper()], value) for name, value in fields.items()})
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


# --- memory: declared sizes are checked before anything is allocated -------------------------------------------


@pytest.mark.parametrize("name", ["huge.nii.gz", "huge.nii"])
def test_nifti_header_claiming_1000_cubed_voxels_is_refused_before_reading(tmp_path, name):
    path = write_nifti(tmp_path / name, dim=(3, 1000, 1000, 1000, 1, 1, 1, 1))
    assert path.stat().st_size < 1000
    tracemalloc.start()
    with pytest.raises(ValueError, match=rf"{name}: NIfTI header declares shape \[1000, 1000, 1000\].*file can hold"):
        load_ct(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6  # the old reader allocated ~2 GB here


def test_nifti_header_over_the_voxel_cap_is_refused(tmp_path):
    path = write_nifti(tmp_path / "giant.nii.gz", dim=(3, 2200, 2200, 2200, 1, 1, 1, 1))
    with pytest.raises(ValueError, match=rf"giant\.nii\.gz: .*over {MAX_VOXELS} voxels"):
        load_ct(path)


def test_tiny_target_spacing_is_refused_before_resampling():
    processor = UniMedIVolumeProcessor(fit_mode="crop_or_pad", target_spacing=(0.005, 0.005, 0.005))
    ct = load_ct(np.zeros((300, 300, 300), dtype=np.int16), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"<array>: target_spacing .* over \d+ voxels; choose a coarser"):
        processor([ct])


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"volume_size": (4096, 4096, 4096)}, "volume_size"),
        ({"longest_edge": 10**6, "crop_size": 224}, "longest_edge"),
        ({"num_channels": 10**6}, "num_channels"),
    ],
)
def test_processor_settings_that_multiply_memory_are_refused(settings, field):
    processor_class = UniMedIVolumeProcessor if "volume_size" in settings else UniMedIImageProcessor
    with pytest.raises(ValueError, match=field):
        processor_class(**settings)


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice the limit, as 30000^2 is by default
    with pytest.raises(ValueError, match=r"bomb\.png: image too large to decode safely"):
        load_xray(tmp_path / "bomb.png")


def test_dicom_declaring_a_huge_image_is_refused_before_decoding(tmp_path, dicom_ct_slice_path):
    dataset = pydicom.dcmread(dicom_ct_slice_path)
    dataset.Rows = dataset.Columns = 65535
    dataset.save_as(tmp_path / "huge.dcm")
    with pytest.raises(ValueError, match=r"huge\.dcm: DICOM header declares 65535 x 65535 x 1 x 1 "):
        load_xray(tmp_path / "huge.dcm")


# --- silent wrong results -----------------------------------------------------------------------------------------


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    upright = np.zeros((40, 60), dtype=np.uint8)
    upright[:10, :15] = 255  # bright top-left corner of a landscape picture
    stored = Image.fromarray(np.rot90(upright, k=1))  # camera stored it rotated 90 degrees, portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    gray = load_xray(tmp_path / "rotated.jpg")
    assert gray.shape == (40, 60)
    assert gray[:10, :15].mean() > 0.9 and gray[10:, 15:].mean() < 0.1


def palette_dicom(path, dicom_ct_slice_path):
    """An 8-bit PALETTE COLOR image whose (gray) table reverses the stored indices."""
    dataset = pydicom.dcmread(dicom_ct_slice_path)
    del dataset.RescaleSlope, dataset.RescaleIntercept
    dataset.PhotometricInterpretation = "PALETTE COLOR"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    indices = np.tile(np.arange(128, dtype=np.uint8) * 2, (128, 1))
    dataset.PixelData = indices.tobytes()
    table = (255 - np.arange(256, dtype=np.uint16)) * 257
    for colour in ("Red", "Green", "Blue"):
        setattr(dataset, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        dataset[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(dataset, f"{colour}PaletteColorLookupTableData", table.tobytes())
    dataset.save_as(path)
    return indices


def test_dicom_palette_colour_xray_uses_its_colour_table(tmp_path, dicom_ct_slice_path):
    indices = palette_dicom(tmp_path / "palette.dcm", dicom_ct_slice_path)
    shown = 255.0 - indices  # what the palette displays
    expected = (shown - shown.min()) / (shown.max() - shown.min())
    np.testing.assert_allclose(load_xray(tmp_path / "palette.dcm"), expected, atol=1e-3)


@pytest.mark.parametrize(
    "processor_class, field",
    [
        (UniMedIImageProcessor, "image_mean"),
        (UniMedIImageProcessor, "image_std"),
        (UniMedIVolumeProcessor, "image_mean"),
        (UniMedIVolumeProcessor, "image_std"),
        (UniMedIVolumeProcessor, "flip_probability"),
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_processor_settings_are_refused(processor_class, field, bad):
    with pytest.raises(ValueError, match=rf"`{field}` must be a finite float, got {bad}"):
        processor_class.from_dict({field: bad})


@pytest.mark.parametrize("window", [(float("nan"), 1000.0), (-1000.0, float("inf"))])
def test_nan_or_inf_hu_window_is_refused(window):
    with pytest.raises(ValueError, match=r"`hu_window\[\d\]` must be a finite float"):
        UniMedIVolumeProcessor.from_dict({"hu_window": list(window)})


def test_image_std_list_with_nan_is_refused():
    with pytest.raises(ValueError, match=r"`image_std\[1\]` must be a finite float, got nan"):
        UniMedIImageProcessor(image_std=[0.5, float("nan"), 0.5])


INVISIBLE_REPORTS = ["\u200b", "\ufeff", "\u00ad", "\u200b \ufeff\u00ad\u200b", "\u202e\u2060", "\u0301", "\x00\x00"]


@pytest.mark.parametrize("report", INVISIBLE_REPORTS)
@pytest.mark.parametrize("clean", [True, False])
def test_report_of_invisible_characters_is_empty(report, clean):
    with pytest.raises(ValueError, match=r"text\[0\] is empty or whitespace-only.*no visible character"):
        prepare_reports([report], clean=clean)
    with pytest.raises(ValueError, match="report is empty"):
        report_text(report)


def test_invisible_characters_are_dropped_from_reports():
    assert clean_report("\ufeffNo\u200b acute\u00ad finding.") == "No acute finding."


def test_multipage_tiff_is_refused(tmp_path):
    pages = [Image.new("L", (16, 16), color) for color in (0, 255)]
    pages[0].save(tmp_path / "two_pages.tiff", save_all=True, append_images=pages[1:])
    with pytest.raises(ValueError, match=r"two_pages\.tiff: 2-page image; an X-ray is a single picture"):
        load_xray(tmp_path / "two_pages.tiff")
    with Image.open(tmp_path / "two_pages.tiff") as image, pytest.raises(ValueError, match="<PIL image>: 2-page"):
        UniMedIImageProcessor()(image)


def test_animated_png_is_refused(tmp_path):
    frames = [Image.new("L", (16, 16), color) for color in (0, 255)]
    frames[0].save(tmp_path / "animated.png", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=r"animated\.png: 2-page image"):
        load_xray(tmp_path / "animated.png")


def test_gantry_tilted_dicom_series_is_refused(tmp_path, write_dicom_ct_series):
    write_dicom_ct_series(tmp_path / "tilted", [0.0, 5.0, 10.0, 15.0])
    for path in (tmp_path / "tilted").iterdir():
        dataset = pydicom.dcmread(path)
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        dataset.ImagePositionPatient = [x, y + 0.4 * z, z]  # 2 mm in-plane per 5 mm slice: a 21.8 degree tilt
        dataset.save_as(path)
    with pytest.raises(ValueError, match=r"tilted: each slice is shifted 2\.000 mm .*gantry tilt of 21\.8 degrees"):
        load_ct(tmp_path / "tilted")


@pytest.mark.parametrize("make_complex", [np.asarray, torch.from_numpy])
def test_complex_arrays_are_refused(make_complex):
    values = make_complex(np.ones((32, 128, 128), dtype=np.complex64))
    with pytest.raises(ValueError, match="complex64 is not real-valued"):
        load_xray(values[0])
    with pytest.raises(ValueError, match="complex64 is not real-valued"):
        load_ct(values, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="complex64 is not real-valued"):
        UniMedIVolumeProcessor().window_grid([values])


@pytest.mark.parametrize("values", [np.array([["a", "b"], ["c", "d"]]), np.array([[None, 1], [2, 3]], dtype=object)])
def test_non_numeric_arrays_are_refused(values):
    with pytest.raises(ValueError, match=rf"<array>: array of dtype {values.dtype} is not real-valued"):
        load_xray(values)


def test_nifti_with_nan_in_its_affine_is_refused(tmp_path):
    path = write_nifti(
        tmp_path / "nan.nii", qform_sform_codes=(0, 2), srow=(2, 0, 0, 0, 0, float("nan"), 0, 0, 0, 0, 2, 0)
    )
    with pytest.raises(ValueError, match=r"nan\.nii: spacing must be three positive finite mm values"):
        load_ct(path)


def test_complex_nifti_is_refused(tmp_path):
    data = np.ones((4, 5, 6), dtype=np.complex64)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "complex.nii.gz")
    with pytest.raises(ValueError, match=r"complex\.nii\.gz: NIfTI datatype 'complex64' is not real-valued"):
        load_ct(tmp_path / "complex.nii.gz")


@pytest.mark.parametrize("pixdim", [(0.0, 2.0, 2.0), (2.0, -2.0, 2.0), (2.0, 2.0, float("nan"))])
@pytest.mark.parametrize("codes", [(1, 0), (0, 2)], ids=["qform", "sform"])
def test_nifti_with_zero_or_negative_pixdim_is_refused(tmp_path, pixdim, codes):
    path = write_nifti(tmp_path / "pixdim.nii", pixdim=(1.0, *pixdim), qform_sform_codes=codes)
    with pytest.raises(ValueError, match=r"pixdim\.nii: NIfTI pixdim \(voxel size in mm\) .* is not positive"):
        load_ct(path)


# --- clear errors naming the file or field ------------------------------------------------------------------------


def test_dicom_window_width_zero_names_the_file(tmp_path, dicom_ct_slice_path):
    dataset = pydicom.dcmread(dicom_ct_slice_path)
    dataset.WindowCenter, dataset.WindowWidth = 40, 0
    dataset.save_as(tmp_path / "no_window.dcm")
    with pytest.raises(ValueError, match=r"no_window\.dcm: DICOM WindowWidth must be positive, got 0.*apply_voi_lut"):
        load_xray(tmp_path / "no_window.dcm")
    assert load_xray(tmp_path / "no_window.dcm", apply_voi_lut=False).shape == (128, 128)


@pytest.mark.parametrize("shape", [(0, 10), (10, 0), (0, 0, 3)])
def test_zero_size_images_are_refused(shape):
    with pytest.raises(ValueError, match=r"<array>: image of shape .* holds no pixels"):
        UniMedIImageProcessor()(np.zeros(shape, dtype=np.uint8))


def test_zero_size_pil_image_is_refused():
    with pytest.raises(ValueError, match=r"<PIL image>: image of shape \(5, 0\) holds no pixels"):
        load_xray(Image.new("L", (0, 5)))


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"scl": (1.0, float("inf"))}, r"NIfTI scl_slope/scl_inter \(1\.0, inf\) must be finite"),
        ({"scl": (float("inf"), 0.0)}, r"NIfTI scl_slope/scl_inter \(inf, 0\.0\) must be finite"),
        ({"datatype": (1, 1)}, r"NIfTI datatype 'binary' is not real-valued"),
        (
            {"dim": (3, -4, 5, 6, 1, 1, 1, 1)},
            r"NIfTI dim field \[3, -4, 5, 6, 1, 1, 1, 1\] is not a valid image shape",
        ),
        (
            {"qform_sform_codes": (0, 2), "srow": (2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0)},
            r"singular affine, its voxel axes .* are not independent",
        ),
    ],
)
def test_bad_nifti_headers_name_the_file_and_field(tmp_path, fields, problem):
    with pytest.raises(ValueError, match=rf"bad\.nii: {problem}"):
        load_ct(write_nifti(tmp_path / "bad.nii", **fields))


def test_dicomdir_inside_a_series_folder_is_skipped(tmp_path, write_dicom_ct_series):
    stored = write_dicom_ct_series(tmp_path / "series", [0.0, 5.0, 10.0])
    index = pydicom.dcmread(get_testdata_file("DICOMDIR"))
    index.save_as(tmp_path / "series" / "DICOMDIR")
    assert load_ct(tmp_path / "series").hu.shape[0] == len(stored)


@pytest.mark.parametrize("cut", [400, 1500])
def test_truncated_slice_inside_a_series_is_named(tmp_path, write_dicom_ct_series, cut):
    write_dicom_ct_series(tmp_path / "series", [0.0, 5.0, 10.0])
    victim = sorted((tmp_path / "series").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:cut])
    with pytest.raises(ValueError, match=rf"{victim.name}: DICOM file without SeriesInstanceUID \(truncated\?\)"):
        load_ct(tmp_path / "series")


def test_unreadable_dcm_file_inside_a_series_is_named(tmp_path, write_dicom_ct_series):
    write_dicom_ct_series(tmp_path / "series", [0.0, 5.0, 10.0])
    (tmp_path / "series" / "broken.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match=r"broken\.dcm: not a readable DICOM file"):
        load_ct(tmp_path / "series")


@pytest.mark.parametrize("orientation", [(0, 0, 0, 0, 0, 0), (1, 0, 0, 1, 0, 0), (2, 0, 0, 0, 2, 0)])
def test_degenerate_image_orientation_is_named(tmp_path, write_dicom_ct_series, orientation):
    write_dicom_ct_series(tmp_path / "series", [0.0, 5.0, 10.0])
    for path in (tmp_path / "series").iterdir():
        dataset = pydicom.dcmread(path)
        dataset.ImageOrientationPatient = list(orientation)
        dataset.save_as(path)
    with pytest.raises(ValueError, match=r"series: ImageOrientationPatient .* is not two orthogonal unit vectors"):
        load_ct(tmp_path / "series")


def test_non_finite_slice_position_is_named(tmp_path, write_dicom_ct_series):
    write_dicom_ct_series(tmp_path / "series", [0.0, 5.0, 10.0])
    victim = min((tmp_path / "series").iterdir())
    dataset = pydicom.dcmread(victim)
    dataset.ImagePositionPatient = [0.0, float("nan"), 0.0]
    dataset.save_as(victim)
    with pytest.raises(ValueError, match=rf"{victim.name}: DICOM ImagePositionPatient holds non-finite values"):
        load_ct(tmp_path / "series")


@pytest.mark.parametrize("report", ["\ud800", "normal text \udfff"])
def test_report_with_a_lone_surrogate_is_named(report):
    with pytest.raises(ValueError, match=r"text\[1\] holds a lone surrogate U\+D(800|FFF) at position \d+"):
        prepare_reports(["fine", report])


@pytest.mark.parametrize(
    "processor_class, settings, problem",
    [
        (UniMedIImageProcessor, {"crop_size": "224"}, r"`crop_size` must be a finite int, got '224'"),
        (UniMedIImageProcessor, {"longest_edge": 256.5}, r"`longest_edge` must be a finite int"),
        (UniMedIImageProcessor, {"image_mean": "0.5"}, r"`image_mean` must be a finite float"),
        (UniMedIImageProcessor, {"apply_voi_lut": "false"}, r"`apply_voi_lut` must be true or false"),
        (UniMedIVolumeProcessor, {"volume_size": 32}, r"`volume_size` must be a list of 3 ints, got 32"),
        (UniMedIVolumeProcessor, {"volume_size": [32, 128]}, r"`volume_size` must be a list of 3 ints"),
        (UniMedIVolumeProcessor, {"hu_window": "-1000,1000"}, r"`hu_window` must be a list of 2 floats"),
        (UniMedIVolumeProcessor, {"flip_axes": "2"}, r"`flip_axes` must be a list of any number of ints"),
        (UniMedIVolumeProcessor, {"orientation": 5}, r"orientation must be three axis codes.*got '5'"),
        (UniMedIVolumeProcessor, {"fit_mode": ["resize"]}, r"fit_mode must be one of"),
    ],
)
def test_wrong_typed_processor_settings_name_the_field(processor_class, settings, problem):
    with pytest.raises(ValueError, match=problem):
        processor_class.from_dict(settings)


def test_wrong_typed_processor_config_json_names_the_field(tmp_path, text_tokenizer):
    UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer).save_pretrained(tmp_path)
    config_path = tmp_path / "processor_config.json"
    original = json.loads(config_path.read_text())
    for section, field, value, problem in [
        ("image_processor", "crop_size", "224", r"`crop_size` must be a finite int, got '224'"),
        ("volume_processor", "volume_size", 32, r"`volume_size` must be a list of 3 ints, got 32"),
        ("volume_processor", "hu_window", [float("nan"), 1000.0], r"`hu_window\[0\]` must be a finite float"),
        (None, "clean_reports", "no", r"`clean_reports` must be true or false"),
    ]:
        edited = copy.deepcopy(original)
        (edited[section] if section else edited)[field] = value
        config_path.write_text(json.dumps(edited))  # json writes NaN, and Python's json reads it back
        with pytest.raises(ValueError, match=problem):
            UniMedIProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "config_class, settings, field",
    [
        (UniMedIVisionConfig, {"patch_size": 0}, "patch_size"),
        (UniMedIVisionConfig, {"num_attention_heads": 0}, "num_attention_heads"),
        (UniMedIVisionConfig, {"hidden_size": -768}, "hidden_size"),
        (UniMedIVisionConfig, {"image_size": -224}, "image_size"),
        (UniMedIVisionConfig, {"hidden_dropout": 1.5}, "hidden_dropout"),
        (UniMedIConfig, {"dino_out_dim": -1}, "dino_out_dim"),
        (UniMedIConfig, {"teacher_temperature": 0.0}, "teacher_temperature"),
        (UniMedIConfig, {"student_temperature": float("nan")}, "student_temperature"),
        (UniMedIConfig, {"pcl_loss_weight": float("inf")}, "pcl_loss_weight"),
        (UniMedIConfig, {"teacher_temperature_warmup_steps": -5}, "teacher_temperature_warmup_steps"),
    ],
)
def test_config_sizes_must_be_positive_and_name_the_field(config_class, settings, field):
    with pytest.raises((StrictDataclassClassValidationError, StrictDataclassFieldValidationError), match=field):
        config_class(**settings)


@pytest.mark.parametrize(
    "name, reader, problem",
    [
        ("empty.nii", load_ct, "cannot read NIfTI file"),
        ("empty.nii.gz", load_ct, "cannot read NIfTI file"),
        ("empty.png", load_xray, "not a readable image"),
        ("empty.dcm", load_xray, "not a readable DICOM file"),
    ],
)
def test_zero_byte_files_name_the_file(tmp_path, name, reader, problem):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: {problem}"):
        reader(tmp_path / name)


def test_window_grid_is_the_explicit_path_for_volumes_on_the_grid():
    processor = UniMedIVolumeProcessor(volume_size=(4, 8, 8))
    stored = np.random.default_rng(0).integers(-1000, 1000, size=(2, 4, 8, 8)).astype(np.int16)
    windowed = processor.window_grid(list(stored))["volume_values"]
    expected = (np.clip((stored.astype(np.float32) + 1000) / 2000, 0, 1) - 0.5) / 0.5
    np.testing.assert_allclose(windowed[:, 0].numpy(), expected, atol=1e-6)
    assert torch.equal(processor(stored)["volume_values"], windowed)  # an array given to __call__ takes this path
    with pytest.raises(ValueError, match=r"<array>: shape \(4, 8, 9\) is not the processor grid \(4, 8, 8\)"):
        processor.window_grid([stored[0], np.zeros((4, 8, 9), np.int16)])
    with pytest.raises(TypeError, match="volume 0: a volume on the grid is a numpy array or tensor, got str"):
        processor.window_grid(["scan.nii.gz"])
