"""CT loading (NIfTI, DICOM series, multi-frame DICOM, arrays) and the CT volume processor, on real data."""

import copy
import itertools

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset

from modeling_unimedi.loading_unimedi import CANONICAL_ORIENTATION, CTVolume, load_ct
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

GRID = (32, 128, 128)
LEFT_LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left")
RIGHT_LOBES = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
LUNG_LOBES = LEFT_LOBES + RIGHT_LOBES


@pytest.fixture(scope="module")
def ct(ct_nifti_path) -> CTVolume:
    return load_ct(ct_nifti_path)


@pytest.fixture(scope="module")
def mask(ct_mask_path) -> CTVolume:
    return load_ct(ct_mask_path)


def centroid(mask: CTVolume, labels: dict[str, int], names) -> np.ndarray:
    """Mean (D, H, W) voxel index of the structures ``names``."""
    return np.argwhere(np.isin(mask.hu, [labels[name] for name in names])).mean(axis=0)


def test_real_ct_comes_out_on_the_grid_in_the_model_range(ct_nifti_path):
    values = UniMedIVolumeProcessor()(ct_nifti_path)["volume_values"]
    assert values.shape == (1, 1, *GRID) and values.dtype == torch.float32
    # Air outside the body windows to 0 and cortical bone (> 1000 HU) to 1, normalised to -1 and 1: the whole range is
    # used, nothing beyond.
    assert values.min() == -1.0 and values.max() == 1.0


def test_load_ct_reorients_the_las_file_to_the_canonical_axes(ct, mask):
    assert CANONICAL_ORIENTATION == "SPL"
    assert ct.hu.shape == mask.hu.shape == (133, 512, 512)  # stored (L, A, S) = (512, 512, 133)
    assert ct.spacing == pytest.approx((2.5, 0.703125, 0.703125))
    assert ct.hu.dtype == np.float32 and (ct.hu.min(), ct.hu.max()) == (-2048.0, 3071.0)


def test_mask_places_left_right_superior_anterior_where_documented(mask, ct_mask_labels):
    left, right = centroid(mask, ct_mask_labels, LEFT_LOBES), centroid(mask, ct_mask_labels, RIGHT_LOBES)
    width = mask.hu.shape[2]
    assert left[2] > width / 2 > right[2]  # W runs patient right -> left
    upper = centroid(mask, ct_mask_labels, ["lung_upper_lobe_left", "lung_upper_lobe_right"])
    assert upper[0] > centroid(mask, ct_mask_labels, ["liver"])[0]  # D runs inferior -> superior
    heart, spine = centroid(mask, ct_mask_labels, ["heart"]), centroid(mask, ct_mask_labels, ["spinal_cord"])
    assert heart[1] < spine[1]  # H runs anterior -> posterior
    assert centroid(mask, ct_mask_labels, ["sternum"])[1] < heart[1]


def test_mask_labels_survive_loading_unchanged(ct_mask_path, mask):
    stored = np.asarray(nib.load(ct_mask_path).dataobj)
    assert stored.dtype == np.uint8 and mask.hu.dtype == np.float32
    # Every label exactly as stored: the (L, A, S) array transposed to (S, A, L) with A flipped to P, nothing blended.
    assert np.array_equal(mask.hu, stored.transpose(2, 1, 0)[:, ::-1, :])


def test_processed_ct_agrees_with_the_mask_on_the_grid(ct, mask, ct_mask_labels):
    processor = UniMedIVolumeProcessor()
    values = processor([ct])["volume_values"][0, 0]
    labels = F.interpolate(torch.from_numpy(mask.hu)[None, None], size=GRID, mode="nearest")[0, 0]
    lungs = torch.isin(labels, torch.tensor([float(ct_mask_labels[name]) for name in LUNG_LOBES]))
    heart = labels == ct_mask_labels["heart"]
    # Window [-1000, 1000] HU -> [-1, 1]: HU / 1000.
    assert values[lungs].mean() < -0.7  # aerated lung, about -850 HU
    assert 0.0 < values[heart].mean() < 0.5  # myocardium and (contrast-enhanced) blood, 0-500 HU
    left = torch.isin(labels, torch.tensor([float(ct_mask_labels[name]) for name in LEFT_LOBES]))
    assert torch.nonzero(left)[:, 2].float().mean() > GRID[2] / 2


def test_any_stored_orientation_loads_to_the_same_canonical_array(tmp_path, ct_mask_path, mask):
    image = nib.load(ct_mask_path)
    for codes in (("R", "P", "I"), ("S", "L", "A"), ("P", "S", "R")):
        path = tmp_path / f"mask_{''.join(codes)}.nii"  # uncompressed: fast to write
        start = nib.orientations.io_orientation(image.affine)
        transform = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(codes))
        reoriented = image.as_reoriented(transform)
        assert nib.aff2axcodes(reoriented.affine) == codes
        nib.save(reoriented, path)
        loaded = load_ct(path)
        assert np.array_equal(loaded.hu, mask.hu)
        assert loaded.spacing == pytest.approx(mask.spacing)


def test_nibabel_image_and_array_inputs(ct_mask_path, mask):
    from_image = load_ct(nib.load(ct_mask_path))
    assert np.array_equal(from_image.hu, mask.hu)
    from_tensor = load_ct(torch.from_numpy(mask.hu[:8, :16, :16]), spacing=(2.5, 0.7, 0.7))
    np.testing.assert_array_equal(from_tensor.hu, mask.hu[:8, :16, :16])
    assert from_tensor.spacing == (2.5, 0.7, 0.7) and from_tensor.source == "<array>"


def test_dicom_series_is_ordered_by_position_not_by_name_or_instance_number(tmp_path, write_dicom_ct_series):
    offsets = [10.0, 0.0, 20.0, 5.0, 15.0]  # slice k (pixels + 10 k) sits offsets[k] mm along the normal (+z, S)
    stored = write_dicom_ct_series(tmp_path / "series", offsets)
    ct = load_ct(tmp_path / "series")
    order = np.argsort(offsets)  # inferior -> superior
    assert ct.hu.shape == (5, 128, 128)
    # Rows run +y (posterior) and columns +x (patient left) in LPS: no flips; HU = stored - 1024 (the rescale).
    np.testing.assert_array_equal(ct.hu, np.stack([stored[k] for k in order]).astype(np.float32) - 1024)
    assert ct.spacing == pytest.approx((5.0, 0.661468, 0.661468))


def test_dicom_series_with_flipped_columns_and_a_downward_normal(tmp_path, write_dicom_ct_series):
    # Columns run -y (anterior): normal = x * -y = -z, so increasing offsets go inferior.
    offsets = [0.0, 2.5, 5.0, 7.5]
    stored = write_dicom_ct_series(tmp_path / "series", offsets, orientation=(1, 0, 0, 0, -1, 0))
    ct = load_ct(tmp_path / "series")
    expected = np.stack([stored[k][::-1, :] for k in reversed(range(4))]).astype(np.float32) - 1024
    np.testing.assert_array_equal(ct.hu, expected)
    assert ct.spacing == pytest.approx((2.5, 0.661468, 0.661468))


def test_multiframe_dicom_matches_the_same_series_as_files(tmp_path, dicom_ct_slice_path, write_dicom_ct_series):
    offsets = [5.0, 0.0, 10.0]
    stored = write_dicom_ct_series(tmp_path / "series", offsets)
    template = pydicom.dcmread(dicom_ct_slice_path)
    enhanced = copy.deepcopy(template)
    origin = np.asarray(template.ImagePositionPatient, dtype=np.float64)
    enhanced.NumberOfFrames = len(offsets)
    enhanced.PixelData = np.stack(stored).astype(np.int16).tobytes()
    shared = Dataset()
    shared.PlaneOrientationSequence = [_item(ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0])]
    shared.PixelMeasuresSequence = [_item(PixelSpacing=list(template.PixelSpacing))]
    shared.PixelValueTransformationSequence = [_item(RescaleSlope=1.0, RescaleIntercept=-1024.0)]
    enhanced.SharedFunctionalGroupsSequence = [shared]
    enhanced.PerFrameFunctionalGroupsSequence = [
        _item(PlanePositionSequence=[_item(ImagePositionPatient=[float(v) for v in origin + [0, 0, z]])])
        for z in offsets
    ]
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleIntercept"):
        delattr(enhanced, keyword)  # the geometry must come from the functional groups
    enhanced.save_as(tmp_path / "enhanced.dcm")
    from_frames, from_files = load_ct(tmp_path / "enhanced.dcm"), load_ct(tmp_path / "series")
    np.testing.assert_array_equal(from_frames.hu, from_files.hu)
    assert from_frames.spacing == pytest.approx(from_files.spacing)


def _item(**elements) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def test_arrays_on_the_grid_are_only_windowed():
    hu = np.random.default_rng(0).integers(-3000, 3000, size=(2, *GRID)).astype(np.int16)
    values = UniMedIVolumeProcessor()(hu)["volume_values"]  # a (B, D, H, W) batch of stored int16 HU
    expected = (np.clip((hu.astype(np.float32) + 1000) / 2000, 0, 1)[:, None] - 0.5) / 0.5
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-6)
    single = UniMedIVolumeProcessor()([torch.from_numpy(hu[1])], return_tensors="np")["volume_values"]
    assert isinstance(single, np.ndarray)
    np.testing.assert_allclose(single[0], expected[1], atol=1e-6)


def test_window_mean_and_std_are_applied_after_windowing():
    hu = np.linspace(-1500, 1500, num=int(np.prod(GRID)), dtype=np.float32).reshape(GRID)
    plain = UniMedIVolumeProcessor()(hu)["volume_values"]
    custom = UniMedIVolumeProcessor(hu_window=(-500, 500), image_mean=0.5, image_std=0.25)(hu)["volume_values"]
    expected = (np.clip((hu + 500) / 1000, 0, 1) - 0.5) / 0.25
    np.testing.assert_allclose(custom[0, 0].numpy(), expected, atol=1e-5)
    assert not torch.allclose(plain, custom)


def test_resample_to_grid_area_averages_when_shrinking():
    stripes = np.where(np.arange(64) % 2 == 0, -1000.0, 1000.0).astype(np.float32)
    volume = np.broadcast_to(stripes, (8, 64, 64)).copy()  # 1-voxel stripes along W
    grid = UniMedIVolumeProcessor(volume_size=(8, 16, 16)).resample_to_grid(CTVolume(volume, (1.0, 1.0, 1.0), "x"))
    assert grid.shape == (8, 16, 16) and grid.dtype == np.float32
    np.testing.assert_allclose(grid, 0.0, atol=1e-3)  # every 4 stripes average out, no aliasing


def test_small_volume_is_upsampled_to_the_grid():
    ramp = np.broadcast_to(np.linspace(-1000, 1000, 16, dtype=np.float32), (4, 8, 16)).copy()
    grid = UniMedIVolumeProcessor().resample_to_grid(CTVolume(ramp, (5.0, 1.0, 1.0), "small"))
    assert grid.shape == GRID
    assert np.all(np.diff(grid[0, 0]) >= 0)  # a linear ramp stays monotonic
    assert grid.min() >= -1000 and grid.max() <= 1000


def test_crop_or_pad_resamples_to_the_target_spacing_then_pads_with_air():
    rng = np.random.default_rng(0)
    volume = rng.uniform(-100, 100, size=(20, 50, 50)).astype(np.float32)
    processor = UniMedIVolumeProcessor(volume_size=(32, 64, 64), fit_mode="crop_or_pad", target_spacing=(2.5, 2, 2))
    grid = processor.resample_to_grid(CTVolume(volume, (5.0, 1.0, 1.0), "x"))  # -> (40, 25, 25) -> crop D, pad H W
    assert grid.shape == (32, 64, 64)
    assert np.all(grid[:, :19] == -1000) and np.all(grid[:, 44:] == -1000)
    assert np.all(grid[:, :, :19] == -1000) and np.all(grid[:, :, 44:] == -1000)
    inner = grid[:, 19:44, 19:44]
    assert inner.min() >= -100 and inner.max() <= 100 and inner.std() > 5


def test_orientation_setting_reorients_exactly():
    volume = np.random.default_rng(0).normal(size=(8, 12, 16)).astype(np.float32)
    ct = CTVolume(volume, (1.0, 2.0, 3.0), "x")
    canonical = UniMedIVolumeProcessor(volume_size=(8, 12, 16)).resample_to_grid(ct)
    np.testing.assert_array_equal(canonical, volume)
    mirrored = UniMedIVolumeProcessor(volume_size=(8, 12, 16), orientation="SPR").resample_to_grid(ct)
    np.testing.assert_array_equal(mirrored, volume[:, :, ::-1])
    transposed = UniMedIVolumeProcessor(volume_size=(12, 8, 16), orientation="PSL").resample_to_grid(ct)
    np.testing.assert_array_equal(transposed, volume.transpose(1, 0, 2))


def test_random_flips_only_when_training():
    hu = np.random.default_rng(0).uniform(-1000, 1000, size=GRID).astype(np.float32)
    processor = UniMedIVolumeProcessor(flip_axes=[2], flip_probability=1.0)
    evaluation = processor(hu)["volume_values"]
    np.testing.assert_allclose(evaluation[0, 0].numpy(), np.clip(hu / 1000, -1, 1), atol=1e-6)
    training = processor(hu, training=True)["volume_values"]
    torch.testing.assert_close(training, evaluation.flip(-1))
    torch.manual_seed(0)
    outputs = UniMedIVolumeProcessor(flip_axes=[0, 1, 2])([hu] * 16, training=True)["volume_values"]
    subsets = [axes for n in range(4) for axes in itertools.combinations((1, 2, 3), n)]
    drawn = [next(axes for axes in subsets if torch.equal(out, evaluation[0].flip(axes))) for out in outputs]
    assert len(set(drawn)) > 2  # each output is the volume flipped along a random subset of (D, H, W)


def test_settings_round_trip_through_save_and_load(tmp_path):
    processor = UniMedIVolumeProcessor(
        volume_size=(16, 64, 96),
        hu_window=(-1200, 600),
        orientation="SPR",
        target_spacing=(3.0, 1.5, 1.5),
        fit_mode="crop_or_pad",
        image_mean=0.4,
        image_std=0.3,
        flip_axes=[0, 2],
        flip_probability=0.25,
        slab_image_reduction="central",
    )
    processor.save_pretrained(tmp_path)
    reloaded = UniMedIVolumeProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    assert (reloaded.volume_size, reloaded.hu_window, reloaded.orientation) == ((16, 64, 96), (-1200, 600), "SPR")
    assert reloaded.target_spacing == (3.0, 1.5, 1.5) and reloaded.fit_mode == "crop_or_pad"
    assert (reloaded.image_mean, reloaded.image_std, reloaded.flip_axes) == (0.4, 0.3, (0, 2))
    assert reloaded.slab_image_reduction == "central"
    overridden = UniMedIVolumeProcessor.from_pretrained(tmp_path, hu_window=[-1000, 1000])
    assert overridden.hu_window == (-1000, 1000) and overridden.volume_size == (16, 64, 96)


def test_default_settings_round_trip(tmp_path):
    UniMedIVolumeProcessor().save_pretrained(tmp_path)
    reloaded = UniMedIVolumeProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == UniMedIVolumeProcessor().to_dict()
    assert reloaded.target_spacing is None and reloaded.volume_size == GRID and reloaded.slab_image_reduction == "mean"


def test_grid_spacing_describes_the_resampled_grid():
    ct = CTVolume(hu=np.zeros((64, 256, 200), np.float32), spacing=(2.5, 0.7, 0.8), source="<array>")
    assert UniMedIVolumeProcessor().grid_spacing(ct) == pytest.approx((5.0, 1.4, 1.25))
    # field of view is preserved: grid size x grid spacing == source size x source spacing
    processor = UniMedIVolumeProcessor(volume_size=(16, 64, 50))
    extent = [g * s for g, s in zip(processor.volume_size, processor.grid_spacing(ct))]
    assert extent == pytest.approx([64 * 2.5, 256 * 0.7, 200 * 0.8])
    cropped = UniMedIVolumeProcessor(fit_mode="crop_or_pad", target_spacing=(2.0, 2.0, 2.0))
    assert cropped.grid_spacing(ct) == (2.0, 2.0, 2.0)
    # another output orientation permutes the axes: W (patient left) first for "LPS"
    assert UniMedIVolumeProcessor(orientation="LPS", volume_size=(50, 64, 16)).grid_spacing(ct) == pytest.approx(
        (3.2, 2.8, 10.0)
    )
