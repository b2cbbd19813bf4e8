"""Bad image/volume inputs: each gives a clear error naming the file and the problem, or a documented handling."""

import copy
import io

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from modeling_unimedi.image_processing_unimedi import UniMedIImageProcessor
from modeling_unimedi.loading_unimedi import load_ct, load_xray
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

GRID = (32, 128, 128)


def save_nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


# --- NIfTI ------------------------------------------------------------------------------------------------------


def test_truncated_nifti_names_the_file(tmp_path, ct_mask_path):
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(ct_mask_path.read_bytes()[:50_000])
    with pytest.raises(ValueError, match=r"truncated\.nii\.gz: cannot read NIfTI file"):
        load_ct(path)


def test_corrupt_nifti_names_the_file(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"not a nifti file" * 100)
    with pytest.raises(ValueError, match=r"garbage\.nii\.gz: cannot read NIfTI file"):
        UniMedIVolumeProcessor()(path)


def test_2d_nifti_is_not_a_volume(tmp_path):
    path = save_nifti(tmp_path / "slice.nii", np.zeros((64, 64), dtype=np.int16))
    with pytest.raises(ValueError, match=r"slice\.nii: a CT volume must be 3-D, got 2-D"):
        load_ct(path)
    single = save_nifti(tmp_path / "single.nii", np.zeros((64, 64, 1), dtype=np.int16))
    with pytest.raises(ValueError, match=r"single\.nii: .*single slice.*not a volume"):
        load_ct(single)


def test_4d_nifti_is_refused_unless_its_last_axis_is_1(tmp_path):
    path = save_nifti(tmp_path / "series.nii.gz", np.zeros((8, 8, 4, 3), dtype=np.int16))
    with pytest.raises(ValueError, match=r"series\.nii\.gz: 4-D image with 3 volumes"):
        load_ct(path)
    data = np.arange(8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4, 1)
    squeezed = load_ct(save_nifti(tmp_path / "one.nii.gz", data))
    assert squeezed.hu.shape == (4, 8, 8)  # RAS (8, 8, 4) -> SPL (4, 8, 8)


def test_nan_and_inf_voxels_are_refused(tmp_path):
    data = np.zeros((8, 8, 4), dtype=np.float32)
    data[1, 2, 3], data[4, 4, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: 2 voxels are NaN or infinite"):
        load_ct(save_nifti(tmp_path / "nan.nii.gz", data))
    with pytest.raises(ValueError, match="<array>: 2 voxels are NaN or infinite"):
        load_ct(data, spacing=(1, 1, 1))
    on_grid = np.zeros(GRID, dtype=np.float32)
    on_grid[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        UniMedIVolumeProcessor()(on_grid)


def test_nifti_without_qform_or_sform_is_refused(tmp_path):
    path = tmp_path / "no_geometry.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), dtype=np.int16), None), path)
    with pytest.raises(ValueError, match=r"no_geometry\.nii: .*neither qform nor sform"):
        load_ct(path)


# --- documented handling of unusual volumes ---------------------------------------------------------------------


def test_constant_volume_windows_to_a_constant(tmp_path):
    path = save_nifti(tmp_path / "constant.nii.gz", np.full((40, 40, 20), 250, dtype=np.int16))
    values = UniMedIVolumeProcessor()(path)["volume_values"]
    assert values.shape == (1, 1, *GRID) and torch.isfinite(values).all()
    torch.testing.assert_close(values, torch.full_like(values, ((250 + 1000) / 2000 - 0.5) / 0.5))


def test_volume_smaller_than_the_grid_is_upsampled(tmp_path):
    data = np.random.default_rng(0).uniform(-1000, 1000, size=(16, 16, 8)).astype(np.float32)
    values = UniMedIVolumeProcessor()(save_nifti(tmp_path / "small.nii.gz", data))["volume_values"]
    assert values.shape == (1, 1, *GRID)
    assert -1 <= values.min() and values.max() <= 1 and values.std() > 0.1


# --- DICOM ------------------------------------------------------------------------------------------------------


def test_dicom_without_pixel_data(tmp_path, dicom_ct_slice_path, write_dicom_ct_series):
    dataset = pydicom.dcmread(dicom_ct_slice_path)
    del dataset.PixelData
    dataset.save_as(tmp_path / "header_only.dcm")
    with pytest.raises(ValueError, match=r"header_only\.dcm: DICOM file holds no pixel data"):
        load_xray(tmp_path / "header_only.dcm")
    write_dicom_ct_series(tmp_path / "series", [0.0, 5.0])
    dataset.SeriesInstanceUID = pydicom.dcmread(next((tmp_path / "series").iterdir())).SeriesInstanceUID
    dataset.save_as(tmp_path / "series" / "header_only.dcm")
    with pytest.raises(ValueError, match=r"header_only\.dcm: DICOM file holds no pixel data"):
        load_ct(tmp_path / "series")


def test_dicom_folder_mixing_two_series_lists_them(tmp_path, write_dicom_ct_series):
    write_dicom_ct_series(tmp_path / "mixed", [0.0, 5.0, 10.0], series_uid="1.2.3.4", seed=1)
    write_dicom_ct_series(tmp_path / "mixed", [0.0, 5.0], series_uid="1.2.3.5", seed=2)
    with pytest.raises(ValueError, match=r"mixed: mixes 2 DICOM series.*1\.2\.3\.4 .*3 files.*1\.2\.3\.5 .*2 files"):
        load_ct(tmp_path / "mixed")


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty: no DICOM files in this folder \(1 other files skipped\)"):
        load_ct(tmp_path / "empty")


def test_single_slice_dicom_file_is_not_a_volume(dicom_ct_slice_path):
    with pytest.raises(ValueError, match=r"CT_small\.dcm: a single-frame DICOM file is one slice"):
        load_ct(dicom_ct_slice_path)


def test_dicom_series_with_duplicate_or_missing_slices(tmp_path, write_dicom_ct_series):
    write_dicom_ct_series(tmp_path / "duplicates", [0.0, 5.0, 5.0])
    with pytest.raises(ValueError, match=r"duplicates: several slices share one position"):
        load_ct(tmp_path / "duplicates")
    write_dicom_ct_series(tmp_path / "gap", [0.0, 5.0, 15.0, 20.0])
    with pytest.raises(ValueError, match=r"gap: uneven slice gaps \(5\.000 to 10\.000 mm\)"):
        load_ct(tmp_path / "gap")


def test_non_dicom_file_with_dicom_extension(tmp_path):
    (tmp_path / "fake.dcm").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"fake\.dcm: not a readable DICOM file"):
        load_xray(tmp_path / "fake.dcm")


# --- raster X-rays ----------------------------------------------------------------------------------------------


def test_rgba_png_drops_alpha_and_becomes_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, size=(40, 60, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(tmp_path / "rgba.png")
    expected = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(load_xray(tmp_path / "rgba.png"), expected, atol=1e-6)
    assert UniMedIImageProcessor()(tmp_path / "rgba.png")["pixel_values"].shape == (1, 3, 224, 224)


def test_16bit_png_is_scaled_by_its_true_range(tmp_path):
    ramp = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit-like content in 16 bits
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")  # really stored as 16-bit
    gray = load_xray(tmp_path / "deep.png")
    np.testing.assert_allclose(gray, (ramp - 1000.0) / 4000.0, atol=1e-6)
    assert len(np.unique(gray)) > 1000  # not clipped or quantised to 8 bits


def test_corrupt_and_truncated_jpegs_name_the_file(tmp_path, xray_jpeg_paths):
    (tmp_path / "garbage.jpg").write_bytes(b"definitely not a jpeg" * 50)
    with pytest.raises(ValueError, match=r"garbage\.jpg: not a readable image"):
        load_xray(tmp_path / "garbage.jpg")
    (tmp_path / "truncated.jpeg").write_bytes(xray_jpeg_paths[0].read_bytes()[:20_000])
    with pytest.raises(ValueError, match=r"truncated\.jpeg: not a readable image"):
        UniMedIImageProcessor()(tmp_path / "truncated.jpeg")


# --- paths, types, arrays, settings -----------------------------------------------------------------------------


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.nii\.gz: no such file or folder"):
        load_ct(tmp_path / "nowhere.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.png: no such file or folder"):
        UniMedIImageProcessor()(str(tmp_path / "nowhere.png"))


def test_unknown_extensions_are_named(tmp_path):
    (tmp_path / "scan.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"scan\.txt: unknown CT file type"):
        load_ct(tmp_path / "scan.txt")
    with pytest.raises(ValueError, match=r"scan\.txt: unknown X-ray file extension '\.txt'"):
        load_xray(tmp_path / "scan.txt")


def test_wrong_array_rank():
    with pytest.raises(ValueError, match=r"<array>: a CT array must be 3-D \(D, H, W\), got shape \(64, 64\)"):
        load_ct(np.zeros((64, 64)), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match=r"<array>: X-ray array must be .*got shape \(2, 3, 4, 5, 6\)"):
        load_xray(np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(ValueError, match=r"<array>: cannot find a channel axis .* \(7, 8, 9\)"):
        load_xray(torch.zeros(7, 8, 9))


def test_array_without_spacing():
    with pytest.raises(ValueError, match=r"<array>: spacing \(mm along D, H, W\) is required"):
        load_ct(np.zeros((8, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"<array>: shape \(8, 8, 8\) is not the processor grid .*load_ct"):
        UniMedIVolumeProcessor()(np.zeros((8, 8, 8), dtype=np.float32))


@pytest.mark.parametrize("spacing", [(0, 1, 1), (1, -2, 1), (1, 1, float("nan")), (1, 1)])
def test_non_positive_or_malformed_spacing(spacing):
    with pytest.raises(ValueError, match=r"<array>: spacing must be three positive finite mm values"):
        load_ct(np.zeros((8, 8, 8), dtype=np.float32), spacing=spacing)


def test_zero_voxel_size_in_a_nifti_affine(tmp_path):
    path = save_nifti(tmp_path / "flat.nii", np.zeros((8, 8, 4), dtype=np.int16))
    header = bytearray(path.read_bytes())
    header[296:312] = np.zeros(4, dtype="<f4").tobytes()  # srow_y: the second voxel axis gets no extent
    path.write_bytes(bytes(header))
    with pytest.raises(
        ValueError, match=r"flat\.nii: spacing must be three positive finite mm values, got \[1\.0, 0\.0"
    ):
        load_ct(path)


def test_spacing_is_refused_for_files(ct_mask_path):
    with pytest.raises(ValueError, match=r"mask\.nii\.gz: spacing is only for arrays"):
        load_ct(ct_mask_path, spacing=(1, 1, 1))


def test_unsupported_input_types():
    with pytest.raises(TypeError, match="cannot read a CT from dict"):
        load_ct({"hu": 1})
    with pytest.raises(TypeError, match="cannot read an X-ray from BytesIO"):
        load_xray(io.BytesIO(b""))


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"hu_window": (1000, -1000)}, "hu_window must be"),
        ({"target_spacing": (1.0, 1.0, 1.0)}, "target_spacing needs fit_mode='crop_or_pad'"),
        ({"fit_mode": "stretch"}, "fit_mode must be one of"),
        ({"slab_image_reduction": "max"}, r"slab_image_reduction must be one of \('central', 'mean'\), got 'max'"),
        ({"orientation": "SPX"}, "orientation must be three axis codes"),
        ({"orientation": "SSL"}, "orientation must be three axis codes"),
        ({"flip_axes": [3]}, "flip_axes must be within"),
        ({"image_std": 0.0}, "image_std must be positive"),
    ],
)
def test_bad_volume_processor_settings(settings, problem):
    with pytest.raises(ValueError, match=problem):
        UniMedIVolumeProcessor(**settings)


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"crop_size": 300}, "crop_size must be in"),
        ({"image_mean": [0.5, 0.5]}, "image_mean needs 1 or 3 values"),
        ({"image_std": [1.0, 0.0, 1.0]}, "image_std must be positive"),
    ],
)
def test_bad_image_processor_settings(settings, problem):
    with pytest.raises(ValueError, match=problem):
        UniMedIImageProcessor(**settings)


def test_multiframe_dicom_is_not_one_xray(tmp_path, dicom_ct_slice_path):
    dataset = pydicom.dcmread(dicom_ct_slice_path)
    stacked = copy.deepcopy(dataset)
    stacked.NumberOfFrames = 2
    stacked.PixelData = np.stack([dataset.pixel_array] * 2).tobytes()
    stacked.save_as(tmp_path / "two_frames.dcm")
    with pytest.raises(ValueError, match=r"two_frames\.dcm: multi-frame DICOM \(2 frames\) is not a single X-ray"):
        load_xray(tmp_path / "two_frames.dcm")
    with pytest.raises(ValueError, match=r"two_frames\.dcm: multi-frame DICOM without PerFrameFunctionalGroups"):
        load_ct(tmp_path / "two_frames.dcm")


def test_nan_pixels_in_an_xray_array():
    image = np.random.default_rng(0).uniform(0, 4000, size=(32, 32)).astype(np.float32)
    image[3, 4] = np.nan
    with pytest.raises(ValueError, match="<array>: image holds NaN or infinite pixel values"):
        UniMedIImageProcessor()(image)
